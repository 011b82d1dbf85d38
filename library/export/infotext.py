"""A1111's "parameters" text: writing it, reading it back, and the PNGs that carry it.

The text is what A1111 writes, so PNG Info / "send to txt2img" reproduces the picture in A1111 with the
same files: the prompt carries ``<lora:NAME:te=T:unet=U>`` (A1111's syntax for separate text-encoder and
UNet multipliers), the token words are A1111 embedding names (the files are named after them), and
``Lora hashes`` / ``TI hashes`` are A1111's short hashes of those files.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.files.atomic import write_atomic


def _quote(text: str) -> str:
    """A1111's infotext quoting: values with a comma, colon or newline become JSON strings."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_number(x: float) -> str:
    """A number the way A1111 writes it in the text: "7", "0.6", not "7.0"."""
    return f"{x:g}"


def lora_tag(name: str, unet_scale: float, te_scale: float) -> str:
    """A1111's prompt tag; ``<lora:NAME:te=T:unet=U>`` sets the two multipliers separately."""
    if unet_scale == te_scale:
        return f"<lora:{name}:{a1111_number(unet_scale)}>"
    return f"<lora:{name}:te={a1111_number(te_scale)}:unet={a1111_number(unet_scale)}>"


def infotext(
    prompt: str,
    negative: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    extra: dict[str, str] | None = None,
) -> str:
    """The "parameters" text A1111 writes into its PNGs (and parses back in PNG Info)."""
    fields = {
        "Steps": str(steps),
        "Sampler": sampler,
        "CFG scale": a1111_number(cfg_scale),
        "Seed": str(seed),
        "Size": f"{width}x{height}",
        "Model": model,
        **(extra or {}),
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None and v != "")
    text = prompt
    if negative:
        text += f"\nNegative prompt: {negative}"
    return f"{text}\n{line}"


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """The inverse (A1111's parser, reduced): Prompt, Negative prompt and every key: value of the last line."""
    *lines, last = text.strip().split("\n")
    out: dict[str, str] = {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    for key, value in _FIELD.findall(last):
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


def a1111_model_name(name: str) -> str:
    """A1111's "Model" field is the checkpoint's file name without its extension."""
    from library.models.loading import SINGLE_FILE_SUFFIXES

    path = Path(name)
    return path.stem if path.suffix.lower() in SINGLE_FILE_SUFFIXES else name


def a1111_hashes(lora: Path | None, embeddings: dict[str, Path | None]) -> dict[str, str]:
    """The "Lora hashes" and "TI hashes" fields: the first 12 hex digits of each file's hash.

    The LoRA's is the SHA-256 of everything after the safetensors header (A1111's and additional-networks'
    LoRA hash); an embedding's is the whole file's SHA-256. Embeddings bundled in the LoRA (path None)
    have no file of their own and get no entry.
    """
    from library.export.kohya import file_sha256, safetensors_file_hash

    hashes: dict[str, str] = {}
    if lora is not None:
        hashes["Lora hashes"] = f"{lora.stem}: {safetensors_file_hash(lora)[:12]}"
    ti = [f"{w}: {file_sha256(p)[:12]}" for w, p in embeddings.items() if p is not None]
    if ti:
        hashes["TI hashes"] = ", ".join(ti)
    return hashes


def save_png(image: Image.Image, path: Path, parameters: str | None) -> Path:
    """Write a PNG with a "parameters" text chunk (A1111's), atomically; creates the folder; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """The images in a grid of `cols` columns (default near-square, as A1111's grid-NNNNN.png), cells as big
    as the largest image."""
    cols = cols or max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / cols)
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid
