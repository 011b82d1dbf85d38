"""The web page's state handling (library/app): the path sandbox, photo state kept in the prepared folder
(survives a reload), one training run per output folder, the mask brush, time left, the TOML the page
composes and the lines that say how to load the files."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.app import presets, training_runs
from library.app.photos import mask_from_editor
from library.app.state import PathRefused, Sandbox, StateError, Workspace
from library.models.base_model import family_named


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def roots(tmp_path):
    data, out, models = tmp_path / "data", tmp_path / "out", tmp_path / "models"
    models.mkdir()
    return Sandbox.make(data, out, models), data, out, models


# ------------------------------------------------------------------------------------------------ sandbox

def test_sandbox_accepts_paths_inside_and_refuses_escapes(roots, tmp_path):
    sb, data, out, models = roots
    assert sb.resolve(data / "photos" / "a.jpg") == (data / "photos" / "a.jpg").resolve()
    assert sb.resolve("photos/a.jpg", base=data) == (data / "photos" / "a.jpg").resolve()
    assert sb.resolve(models / "v1.safetensors") == (models / "v1.safetensors").resolve()
    for bad in ("/etc/passwd", str(data / ".." / "elsewhere"), "../../etc/passwd", "", "a\x00b"):
        with pytest.raises(PathRefused):
            sb.resolve(bad, base=data)
    # the models folder is read-only for the page
    with pytest.raises(PathRefused, match="outside the folders this page may write"):
        sb.resolve(models / "x.toml", write=True)
    # a symlink inside the data folder that points outside it is followed, then refused
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", data / "link")
    with pytest.raises(PathRefused):
        sb.resolve(data / "link")


def test_path_refused_is_one_line(roots):
    sb, *_ = roots
    with pytest.raises(PathRefused) as err:
        sb.resolve("/etc/pass\nwd")
    assert "\n" not in str(err.value) and str(err.value).startswith("/etc/pass / wd: outside")


# ------------------------------------------------------------------------------------------------ photos

def test_a_link_inside_the_data_folder_pointing_outside_is_refused_file_by_file(roots, tmp_path):
    from library.app.photos import details_markdown, prepare_kind

    sb, data, *_ = roots
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    (outside / "face.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    typed = data / "typed"
    typed.mkdir()
    (typed / "mine.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    os.symlink(outside / "face.png", typed / "theirs.png")
    os.symlink(outside / "passwd", typed / "notes.txt")
    files, refused = sb.files(typed)
    assert files == [(typed / "mine.png").resolve()]
    line = "a link to a file outside the data, output and models folders; not read"
    assert refused == [f"notes.txt: {line}", f"theirs.png: {line}"]

    # an upload that is a link out: prepare is refused in one line before it reads anything
    ws = Workspace(data)
    ws.uploads("source").mkdir(parents=True)
    os.symlink(outside / "face.png", ws.uploads("source") / "x.png")
    with pytest.raises(PathRefused) as err:
        prepare_kind(ws, "source")
    assert str(err.value) == f"{ws.uploads('source') / 'x.png'}: {line}; remove it, then prepare again"
    # a prepared item whose image links out is not listed, and the notes say why
    _item(ws.prepared("source"), "a", np.zeros((4, 4), np.uint8))
    _item(ws.prepared("source"), "b", np.zeros((4, 4), np.uint8))
    (ws.prepared("source") / "b.png").unlink()
    os.symlink(outside / "face.png", ws.prepared("source") / "b.png")
    assert [r["stem"] for r in ws.items("source")] == ["a"]
    with pytest.raises(StateError):
        ws.set_caption("source", "b", "x")
    assert f"- refused {ws.prepared('source') / 'b.png'}: {line}" in details_markdown(
        "source", ws.items("source"), ws.prepare_log("source"), ws.outside_links("source"))



def _item(folder: Path, stem: str, mask: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.png").write_bytes(_png(np.zeros(mask.shape + (3,), np.uint8)))
    (folder / f"{stem}.mask.png").write_bytes(_png(mask))
    (folder / f"{stem}.txt").write_text("a photo of a mcv1 person\n")
    (folder / f"{stem}.json").write_text(json.dumps({"image": f"{stem}.png", "kind": "source",
                                                     "warnings": ["small face"], "face_box": [1, 1, 3, 3]}))


def test_exclude_caption_and_mask_survive_a_reload(roots):
    sb, data, *_ = roots
    ws = Workspace(data)
    prepared = ws.prepared("source")
    _item(prepared, "a", np.zeros((4, 4), np.uint8))
    _item(prepared, "b", np.full((4, 4), 255, np.uint8))

    ws.set_excluded("source", "b", True)
    ws.set_caption("source", "a", "a photo of\na mcv1 person  smiling")
    new_mask = _png(np.full((4, 4), 255, np.uint8))
    ws.save_mask("source", "a", new_mask)

    again = Workspace(data)  # a reload: a new object reading the same folders
    items = {r["stem"]: r for r in again.items("source")}
    assert [(r["stem"], r["excluded"]) for r in again.items("source")] == [("a", False), ("b", True)]
    assert items["a"]["caption"] == "a photo of a mcv1 person smiling"
    assert items["a"]["mask_edited"] is True and items["b"]["mask_edited"] is False
    assert items["a"]["warnings"] == ["small face"]
    # excluded: all four files of b left the folder the trainer reads; the edited mask replaced a's
    assert sorted(p.name for p in prepared.glob("b*")) == []
    assert sorted(p.name for p in (prepared / "excluded").iterdir()) == ["b.json", "b.mask.png", "b.png", "b.txt"]
    assert (prepared / "a.mask.png").read_bytes() == new_mask
    orig = np.asarray(Image.open(prepared / "original_masks" / "a.mask.png"))
    assert orig.max() == 0  # the mask prepare made, kept

    again.set_excluded("source", "b", False)
    assert sorted(p.name for p in prepared.glob("b*")) == ["b.json", "b.mask.png", "b.png", "b.txt"]
    with pytest.raises(StateError):
        again.set_caption("source", "zzz", "x")
    with pytest.raises(PathRefused):
        again.set_caption("source", "../a", "x")


def test_painted_masks_and_captions_survive_preparing_again_and_photos_can_be_deleted(roots):
    sb, data, *_ = roots
    ws = Workspace(data)
    prepared = ws.prepared("source")
    for stem in ("a", "b", "c"):
        _item(prepared, stem, np.zeros((4, 4), np.uint8))
    painted = _png(np.full((4, 4), 255, np.uint8))
    ws.save_mask("source", "a", painted)
    ws.set_caption("source", "a", "my own words")
    ws.save_mask("source", "c", painted)
    # prepare again: it writes every item afresh (c's photo now another size)
    automatic = _png(np.full((4, 4), 7, np.uint8))
    for stem in ("a", "b"):
        _item(prepared, stem, np.full((4, 4), 7, np.uint8))
    _item(prepared, "c", np.zeros((6, 6), np.uint8))
    assert ws.reapply_edits("source") == ["c: the photo changed size; paint its mask again"]
    items = {r["stem"]: r for r in ws.items("source")}
    assert (prepared / "a.mask.png").read_bytes() == painted and items["a"]["mask_edited"] is True
    assert items["a"]["caption"] == "my own words"
    assert (prepared / "original_masks" / "a.mask.png").read_bytes() == automatic  # prepare's newest, kept
    assert items["b"]["caption"] == "a photo of a mcv1 person" and items["b"]["mask_edited"] is False
    assert items["c"]["mask_edited"] is False

    ws.uploads("source").mkdir(parents=True)
    (ws.uploads("source") / "a.jpg").write_bytes(b"x")
    rec = json.loads((prepared / "a.json").read_text())
    (prepared / "a.json").write_text(json.dumps({**rec, "source_file": "a.jpg"}))
    ws.delete("source", "a")
    assert [r["stem"] for r in ws.items("source")] == ["b", "c"]
    assert not (ws.uploads("source") / "a.jpg").exists() and not list(prepared.rglob("a.*"))


def test_prepare_log_round_trip(roots):
    _, data, *_ = roots
    ws = Workspace(data)
    assert ws.prepare_log("reference") == {"skipped": [], "warnings": []}
    ws.save_prepare_log("reference", [("x.jpg", "no face found")], [("", "only 1 usable image(s)")])
    assert Workspace(data).prepare_log("reference") == {"skipped": [["x.jpg", "no face found"]],
                                                        "warnings": [["", "only 1 usable image(s)"]]}


def test_brush_layers_set_and_clear_mask_pixels(tmp_path):
    mask = np.zeros((3, 4), np.uint8)
    mask[2, 3] = 255
    (tmp_path / "m.png").write_bytes(_png(mask))
    layer = np.zeros((3, 4, 4), np.uint8)
    layer[0, 1] = (255, 255, 255, 255)  # white stroke: trains
    layer[2, 3] = (0, 0, 0, 200)  # black stroke: does not train
    layer[1, 1] = (250, 250, 250, 0)  # transparent: untouched
    layer[1, 2] = (140, 130, 120, 10)  # light gray (mean 130 >= 128), faint but painted: trains
    out = np.asarray(Image.open(io.BytesIO(mask_from_editor(tmp_path / "m.png", [layer]))))
    expected = np.zeros((3, 4), np.uint8)
    expected[0, 1] = 255
    expected[1, 2] = 255
    assert out.tolist() == expected.tolist()


# ------------------------------------------------------------------------------------------------ runs

def test_second_start_is_refused_and_stop_frees_the_folder(tmp_path, fake_python):
    out = tmp_path / "run"
    pid = training_runs.start_run("[model]\n", out, python=fake_python)
    for _ in range(6000):  # the event: the started process has said what it was given (else Stop may come first)
        if "started " in (out / training_runs.LOG).read_text():
            break
        time.sleep(0.01)
    try:
        lock = json.loads((out / training_runs.LOCK).read_text())
        assert lock["pid"] == pid and lock["since"] == [1, 0]
        assert (out / training_runs.CONFIG).read_text() == "[model]\n"
        with pytest.raises(training_runs.RunRefused, match=rf"process {pid}\) is already using this output folder"):
            training_runs.start_run("[model]\n", out, python=fake_python)
        assert training_runs.read_lock(out)["pid"] == pid
    finally:
        assert training_runs.stop_run(out) == pid
    deadline = time.time() + 10
    while (out / training_runs.LOCK).exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not (out / training_runs.LOCK).exists()
    assert training_runs.read_lock(out) is None
    with pytest.raises(training_runs.RunRefused, match="no training run from this page"):
        training_runs.stop_run(out)
    log = (out / training_runs.LOG).read_text()
    assert log.startswith(f"{training_runs.START_MARK}\nstarted ") and log.split()[-4:] == ["--config", str(out / "app_config.toml"),
                                                                "--output_dir", str(out)]


def test_start_is_refused_while_a_run_from_the_terminal_holds_the_folder(tmp_path, fake_python):
    from library.training.run_lock import hold_output_folder

    out = tmp_path / "run"
    with hold_output_folder(out):  # what train_magicapture.py holds while it writes there
        with pytest.raises(training_runs.RunRefused, match=rf"process {os.getpid()}\) is already using this output folder"):
            training_runs.start_run("[model]\n", out, python=fake_python)
    assert not (out / training_runs.LOCK).exists() and not (out / training_runs.CONFIG).exists()


def test_stale_lock_of_a_dead_process_is_removed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / training_runs.LOCK).write_text(json.dumps({"pid": proc.pid, "started": 0}))
    assert training_runs.read_lock(out) is None
    assert not (out / training_runs.LOCK).exists()


def test_format_seconds():
    assert [training_runs.format_seconds(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]


# ------------------------------------------------------------------------------------------------ settings

def test_compose_writes_the_settings_and_keeps_the_presets_comments():
    preset = "# the paper's run\n[model]\npretrained = \"models/x.safetensors\"  # a file\n\n[phase1]\nsteps = 1200\n"
    s = presets.Settings(pretrained="/d/tiny", source_dir="/d/s", reference_dir="/d/r", output_dir="/o/run",
                         output_name="run", phase1_steps=2, phase2_steps=3, identity_weights="/d/a.pth")
    text = presets.compose(preset, s)
    assert text.startswith("# the paper's run\n[model]\npretrained = \"/d/tiny\"  # a file\n")
    import tomllib

    doc = tomllib.loads(text)
    assert doc == {"model": {"pretrained": "/d/tiny"}, "phase1": {"steps": 2},
                   "data": {"source_dir": "/d/s", "reference_dir": "/d/r"}, "phase2": {"steps": 3},
                   "tokens": {"source": "mcv1", "reference": "mcv2"}, "loss": {"identity_weights": "/d/a.pth"},
                   "output": {"dir": "/o/run", "name": "run"}}
    s.identity_weights = ""  # left empty: the preset's value stays
    kept = tomllib.loads(presets.compose(preset + "[loss]\nidentity_weights = \"d/a.pth\"\n", s))
    assert kept["loss"] == {"identity_weights": "d/a.pth"}


def test_presets_follow_the_family():
    offered = presets.available_presets()
    assert offered["paper (SD 1.5)"].name == "magicapture_sd15.toml"
    assert presets.preset_for_family("sd1") == "paper (SD 1.5)"
    assert presets.preset_for_family("sdxl") == "SDXL"  # ModelFamily.preset: magicapture_sdxl.toml
    assert presets.preset_for_family("sd2") is None
    # the model a preset names gets that preset (configs/demo.toml: data/tiny_sd), others the family's
    root = presets.CONFIGS.parent
    assert presets.preset_for_model(root / "data" / "tiny_sd", "sd1") == "demo (tiny model, CPU)"
    assert presets.preset_for_model(root / "data" / "other_sd", "sd1") == "paper (SD 1.5)"
    # two presets name models/v1-5-pruned-emaonly.safetensors: the first in PRESETS order
    assert presets.preset_for_model(root / "models" / "v1-5-pruned-emaonly.safetensors", "sd1") == "paper (SD 1.5)"


def test_usage_lines_name_the_files_and_prompts():
    from library.app.results import usage_lines
    from library.config import Config

    cfg = Config()
    cfg.output.name = "me"
    text = usage_lines(cfg)
    assert "a photo of a mcv1 person in the style of mcv2 <lora:me:0.6>" in text
    assert "a photo of a embedding:mcv1 person in the style of embedding:mcv2" in text
    assert "a photo of a <mcv1> person in the style of <mcv2>" in text
    assert "`models/loras/`" in text and "`models/Lora/`" in text


def test_strokes_are_where_the_composite_differs_from_the_background():
    from library.app.photos import strokes

    bg = np.full((2, 3, 3), 100, np.uint8)
    comp = bg.copy()
    comp[0, 2] = (255, 255, 255)  # a white stroke
    comp[1, 0] = (104, 100, 100)  # within 8 levels: not a stroke
    layer = strokes(Image.fromarray(bg), Image.fromarray(comp))
    assert layer[..., 3].tolist() == [[0, 0, 255], [0, 0, 0]]
    assert layer[0, 2, :3].tolist() == [255, 255, 255]


def test_start_check_refuses_a_toml_that_reads_outside_the_folders(roots, tmp_path, monkeypatch):
    import library.training.preflight

    monkeypatch.setattr(library.training.preflight, "check_run_inputs", lambda cfg: None)  # the folders are empty
    sb, data, out, _ = roots
    for d in ("src", "ref", "model"):
        (data / d).mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    ok = (f'[model]\npretrained = "{data / "model"}"\n[data]\nsource_dir = "{data / "src"}"\n'
          f'reference_dir = "{data / "ref"}"\n[output]\ndir = "{out / "run"}"\n')
    training_runs.check_config(ok, out / "run", sb)  # inside: accepted
    assert not (out / "run" / ".app_check.toml").exists()
    with pytest.raises(PathRefused, match=rf"^{outside}: outside the folders this page may read"):
        training_runs.check_config(ok.replace(str(data / "model"), str(outside)), out / "run", sb)
    with pytest.raises(PathRefused, match="may write"):
        training_runs.check_config(ok.replace(str(out / "run"), str(outside)), out / "run", sb)


def test_details_list_every_photo_warning_and_skip():
    from library.app.photos import details_markdown

    items = [{"stem": "a", "excluded": False, "mask_edited": True, "warnings": ["small face", "rotated 90"]},
             {"stem": "b", "excluded": True, "warnings": []}]
    log = {"skipped": [["c.jpg", "no face found"]], "warnings": [["", "only 2 usable image(s)"]]}
    assert details_markdown("source", items, log) == (
        "**source**: 2 photo(s), 1 training\n\n"
        "- `a` (trains, mask edited): small face; rotated 90\n"
        "- `b` (excluded): no warnings\n"
        "- skipped `c.jpg`: no face found\n"
        "- note: only 2 usable image(s)\n")


def test_start_checks_speak_of_what_the_user_chose(roots):
    sb, data, out, _ = roots
    with pytest.raises(ValueError, match="^the config is empty: choose a base model and a preset, then press "
                                         "Compose config$"):
        training_runs.check_config("  \n", out / "run", sb)
    with pytest.raises(ValueError) as err:
        training_runs.check_config("[model]\npretrained = \"\"\n", out / "run", sb)
    assert str(err.value).startswith("the config: model.pretrained is empty") and ".app_check" not in str(err.value)
    (data / "src").mkdir()  # inside the folders, but not prepared: the trainer's cheap check says so
    (data / "ref").mkdir()
    with pytest.raises(ValueError, match="src"):
        training_runs.check_config(f'[model]\npretrained = "{data / "src"}"\n[data]\nsource_dir = "{data / "src"}"\n'
                                   f'reference_dir = "{data / "ref"}"\n[output]\ndir = "{out / "run"}"\n',
                                   out / "run", sb)


def test_messages_for_people_have_project_paths_and_the_pages_words():
    from library.app.state import PROJECT, for_people

    assert for_people(f"stopped in phase 2 at step 3/20: saved {PROJECT}/out/t1/checkpoint-p2-000003; continue with "
                      "--resume latest") == ("stopped in phase 2 at step 3/20: saved out/t1/checkpoint-p2-000003; "
                                             "press Resume to continue")
    assert training_runs.error_line(ValueError(f"{PROJECT}/models/x.ckpt: refused: not a plain-tensor pickle")) == (
        "error: models/x.ckpt: refused: a file that could run code when opened, so it is not opened")


def test_presets_set_steps_and_resolution_and_the_demo_is_short():
    assert presets.preset_values("demo (tiny model, CPU)") == {"steps1": 40, "steps2": 40, "resolution": 256}
    assert presets.preset_values("paper (SD 1.5)")["resolution"] == 512
    s = presets.Settings(pretrained="m", source_dir="s", reference_dir="r", output_dir="o", output_name="n",
                         phase1_steps=40, phase2_steps=40, resolution=128)
    assert "resolution = 128" in presets.compose(presets.read_preset("demo (tiny model, CPU)"), s)


def test_the_model_picker_lists_models_with_their_family(tiny_model, tmp_path):
    folder, single = tiny_model
    models = tmp_path / "models"
    (models / "sd").mkdir(parents=True)
    os.symlink(folder, models / "tiny")
    os.symlink(single, models / "sd" / "tiny.safetensors")
    (models / "small.safetensors").write_bytes(b"x" * 100)  # an embedding-sized file: not a base model
    (models / "page.ckpt").write_bytes(b"<html>" + b"x" * (2 << 20))
    found = presets.model_candidates([models])
    assert [p.relative_to(models).as_posix() for p in found] == ["page.ckpt", "tiny", "sd/tiny.safetensors"]
    labels = [presets.model_choice(p) for p in found]
    assert labels[0].startswith("not usable: ") and "page.ckpt" in labels[0]
    assert labels[1].startswith("an SD 1.x") and labels[2].startswith("an SD 1.x")


# ------------------------------------------------------------------------------------------------ DiT bases

@pytest.fixture(scope="module")
def tiny_dits(tmp_path_factory):
    """A models folder holding a tiny Z-Image and a tiny FLUX.2 Klein 4B and 9B as diffusers folders, and
    the Z-Image's ComfyUI split files (testkit/tiny_zimage.py, tiny_klein.py)."""
    from testkit.tiny_klein import save_klein_model
    from testkit.tiny_zimage import save_zimage_model

    models = tmp_path_factory.mktemp("dit") / "models"
    zimage, split = save_zimage_model(models / "z_image")
    save_klein_model(models / "klein4b", "4b")
    save_klein_model(models / "klein9b", "9b")
    return models, zimage, split


@pytest.mark.slow  # builds three tiny DiT models
def test_the_model_picker_shows_the_dit_families_and_picks_their_presets(tiny_dits):
    models, _, _ = tiny_dits
    found = {p.name: p for p in presets.model_candidates([models])}
    assert {"z_image", "klein4b", "klein9b"} <= set(found)
    expected = {"z_image": ("zimage", "a Z-Image model", "Z-Image"),
                "klein4b": ("klein4b", "a FLUX.2 Klein 4B model", "FLUX.2 Klein"),
                "klein9b": ("klein9b", "a FLUX.2 Klein 9B model", "FLUX.2 Klein")}
    for name, (family, label, preset) in expected.items():
        assert presets.model_choice(found[name]).startswith(label), presets.model_choice(found[name])
        assert presets.identify_model(found[name])[0] == family
        assert presets.preset_for_model(found[name], family) == preset
        assert presets.available_presets()[preset].name == family_named(family).preset
        assert not presets.is_split_transformer(found[name], family)  # a folder holds every part


@pytest.mark.slow  # builds three tiny DiT models
def test_a_transformer_file_alone_asks_for_the_other_parts(tiny_dits, tmp_path):
    models, _, split = tiny_dits
    family, text = presets.identify_model(split.transformer)
    assert family == "zimage" and presets.is_split_transformer(split.transformer, family)
    assert text.startswith("a Z-Image model") and text.endswith("give its text encoder, VAE and tokenizer below")
    assert presets.preset_for_model(split.transformer, family) == "Z-Image"
    # the Start check's line, for people: what is missing, nothing else
    where = presets.missing_split_files(str(split.transformer), "", "", "")
    assert where.endswith(" is a Z-Image transformer file alone (ComfyUI's split files): also give its "
                          "text-encoder file (Qwen3-4B), VAE file and tokenizer folder") and "\n" not in where
    assert presets.missing_split_files(str(split.transformer), str(split.text_encoder), "", "").endswith(
        "also give its VAE file and tokenizer folder")
    assert presets.missing_split_files(str(split.transformer), str(split.text_encoder), str(split.vae), "").endswith(
        "also give its tokenizer folder")
    assert presets.missing_split_files(str(split.transformer), str(split.text_encoder), str(split.vae),
                                       str(split.tokenizer)) is None
    assert presets.missing_split_files(str(models / "z_image"), "", "", "") is None  # a diffusers folder

    # Start refuses the composed config with that line, before the trainer's checks
    sb = Sandbox.make(tmp_path / "data", tmp_path / "out", split.transformer.parent.parent)
    (tmp_path / "data" / "src").mkdir(parents=True)
    s = presets.Settings(pretrained=str(split.transformer), source_dir=str(tmp_path / "data" / "src"),
                         reference_dir=str(tmp_path / "data" / "src"), output_dir=str(tmp_path / "out" / "run"),
                         output_name="run", phase1_steps=1, phase2_steps=1, vae=str(split.vae))
    text = presets.compose(presets.read_preset("Z-Image"), s)
    assert f'vae = "{split.vae}"' in text and 'text_encoder = ""' in text
    with pytest.raises(ValueError, match=r"transformer file alone \(ComfyUI's split files\): also give its "
                                         r"text-encoder file \(Qwen3-4B\) and tokenizer folder$"):
        training_runs.check_config(text, tmp_path / "out" / "run", sb)


@pytest.mark.slow  # trains a tiny Z-Image in a subprocess
def test_a_zimage_run_started_from_the_page_trains_and_exports(tiny_dits, tmp_path):
    """The page's own path: the family's preset composed with the page's settings, its Start check, the
    training subprocess; the run ends finished, with the transformer LoRA and the Qwen3 embeddings."""
    from library.app import runs
    from testkit.tiny import write_prepared

    models, zimage, _ = tiny_dits
    data, out = tmp_path / "data", tmp_path / "out"
    source = write_prepared(data / "source", "source", "mcv1", seed=1)
    reference = write_prepared(data / "reference", "reference", "mcv2", seed=2)
    sb = Sandbox.make(data, out, models)
    label = presets.preset_for_model(zimage, "zimage")
    s = presets.Settings(pretrained=str(zimage), source_dir=str(source), reference_dir=str(reference),
                         output_dir=str(out / "zrun"), output_name="zrun", phase1_steps=1, phase2_steps=2, resolution=64)
    text = presets.compose(presets.read_preset(label), s)
    # the CPU: no 8-bit optimiser kernels, fp32
    text = text.replace('name = "AdamW8bit"', 'name = "AdamW"').replace('mixed_precision = "bf16"', 'mixed_precision = "no"')
    training_runs.check_config(text, out / "zrun", sb)
    training_runs.start_run(text, out / "zrun")
    deadline = time.monotonic() + 600  # generous: CI may be loaded many times over; the event is the lock's release
    while (training_runs.read_lock(out / "zrun") is not None or (out / "zrun" / training_runs.LOCK).exists()) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    log = (out / "zrun" / training_runs.LOG).read_text()
    assert runs.run_info(out / "zrun").state_text() == "finished: phase 2 step 2/2", log[-2000:]
    assert (out / "zrun" / "zrun.safetensors").is_file() and (out / "zrun" / "mcv1.safetensors").is_file()
