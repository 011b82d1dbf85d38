"""evaluate.py --sweep: the Table 1 protocol's plumbing on the tiny model (its figures mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from library.evaluation.sweep import SweepError, read_sweep, run_one, shard
from sweep_files import write_sweep_file as _sweep_file

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sweep_in_two_shards_then_the_table(tmp_path, tiny_model, prepared_data):
    source, reference = prepared_data
    pairs = _sweep_file(tmp_path, tiny_model[0], source, reference)
    first = _cli("--sweep", pairs, "--shard", "1/2")
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((tmp_path / "table" / "table.json").read_text())
    assert [(r["method"], r["pairs"], r["of"]) for r in table["rows"]] == [("MagiCapture", 1, 1), ("without AR", 0, 1)]
    second = _cli("--sweep", pairs, "--shard", "2/2")
    assert second.returncode == 0, second.stderr[-3000:]
    for method in ("MagiCapture", "without_AR"):
        run = tmp_path / "table" / method / "person_one_style_one"
        assert (run / "magicapture.safetensors").is_file()
        assert len(list((run / "generated").glob("*.png"))) == 1
        metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
        assert metrics["networks"]["identity"] == "dlib ResNet v1 (face_recognition_models)"
    effective = (tmp_path / "table" / "without_AR" / "person_one_style_one" / "effective_config.toml").read_text()
    assert "attn_weight = 0" in effective
    table = json.loads((tmp_path / "table" / "table.json").read_text())
    assert [(r["method"], r["pairs"], r["of"]) for r in table["rows"]] == [("MagiCapture", 1, 1), ("without AR", 1, 1)]
    md = (tmp_path / "table" / "table.md").read_text().splitlines()
    assert md[0] == "| Method | CSIM | Masked CLIP (style) | Aesthetic | pairs |"
    assert [line.split("|")[1].strip() for line in md[2:4]] == ["MagiCapture", "without AR"]
    assert all(line.split("|")[5].strip() == "1/1" for line in md[2:4])
    csv = (tmp_path / "table" / "table.csv").read_text().splitlines()
    assert csv[0] == "method,csim_mean,csim_std,style_mean,style_std,aesthetic_mean,aesthetic_std,pairs,of"
    assert len(csv) == 3
    again = _cli("--sweep", pairs)  # everything finished: nothing is trained again
    assert again.returncode == 0
    assert again.stderr.count("finished earlier, skipped") == 2 and "training" not in again.stderr


def test_run_one_continues_what_is_there(tmp_path, prepared_data, tiny_model):
    source, reference = prepared_data
    sweep = read_sweep(_sweep_file(tmp_path, tiny_model[0], source, reference))
    sweep.n = 3
    run = sweep.runs[0]
    calls = []

    def fake(kind, rc=0):
        def call(argv):
            calls.append((kind, argv))
            return rc
        return call

    (run.folder / "checkpoint-p1-000001").mkdir(parents=True)
    (run.folder / "generated").mkdir()
    (run.folder / "generated" / "00000-1.png").write_bytes(b"")
    (run.folder / "generated" / "grid-00000.png").write_bytes(b"")
    assert run_one(sweep, run, fake("train"), fake("generate"), fake("evaluate"), say=lambda _: None)
    kinds = [k for k, _ in calls]
    assert kinds == ["train", "generate", "evaluate"]
    assert calls[0][1][2:4] == ["--resume", "latest"]
    gen = calls[1][1]
    assert gen[gen.index("--n") + 1] == "2"  # one of three is there already; the grid does not count
    assert gen[gen.index("--seed") + 1] == "2"  # seed 1 is there: the next seeds, never seed 1 again
    assert f"output.dir={run.folder.as_posix()}" in gen and f"data.source_dir={source}" in gen
    calls.clear()
    (run.folder / "magicapture.safetensors").write_bytes(b"")  # the LoRA under output.name: trained
    assert not run_one(sweep, run, fake("train"), fake("generate"), fake("evaluate", 1), say=lambda _: None)
    assert [k for k, _ in calls] == ["generate", "evaluate"]


def test_sweep_file_and_shard_errors(tmp_path, prepared_data, tiny_model):
    source, reference = prepared_data
    good = _sweep_file(tmp_path, tiny_model[0], source, reference).read_text()
    runs = read_sweep(tmp_path / "pairs.toml").runs
    assert [(r.method, r.pair) for r in shard(runs, "2/2")] == [("without AR", "person one / style one")]
    for bad, message in (
        (good.replace('n = 1', 'n = 0'), "n must be a positive whole number"),
        (good.replace('steps = 2', 'step = 2'), "unknown key 'step'"),
        (good.replace(source.as_posix(), (tmp_path / "nope").as_posix()), "source"),
        (good.replace('name = "without AR"', 'name = "MagiCapture"'), "share the folder name"),
    ):
        (tmp_path / "bad.toml").write_text(bad)
        with pytest.raises(SweepError, match=message):
            read_sweep(tmp_path / "bad.toml")
    for spec in ("3/2", "x", "0/0"):
        with pytest.raises(SweepError, match="give i/n"):
            shard(runs, spec)
    with pytest.raises(SweepError, match="shards count from 1"):
        shard(runs, "0/2")
    res = _cli("--sweep", tmp_path / "missing.toml")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
