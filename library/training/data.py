"""Prepared source / reference folders -> cached latents, masks, landmarks; the task sampler; templates.

Everything an optimiser step needs is computed once: VAE latents (and their horizontal flips), masks at
latent size, the 5 ArcFace landmarks at training resolution, and the tokenised prompts. A step then only
indexes tensors, which keeps the GPU busy with the UNet instead of the data pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.files.images import read_image
from library.files.text import TextFileError, read_text_file
from library.training.losses import soften_mask
from library.files.messages import UserError

log = logging.getLogger(__name__)

SOURCE_TEMPLATES = [
    "a photo of a {s} person",
    "a close-up photo of a {s} person",
    "a portrait of a {s} person",
    "a cropped photo of a {s} person",
    "a good photo of a {s} person",
    "a photo of the face of a {s} person",
    "a bright photo of a {s} person",
    "a rendition of a {s} person",
]
REFERENCE_TEMPLATES = [
    "a painting of a person in the style of {r}",
    "a photo of a person in the style of {r}",
    "a portrait of a person in the style of {r}",
    "a picture of a person in the style of {r}",
    "an image of a person in the style of {r}",
    "a rendering of a person in the style of {r}",
    "a close-up picture of a person in the style of {r}",
    "a nice portrait of a person in the style of {r}",
]
COMPOSED_TEMPLATES = [
    "a photo of a {s} person in the style of {r}",
    "a portrait of a {s} person in the style of {r}",
    "a close-up photo of a {s} person in the style of {r}",
    "a picture of a {s} person in the style of {r}",
    "a painting of a {s} person in the style of {r}",
    "a rendering of a {s} person in the style of {r}",
    "a good photo of a {s} person in the style of {r}",
    "an image of a {s} person in the style of {r}",
]
TEMPLATES = {"source": SOURCE_TEMPLATES, "reference": REFERENCE_TEMPLATES, "composed": COMPOSED_TEMPLATES}
FLIP_ORDER = [1, 0, 2, 4, 3]  # a mirrored face swaps image-left and image-right landmarks
KINDS = ("source", "reference")
# what a user may have put in a data folder instead of prepared files (dataset_tools.images' list, which
# training may not import)
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_UPSCALE = 2.0  # a square crop enlarged more than this trains visibly soft
SHOWN = 3  # file names quoted in one line


class DatasetError(UserError, ValueError):
    """A prepared folder is unusable; the message names it and says how to prepare it."""


@dataclass
class PreparedImage:
    name: str
    image: np.ndarray  # [R, R, 3] uint8, cropped and resized
    mask: np.ndarray  # [R, R] float in [0, 1]: the region that trains
    face_mask: np.ndarray  # [R, R] float: the face (source: = mask; reference: its complement, 0 without a face)
    landmarks: np.ndarray | None  # [5, 2] pixels in the R x R image
    caption: str
    original_hw: tuple[int, int] = (0, 0)  # (height, width) of the prepared image before the crop, pixels (size ids)
    crop_box: tuple[int, int, int] = (0, 0, 0)  # (left, top, side) of the square crop, original pixels


def _square_crop_box(width: int, height: int, center: tuple[float, float] | None) -> tuple[int, int, int]:
    side = min(width, height)
    cx, cy = center if center is not None else (width / 2, height / 2)
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side


def _read_sidecar(path: Path) -> str:
    """A text sidecar; one that is not UTF-8 / UTF-16 text stops loading (a DatasetError naming it) rather
    than silently training on fewer images or a garbled caption."""
    try:
        return read_text_file(path)
    except TextFileError as err:
        raise DatasetError(str(err)) from err


def _prepared_stems(folder: Path) -> tuple[list[str], int]:
    """(stems with NAME.png, NAME.mask.png and NAME.json, number of other photos) of `folder`: names only."""
    try:
        names = {entry.name for entry in os.scandir(folder) if not entry.name.startswith(".")}
    except OSError as err:
        raise DatasetError(f"{folder}: cannot be read ({err.strerror or err}); check its permissions") from err
    stems = sorted(n[: -len(".png")] for n in names if n.endswith(".png") and not n.endswith(".mask.png"))
    prepared = [s for s in stems if f"{s}.mask.png" in names and f"{s}.json" in names]
    photos = sum(1 for n in names if n.lower().endswith(PHOTO_EXTENSIONS) and not n.endswith(".mask.png"))
    return prepared, photos - len(prepared)


def _sidecar_kinds(folder: Path, key: str, kind: str) -> dict[str, str | None]:
    """NAME.json -> its "kind" (None when absent: sidecars of earlier versions) for every prepared photo of
    `folder`; raises DatasetError when there is none or a sidecar is not text."""
    stems, photos = _prepared_stems(folder)
    if not stems:
        what = f"{photos} photo(s) but no prepared files" if photos else "no prepared files"
        raise DatasetError(
            f"{key} = '{folder}': {what} (NAME.png + NAME.mask.png + NAME.json); run "
            f"`python -m dataset_tools.prepare {kind} {folder} {folder}_prepared` and set {key} to the new folder"
        )
    kinds = {}
    for stem in stems:
        text = _read_sidecar(folder / f"{stem}.json")  # not text: a DatasetError, as loading would raise
        try:
            record = json.loads(text)
        except ValueError:
            continue  # not JSON: loading skips the photo with its own warning
        found = record.get("kind") if isinstance(record, dict) else None
        kinds[f"{stem}.json"] = found if found in KINDS else None
    return kinds


def check_prepared_sets(source_dir: str | os.PathLike, reference_dir: str | os.PathLike) -> None:
    """Refuse photo sets that cannot mean what ``data.source_dir`` / ``data.reference_dir`` say, before any model
    loads: reads only file names and the NAME.json sidecars (no image is decoded).

    Raises DatasetError, one line naming the folder and the fix, for: a missing folder; one with no
    prepared photo (NAME.png + NAME.mask.png + NAME.json); the same folder given as both (also through a
    symlink or another spelling); sidecars whose ``"kind"`` is the other set's (both folders: "swapped").
    Sidecars without ``"kind"`` (earlier versions) are accepted.
    """
    folders = {"source": Path(source_dir), "reference": Path(reference_dir)}
    keys = {kind: f"data.{kind}_dir" for kind in KINDS}
    for kind, folder in folders.items():
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise DatasetError(f"{keys[kind]} = '{folder}' {what}; point it at a folder made by "
                               f"`python -m dataset_tools.prepare {kind} PHOTOS OUT`")
    source, reference = folders.values()
    if os.path.samefile(source, reference):
        spelled = f"'{source}'" if str(source) == str(reference) else f"'{source}' and '{reference}'"
        raise DatasetError(
            f"data.source_dir and data.reference_dir are the same folder ({spelled}): the person's photos and "
            "the style's photos are two sets; prepare each into its own folder with "
            "`python -m dataset_tools.prepare source|reference PHOTOS OUT`"
        )
    kinds = {kind: _sidecar_kinds(folder, keys[kind], kind) for kind, folder in folders.items()}
    other = {"source": "reference", "reference": "source"}
    wrong = {kind: [name for name, said in kinds[kind].items() if said == other[kind]] for kind in KINDS}
    if all(wrong[kind] and len(wrong[kind]) == len(kinds[kind]) for kind in KINDS):
        raise DatasetError(
            f"data.source_dir ('{source}') holds reference photos and data.reference_dir ('{reference}') source "
            "photos (their NAME.json \"kind\"): the two folders are swapped; exchange the two settings"
        )
    for kind in KINDS:
        if wrong[kind]:
            names = ", ".join(wrong[kind][:SHOWN]) + (" ..." if len(wrong[kind]) > SHOWN else "")
            fix = (f"set {keys[kind]} to a folder made by `python -m dataset_tools.prepare {kind} PHOTOS OUT`"
                   if len(wrong[kind]) == len(kinds[kind]) else
                   f"move those photos to the {other[kind]} set or delete their NAME.* files")
            raise DatasetError(
                f"{keys[kind]} = '{folders[kind]}': {len(wrong[kind])} of {len(kinds[kind])} prepared photos were "
                f"prepared as {other[kind]} ({names}: \"kind\": \"{other[kind]}\"); {fix}"
            )


def _enlarged(side: int, resolution: int) -> bool:
    return side * MAX_UPSCALE < resolution


def crop_warnings(path: Path, kind: str, width: int, height: int, has_face: bool, resolution: int) -> list[str]:
    """The lines a user sees about one photo's square crop (:func:`_square_crop_box`) at `resolution` pixels.

    One line when the crop (side = the short side of the `width` x `height` prepared image, pixels) is
    enlarged more than ``MAX_UPSCALE`` times, naming the size and the factor; one when the square keeps
    less than two thirds of the image (a panorama or a full-length portrait), naming the kept fraction
    (short side / long side) and what to do. Empty when neither applies.
    """
    side, long = min(width, height), max(width, height)
    lines = []
    if _enlarged(side, resolution):
        lines.append(f"{path}: {width}x{height} photo is upscaled {resolution / side:.1f}x to {resolution} px and "
                     f"will train soft; use a photo at least {resolution // 2} px on its short side")
    if 3 * side < 2 * long:  # integers: a 3:2 photo (kept = 2/3 exactly) is not warned about
        where = "around the face" if has_face else "from the centre"
        lines.append(f"{path}: {width}x{height} photo; the square crop keeps {side / long:.2f} of it ({side}x{side} "
                     f"px {where}); crop it yourself to the part that should train and prepare it again with "
                     f"`python -m dataset_tools.prepare {kind} PHOTOS OUT`")
    return lines


def load_prepared_folder(folder: str | Path, kind: str, resolution: int, captions: bool = False) -> list[PreparedImage]:
    """Read NAME.png / NAME.mask.png / NAME.json (and NAME.txt if `captions`) written by dataset_tools.prepare.

    Captions are read only when asked for (``data.captions = "sidecar"``): a caption file that is not
    used must not be able to stop training. A missing or empty caption is ``""`` (the sampler then uses a
    template). Raises DatasetError when the folder holds no usable image or a sidecar is not UTF-8 /
    UTF-16 text; images with missing, undecodable or mismatched files are skipped with a warning. Each
    photo's square crop keeps its face box (source and reference alike; the centre without one); a
    crop enlarged more than 2x or keeping less than two thirds of the photo is warned about once
    (:func:`crop_warnings`), with a count of the enlarged ones at the end.
    """
    folder = Path(folder)
    items = []
    upscaled = 0
    for image_path in sorted(folder.glob("*.png")):
        if image_path.name.endswith(".mask.png"):
            continue
        stem = image_path.name[: -len(".png")]
        mask_path, meta_path, caption_path = (folder / f"{stem}{s}" for s in (".mask.png", ".json", ".txt"))
        if not mask_path.is_file() or not meta_path.is_file():
            log.warning("%s: no %s or %s next to it; skipped (run dataset_tools.prepare)", image_path, mask_path.name, meta_path.name)
            continue
        meta_text = _read_sidecar(meta_path)
        reading = image_path  # the file a warning names
        try:
            meta = json.loads(meta_text)
            image = read_image(image_path).image
            reading = mask_path
            mask = read_image(mask_path, mode="L").image
        except (OSError, ValueError) as err:  # ImageLoadError is a ValueError
            log.warning("%s: unreadable (%s); skipped", reading, err)
            continue
        if mask.size != image.size:
            log.warning("%s: mask size %s differs from image %s; skipped", mask_path, mask.size, image.size)
            continue
        box = meta.get("face_box")
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) if box else None
        width, height = image.size  # before the crop: the "original size" of size ids
        left, top, side = _square_crop_box(width, height, center)
        crop = (left, top, left + side, top + side)
        for line in crop_warnings(image_path, kind, width, height, box is not None, resolution):
            log.warning("%s", line)
        upscaled += _enlarged(side, resolution)
        image = image.crop(crop).resize((resolution, resolution), Image.LANCZOS)
        mask_arr = np.asarray(mask.crop(crop).resize((resolution, resolution), Image.NEAREST), np.float32) / 255.0
        landmarks = meta.get("landmarks")
        if landmarks is not None:
            landmarks = (np.asarray(landmarks, np.float32) - [left, top]) * (resolution / side)
        has_face = box is not None
        face_mask = mask_arr if kind == "source" else ((1.0 - mask_arr) if has_face else np.zeros_like(mask_arr))
        caption = _read_sidecar(caption_path).strip() if captions and caption_path.is_file() else ""
        items.append(PreparedImage(stem, np.asarray(image), mask_arr, face_mask, landmarks, caption,
                                   original_hw=(int(height), int(width)), crop_box=(left, top, side)))
    if not items:
        raise DatasetError(
            f"{folder}: no prepared images; run `python -m dataset_tools.prepare {kind} PHOTOS {folder}` first"
        )
    if upscaled:
        log.warning("%s: %d of %d %s photos are upscaled more than %gx to %d px (named above)",
                    folder, upscaled, len(items), kind, MAX_UPSCALE, resolution)
    return items


@dataclass
class CachedSet:
    """One image set at training resolution, with flips appended (index i + n is the flip of i)."""

    latents: torch.Tensor  # [N, 4, h, w]
    recon_masks: torch.Tensor  # [N, 1, h, w] softened training mask
    region_masks: torch.Tensor  # [N, 1, h, w] hard training mask (AR target of the set's own token)
    face_masks: torch.Tensor  # [N, 1, h, w] hard face mask
    landmarks: torch.Tensor  # [N, 5, 2] pixels at training resolution (zeros where has_face is false)
    has_face: torch.Tensor  # [N] bool
    images: torch.Tensor  # [N, 3, R, R] in [-1, 1] (for identity embeddings and pictures)
    size_ids: torch.Tensor | None = None  # [N, k] the family's per-image ids (ModelFamily.size_ids), None without
    captions: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device) -> "CachedSet":
        """What every step indexes moves to `device` once; the full-size images stay in host memory, and so do
        `has_face` and `landmarks`: a step decides on the host which samples take the identity term and
        where its face window lies, and reading them off the GPU would stall it once per step."""
        moved = {name: getattr(self, name).to(device) for name in
                 ("latents", "recon_masks", "region_masks", "face_masks", "size_ids")
                 if getattr(self, name) is not None}
        return dataclasses.replace(self, **moved)


def _to_latent_mask(masks: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.stack(masks)).float().unsqueeze(1)
    return F.interpolate(t, size=(size, size), mode="nearest")


@torch.no_grad()
def cache_set(items: list[PreparedImage], vae, family, flip: bool, mask_eps: float, batch_size: int = 4) -> CachedSet:
    """VAE latents, latent-grid masks, landmarks and the images of `items`, their mirror images appended with
    `flip`. The model `family` normalises the latents (:meth:`~library.models.family.ModelFamily.latents_from_vae`)
    and gives each image's extra conditioning (:meth:`~library.models.family.ModelFamily.size_ids`), or None."""
    device, dtype = vae.device, vae.dtype
    images = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    masks = [it.mask for it in items]
    face = [it.face_mask for it in items]
    resolution = images.shape[-1]
    ids = [family.size_ids(it.original_hw, it.crop_box, resolution) for it in items]
    lms = torch.stack(
        [torch.from_numpy(it.landmarks) if it.landmarks is not None else torch.zeros(5, 2) for it in items]
    ).float()
    has_face = torch.tensor([it.landmarks is not None for it in items])
    if flip:
        images = torch.cat([images, images.flip(-1)])
        masks = masks + [m[:, ::-1].copy() for m in masks]
        face = face + [m[:, ::-1].copy() for m in face]
        flipped = lms[:, FLIP_ORDER].clone()
        flipped[..., 0] = resolution - flipped[..., 0]
        lms = torch.cat([lms, flipped])
        has_face = torch.cat([has_face, has_face])
        if ids[0] is not None:
            ids += [family.size_ids(it.original_hw, it.crop_box, resolution, flipped=True) for it in items]
    latents = []
    for chunk in images.split(batch_size):
        dist = vae.encode(chunk.to(device, dtype)).latent_dist
        latents.append(family.latents_from_vae(vae, dist.mean).float().cpu())
    latents = torch.cat(latents)
    size = latents.shape[-1]
    region = _to_latent_mask(masks, size)
    region = (region > 0.5).float()
    return CachedSet(
        latents=latents,
        recon_masks=soften_mask(region, mask_eps),
        region_masks=region,
        face_masks=(_to_latent_mask(face, size) > 0.5).float(),
        landmarks=lms,
        has_face=has_face,
        images=images,
        size_ids=torch.stack(ids) if ids[0] is not None else None,
        captions=[it.caption for it in items] * (2 if flip else 1),
        names=[it.name for it in items] + ([f"{it.name} (flipped)" for it in items] if flip else []),
    )


@dataclass
class Sample:
    task: str  # source | reference | composed
    index: int  # into the source set (source task) or the reference set (reference, composed)
    prompt: str
    id_source: int  # the source image whose face is the identity target (source task: the image itself)


def make_prompt(task: str, source_token: str, reference_token: str, rng: random.Random, caption: str = "") -> str:
    if caption:
        return caption
    return rng.choice(TEMPLATES[task]).format(s=source_token, r=reference_token)


class TaskSampler:
    """Draws the samples of one optimiser step: the phase's tasks in turn, random images and templates.

    Tasks follow one round-robin cursor that carries over from step to step, so the task mix is exact
    over consecutive steps whatever the batch size: with three tasks and batch 4, any three consecutive
    steps hold each task four times (the released code keeps source : reference : composed at about
    1 : 1 : 1). Its whole state is the cursor and one `random.Random`, so a resumed run draws exactly
    what an uninterrupted one would.
    """

    def __init__(
        self,
        tasks: list[str],
        n_source: int,
        n_reference: int,
        source_token: str,
        reference_token: str,
        seed: int,
        source_captions: list[str] | None = None,
        reference_captions: list[str] | None = None,
    ):
        self.tasks = list(tasks)
        self.sizes = {"source": n_source, "reference": n_reference, "composed": n_reference}
        self.tokens = (source_token, reference_token)
        self.captions = {"source": source_captions, "reference": reference_captions}
        self.rng = random.Random(seed)
        self.cursor = 0

    def draw(self, batch_size: int) -> list[Sample]:
        samples = []
        for _ in range(batch_size):
            task = self.tasks[self.cursor % len(self.tasks)]
            self.cursor += 1
            index = self.rng.randrange(self.sizes[task])
            captions = self.captions.get(task)
            caption = captions[index] if captions else ""
            prompt = make_prompt(task, *self.tokens, self.rng, caption)
            id_source = index if task == "source" else self.rng.randrange(self.sizes["source"])
            samples.append(Sample(task, index, prompt, id_source))
        return samples

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "cursor": self.cursor}

    def load_state(self, state: dict | list) -> None:
        """Restore :meth:`state`; a bare RNG state (checkpoints of earlier versions) restarts the cursor."""
        rng, cursor = (state["rng"], state["cursor"]) if isinstance(state, dict) else (state, 0)
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.cursor = int(cursor)
