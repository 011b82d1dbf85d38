"""Dataset tools for MagiCapture: turn folders of photos into prepared training sets.

CLI: ``python -m dataset_tools.prepare {source,reference} IN_DIR OUT_DIR`` and
``python -m dataset_tools.demo_photos DEST``. Imports nothing from ``library/``; heavy modules
(mediapipe, torch) load only when used.
"""

from __future__ import annotations

__all__ = ["prepare_folder", "Summary", "PrepareError", "write_demo_photos", "DEFAULT_TOKENS", "CAPTIONS"]


def __getattr__(name):
    if name in ("prepare_folder", "Summary", "PrepareError", "DEFAULT_TOKENS", "CAPTIONS"):
        from dataset_tools import prepare

        return getattr(prepare, name)
    if name == "write_demo_photos":
        from dataset_tools.demo_photos import write_demo_photos

        return write_demo_photos
    raise AttributeError(f"module 'dataset_tools' has no attribute {name!r}")
