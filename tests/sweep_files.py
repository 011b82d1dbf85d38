"""The sweep file the sweep tests share (tests/test_sweep.py, tests/test_sweep_jobs.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_sweep_file(tmp_path: Path, model: Path, source: Path, reference: Path, extra: str = "", n: int = 1) -> Path:
    """tmp_path/pairs.toml: one pair and two methods (MagiCapture, without AR) on the tiny model, 1 + 1
    training steps, `n` images of 2 sampling steps; the table in tmp_path/table."""
    text = f"""
config = "{(ROOT / 'configs' / 'test_tiny.toml').as_posix()}"
out = "{(tmp_path / 'table').as_posix()}"
n = {n}
steps = 2
overrides = ["model.pretrained={model.as_posix()}", "phase1.steps=1", "phase2.steps=1", "output.save_every=0"]
{extra}
[[pair]]
name = "person one / style one"
source = "{source.as_posix()}"
reference = "{reference.as_posix()}"

[[method]]
name = "MagiCapture"

[[method]]
name = "without AR"
overrides = ["loss.attn_weight=0"]
"""
    path = tmp_path / "pairs.toml"
    path.write_text(text)
    return path
