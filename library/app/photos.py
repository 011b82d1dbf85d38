"""The Photos tab's work: take uploaded photos in, run dataset_tools.prepare on them, draw each prepared
photo with its mask and face box, and turn a brush edit into the photo's new mask file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dataset_tools.images import ImageLoadError, encode_png, is_image_name, load_image
from dataset_tools.prepare import PrepareError, Summary, prepare_folder
from library.app.state import PathRefused, Workspace
from library.files.images import IMAGE_EXTENSIONS_TEXT, read_image
from library.files.messages import one_line

TINT = np.array([255, 60, 60], np.float32)  # the mask's colour over the photo (red: trains)
TINT_ALPHA = 0.45
BOX_COLOUR = (60, 200, 255)
UPLOAD_MAX_SHORT = 4096  # the dataset tools' reader shrinks anything larger; refusing nothing prepare accepts


def add_uploads(ws: Workspace, kind: str, files: list[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Copy uploaded files into photos/<kind>/ after the dataset tools' checks (an image name and a
    readable image, no smaller than they accept). Returns (names added, one line per file refused)."""
    dest = ws.uploads(kind)
    dest.mkdir(parents=True, exist_ok=True)
    added, refused = [], []
    for f in files or []:
        src = Path(f)
        name = Path(src.name).name  # a browser's file name, never a path
        if not is_image_name(name):
            refused.append(f"{one_line(name)}: not a photo the dataset tools read ({IMAGE_EXTENSIONS_TEXT})")
            continue
        try:
            load_image(src, UPLOAD_MAX_SHORT)
        except ImageLoadError as exc:
            refused.append(f"{one_line(name)}: {one_line(exc)}")
            continue
        shutil.copyfile(src, dest / name)
        added.append(name)
    return added, refused


def prepare_kind(ws: Workspace, kind: str, identity_weights: str | None = None) -> Summary:
    """Run dataset_tools.prepare on photos/<kind>/ into prepared/<kind>/ (its progress bar is tqdm, which
    the page follows) and keep its skipped files and warnings in the prepared folder. Items excluded
    before are moved out again after prepare rewrote them, and painted masks and edited captions are put
    back (Workspace.reapply_edits). Raises PrepareError (one line), and PathRefused
    when an upload is a link leading out of the data folder (prepare would read what it points at)."""
    links = ws.outside_links(kind)
    if links:
        raise PathRefused(f"{links[0]}; remove it, then prepare again")
    excluded = {rec["stem"] for rec in ws.items(kind) if rec["excluded"]}
    summary = prepare_folder(kind, ws.uploads(kind), ws.prepared(kind), progress=True,
                             identity_weights=identity_weights)
    for stem in excluded:
        if (ws.prepared(kind) / f"{stem}.json").is_file():
            ws.set_excluded(kind, stem, True)
    dropped = ws.reapply_edits(kind)  # the user's masks and captions win over prepare's automatic ones
    ws.save_prepare_log(kind, summary.skipped, [w for w in summary.warnings if not w[0]] + [("", d) for d in dropped])
    return summary


def overlay(folder: Path, stem: str, rec: dict) -> Image.Image:
    """NAME.png with its mask tinted red (what trains) and the face box drawn; RGB, the photo's size."""
    rgb = np.asarray(read_image(folder / f"{stem}.png").image, np.float32)
    mask = np.asarray(read_image(folder / f"{stem}.mask.png", mode="L").image, np.float32)[..., None] / 255.0
    if mask.shape[:2] != rgb.shape[:2]:
        mask = np.zeros(rgb.shape[:2] + (1,), np.float32)
    out = rgb * (1 - TINT_ALPHA * mask) + TINT * (TINT_ALPHA * mask)
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    box = rec.get("face_box")
    if box:
        ImageDraw.Draw(im).rectangle([float(v) for v in box], outline=BOX_COLOUR, width=max(2, im.width // 200))
    return im


def item_caption(rec: dict) -> str:
    """The Selected photo panel's text: name, state, the caption text and every warning, one per line."""
    lines = [f"{rec['stem']} ({_state(rec)})", f"caption: {rec.get('caption', '')}"]
    lines += [f"warning: {w}" for w in rec.get("warnings") or []]
    return "\n".join(lines)


def gallery_label(rec: dict) -> str:
    """The gallery's caption under a thumbnail, short because Gradio cuts it to one line of the thumbnail's
    width: the warning count first ("⚠ 2 ", so a cut still shows it), then name and state. The full text
    is item_caption's, shown when the photo is clicked."""
    n = len(rec.get("warnings") or [])
    return f"{f'⚠ {n} ' if n else ''}{rec['stem']} ({_state(rec)})"


def _state(rec: dict) -> str:
    return ("EXCLUDED" if rec.get("excluded") else "trains") + (", mask edited" if rec.get("mask_edited") else "")


def mask_from_editor(mask_path: Path, layers: list) -> bytes:
    """The new mask: the current NAME.mask.png with each brush layer applied where it was painted
    (alpha > 0): a light stroke (gray >= 128) marks "trains" (255), a dark stroke "does not train" (0).
    `layers`: RGBA arrays [H, W, 4] or PIL images the size of the mask. Returns 8-bit gray PNG bytes."""
    mask = np.asarray(read_image(mask_path, mode="L").image, np.uint8).copy()
    for layer in layers or []:
        arr = np.asarray(layer.convert("RGBA") if isinstance(layer, Image.Image) else layer)
        if arr.ndim != 3 or arr.shape[2] != 4:
            continue
        if arr.shape[:2] != mask.shape:
            arr = np.asarray(Image.fromarray(arr).resize(mask.shape[::-1], Image.NEAREST))
        painted = arr[..., 3] > 0
        light = arr[..., :3].astype(np.float32).mean(axis=2) >= 128
        mask[painted & light] = 255
        mask[painted & ~light] = 0
    return encode_png(mask)


def strokes(background: Image.Image, composite: Image.Image) -> np.ndarray:
    """What was painted, as an RGBA layer [H, W, 4]: the composite's pixels where it differs from the
    background (alpha 255), transparent elsewhere."""
    bg = np.asarray(background.convert("RGB"), np.int16)
    comp = np.asarray(composite.convert("RGB").resize(background.size), np.int16)
    painted = np.abs(comp - bg).max(axis=2) > 8  # JPEG-free PNG round trip: any real stroke differs far more
    return np.dstack([comp.astype(np.uint8), (painted * 255).astype(np.uint8)])


def details_markdown(kind: str, items: list[dict], log: dict, links: list[str] = ()) -> str:
    """Markdown for one kind: every prepared photo with its state and every warning, then the files the
    last prepare run skipped (and why), its folder-wide notes (`log`: Workspace.prepare_log) and the files
    not read because they link out of the data folder (`links`: Workspace.outside_links)."""
    rows = [f"**{kind}**: {len(items)} photo(s), {sum(not r.get('excluded') for r in items)} training", ""]
    for r in items:
        state = "excluded" if r.get("excluded") else "trains"
        if r.get("mask_edited"):
            state += ", mask edited"
        warns = "; ".join(one_line(w) for w in r.get("warnings") or []) or "no warnings"
        rows.append(f"- `{one_line(r['stem'])}` ({state}): {warns}")
    rows += [f"- skipped `{one_line(n)}`: {one_line(why)}" for n, why in log.get("skipped", [])]
    rows += [f"- note: {one_line(m)}" for _, m in log.get("warnings", [])]
    rows += [f"- refused {line}" for line in links]
    return "\n".join(rows) + "\n"


__all__ = ["PrepareError", "add_uploads", "gallery_label", "item_caption", "mask_from_editor", "overlay",
           "prepare_kind", "strokes", "details_markdown"]
