"""NAME.json records of a prepared folder: one key per line, numbers rounded."""

from __future__ import annotations

import json


def json_bytes(meta: dict) -> bytes:
    """One key per line, values compact: easy to read and to diff."""
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items())
    return ("{\n" + body + "\n}\n").encode("utf-8")


def round_list(v, nd=2):
    return [round(float(x), nd) for x in v]
