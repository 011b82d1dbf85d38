"""Previews of a prepared folder: each image with its training region tinted, and a contact sheet."""

from __future__ import annotations

import math

import cv2
import numpy as np

PREVIEW_MAX_SIDE = 512
THUMB = 192


def encode_jpg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("JPEG encoding failed")
    return buf.tobytes()


def fit(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s >= 1.0:
        return rgb, 1.0
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA), s


_LM_COLORS = [(255, 60, 60), (60, 120, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def make_preview(rgb: np.ndarray, mask: np.ndarray, box, landmarks, other_boxes=()) -> np.ndarray:
    """The image with the training region tinted green, the face box (yellow), the 5 landmarks, and the
    boxes of any other faces found (red)."""
    small, s = fit(rgb, PREVIEW_MAX_SIDE)
    m = mask if s == 1.0 else cv2.resize(mask, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_NEAREST)
    on = m > 127
    tint = np.empty_like(small)
    tint[:] = (0, 255, 0)
    lit = cv2.addWeighted(small, 0.6, tint, 0.4, 0)
    out = (small >> 1) + (small >> 3)  # ~0.6: what does not train is dimmed
    out[on] = lit[on]
    # outline of the mask, so its edge reads at a glance
    contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), 1, cv2.LINE_AA)
    t = max(1, round(max(out.shape[:2]) / 300))
    for ob in other_boxes:
        x0, y0, x1, y1 = (int(round(v * s)) for v in ob)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 40, 40), t, cv2.LINE_AA)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v * s)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 210, 0), t, cv2.LINE_AA)
    if landmarks is not None:
        for (x, y), c in zip(landmarks, _LM_COLORS):
            cv2.circle(out, (int(round(x * s)), int(round(y * s))), t + 1, c, -1, cv2.LINE_AA)
    return out


def make_contact_sheet(thumbs: list[tuple[str, np.ndarray]], cell: int = THUMB) -> np.ndarray:
    n = len(thumbs)
    cols = max(1, min(6, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    label_h = 18
    sheet = np.full((rows * (cell + label_h), cols * cell, 3), 32, np.uint8)
    for i, (name, th) in enumerate(thumbs):
        r, c = divmod(i, cols)
        y, x = r * (cell + label_h), c * cell
        small, _ = fit(th, cell - 4)
        h, w = small.shape[:2]
        oy, ox = y + (cell - h) // 2, x + (cell - w) // 2
        sheet[oy : oy + h, ox : ox + w] = small
        text = name if len(name) <= 26 else name[:24] + ".."
        cv2.putText(sheet, text, (x + 4, y + cell + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 230, 230), 1, cv2.LINE_AA)
    return sheet
