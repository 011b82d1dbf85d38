"""The page's layout (Gradio): Photos, Train, Results. Each handler reads the folders afresh (nothing lives
only in the browser) and shows a failure as the one-line ``error: ...`` the command line prints."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import gradio as gr
import pandas as pd

from library.app import photos, presets, results, runs, training_runs
from library.app.state import KINDS, Sandbox, Workspace, relative, within
from library.files.images import IMAGE_EXTENSIONS
from library.files.messages import one_line
from library.files.text import read_text_file

log = logging.getLogger(__name__)
# for launch(head=...): strokes begun beside the photo in the mask editor paint (see the file's comment)
HEAD = f"<script>{read_text_file(Path(__file__).with_name('brush_edge.js'))}</script>"
POLL_SECONDS = 2.0
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _guard(n_outputs: int):
    """Run a handler; on any exception return gr.update() for every output but the last, which gets the
    error's one line (never a traceback). The handler's last output must be the status text."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the page shows one line for every failure
                log.debug("handler %s failed", fn.__name__, exc_info=True)
                rest = [gr.update()] * (n_outputs - 1)
                return (*rest, training_runs.error_line(exc)) if n_outputs > 1 else training_runs.error_line(exc)

        return inner

    return wrap


def build_page(sandbox: Sandbox, data_dir: Path, output_dir: Path) -> gr.Blocks:
    """The Blocks app for `data_dir` (photos) and `output_dir` (runs); every typed path goes through `sandbox`."""
    ws = Workspace(data_dir)
    output_dir = Path(output_dir).resolve()

    def run_dir(name: str) -> Path:
        name = (name or "").strip()
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"output name {one_line(name)!r}: use one folder name, e.g. magicapture")
        return sandbox.resolve(output_dir / name, write=True)

    # ---------------------------------------------------------------- photos
    def gallery_items(kind: str) -> list[tuple]:
        return [(photos.overlay(Path(r["folder"]), r["stem"], r), photos.gallery_label(r)) for r in ws.items(kind)]

    def photo_views():
        notes = "\n".join(photos.details_markdown(k, ws.items(k), ws.prepare_log(k), ws.outside_links(k)) for k in KINDS)
        return gallery_items("source"), gallery_items("reference"), notes

    @_guard(4)
    def prepare(src_files, ref_files, src_folder, ref_folder, progress=gr.Progress(track_tqdm=True)):
        lines = []
        for kind, files, folder in (("source", src_files, src_folder), ("reference", ref_files, ref_folder)):
            if folder and folder.strip():
                found, refused = sandbox.files(folder)
                files = [*(files or []), *found]
                lines += [f"refused {r}" for r in refused]
            if files:
                added, refused = photos.add_uploads(ws, kind, files)
                lines += [f"refused {r}" for r in refused]
            if any(ws.uploads(kind).glob("*")) if ws.uploads(kind).is_dir() else False:
                progress(0, desc=f"prepare {kind}")
                summary = photos.prepare_kind(ws, kind)
                lines.append(summary.lines()[0])
        return (*photo_views(), "\n".join(lines) or "no photos given")

    def photo_size(img) -> str:  # where brush_edge.js finds the photo in the mask editor's canvas
        return f"<span data-width='{img.width}' data-height='{img.height}'></span>"

    def selected(kind: str, evt: gr.SelectData):
        rec = ws.items(kind)[evt.index]
        img = photos.overlay(Path(rec["folder"]), rec["stem"], rec)
        editor = {"background": img, "layers": [], "composite": img}
        return ({"kind": kind, "stem": rec["stem"]}, editor, rec["caption"], photos.item_caption(rec),
                photo_size(img))

    @_guard(5)
    def toggle_exclude(sel):
        if not sel:
            raise ValueError("select a photo first")
        rec = next(r for r in ws.items(sel["kind"]) if r["stem"] == sel["stem"])
        ws.set_excluded(sel["kind"], sel["stem"], not rec["excluded"])
        src, ref, details = photo_views()
        return src, ref, details, photos.item_caption({**rec, "excluded": not rec["excluded"]}), \
            f"{sel['stem']}: {'excluded from' if not rec['excluded'] else 'back in'} training"

    @_guard(9)
    def delete_photo(sel):
        if not sel:
            raise ValueError("select a photo first")
        ws.delete(sel["kind"], sel["stem"])
        # the editor and the Selected photo box let go of it: they showed a photo that is gone
        return (*photo_views(), None, None, "", "", "", f"{sel['stem']}: deleted (its upload too)")

    @_guard(4)
    def save_caption(sel, text):
        if not sel:
            raise ValueError("select a photo first")
        ws.set_caption(sel["kind"], sel["stem"], text)
        return (*photo_views(), f"{sel['stem']}: caption saved")

    @_guard(4)
    def save_mask(sel, edited):
        if not sel:
            raise ValueError("select a photo first")
        folder = ws.item_folder(sel["kind"], sel["stem"])
        edited = edited or {}
        layers = [x for x in edited.get("layers") or [] if x is not None and x.convert("RGBA").getextrema()[3][1] > 0]
        if not layers and edited.get("background") is not None and edited.get("composite") is not None:
            painted = photos.strokes(edited["background"], edited["composite"])  # an editor without layers
            layers = [painted] if painted[..., 3].any() else []
        if not layers:
            raise ValueError("paint on the photo first (white: trains, black: does not)")
        path = ws.save_mask(sel["kind"], sel["stem"], photos.mask_from_editor(folder / f"{sel['stem']}.mask.png", layers))
        return (*photo_views(), f"{sel['stem']}: mask saved to {path.name} (the original is in original_masks/)")

    # ---------------------------------------------------------------- train
    def model_changed(path):
        """(the Detected line, the preset, the split-files row shown for a DiT transformer file alone)."""
        try:
            p = sandbox.resolve(path)
            family, text = presets.identify_model(p)
        except Exception as exc:  # noqa: BLE001
            return training_runs.error_line(exc), gr.update(), gr.update()
        label = presets.preset_for_model(p, family)
        split = gr.update(visible=presets.is_split_transformer(p, family))  # hidden again for a folder
        return text, (gr.update(value=label) if label else gr.update()), split

    def model_list():
        folders = [r for r in sandbox.readable if r != output_dir]
        return [(f"{relative(p)}: {presets.model_choice(p)}", str(p)) for p in presets.model_candidates(folders)
                if within(p, sandbox.readable)]

    def model_picked(path):
        return (path, *model_changed(path)) if path else (gr.update(),) * 4

    def preset_changed(label):
        try:
            v = presets.preset_values(label)
        except Exception:  # noqa: BLE001 - no preset chosen yet
            return gr.update(), gr.update(), gr.update()
        return v["steps1"], v["steps2"], v["resolution"]

    def optional_path(text: str) -> str:
        return str(sandbox.resolve(text)) if text and text.strip() else ""

    @_guard(2)
    def compose(model, preset, name, steps1, steps2, resolution, tok_src, tok_ref, id_weights, te_file, vae_file,
                tok_dir):
        s = presets.Settings(
            pretrained=str(sandbox.resolve(model)), source_dir=str(ws.prepared("source")),
            reference_dir=str(ws.prepared("reference")), output_dir=str(run_dir(name)), output_name=name.strip(),
            phase1_steps=int(steps1), phase2_steps=int(steps2), resolution=int(resolution or 0),
            source_token=tok_src, reference_token=tok_ref,
            identity_weights=optional_path(id_weights), text_encoder=optional_path(te_file), vae=optional_path(vae_file),
            tokenizer=optional_path(tok_dir))
        return presets.compose(presets.read_preset(preset), s), "config composed; edit it below if needed"

    def launch(out: Path, text: str, resume: bool) -> str:
        other = runs.busy(output_dir)
        if other and other != out.name:  # one device: wait instead of training beside it
            runs.enqueue(text, out, resume)
            return f"{out.name} is queued: it starts when {other} ends (the list says so)"
        pid = training_runs.start_run(text, out, resume=resume)
        return f"{'resumed' if resume else 'started'} training {out.name} (process {pid})"

    hidden = gr.update(visible=False)

    @_guard(3)
    def start(name, text):
        out = run_dir(name)
        training_runs.check_config(text, out, sandbox)
        if runs.holder(out) is None and runs.has_run(out):  # a new start would overwrite its history
            info = runs.run_info(out)
            return (gr.update(visible=True),
                    f"{out.name} already holds a run ({info.state_text()}): resume it, start over (the old run is "
                    f"kept as {runs.keep_aside_name(out)}) or cancel", "")
        return hidden, "", launch(out, text, resume=False)

    @_guard(3)
    def resume(name, text):
        out = run_dir(name)
        training_runs.check_config(text, out, sandbox)
        return hidden, "", launch(out, text, resume=True)

    @_guard(3)
    def start_over(name, text):
        out = run_dir(name)
        training_runs.check_config(text, out, sandbox)
        kept = runs.keep_aside(out)
        return hidden, "", f"the old run is kept as {kept.name}; " + launch(out, text, resume=False)

    @_guard(1)
    def stop(name):
        out = run_dir(name)
        if runs.cancel(out):
            return f"{out.name} taken out of the queue"
        training_runs.stop_run(out)
        return f"asked {out.name} to stop: it saves a checkpoint after this step (Resume continues from it)"

    def run_table():
        return pd.DataFrame([i.row() for i in runs.list_runs(output_dir)], columns=runs.COLUMNS)

    def watch(name):
        try:
            runs.start_next(output_dir)
            table = run_table()
            out = run_dir(name)
            info = runs.run_info(out, waits_for=runs.busy(output_dir))
        except Exception as exc:  # noqa: BLE001
            return gr.update(), training_runs.error_line(exc), "", None, None, [], [], "", gr.update()
        held = training_runs.read_lock(out) or {}
        since = training_runs.overall_step(*(held.get("since") or [1, 0]), info.total) if held else 0
        bar = runs.progress_html(info, runs.speed(info, since), runs.device_memory(info.pid))
        losses, score_df = runs.chart_frames(info.history, info.total)
        return (table, info.state_text(), bar, losses, score_df, [str(p) for p in runs.pictures(out, "samples")[-4:]],
                [str(p) for p in runs.pictures(out, "attention")[-2:]], training_runs.tail(out / training_runs.LOG),
                gr.update(choices=[str(r) for r in table[runs.COLUMNS[0]]] if len(table) else []))

    def pick_run(evt: gr.SelectData):
        row = evt.row_value if getattr(evt, "row_value", None) else None
        return open_run(str(row[0]) if row else "")

    def open_run(picked):
        if not picked:
            return (gr.update(), *[gr.update()] * 12, "")
        text, v = runs.saved_config(run_dir(picked))
        if not text:
            return (picked, *[gr.update()] * 12, f"{picked}: no config kept in its folder")
        split = gr.update(visible=True) if any(v[k] for k in ("text_encoder", "tokenizer")) else gr.update()
        return (picked, text, v["model"], v["steps1"], v["steps2"], v["resolution"], v["tok_src"], v["tok_ref"],
                v["id_weights"], v["text_encoder"], v["vae"], v["tokenizer"], split,
                f"{picked}: its config is loaded; Resume continues it")

    # ---------------------------------------------------------------- results
    @_guard(3)
    def do_generate(name, prompt, negative, weight, seed, steps, n, upscale, progress=gr.Progress(track_tqdm=True)):
        out = run_dir(name)
        paths = results.generate_images(out, prompt, negative, weight, int(seed), int(steps), int(n),
                                        upscale=float(upscale) if upscale and float(upscale) > 1 else None)
        return results.gallery(out), downloads(name)[0], f"wrote {len(paths)} image(s) to {relative(out / 'generated')}"

    def downloads(name):
        try:
            out = run_dir(name)
            cfg = results.run_config(out)
        except Exception:  # noqa: BLE001 - no run there yet: say what to do, not an error
            note = f"no trained run named {one_line(name)!r} yet: train one on the Train tab (or pick it in the list)"
            off = gr.update(value=None, interactive=False)
            return off, off, off, note, "", None, []
        files = results.trained_files(cfg)
        words = (cfg.tokens.source, cfg.tokens.reference)

        def button(key):  # a button with no file behind it is greyed out; the note says which file is missing
            return gr.update(value=str(files[key]), interactive=True) if key in files else \
                gr.update(value=None, interactive=False)

        missing = results.missing_files(cfg)
        usage_md = "\n\n".join(x for x in (f"**{missing}**" if missing else "", results.usage_lines(cfg),
                                           results.EMBEDDING_NOTE.format(src=words[0])) if x)
        return (button("lora"), button(words[0]), button(words[1]), usage_md,
                results.composed_prompt(*words), scores_table(out), [str(p) for p in results.step_files(cfg)])

    def scores_table(out: Path):
        rows = results.evaluation_scores(out)
        return pd.DataFrame(rows, columns=["score", "mean", "std", "images"]) if rows else None

    def report_link(out: Path) -> str:
        report = out / "evaluation" / "report.html"
        if not report.is_file():
            return ""
        src = f"/gradio_api/file={report}"
        return (f"<a href='{src}' target='_blank'>open the report in a new tab</a>"
                f"<iframe src='{src}' style='width:100%;height:480px;border:1px solid #ccc'></iframe>")

    @_guard(3)
    def do_evaluate(name):
        out = run_dir(name)
        rc, tail = results.evaluate(out, ws.prepared("source"), ws.prepared("reference"))
        if rc != 0:
            raise RuntimeError(tail.splitlines()[-1] if tail else f"the evaluation stopped (status {rc})")
        return scores_table(out), report_link(out), f"evaluation written to {relative(out / 'evaluation')}"

    # ---------------------------------------------------------------- layout
    with gr.Blocks(title="MagiCapture") as page:
        gr.Markdown("# MagiCapture\nPhotos -> Train -> Results. Everything is kept in the data and output folders.")
        selection = gr.State(None)
        with gr.Tab("Photos", id="photos"):
            with gr.Row():
                src_files = gr.File(label="Source photos (the person)", file_count="multiple",
                                    file_types=list(IMAGE_EXTENSIONS), elem_id="src_files")
                ref_files = gr.File(label="Reference photos (the style)", file_count="multiple",
                                    file_types=list(IMAGE_EXTENSIONS), elem_id="ref_files")
            with gr.Row():
                src_folder = gr.Textbox(label="or a folder of source photos", elem_id="src_folder")
                ref_folder = gr.Textbox(label="or a folder of reference photos", elem_id="ref_folder")
            prep_btn = gr.Button("Prepare photos", variant="primary", elem_id="prepare")
            photo_status = gr.Textbox(label="Status", interactive=False, elem_id="photo_status")
            # the key here, not in the galleries' labels: a label longer than one line covers the first photos
            gr.Markdown("Red: the part of the photo that trains; blue: the face box; **⚠ n**: the photo has n "
                        "warnings. Click a photo to read them, edit its caption or paint its mask below.",
                        elem_id="gallery_key")
            with gr.Row():
                # 3 columns: Gradio's thumbnails are at least 100 px, and 5 overflowed half a 1000 px page
                src_gallery = gr.Gallery(label="Source", columns=3, height=340, elem_id="src_gallery",
                                         allow_preview=False)
                ref_gallery = gr.Gallery(label="Reference", columns=3, height=340, elem_id="ref_gallery",
                                         allow_preview=False)
            notes = gr.Markdown(elem_id="photo_notes")
            with gr.Row():
                editor = gr.ImageEditor(label="Correct the mask: white paints 'trains', black 'does not'",
                                        type="pil", brush=gr.Brush(colors=["#ffffff", "#000000"], color_mode="fixed"),
                                        layers=False, interactive=True, elem_id="mask_editor", height=360)
                with gr.Column():
                    mask_photo_size = gr.HTML(elem_id="mask_photo_size", container=False, padding=False)
                    # grows to the whole text: every warning of the photo shown beside it, never behind a scroll bar
                    item_info = gr.Textbox(label="Selected photo (its state, caption and every warning)", lines=4,
                                           max_lines=40, interactive=False, elem_id="item_info")
                    caption = gr.Textbox(label="Caption", elem_id="caption")
                    with gr.Row():
                        cap_btn = gr.Button("Save caption", elem_id="save_caption")
                        excl_btn = gr.Button("Exclude / include", elem_id="exclude")
                        mask_btn = gr.Button("Save mask", elem_id="save_mask")
                        del_btn = gr.Button("Delete photo", variant="stop", elem_id="delete_photo")
        with gr.Tab("Train", id="train"):
            runs_df = gr.Dataframe(headers=runs.COLUMNS, interactive=False, elem_id="runs", max_height=220,
                                   label="Runs in the output folder (from this page or a terminal); click one to "
                                         "load its config and watch it")
            run_pick = gr.Dropdown([], label="Open a run: its config goes into the form and the page watches it",
                                   elem_id="run_pick", value=None)
            default_preset = next(iter(presets.available_presets()), None)
            first = presets.preset_values(default_preset) if default_preset else {}
            with gr.Row():
                model_pick = gr.Dropdown(model_list(), label="Base models found (models and data folders)",
                                         elem_id="model_pick", value=None)
                model = gr.Textbox(label="Base model (file or diffusers folder)", elem_id="model")
                family = gr.Textbox(label="Detected", interactive=False, elem_id="family")
                preset = gr.Dropdown(list(presets.available_presets()), label="Preset", elem_id="preset",
                                     value=default_preset)
            # a Z-Image / FLUX.2 Klein transformer file alone (ComfyUI's split files) needs the other three
            with gr.Row(visible=False) as split_row:
                te_file = gr.Textbox(label="Text-encoder file (Qwen3 .safetensors)", elem_id="text_encoder_file")
                vae_file = gr.Textbox(label="VAE file (.safetensors)", elem_id="vae_file")
                tok_dir = gr.Textbox(label="Tokenizer folder (holds tokenizer.json)", elem_id="tokenizer_dir")
            with gr.Row():
                name = gr.Textbox(label="Output name", value="magicapture", elem_id="output_name")
                steps1 = gr.Number(label="Phase 1 steps", value=first.get("steps1", 0), precision=0, elem_id="steps1")
                steps2 = gr.Number(label="Phase 2 steps", value=first.get("steps2", 0), precision=0, elem_id="steps2")
                resolution = gr.Number(label="Resolution", value=first.get("resolution", 0), precision=0,
                                       elem_id="resolution")
                tok_src = gr.Textbox(label="Person token", value="mcv1", elem_id="tok_src")
                tok_ref = gr.Textbox(label="Style token", value="mcv2", elem_id="tok_ref")
                id_weights = gr.Textbox(label="Identity network (ArcFace .onnx/.pth)", elem_id="id_weights")
            compose_btn = gr.Button("Compose config", elem_id="compose")
            toml_box = gr.Textbox(label="Config (TOML; what Start runs; editable)", lines=14, max_lines=30,
                                  elem_id="toml")
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="start")
                stop_btn = gr.Button("Stop (saves a checkpoint)", elem_id="stop")
                resume_btn = gr.Button("Resume", elem_id="resume")
            with gr.Row(visible=False) as ask_row:
                ask_text = gr.Markdown(elem_id="ask")
                ask_resume = gr.Button("Resume it", elem_id="ask_resume")
                ask_over = gr.Button("Start over (the old run is kept)", elem_id="ask_over")
                ask_cancel = gr.Button("Cancel", elem_id="ask_cancel")
            train_status = gr.Textbox(label="Status", interactive=False, elem_id="train_status")
            progress_line = gr.Textbox(label="State", interactive=False, elem_id="progress")
            progress_bar = gr.HTML(elem_id="progress_bar")
            with gr.Row():
                # a fixed colour per series, whichever terms a run logs
                loss_plot = gr.LinePlot(x="step", y="value", color="term", label="Loss terms", elem_id="loss_plot",
                                        color_map=dict(zip(runs.LOSS_TERMS, SERIES_COLOURS)))
                score_plot = gr.LinePlot(x="step", y="value", color="score", label="Identity score (samples)",
                                         elem_id="score_plot", color_map=dict(zip(runs.SCORES, SERIES_COLOURS)))
            with gr.Row():
                samples = gr.Gallery(label="Latest samples", columns=4, height=220, elem_id="samples")
                attention = gr.Gallery(label="Attention", columns=2, height=220, elem_id="attention")
            log_tail = gr.Textbox(label="Log (its end)", lines=8, max_lines=8, interactive=False, autoscroll=True,
                                  elem_id="log_tail")
            timer = gr.Timer(POLL_SECONDS)
        with gr.Tab("Results", id="results") as results_tab:
            with gr.Row():
                prompt = gr.Textbox(label="Prompt (empty: the composed prompt)", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
            with gr.Row():
                weight = gr.Slider(0, 1.5, value=results.DEFAULT_LORA_WEIGHT, step=0.05, label="LoRA weight")
                seed = gr.Number(label="Seed", value=1, precision=0, elem_id="seed")
                gen_steps = gr.Number(label="Steps", value=25, precision=0, elem_id="gen_steps")
                n_images = gr.Number(label="Images", value=1, precision=0, elem_id="n_images")
                upscale = gr.Number(label="Upscale (1 = off)", value=1, elem_id="upscale")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
            res_status = gr.Textbox(label="Status", interactive=False, elem_id="results_status")
            res_gallery = gr.Gallery(label="Generated (settings in each caption)", columns=4, height=300,
                                     elem_id="generated")
            with gr.Row():
                dl_lora = gr.DownloadButton("Download LoRA", elem_id="dl_lora")
                dl_src = gr.DownloadButton("Download person embedding", elem_id="dl_src")
                dl_ref = gr.DownloadButton("Download style embedding", elem_id="dl_ref")
            usage = gr.Markdown(elem_id="usage")
            step_dl = gr.File(label="LoRA and embeddings saved every output.save_lora_every steps", file_count="multiple",
                              interactive=False, elem_id="step_files")
            eval_btn = gr.Button("Evaluate the generated images", elem_id="evaluate")
            eval_table = gr.Dataframe(headers=["score", "mean", "std", "images"], interactive=False,
                                      label="Evaluation scores (mean and spread over the generated images)",
                                      elem_id="evaluation")
            report = gr.HTML(elem_id="report")

        # events
        prep_btn.click(prepare, [src_files, ref_files, src_folder, ref_folder],
                       [src_gallery, ref_gallery, notes, photo_status])
        def select_source(evt: gr.SelectData):
            return selected("source", evt)

        def select_reference(evt: gr.SelectData):
            return selected("reference", evt)

        picked = [selection, editor, caption, item_info, mask_photo_size]
        src_gallery.select(select_source, None, picked)
        ref_gallery.select(select_reference, None, picked)
        excl_btn.click(toggle_exclude, [selection], [src_gallery, ref_gallery, notes, item_info, photo_status])
        cap_btn.click(save_caption, [selection, caption], [src_gallery, ref_gallery, notes, photo_status])
        mask_btn.click(save_mask, [selection, editor], [src_gallery, ref_gallery, notes, photo_status])
        del_btn.click(delete_photo, [selection], [src_gallery, ref_gallery, notes, *picked, photo_status])
        model.submit(model_changed, [model], [family, preset, split_row])
        model.blur(model_changed, [model], [family, preset, split_row])
        model_pick.change(model_picked, [model_pick], [model, family, preset, split_row])
        preset.change(preset_changed, [preset], [steps1, steps2, resolution])
        compose_btn.click(compose, [model, preset, name, steps1, steps2, resolution, tok_src, tok_ref, id_weights,
                                    te_file, vae_file, tok_dir], [toml_box, train_status])
        asked = [ask_row, ask_text, train_status]
        start_btn.click(start, [name, toml_box], asked)
        resume_btn.click(resume, [name, toml_box], asked)
        ask_resume.click(resume, [name, toml_box], asked)
        ask_over.click(start_over, [name, toml_box], asked)
        ask_cancel.click(lambda: (hidden, "", "cancelled: nothing started"), None, asked)
        stop_btn.click(stop, [name], [train_status])
        watch_outputs = [runs_df, progress_line, progress_bar, loss_plot, score_plot, samples, attention, log_tail,
                         run_pick]
        opened = [name, toml_box, model, steps1, steps2, resolution, tok_src, tok_ref, id_weights, te_file, vae_file,
                  tok_dir, split_row, train_status]
        runs_df.select(pick_run, None, opened)
        run_pick.input(open_run, [run_pick], opened)
        timer.tick(watch, [name], watch_outputs)
        gen_btn.click(do_generate, [name, prompt, negative, weight, seed, gen_steps, n_images, upscale],
                      [res_gallery, dl_lora, res_status])
        result_outputs = [dl_lora, dl_src, dl_ref, usage, prompt, eval_table, step_dl]
        name.change(downloads, [name], result_outputs)
        results_tab.select(downloads, [name], result_outputs)
        eval_btn.click(do_evaluate, [name], [eval_table, report, res_status])
        def on_load(n):
            try:
                generated = results.gallery(run_dir(n))
            except Exception:  # noqa: BLE001 - a bad name shows its error in the other fields
                generated = []
            try:
                shown = report_link(run_dir(n))
            except Exception:  # noqa: BLE001
                shown = ""
            return (*photo_views(), *watch(n), generated, *downloads(n), shown, gr.update(choices=model_list()))

        page.load(on_load, [name],
                  [src_gallery, ref_gallery, notes, *watch_outputs, res_gallery, *result_outputs, report, model_pick])
    return page
