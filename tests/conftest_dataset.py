"""Helpers for the dataset_tools tests (imported by test_faces.py and test_prepare.py).

Real photos only, all shipped in installed packages: scikit-image's astronaut / coffee, insightface's
Tom Hanks sample (112 px face) and its group photo t1.jpg (1280 x 886).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@functools.lru_cache(maxsize=None)
def _insightface_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    if spec is None:
        pytest.skip("insightface (sample photos) not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "images"


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def coffee() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee())


def tom_hanks() -> Image.Image:
    with Image.open(_insightface_dir() / "Tom_Hanks_54745.png") as im:
        return im.convert("RGB")


def group_photo() -> Image.Image:
    with Image.open(_insightface_dir() / "t1.jpg") as im:
        return im.convert("RGB")


# the 5 landmarks of the upright astronaut (skimage.data.astronaut(), 512 x 512 or its top 512 x 400) and of
# insightface's Tom Hanks sample (112 x 112), as the face mesh gives them: image-left eye, image-right eye,
# nose tip, image-left and image-right mouth corners (pixels)
ASTRO_LANDMARKS = np.array([[203.5, 101.9], [247.0, 103.8], [223.4, 131.2], [201.1, 139.2], [246.2, 141.8]])
TOM_LANDMARKS = np.array([[35.9, 51.4], [71.4, 49.6], [63.3, 82.8], [37.8, 91.2], [66.7, 89.7]])


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files anywhere under an output folder."""
    return [str(p) for p in Path(folder).rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", im.mode
        return np.asarray(im).copy()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dataset_tools.prepare", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def box_mean(mask: np.ndarray, box, shrink: float = 0.0) -> float:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * shrink, (y1 - y0) * shrink
    sub = mask[int(y0 + dy): int(np.ceil(y1 - dy)), int(x0 + dx): int(np.ceil(x1 - dx))]
    return float(sub.mean()) / 255.0


def far_from_box(mask: np.ndarray, box, factor: float = 1.6) -> np.ndarray:
    """Mask values at pixels more than `factor` box sizes from the box centre (Chebyshev distance)."""
    h, w = mask.shape
    x0, y0, x1, y1 = box
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    yy, xx = np.mgrid[0:h, 0:w]
    far = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) > factor * side
    return mask[far]


@pytest.fixture(scope="module")
def analyzer():
    from library.faces import FaceAnalyzer, quiet_native_stderr

    with quiet_native_stderr():
        fa = FaceAnalyzer()
    yield fa
    fa.close()
