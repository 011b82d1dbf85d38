"""The page's list of runs (library/app/runs.py): each run's state read from its folder (a failure with its
reason, a command-line run, a finished run's best step and likeness), the queue, starting over, the
config loaded back into the form, and the progress bar's speed and time left."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from library.app import runs, training_runs

CONFIG = "[model]\npretrained = \"data/tiny_sd\"\n[phase1]\nsteps = 10\n[phase2]\nsteps = 20\n"


def _history(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loss_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_failed_start_shows_its_reason_as_the_state(tmp_path):
    run = tmp_path / "out" / "t1"
    _history(run, [{"phase": 1, "step": s, "loss": 1.0} for s in range(1, 8)])
    (run / "app_config.toml").write_text(CONFIG)
    mark = training_runs.START_MARK
    (run / "app_train.log").write_text(
        f"{mark}\nerror: an older failure\n"  # a start that failed before: not this one's reason
        f"{mark}\nloading\n  phase 1 step 7/10\nerror: the checkpoint was made with phase1.lr_embeddings = 0.005; "
        "this config says 0.01; put it back or start over\nsome trailing line\n")
    info = runs.run_info(run)
    assert info.state_text() == ("failed: the checkpoint was made with phase1.lr_embeddings = 0.005; this config "
                                 "says 0.01; put it back or start over")
    assert info.row() == ["t1", info.state_text(), "7/30", "", ""]
    # the next start that does not fail: no reason any more, the run is stopped where it was
    with open(run / "app_train.log", "a") as log:
        log.write(f"{mark}\nstopped at phase 1 step 7; continue with --resume latest\n")
    assert runs.run_info(run).state_text() == "stopped: phase 1 step 7/10"


def test_the_list_shows_command_line_runs_with_best_step_and_likeness(tmp_path):
    out = tmp_path / "out"
    cli = out / "from_terminal"  # no page files: what train_magicapture.py writes
    _history(cli, [{"phase": 1, "step": 10, "loss": 1.0},
                   {"phase": 2, "step": 10, "loss": 0.5, "eval/identity": 0.41, "eval/copy_share": 0.25,
                    "eval/face_found": 1.0},
                   # more alike but copying a photo: the trainer's rule passes it over, so the page does
                   {"phase": 2, "step": 20, "loss": 0.4, "eval/identity": 0.47, "eval/copy_share": 0.75}])
    (cli / "effective_config.toml").write_text(CONFIG)
    (out / "not_a_run").mkdir()
    other = out / "half"
    _history(other, [{"phase": 1, "step": 3, "loss": 1.0}])
    names = [i.name for i in runs.list_runs(out)]
    assert sorted(names) == ["from_terminal", "half"]
    rows = {i.name: i.row() for i in runs.list_runs(out)}
    assert rows["from_terminal"] == ["from_terminal", "finished: phase 2 step 20/20", "30/30", "phase 2 step 10",
                                     "0.410"]
    assert rows["half"] == ["half", "stopped: phase 1 step 3", "3", "", ""]
    # every scored step copies: the page names the trainer's fallback and says so
    assert runs.best_score([{"phase": 2, "step": 10, "eval/identity": 0.5, "eval/copy_share": 0.75},
                            {"phase": 2, "step": 20, "eval/identity": 0.6, "eval/copy_share": 1.0}]) == (
        "phase 2 step 10 (copies: no step under the copy limit)", 0.5)


def test_saved_config_is_what_the_form_shows_again(tmp_path):
    run = tmp_path / "t1"
    run.mkdir()
    (run / "app_config.toml").write_text(CONFIG + "[tokens]\nsource = \"sks\"\n[loss]\nidentity_weights = \"a.pth\"\n")
    text, values = runs.saved_config(run)
    assert text.startswith("[model]\npretrained = \"data/tiny_sd\"")
    assert values == {"model": "data/tiny_sd", "steps1": 10, "steps2": 20, "tok_src": "sks", "tok_ref": "mcv2",
                      "id_weights": "a.pth", "resolution": 0, "text_encoder": "", "vae": "", "tokenizer": ""}
    # a DiT transformer file's three other parts come back into their fields
    (run / "app_config.toml").write_text('[model]\npretrained = "z.safetensors"\ntext_encoder = "q.safetensors"\n'
                                         'vae = "ae.safetensors"\ntokenizer = "tok"\n')
    assert {k: runs.saved_config(run)[1][k] for k in ("text_encoder", "vae", "tokenizer")} == {
        "text_encoder": "q.safetensors", "vae": "ae.safetensors", "tokenizer": "tok"}
    assert runs.saved_config(tmp_path / "none") == ("", {})


def test_start_over_keeps_the_old_run_under_a_new_name(tmp_path):
    run = tmp_path / "t1"
    _history(run, [{"phase": 1, "step": 1}])
    (tmp_path / "t1-2").mkdir()
    assert runs.has_run(run) and not runs.has_run(tmp_path / "t1-2")
    assert runs.keep_aside_name(run) == "t1-3"
    kept = runs.keep_aside(run)
    assert kept == tmp_path / "t1-3" and (kept / "loss_history.jsonl").is_file() and not run.exists()


def test_a_second_start_waits_in_the_queue_and_starts_when_the_first_ends(tmp_path, fake_python):
    out = tmp_path / "out"
    a, b = out / "a", out / "b"
    pid = training_runs.start_run(CONFIG, a, python=fake_python)
    try:
        runs.enqueue(CONFIG, b, resume=False)
        assert runs.busy(out) == "a"
        assert runs.start_next(out, python=fake_python) == ""  # a still trains: b waits
        states = {i.name: i.state_text() for i in runs.list_runs(out)}
        assert states == {"a": "running", "b": "queued: waits for a to end"}
    finally:
        training_runs.stop_run(a)
    deadline = time.time() + 10  # the reaper thread frees a's folder when the process has ended
    while training_runs.read_lock(a) is not None and time.time() < deadline:
        time.sleep(0.05)
    assert runs.start_next(out, python=fake_python) == "b"
    try:
        assert runs.run_info(b).state == "running" and not (b / runs.QUEUED).exists()
        assert runs.start_next(out, python=fake_python) == ""
    finally:
        training_runs.stop_run(b)
    assert not runs.cancel(b)


def test_progress_counts_speed_from_the_first_step_after_loading(tmp_path):
    info = runs.RunInfo(name="t1", folder=tmp_path, state="running", pid=1, total=(10, 20), phase=1, step=4)
    # resumed at phase 1 step 4: nothing new yet, so the model is loading
    assert runs.speed(info, since=4, now=100.0) is None
    assert runs.progress_html(info, None).startswith(
        "<div class='mc-state'>loading the model (the bar starts at the first step)</div>")
    info.step = 5
    assert runs.speed(info, since=4, now=130.0) is None  # the first step: the clock starts here, not at 100
    info.phase, info.step = 2, 2  # 7 steps later (10 - 5 + 2), 14 s later
    assert runs.speed(info, since=4, now=144.0) == pytest.approx(0.5)
    html = runs.progress_html(info, 0.5, "2.1 GiB of device memory in use")
    assert html == ("<div class='mc-state'>running: phase 2 step 2/20</div>\n"
                    "<div class='mc-phase' data-phase='1'>phase 1: 10/10 steps<br><progress value='10' max='10' "
                    "style='width:100%'></progress></div>\n"
                    "<div class='mc-phase' data-phase='2'>phase 2: 2/20 steps, 0.50 steps/s, about 36 s left<br>"
                    "<progress value='2' max='20' style='width:100%'></progress></div>\n"
                    "<div class='mc-memory'>2.1 GiB of device memory in use</div>")


def test_results_show_the_scores_the_step_files_and_what_is_missing(tmp_path):
    from library.app import results
    from library.config import Config

    run = tmp_path / "t1"
    (run / "evaluation").mkdir(parents=True)
    (run / "evaluation" / "metrics.json").write_text(json.dumps({"folders": {}, "summary": {
        "csim": {"mean": 0.4125, "std": 0.02, "n": 2}, "style": {"mean": None, "std": None, "n": 0},
        "face_found": {"mean": 1.0, "std": 0.0, "n": 2}, "copied": {"mean": 0.5, "std": 0.5, "n": 2}}}))
    assert results.evaluation_scores(run) == [["identity (CSIM, higher is more alike)", "0.412", "0.020", "2"],
                                              ["copy share (nearer one photo than the photos are to each other)",
                                               "0.500", "0.500", "2"],
                                              ["face found (share of images)", "1.000", "0.000", "2"],
                                              ["style (masked CLIP)", "skipped", "", "0"]]
    assert results.evaluation_scores(tmp_path / "none") == []
    cfg = Config()
    cfg.output.dir, cfg.output.name = str(run), "t1"
    for f in ("t1.safetensors", "t1-step00000002.safetensors", "mcv1-step00000002.safetensors"):
        (run / f).write_bytes(b"x")
    assert results.missing_files(cfg) == ("not there yet: mcv1.safetensors, mcv2.safetensors (written when "
                                          "training ends)")
    assert [p.name for p in results.step_files(cfg)] == ["mcv1-step00000002.safetensors",
                                                         "t1-step00000002.safetensors"]


def _fake_smi(folder: Path, output: str) -> Path:
    """A fake `nvidia-smi` in `folder` that prints `output` and keeps its arguments in folder/args."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {folder / 'args'}\nprintf '{output}'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def test_device_memory_is_the_training_process_rows_of_nvidia_smi(tmp_path, monkeypatch):
    # pid 4242 on two GPUs, 1536 + 614.4 MiB = 2150.4 MiB = 2.1 GiB; another process's 7000 MiB is not ours
    bin_dir = _fake_smi(tmp_path / "bin", "999, 7000\\n4242, 1536\\n4242, 614.4\\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert runs.device_memory(4242) == "2.1 GiB of device memory in use"
    assert (bin_dir / "args").read_text() == "--query-compute-apps=pid,used_memory --format=csv,noheader,nounits\n"
    info = runs.RunInfo(name="t1", folder=tmp_path, state="running", pid=4242, total=(10, 20), phase=1, step=4)
    assert runs.progress_html(info, 0.5, runs.device_memory(info.pid)).endswith(
        "\n<div class='mc-memory'>2.1 GiB of device memory in use</div>")
    assert runs.device_memory(42) == ""  # the process holds no device memory (a CPU run beside a GPU job)
    assert runs.device_memory(None) == ""


def test_no_device_memory_figure_without_nvidia_smi_or_its_number(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all: no figure, no error
    assert runs.device_memory(4242) == ""
    info = runs.RunInfo(name="t1", folder=tmp_path, state="running", pid=4242, total=(10, 20), phase=1, step=4)
    assert "mc-memory" not in runs.progress_html(info, 0.5, runs.device_memory(info.pid))
    # MIG and some drivers print [N/A] where the figure should be
    monkeypatch.setenv("PATH", str(_fake_smi(tmp_path / "na", "4242, [N/A]\\n")))
    assert runs.device_memory(4242) == ""
