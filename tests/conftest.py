"""Shared fixtures: the tiny SD 1.x model (built once per session) and small prepared data folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, original-layout single .safetensors) of the tiny SD 1.x model."""
    from library.testing import save_model

    return save_model(tmp_path_factory.mktemp("model") / "tiny_sd")


def write_prepared(folder: Path, kind: str, token: str, n: int = 3, size: int = 96, seed: int = 0) -> Path:
    """Files as dataset_tools.prepare writes them, with a drawn face at a known place."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 255, 3)
        img = Image.new("RGB", (size, size), tuple(int(c) for c in base))
        draw = ImageDraw.Draw(img)
        cx, cy, r = size * (0.45 + 0.1 * i / n), size * 0.5, size * 0.22
        box = [cx - r, cy - r * 1.2, cx + r, cy + r * 1.2]
        draw.ellipse(box, fill=(224, 172, 140))
        lms = [[cx - r * 0.4, cy - r * 0.3], [cx + r * 0.4, cy - r * 0.3], [cx, cy + r * 0.1],
               [cx - r * 0.35, cy + r * 0.55], [cx + r * 0.35, cy + r * 0.55]]
        for x, y in lms:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(40, 30, 30))
        face = Image.new("L", (size, size), 0)
        ImageDraw.Draw(face).ellipse(box, fill=255)
        mask = face if kind == "source" else Image.eval(face, lambda v: 255 - v)
        img.save(folder / f"img{i}.png")
        mask.save(folder / f"img{i}.mask.png")
        caption = f"a photo of a {token} person" if kind == "source" else f"a photo of a person in the style of {token}"
        (folder / f"img{i}.txt").write_text(caption)
        meta = {"image": f"img{i}.png", "kind": kind, "token": token, "width": size, "height": size,
                "face_box": box, "score": 0.9, "landmarks": lms, "mask_coverage": float(np.mean(np.asarray(mask) > 127)),
                "num_faces": 1, "detector": "short_range", "warnings": []}
        (folder / f"img{i}.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def prepared_data(tmp_path) -> tuple[Path, Path]:
    return (write_prepared(tmp_path / "source", "source", "mcv1", seed=1),
            write_prepared(tmp_path / "reference", "reference", "mcv2", seed=2))
