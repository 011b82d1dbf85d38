"""NAME.json records of a prepared folder: one key per line, numbers rounded."""

from __future__ import annotations

import json


def json_bytes(meta: dict) -> bytes:
    """One key per line, values compact: easy to read and to diff."""
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items())
    return ("{\n" + body + "\n}\n").encode("utf-8")


def round_list(v, nd=2):
    return [round(float(x), nd) for x in v]


def small_face_warning(box, width: int, height: int) -> str | None:
    """The warning for a source photo whose chosen face (`box`: x0, y0, x1, y1 px) is under 1/8 of the
    image's short side (`width` x `height` px), else None."""
    side = max(box[2] - box[0], box[3] - box[1])
    if side < min(width, height) / 8:
        return f"small face ({side:.0f} px in a {width}x{height} image): crop closer for more identity detail"
    return None
