"""Face masks (255 = face) from the face mesh's oval, a box's ellipse, or BiSeNet face parsing."""

from __future__ import annotations

import cv2
import numpy as np

PARSE_FACTOR = 1.8  # BiSeNet region side / face box side (CelebAMask-HQ framing)


def oval_polygon() -> np.ndarray:
    """mediapipe's FACE_OVAL (a set of edges) chained into one closed polygon: face-mesh indices [N]."""
    import mediapipe as mp

    edges = list(mp.solutions.face_mesh.FACEMESH_FACE_OVAL)
    nxt: dict[int, list[int]] = {}
    for a, b in edges:
        nxt.setdefault(a, []).append(b)
        nxt.setdefault(b, []).append(a)
    start = min(nxt)
    order, prev, cur = [start], None, start
    while True:
        cands = [n for n in nxt[cur] if n != prev]
        if not cands:
            break
        prev, cur = cur, cands[0]
        if cur == start:
            break
        order.append(cur)
        if len(order) > len(nxt):
            break
    return np.array(order, dtype=np.int64)


def oval_mask(shape: tuple[int, int], pts: np.ndarray, oval: np.ndarray) -> np.ndarray:
    """[H, W] uint8 mask: the polygon of face-mesh points `pts` [468, 2] (pixels) at indices `oval`."""
    mask = np.zeros(shape, np.uint8)
    poly = np.round(pts[oval] * 16).astype(np.int32)
    cv2.fillPoly(mask, [poly], 255, lineType=cv2.LINE_8, shift=4)
    return mask


def ellipse_mask(shape: tuple[int, int], box) -> np.ndarray:
    """[H, W] uint8 mask: an upright ellipse a little taller than the (x0, y0, x1, y1) face box."""
    mask = np.zeros(shape, np.uint8)
    x0, y0, x1, y1 = box
    center = (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2 - 0.05 * (y1 - y0))))
    axes = (max(1, int(round(0.5 * (x1 - x0)))), max(1, int(round(0.62 * (y1 - y0)))))
    cv2.ellipse(mask, center, axes, 0, 0, 360, 255, -1)
    return mask


def parse_region(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The image region (x0, y0, x1, y1), clipped, that face parsing looks at for a face box."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = PARSE_FACTOR * max(x1 - x0, y1 - y0)
    return (
        max(0, int(np.floor(cx - side / 2))),
        max(0, int(np.floor(cy - side / 2))),
        min(width, int(np.ceil(cx + side / 2))),
        min(height, int(np.ceil(cy + side / 2))),
    )


def parsed_mask(parser, rgb: np.ndarray, box) -> np.ndarray:
    """[H, W] uint8 mask from a `bisenet.FaceParser` run on the square region around `box`."""
    from library.faces.bisenet import INPUT_SIZE

    h, w = rgb.shape[:2]
    rx0, ry0, rx1, ry1 = parse_region(box, w, h)
    region = rgb[ry0:ry1, rx0:rx1]
    interp = cv2.INTER_AREA if max(region.shape[:2]) > INPUT_SIZE else cv2.INTER_LINEAR
    crop = cv2.resize(region, (INPUT_SIZE, INPUT_SIZE), interpolation=interp)
    m = cv2.resize(parser.face_mask(crop), (rx1 - rx0, ry1 - ry0), interpolation=cv2.INTER_NEAREST)
    # keep the face blobs that touch the detected box: a neighbour's face in the region is not ours
    n, labels = cv2.connectedComponents((m > 0).astype(np.uint8), connectivity=8)
    if n > 2:
        bx0, by0, bx1, by1 = (int(round(v)) for v in box)
        inside = labels[max(0, by0 - ry0): max(0, by1 - ry0), max(0, bx0 - rx0): max(0, bx1 - rx0)]
        keep = np.unique(inside[inside > 0])
        m = np.where(np.isin(labels, keep), 255, 0).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[ry0:ry1, rx0:rx1] = m
    return mask
