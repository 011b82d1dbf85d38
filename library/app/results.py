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


def evaluation_summary(out_dir: Path) -> str:
    """Markdown of OUT/evaluation/metrics.json's top-level numbers, "" when there is no evaluation."""
    try:
        doc = json.loads(read_text_file(Path(out_dir) / "evaluation" / "metrics.json"))
    except (FileNotFoundError, TextFileError, ValueError):
        return ""
    rows = [f"- {k}: {v}" for k, v in doc.items() if isinstance(v, (int, float, str))]
    for k, v in doc.items():
        if isinstance(v, dict):
            rows += [f"- {k}.{kk}: {vv}" for kk, vv in v.items() if isinstance(vv, (int, float, str))]
    return "\n".join(one_line(r) for r in rows)
