"""Interrupted runs and `--resume`: killed at any point, a run resumed from its newest whole checkpoint ends
with the same files as a run that was never interrupted; no file under an output name is ever partial; a
changed configuration is checked against the checkpoint's before anything is written.

The interruption tests run the real entry point (`train_magicapture.main`) in child processes of
`tests/forked_training.py`, which kill themselves at exact points through hooks that exist only there;
the uninterrupted reference is a plain `python train_magicapture.py` subprocess. On a CPU with one
thread the resumed run's files are *bitwise* equal to the reference's (tolerance 0): a resumed run
restores the trainable tensors, optimiser, LR schedule, task sampler and noise generator exactly, and
signals stop training between two steps, never inside one. "Equal" is: the same file names; every tensor
of the LoRA, both embeddings and the last checkpoint's trainable tensors `torch.equal`; the LoRA's
metadata equal but for `modelspec.date` (the export's wall-clock time); loss_history.jsonl equal line
for line. The points: Ctrl-C twice and once in phase 1, SIGKILL after a phase-1 step, SIGTERM in phase
2, SIGKILL half-way through a checkpoint's write, SIGKILL after a phase-2 step, a damaged checkpoint on
disk, SIGKILL half-way through the export, and SIGTERM while the model loads.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_magicapture
from library.training import checkpoint as ckpt
from library.config import Config, load_config, save_config
from library.training.run_lock import LOCK_NAME
from library.training.resume import RULES, compare_configs, prepare_resume, rewind_history, rule_for
from testkit.tiny import save_random_arcface, write_prepared

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
OUTPUT_FILES = {"magicapture.safetensors", "mcv1.safetensors", "mcv2.safetensors"}


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume_inputs")
    return {"model": tiny_model[0],
            "source": write_prepared(root / "source", "source", "mcv1", seed=1),
            "reference": write_prepared(root / "reference", "reference", "mcv2", seed=2),
            "arcface": save_random_arcface(root / "arcface.pth")}


def cli_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """configs/test_tiny.toml (3 + 3 steps, a checkpoint every 2, resolution 64) on the shared inputs."""
    return ["--config", "configs/test_tiny.toml", f'model.pretrained="{inputs["model"]}"',
            f'data.source_dir="{inputs["source"]}"', f'data.reference_dir="{inputs["reference"]}"',
            f'loss.identity_weights="{inputs["arcface"]}"', f'output.dir="{out}"',
            "logging.tensorboard=false", "sample.every=0", *extra]


class Forked:
    """tests/forked_training.py: one process that imported everything, forking a child per run."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forked_training.py")], cwd=ROOT, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], logs: Path, kill: str | None = None) -> tuple[int, str, str]:
        """(exit code, negative for a signal; stdout; stderr) of one child."""
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.proc.stdin.write(json.dumps({"argv": argv, "kill": kill, "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return rc, out.read_text(), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forked():
    server = Forked()
    yield server
    server.close()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_nothing_partial(out: Path) -> list[str]:
    """Every file under an output name is whole; only `*.tmp` names may be partial. Returns the names seen."""
    names = []
    for path in sorted(out.iterdir()):
        names.append(path.name)
        if path.name.endswith((".tmp", ".old")):
            continue
        if path.name.startswith("checkpoint-"):
            ckpt.load_checkpoint(ckpt.checkpoint_at(path))  # raises on a truncated or damaged file
        elif path.suffix == ".safetensors":
            assert tensors(path), path
        elif path.name == "effective_config.toml":
            tomllib.loads(path.read_text())
        elif path.name == "timings.json":  # seconds per stage (library/training/timing.py)
            assert set(json.loads(path.read_text())) >= {"seconds", "steps"}
        elif path.name == "loss_history.jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.name == "progress.png":
            from PIL import Image

            with Image.open(path) as plot:
                plot.load()  # raises on a truncated file
        elif path.name == LOCK_NAME:  # a killed run's lock: the next run takes it over (tests/test_output_guards.py)
            json.loads(path.read_text())
        else:
            raise AssertionError(f"unexpected file {path}")
    return names


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ interruption, end to end
def test_killed_at_every_kind_of_point_and_resumed_ends_equal_to_an_uninterrupted_run(inputs, forked, tmp_path):
    reference_out, out = tmp_path / "reference", tmp_path / "interrupted"
    reference = subprocess.Popen([sys.executable, "train_magicapture.py", *cli_args(inputs, reference_out)], cwd=ROOT,
                                 env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    args = cli_args(inputs, out)

    # 1. Ctrl-C twice in phase 1 step 1: stops at once, saves nothing (the step was incomplete)
    rc, _, err = forked.run(args, tmp_path / "1", kill="int2:1:1")
    assert rc == 130 and "Traceback" not in err
    assert last_line(err) == ("interrupted (SIGINT): stopped at once in phase 1 after step 0; not saved (the step in "
                              "progress was incomplete), no checkpoint yet: start again without --resume")
    assert not ckpt.list_checkpoints(out)
    # 2. a new run, Ctrl-C once in phase 1 step 1: that step finishes, is saved, and the run says how to go on
    rc, _, err = forked.run(args, tmp_path / "2", kill="int:1:1")
    assert rc == 130 and "Traceback" not in err
    assert last_line(err) == (f"interrupted (SIGINT): stopped in phase 1 at step 1/3: saved {out}/checkpoint-p1-000001; "
                              f"continue with --resume latest")
    assert assert_nothing_partial(out) == ["checkpoint-p1-000001", "effective_config.toml", "loss_history.jsonl"]
    # 3. SIGKILL after phase 1 step 3 was computed, before the end of the phase saved it
    rc, _, _ = forked.run([*args, "--resume"], tmp_path / "3", kill="kill:1:3")
    assert rc == -9
    assert [c.path.name for c in ckpt.list_checkpoints(out)] == ["checkpoint-p1-000001", "checkpoint-p1-000002"]
    assert_nothing_partial(out)
    # 4. SIGTERM in phase 2 step 1: as Ctrl-C (the step finishes, is saved, exit 128 + 15)
    rc, stdout, err = forked.run([*args, "--resume"], tmp_path / "4", kill="term:2:1")
    assert rc == 143 and "Traceback" not in err
    assert "resuming from checkpoint-p1-000002: phase 1, step 2" in stdout
    assert last_line(err) == (f"interrupted (SIGTERM): stopped in phase 2 at step 1/3: saved {out}/checkpoint-p2-000001; "
                              f"continue with --resume latest")
    assert assert_nothing_partial(out)[:2] == ["checkpoint-p1-000003", "checkpoint-p2-000001"]
    # 5. SIGKILL in the middle of writing checkpoint-p2-000002 (half of trainable.safetensors on disk)
    rc, _, _ = forked.run([*args, "--resume"], tmp_path / "5", kill="write:checkpoint-p2-000002")
    assert rc == -9
    assert any(re.fullmatch(r"\.checkpoint-p2-000002\.\w+\.tmp", n) for n in assert_nothing_partial(out))
    assert ckpt.list_checkpoints(out)[-1].path.name == "checkpoint-p2-000001"
    # 6. SIGKILL after phase 2 step 3 was computed; the half-written folder of the last kill is gone
    rc, _, _ = forked.run([*args, "--resume"], tmp_path / "6", kill="kill:2:3")
    assert rc == -9
    assert [n for n in assert_nothing_partial(out) if n.startswith("checkpoint")] == ["checkpoint-p2-000001",
                                                                                      "checkpoint-p2-000002"]
    # 7. checkpoint-p2-000002 damaged on disk: --resume latest falls back to p2-000001 with one line; then
    #    SIGKILL in the middle of the export (mcv1 written, mcv2 half written, the LoRA not yet)
    damaged = out / "checkpoint-p2-000002" / "trainable.safetensors"
    whole = damaged.stat().st_size
    os.truncate(damaged, whole - 100)
    rc, stdout, _ = forked.run([*args, "--resume"], tmp_path / "7", kill="write:mcv2.safetensors")
    assert rc == -9
    assert [line for line in stdout.splitlines() if line.startswith(("warning", "resum"))] == [
        f"warning: {damaged}: {whole - 100} bytes, the manifest says {whole} (truncated or overwritten); resuming "
        f"from checkpoint-p2-000001, the newest whole checkpoint (the damaged one is removed at the next save)",
        "resuming from checkpoint-p2-000001: phase 2, step 1",
    ]
    names = assert_nothing_partial(out)
    assert any(re.fullmatch(r"\.mcv2\.safetensors\.\w+\.tmp", n) for n in names)
    assert "mcv2.safetensors" not in names and "magicapture.safetensors" not in names
    assert "mcv1.safetensors" in names and "checkpoint-p2-000003" in names
    # 8. resumed from the final checkpoint (with a setting that is safe to change): only the export runs
    rc, stdout, err = forked.run([*args, "--resume", "logging.print_every=1"], tmp_path / "8")
    assert rc == 0, err
    assert [line for line in stdout.splitlines() if line.startswith(("warning", "resum", "phase"))] == [
        "resume: changed since checkpoint-p2-000003, and safe to change: logging.print_every 100 -> 1",
        "resuming from checkpoint-p2-000003: phase 2, step 3",
    ]

    assert reference.wait(timeout=300) == 0, reference.communicate()[1]
    names = assert_nothing_partial(out)
    assert names == assert_nothing_partial(reference_out) == [
        "checkpoint-p2-000002", "checkpoint-p2-000003", "effective_config.toml", "loss_history.jsonl",
        "magicapture.safetensors", "mcv1.safetensors", "mcv2.safetensors", "progress.png", "timings.json"]
    for name in [*sorted(OUTPUT_FILES), "checkpoint-p2-000003/trainable.safetensors"]:
        got, want = tensors(out / name), tensors(reference_out / name)
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), f"{name} differs from the uninterrupted run"
    with safe_open(str(out / "magicapture.safetensors"), "pt") as a, safe_open(str(reference_out / "magicapture.safetensors"), "pt") as b:
        got, want = a.metadata(), b.metadata()
        assert got.pop("modelspec.date") >= want.pop("modelspec.date")  # the export's time: the only difference
        assert got == want
    assert history(out) == history(reference_out)  # every step's losses, once each, as in one run
    assert [(h["phase"], h["step"]) for h in history(out)] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


def test_sigterm_before_training_is_one_line_and_leaves_no_checkpoint(inputs, forked, tmp_path):
    out = tmp_path / "out"
    rc, _, err = forked.run(cli_args(inputs, out), tmp_path / "log", kill="term-at-load")
    assert rc == 143
    assert err.strip().splitlines()[-1] == ("interrupted (SIGTERM): outside a training step; the checkpoints written so "
                                            "far are kept (continue with --resume latest)")
    assert "Traceback" not in err and not ckpt.list_checkpoints(out)


# ------------------------------------------------------------------ the configuration against the checkpoint's
def base_config(inputs: dict[str, Path], out: Path, *extra: str) -> Config:
    return load_config(ROOT / "configs/test_tiny.toml", cli_args(inputs, out, *extra)[2:])


def fake_checkpoint(out: Path, phase: int, step: int, config: dict | None, keep: int = 0) -> Path:
    """A small but whole checkpoint (the config check runs before any tensor is used)."""
    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": step},
             "sampler": {"rng": [3, [0] * 625, None], "cursor": 0}, "generator": torch.Generator().get_state()}
    trainable = {"token_embedding.new_vectors": torch.arange(64.0).view(2, 32) * step}
    return ckpt.save_checkpoint(out, phase, step, trainable, state, keep=keep, config=config)


def test_every_config_key_has_a_resume_rule():
    keys = [f"{s}.{k}" for s, values in Config().to_dict().items() for k in values]
    for key in keys:
        assert rule_for(key)[0] in ("fixed", "fixed from phase 2", "per phase", "safe"), key
    assert all(k.endswith(".*") or k in keys for k in RULES), "RULES names a key Config does not have"


REFUSED = [  # (override, the change as the one-line error lists it), for a checkpoint at phase 2 step 2
    ("lora.rank=8", "lora.rank 4 -> 8 (the LoRA's shape and scale)"),
    ("lora.targets=\"kohya_all\"", 'lora.targets "cross_attn" -> "kohya_all" (the LoRA\'s shape and scale)'),
    ("tokens.vectors=2", "tokens.vectors 1 -> 2 (the shape of the trained vectors)"),
    ("tokens.source=\"sks\"", 'tokens.source "mcv1" -> "sks" (the token words the vectors belong to)'),
    ("data.resolution=128", "data.resolution 64 -> 128 (the cached latents the training state indexes)"),
    ("data.captions=\"sidecar\"", 'data.captions "template" -> "sidecar" (the prompts the tokens learn in)'),
    ("train.seed=7", "train.seed 42 -> 7 (the checkpoint continues the old seed's random streams)"),
    ("optimizer.name=\"SGD\"", 'optimizer.name "AdamW" -> "SGD" (the checkpoint holds this optimiser\'s state)'),
    ("phase1.steps=5", "phase1.steps 3 -> 5 (phase 1 has finished with the old value)"),
    ("phase1.lr_embeddings=0.01", "phase1.lr_embeddings 0.0005 -> 0.01 (phase 1 has finished with the old value)"),
    ("phase2.steps=1", "phase2.steps 3 -> 1 (the checkpoint is at step 2)"),
    ('phase2.tasks=["source", "reference"]',
     'phase2.tasks ["source", "reference", "composed"] -> ["source", "reference"] (the phase\'s task cursor runs over this list)'),
    # the default is empty: the model family's layers (SD 1.x's five 16x16 ones)
    ('attention.layers=["down_blocks.2.attentions.0"]', 'attention.layers [] -> ["down_blocks.2.attentions.0"] '
     '(the layers phase 2\'s refocusing and its collapse guard measure)'),
]


@pytest.mark.parametrize("override, listed", REFUSED, ids=[r[0].split("=")[0] for r in REFUSED])
def test_resume_with_a_changed_fixed_key_is_one_line_before_anything_is_written(inputs, tmp_path, capsys, override, listed):
    out = tmp_path / "out"
    saved = fake_checkpoint(out, 2, 2, base_config(inputs, out).to_dict())
    save_config(base_config(inputs, out), out / "effective_config.toml")
    (out / "loss_history.jsonl").write_text('{"phase": 2, "step": 3, "loss": 1.0}\n')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}

    rc = train_magicapture.main([*cli_args(inputs, out), override, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"error: {saved}/config.toml: cannot resume with {listed} ; set it back as in that file, "
                   f"or train anew into another output.dir"]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_several_refused_keys_are_listed_in_one_line(inputs, tmp_path):
    out = tmp_path / "out"
    fake_checkpoint(out, 2, 2, base_config(inputs, out).to_dict())
    with pytest.raises(Exception) as caught:
        prepare_resume(base_config(inputs, out, "lora.rank=8", "tokens.vectors=2", "sample.every=5"), "latest")
    assert str(caught.value) == (
        f"{out}/checkpoint-p2-000002/config.toml: cannot resume with tokens.vectors 1 -> 2 (the shape of the trained "
        f"vectors), lora.rank 4 -> 8 (the LoRA's shape and scale) ; set them back as in that file, or train anew into "
        f"another output.dir")


def test_safe_changes_are_accepted_and_listed_in_one_line(inputs, tmp_path):
    out = tmp_path / "out"
    fake_checkpoint(out, 2, 2, base_config(inputs, out).to_dict())
    changed = ["phase2.steps=9", "phase2.lr_unet=5e-5", "phase2.batch_size=6", "phase2.grad_accum=2",
               "loss.attn_weight=1.0", "optimizer.betas=[0.8, 0.99]", "train.mixed_precision=\"bf16\"",
               "output.save_every=100", "output.name=\"other\"", "sample.every=5", "logging.print_every=1",
               "tokens.norm_target=0.5", "attention.backend=\"sdpa\""]
    point = prepare_resume(base_config(inputs, tmp_path / "elsewhere", *changed), str(out / "checkpoint-p2-000002"))
    assert point.info.order == (2, 2)
    assert point.notes == [
        "resume: changed since checkpoint-p2-000002, and safe to change: tokens.norm_target 0.4 -> 0.5, "
        "phase2.steps 3 -> 9, phase2.batch_size 3 -> 6, phase2.grad_accum 1 -> 2, phase2.lr_unet 0.0001 -> 5e-05, "
        "loss.attn_weight 2.5 -> 1.0, optimizer.betas [0.9, 0.999] -> [0.8, 0.99], train.mixed_precision \"no\" -> \"bf16\", "
        f"output.dir \"{out}\" -> \"{tmp_path / 'elsewhere'}\", output.name \"magicapture\" -> \"other\", "
        "output.save_every 2 -> 100, sample.every 0 -> 5, logging.print_every 100 -> 1"]
    same = prepare_resume(base_config(inputs, out), "latest")
    assert same.notes == [] and torch.equal(same.trainable["token_embedding.new_vectors"], torch.arange(64.0).view(2, 32) * 2)


def test_what_phase_1_checkpoints_leave_free(inputs, tmp_path):
    """Before phase 2 the LoRA does not exist yet: its shape, phase 2's tasks and the layers may still change."""
    saved = base_config(inputs, tmp_path).to_dict()
    new = base_config(inputs, tmp_path, "lora.rank=8", 'phase2.tasks=["source"]', 'attention.layers=["down_blocks.2.attentions.0"]',
                      "phase1.steps=5", 'phase1.tasks=["source"]').to_dict()
    refused, accepted = compare_configs(saved, new, phase=1, step=2)
    assert [c.key for c in refused] == ["phase1.tasks"]
    assert [c.key for c in accepted] == ["phase1.steps", "phase2.tasks", "lora.rank", "attention.layers"]
    refused, _ = compare_configs(saved, base_config(inputs, tmp_path, "phase1.steps=1").to_dict(), phase=1, step=2)
    assert [str(c) for c in refused] == ["phase1.steps 3 -> 1 (the checkpoint is at step 2)"]


def test_paths_written_another_way_and_keys_an_older_version_did_not_save_are_not_changes(inputs, tmp_path, monkeypatch):
    saved = base_config(inputs, tmp_path).to_dict()
    del saved["loss"]["id_face"]  # a key added after the checkpoint was written: its default
    new = base_config(inputs, tmp_path).to_dict()
    monkeypatch.chdir(inputs["source"].parent)
    new["data"]["source_dir"] = "source"  # relative to the working directory: the same folder
    new["model"]["pretrained"] = str(inputs["model"]) + "/"
    assert compare_configs(saved, new, 2, 2) == ([], [])
    new["loss"]["id_face"] = "detector"
    assert [str(c) for c in compare_configs(saved, new, 2, 2)[1]] == ['loss.id_face "landmarks" -> "detector"']


# ------------------------------------------------------------------ damaged checkpoints
def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage_same_size(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _without_manifest(damage):
    def apply(path: Path) -> None:
        (path.parent / "manifest.json").unlink()
        damage(path)
    return apply


class _Marker:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/magicapture_resume_marker")


def _hostile_pickle(path: Path) -> None:
    (path.parent / "manifest.json").unlink()
    path.write_bytes(pickle.dumps({"optimizer": _Marker()}))


DAMAGE = {  # name: (file, how, what the one line says after the file's path)
    "truncated trainable": ("trainable.safetensors", _truncate, "bytes, the manifest says"),
    "overwritten trainable": ("trainable.safetensors", _garbage_same_size, "contents differ from the manifest's SHA-256"),
    "missing trainable": ("trainable.safetensors", Path.unlink, "missing"),
    "missing state": ("state.pt", Path.unlink, "missing"),
    "garbage state": ("state.pt", lambda p: p.write_bytes(b"not a checkpoint" * 10), "bytes, the manifest says"),
    "garbage manifest": ("manifest.json", lambda p: p.write_text("{"), "unreadable"),
    "truncated trainable, no manifest": ("trainable.safetensors", _without_manifest(_truncate),
                                         "not a readable .safetensors file (truncated: it ends before the tensors its header lists"),
    "truncated state, no manifest": ("state.pt", _without_manifest(_truncate), "truncated or corrupt (its zip archive is incomplete)"),
    "garbage state, no manifest": ("state.pt", _without_manifest(lambda p: p.write_bytes(b"\x80\x04garbage")),
                                   "refused: not a plain-tensor pickle (Unsupported operand 103)"),
    "state of another kind, no manifest": ("state.pt", _without_manifest(lambda p: torch.save([1, 2], p)),
                                           "not a training state (needs optimizer, scheduler, sampler, generator)"),
    "hostile pickle as state": ("state.pt", _hostile_pickle, "refused: not a plain-tensor pickle (Unsupported operand 149)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_passed_over_by_latest_and_refused_by_path(kind, tmp_path):
    name, damage, says = DAMAGE[kind]
    out = tmp_path / "out"
    config = Config().to_dict()
    fake_checkpoint(out, 1, 2, config)
    newest = fake_checkpoint(out, 2, 1, config)
    damage(newest / name)
    MARKER.unlink(missing_ok=True)

    info, trainable, state, notes = ckpt.find_resumable("latest", out)
    assert info.path.name == "checkpoint-p1-000002" and torch.equal(trainable["token_embedding.new_vectors"][0, :3], torch.tensor([0.0, 2.0, 4.0]))
    assert len(notes) == 1 and notes[0].startswith(f"warning: {newest / name}: {says}" if says != "bytes, the manifest says"
                                                   else f"warning: {newest / name}: ")
    assert says in notes[0] and notes[0].endswith("; resuming from checkpoint-p1-000002, the newest whole checkpoint "
                                                  "(the damaged one is removed at the next save)")
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.find_resumable(str(newest), out)
    assert str(caught.value).startswith(f"{newest / name}: ") and says in str(caught.value)
    assert "\n" not in str(caught.value) and not MARKER.exists()


def test_resume_from_a_damaged_path_is_one_line_and_no_whole_checkpoint_is_one_line(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    config = base_config(inputs, out).to_dict()
    older, newest = fake_checkpoint(out, 1, 2, config), fake_checkpoint(out, 2, 1, config)
    _truncate(newest / "state.pt")
    assert train_magicapture.main([*cli_args(inputs, out), "--resume", str(newest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {newest}/state.pt: ") and "truncated" in err[0]
    (older / "trainable.safetensors").unlink()
    assert train_magicapture.main([*cli_args(inputs, out), "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out}: none of the 2 checkpoints is whole (newest: {newest}/state.pt: "
        f"{(newest / 'state.pt').stat().st_size} bytes, the manifest says {(older / 'state.pt').stat().st_size} "
        f"(truncated or overwritten)) ; train again without --resume, or into another output.dir"]
    assert train_magicapture.main([*cli_args(inputs, tmp_path / "empty"), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --resume: no checkpoint-p*-* folder in {tmp_path / 'empty'}"


# ------------------------------------------------------------------ writing checkpoints
def test_checkpoints_replace_atomically_prune_and_drop_an_abandoned_future(tmp_path):
    out = tmp_path / "out"
    for phase, step in ((1, 2), (1, 3), (2, 2), (2, 4)):
        fake_checkpoint(out, phase, step, None, keep=0)
    (out / ".checkpoint-p2-000006.k3j_x9ab.tmp").mkdir()  # a kill in the middle of a write
    (out / ".checkpoint-p2-000002.a1b2c3d4.old").mkdir()  # a kill between the two renames of a replacement
    (out / "checkpoint-notes").mkdir()  # not ours: left alone
    (out / ".checkpoint-notes.abcdefgh.tmp").mkdir()
    assert sorted(p.name for p in ckpt.remove_stale_temporaries(out)) == [".checkpoint-p2-000002.a1b2c3d4.old",
                                                                            ".checkpoint-p2-000006.k3j_x9ab.tmp"]
    (out / ".checkpoint-notes.abcdefgh.tmp").rmdir()
    # resumed from p1-000003 and saving p2-000002 again: it is replaced whole, p2-000004 (the run that was
    # abandoned by resuming earlier) goes, and keep=2 counts back from the checkpoint just written
    path = fake_checkpoint(out, 2, 2, {"a": {"b": 1}}, keep=2)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-notes", "checkpoint-p1-000003", "checkpoint-p2-000002"]
    assert sorted(p.name for p in path.iterdir()) == ["config.toml", "manifest.json", "state.pt", "trainable.safetensors"]
    assert ckpt.read_checkpoint_config(ckpt.checkpoint_at(path)) == {"a": {"b": 1}}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["phase"] == 2 and manifest["step"] == 2 and set(manifest["files"]) == {
        "trainable.safetensors", "state.pt", "config.toml"}
    assert manifest["files"]["state.pt"]["bytes"] == (path / "state.pt").stat().st_size


def test_rewind_history_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "loss_history.jsonl"
    lines = [{"phase": 1, "step": 1, "loss": 1.5}, {"phase": 1, "step": 2, "loss": 1.25}, {"phase": 2, "step": 1, "loss": 2.0},
             {"phase": 2, "step": 2, "loss": 0.5}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"phase": 2, "st')  # the last line cut by a kill
    rewind_history(path, 2, 1)
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
    rewind_history(path, 0, 0)  # a new run in the same folder
    assert path.read_text() == ""


# ------------------------------------------------------------------ the optimiser's state and the config's rates
def _adamw_and_schedule(lr: float, betas=(0.9, 0.999), weight_decay=0.01, value=None):
    from diffusers.optimization import get_scheduler

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]) if value is None else value.clone())
    opt = torch.optim.AdamW([{"params": [p], "lr": lr}], betas=betas, weight_decay=weight_decay)
    return p, opt, get_scheduler("linear", optimizer=opt, num_warmup_steps=0, num_training_steps=10)


def _step(p, opt, sched, k: int) -> None:
    p.grad = torch.tensor([0.5, -1.0, 0.25]) * (k + 1)
    opt.step()
    sched.step()
    opt.zero_grad()


def test_resumed_optimiser_matches_an_uninterrupted_one_and_takes_new_rates():
    from library.training.optim import load_training_state

    p, opt, sched = _adamw_and_schedule(1e-2)
    for k in range(3):
        _step(p, opt, sched, k)
    saved_value = p.detach().clone()
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    for k in range(3, 5):
        _step(p, opt, sched, k)

    q, opt2, sched2 = _adamw_and_schedule(1e-2, value=saved_value)
    load_training_state(opt2, sched2, copy.deepcopy(saved_opt), copy.deepcopy(saved_sched))
    for k in range(3, 5):
        _step(q, opt2, sched2, k)
    assert torch.equal(q, p) and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    r, opt3, sched3 = _adamw_and_schedule(5e-3, betas=(0.5, 0.9), weight_decay=0.0, value=saved_value)
    load_training_state(opt3, sched3, copy.deepcopy(saved_opt), copy.deepcopy(saved_sched))
    group = opt3.param_groups[0]
    assert group["lr"] == 5e-3 * (7 / 10) and group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.0
    # diffusers' linear schedule: base rate x (10 - step) / 10
    assert sched3.base_lrs == [5e-3] and sched3.last_epoch == 3 and sched3.get_last_lr() == [5e-3 * (7 / 10)]
    assert torch.equal(opt3.state[r]["exp_avg"], saved_opt["state"][0]["exp_avg"])  # the moments carry over
    _step(r, opt3, sched3, 3)
    assert group["lr"] == 5e-3 * (6 / 10)


def test_stale_temporaries_beside_the_outputs_are_removed_and_nothing_else(tmp_path):
    from library.training.outputs import remove_stale_temporaries

    cfg = Config()
    cfg.output.dir, cfg.output.name, cfg.output.embeddings_pt = str(tmp_path), "run", True
    ours = [".run.safetensors.x1y2z3w4.tmp", ".mcv1.safetensors.abcdefgh.tmp", ".mcv2.pt.a_b_c_d1.tmp",
            ".effective_config.toml.q1w2e3r4.tmp", ".loss_history.jsonl.zzzzzzzz.tmp"]
    others = ["run.safetensors", "notes.tmp", ".mcv3.safetensors.abcdefgh.tmp", "run.safetensors.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in remove_stale_temporaries(cfg)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
