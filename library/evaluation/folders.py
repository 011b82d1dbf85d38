"""The image folders `evaluate.py` reads: generated images, source photos, reference photos.

A folder is either one `dataset_tools.prepare` wrote (NAME.png with NAME.mask.png beside it) or a plain
folder of photos. Masks (`NAME.mask.png`) and the `preview/` subfolder are not images to score; a
prepared reference image's mask (white = trains = everything but the face) is kept as its face mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.files.images import IMAGE_EXTENSIONS, IMAGE_EXTENSIONS_TEXT, ImageLoadError, read_image
from library.files.messages import UserError

MAX_SHORT_SIDE = 1024  # larger photos are shrunk on reading: every metric looks at 224 px or a face crop


class FolderError(UserError, ValueError):
    """A folder that cannot be evaluated; str() is one line naming it and what to do."""


@dataclass
class EvalImage:
    path: Path
    rgb: np.ndarray  # [H, W, 3] uint8, EXIF-rotated
    face_mask: np.ndarray | None = None  # [H, W] bool, True = face; from a prepared NAME.mask.png


def _is_grid(stem: str) -> bool:
    """generate.py's contact sheet (`grid-NNNNN.png`): the generated images again, not one of them."""
    return stem == "grid" or (stem.startswith("grid-") and stem[5:].isdigit())


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images of `folder` to score, sorted by name (not recursive; masks excluded).

    Raises FolderError when `folder` is missing, not a folder or holds no image."""
    folder = Path(folder)
    if not folder.exists():
        raise FolderError(f"{folder}: no such folder ; give the folder of images")
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a folder ; give the folder of images")
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.lower().endswith(".mask.png")
        and not p.name.startswith(".") and not _is_grid(p.stem)
    )
    if not files:
        raise FolderError(f"{folder}: no images ({IMAGE_EXTENSIONS_TEXT}) ; give a folder of photos or a prepared folder")
    return files


def read_folder(folder: str | os.PathLike, reference_masks: bool = False, warn=print) -> list[EvalImage]:
    """Every readable image of `folder` (see `image_files`); with `reference_masks`, each with the face
    mask of its prepared reference `NAME.mask.png` when there is one (black = face there).

    An unreadable image is one `warn` line and is left out; FolderError when none is readable.
    `generate.py`'s grid (`grid-NNNNN.png`) is not one of the images."""
    out: list[EvalImage] = []
    for path in image_files(folder):
        try:
            rgb = np.array(read_image(path, max_short_side=MAX_SHORT_SIDE).image)
        except ImageLoadError as err:
            warn(f"warning: {path}: {err} ; skipped")
            continue
        mask = None
        mask_path = path.with_name(path.stem + ".mask.png")
        if reference_masks and mask_path.is_file():
            try:
                m = np.asarray(read_image(mask_path, mode="L", max_short_side=MAX_SHORT_SIDE).image)
            except ImageLoadError as err:
                warn(f"warning: {mask_path}: {err} ; its face is found again instead")
            else:
                if m.shape == rgb.shape[:2]:
                    mask = m < 128  # a reference mask is white where the style trains: the face is black
                else:
                    warn(f"warning: {mask_path}: {m.shape[1]}x{m.shape[0]}, its image is "
                         f"{rgb.shape[1]}x{rgb.shape[0]} ; its face is found again instead")
        out.append(EvalImage(path, rgb, mask))
    if not out:
        raise FolderError(f"{folder}: no readable image ; see the warnings above")
    return out
