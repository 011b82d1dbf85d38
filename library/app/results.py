"""The Results tab's work: generate with a run's trained files, list what was generated with its settings,
run and read the evaluation, and say how to load the files in A1111, Forge, ComfyUI and InvokeAI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from library.config import Config, composed_prompt, load_config
from library.files.images import png_text
from library.files.messages import one_line
from library.files.text import TextFileError, read_text_file

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LORA_WEIGHT = 0.6  # the weight the trainer's closing note suggests


def run_config(out_dir: Path) -> Config:
    """The config a run in `out_dir` used: effective_config.toml (written by the trainer) or the page's
    app_config.toml; ConfigError / FileNotFoundError (one line) when neither is there."""
    for name in ("effective_config.toml", "app_config.toml"):
        path = Path(out_dir) / name
        if path.is_file():
            cfg = load_config(path, check_paths=False)
            cfg.output.dir = str(out_dir)
            return cfg
    raise FileNotFoundError(f"{out_dir}: no effective_config.toml or app_config.toml; train a run there first")


def trained_files(cfg: Config) -> dict[str, Path]:
    """The run's exported files that exist, by role: "lora" and each token word (its .safetensors)."""
    out = Path(cfg.output.dir)
    files = {"lora": out / f"{cfg.output.name}.safetensors"}
    for word in (cfg.tokens.source, cfg.tokens.reference):
        files[word] = out / f"{word}.safetensors"
    return {k: p for k, p in files.items() if p.is_file()}


def usage_lines(cfg: Config, weight: float = DEFAULT_LORA_WEIGHT) -> str:
    """Markdown: where each frontend wants the LoRA and embedding files and the prompt that uses them."""
    name, src, ref = cfg.output.name, cfg.tokens.source, cfg.tokens.reference
    prompt = composed_prompt(src, ref)
    comfy_prompt = composed_prompt(f"embedding:{src}", f"embedding:{ref}")
    invoke_prompt = composed_prompt(f"<{src}>", f"<{ref}>")
    return "\n".join([
        f"**AUTOMATIC1111 / Forge**: copy `{name}.safetensors` to `models/Lora/`, `{src}.safetensors` and "
        f"`{ref}.safetensors` to `embeddings/`; prompt:",
        f"```\n{prompt} <lora:{name}:{weight:g}>\n```",
        f"**ComfyUI**: copy `{name}.safetensors` to `models/loras/` (a LoraLoader node, lora_name "
        f"`{name}.safetensors`, strength_model and strength_clip {weight:g}) and the embeddings to "
        "`models/embeddings/`; prompt:",
        f"```\n{comfy_prompt}\n```",
        f"**InvokeAI**: add the three files in the Model Manager (Add Model, then the file's path); pick "
        f"`{name}` in the LoRA panel at weight {weight:g}; prompt:",
        f"```\n{invoke_prompt}\n```",
    ])


def generate_images(out_dir: Path, prompt: str, negative: str, lora_weight: float, seed: int, steps: int, n: int,
                    upscale: float | None = None, restore: str | None = None) -> list[Path]:
    """library.generation's generate() with the run's config; images go to OUT/generated/. Errors are
    GenerationError / ConfigError / ModelLoadError with one-line messages."""
    from library.generation.pipeline import generate

    cfg = run_config(out_dir)
    return generate(cfg, prompt=prompt or None, negative=negative, n=int(n), seed=int(seed), steps=int(steps),
                    lora_scale=float(lora_weight), te_scale=float(lora_weight), upscale=upscale,
                    restore=restore or None, device="auto", precision="auto", grid=False, progress=True, quiet=True)


def gallery(out_dir: Path) -> list[tuple[str, str]]:
    """(image path, its settings: the A1111 infotext in the PNG) for OUT/generated/*.png, newest first."""
    folder = Path(out_dir) / "generated"
    items = []
    for p in sorted(folder.glob("[0-9]*.png"), reverse=True):
        items.append((str(p), png_text(p)))
    return items


def evaluate(out_dir: Path, source: Path, reference: Path) -> tuple[int, str]:
    """Run evaluate.py on OUT/generated against the prepared folders, as the command line does; returns
    (exit status, its last lines). The report lands in OUT/evaluation/."""
    command = [sys.executable, str(ROOT / "evaluate.py"), "--generated", str(Path(out_dir) / "generated"),
               "--source", str(source), "--reference", str(reference), "--out", str(Path(out_dir) / "evaluation")]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, "\n".join(lines[-15:])


SCORE_NAMES = {"csim": "identity (CSIM, higher is more alike)",
               "identity": "identity against the source faces' centroid", "copy": "copy score (nearest photo minus centroid)",
               "copied": "copy share (nearer one photo than the photos are to each other)",
               "face_found": "face found (share of images)",
               "same_person": "same person (share of images)", "style": "style (masked CLIP)",
               "aesthetic": "aesthetic"}


def evaluation_scores(out_dir: Path) -> list[list[str]]:
    """The evaluation's scores as table rows [score, mean, std, images] from OUT/evaluation/metrics.json's
    "summary" (a score whose weights were not given reads "skipped"); [] when there is no evaluation."""
    try:
        doc = json.loads(read_text_file(Path(out_dir) / "evaluation" / "metrics.json"))
        summary = doc.get("summary") or {}
    except (FileNotFoundError, TextFileError, ValueError, AttributeError):
        return []
    rows = []
    for key, label in SCORE_NAMES.items():
        entry = summary.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("mean") is None:
            rows.append([label, "skipped", "", "0"])
        else:
            rows.append([label, f"{entry['mean']:.3f}", f"{entry.get('std') or 0:.3f}", str(entry.get("n", ""))])
    return rows


def step_files(cfg: Config) -> list[Path]:
    """The LoRA and embeddings saved every output.save_lora_every steps (NAME-step00000500.safetensors,
    mcv1-step00000500.safetensors ...), sorted by name."""
    out = Path(cfg.output.dir)
    names = (cfg.output.name, cfg.tokens.source, cfg.tokens.reference)
    return sorted(p for n in names for p in out.glob(f"{n}-step*.safetensors"))


def missing_files(cfg: Config) -> str:
    """One line naming the trained files that are not there yet ("" when all are), so that a download
    button with nothing behind it says why."""
    found = trained_files(cfg)
    wanted = {"lora": f"{cfg.output.name}.safetensors", cfg.tokens.source: f"{cfg.tokens.source}.safetensors",
              cfg.tokens.reference: f"{cfg.tokens.reference}.safetensors"}
    gone = [name for key, name in wanted.items() if key not in found]
    return f"not there yet: {', '.join(gone)} (written when training ends)" if gone else ""


EMBEDDING_NOTE = ("Keep each embedding's file name: the frontends take the word you prompt with from the file "
                  "name, so `{src}.safetensors` is prompted as `{src}`. A step file (`{src}-step00000500.safetensors`) "
                  "must be renamed to `{src}.safetensors` first.")
