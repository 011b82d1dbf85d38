"""The sweep as idempotent jobs: the job lock, SLURM array shards, generation that continues from the next
seed, two `--shard` workers on one file, and Ray on a local cluster with a worker killed mid-training.
Every wait is on an event (a file, a process exit) with a generous deadline, never on the clock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from library.evaluation.job_lock import LOCK_NAME, JobBusy, _break, claim_job, read_lock
from library.evaluation.sweep import SweepError, read_sweep, shard, shard_from_env
from library.files.images import read_image
from sweep_files import write_sweep_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "RAY_DEDUP_LOGS": "0"}
N = 2  # images per run
PAIR = "person_one_style_one"  # the pair's folder
A, B = "MagiCapture / person one / style one", "without AR / person one / style one"  # the two runs


def _dead_pid() -> int:
    """The pid of a process that has exited (a worker that was killed)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "owner": None, "token": "t0",
                                "started": 0.0, **record}))
    return path


def test_the_job_lock_refuses_a_live_holder_and_takes_over_dead_stale_and_same_owner_ones(tmp_path):
    lines: list[str] = []
    job = tmp_path / "job"
    first = claim_job(job, say=lines.append)
    assert read_lock(job)["token"] == first.token and read_lock(job)["pid"] == os.getpid()
    with pytest.raises(JobBusy, match=rf"held by process {os.getpid()} on .*, last heartbeat \d+ s ago"):
        claim_job(job, say=lines.append)  # a live holder on this host, fresh heartbeat
    # a heartbeat older than the timeout: taken over, judged at an injected time (no waiting)
    second = claim_job(job, timeout_s=300, now=time.time() + 301, say=lines.append)
    assert lines == [f"note: {job}: took over the job lock of process {os.getpid()} on {socket.gethostname()}, "
                     f"last heartbeat 301 s ago, whose heartbeat stopped more than 300 s ago"]
    first.release()  # no longer its lock: the new holder's stays
    assert read_lock(job)["token"] == second.token and first.owned() is False
    os.utime(job / LOCK_NAME, (0, 0))
    second.heartbeat()
    assert time.time() - (job / LOCK_NAME).stat().st_mtime < 60
    first.heartbeat()  # not its lock: leaves the mtime alone
    assert read_lock(job)["token"] == second.token
    second.release()
    assert not (job / LOCK_NAME).exists()

    lines.clear()
    _write_lock(job, pid=_dead_pid())  # this host, a pid that no longer runs: taken over at once
    assert claim_job(job, say=lines.append).owned()
    assert lines[0].endswith("which is no longer running")
    (job / LOCK_NAME).unlink()

    lines.clear()
    _write_lock(job, host="elsewhere", pid=1, owner="job-7")  # another machine, fresh: busy ...
    with pytest.raises(JobBusy, match="held by process 1 on elsewhere"):
        claim_job(job, owner="job-8", say=lines.append)
    assert claim_job(job, owner="job-7", say=lines.append).owned()  # ... unless it is our own earlier attempt
    assert lines == [f"note: {job}: took over the job lock of process 1 on elsewhere, last heartbeat 0 s ago, "
                     "an earlier attempt of this job, whose worker died"]
    (job / LOCK_NAME).unlink()

    _write_lock(job, host="elsewhere", pid=1)  # stale, but another worker is breaking it right now
    later = time.time() + 1000
    (job / (LOCK_NAME + ".break")).write_text("")
    os.utime(job / (LOCK_NAME + ".break"), (later, later))  # the breaker is fresh at that time
    with pytest.raises(JobBusy, match="another worker is taking over its lock"):
        claim_job(job, now=later)
    assert read_lock(job)["token"] == "t0"
    (job / (LOCK_NAME + ".break")).unlink()
    # a lock found stale, then replaced by a new holder's before the breaker got there: the new one stays
    assert _break(job / LOCK_NAME, "stale-token", 300, later) and read_lock(job)["token"] == "t0"
    assert not (job / (LOCK_NAME + ".break")).exists()


@pytest.mark.parametrize("array,expected", [
    ({"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3", "ids": [0, 1, 2]}, ["1/3", "2/3", "3/3"]),
    ({"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3", "ids": [1, 2, 3]}, ["1/3", "2/3", "3/3"]),
    ({"SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "2", "ids": [4, 6]},
     ["1/2", "2/2"]),
])
def test_every_slurm_array_task_gets_its_shard_and_together_they_run_every_run_once(array, expected):
    ids = array.pop("ids")
    specs = [shard_from_env({**array, "SLURM_ARRAY_TASK_ID": str(i)}) for i in ids]
    assert specs == expected
    runs = list(range(7))
    done = [r for spec in specs for r in shard(runs, spec)]
    assert sorted(done) == runs  # no run twice, none left out (a 0-based array's last task included)


def test_slurm_arrays_that_would_skip_runs_and_zero_based_shards_are_one_line_errors():
    assert shard_from_env({}) is None
    for env in ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"},  # 1,2,7
                {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
                 "SLURM_ARRAY_TASK_COUNT": "2"},
                {"SLURM_ARRAY_TASK_ID": "1"},
                {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}):
        with pytest.raises(SweepError) as err:
            shard_from_env(env)
        assert "\n" not in str(err.value) and "--shard i/n" in str(err.value)
    with pytest.raises(SweepError, match=r"shards count from 1 \(1/4 to 4/4\)"):
        shard([1, 2, 3, 4], "0/4")


def _sweep_file(tmp_path: Path, model: Path, source: Path, reference: Path) -> Path:
    return write_sweep_file(tmp_path, model, source, reference, n=N)


def _start(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _seeds_and_hashes(run: Path) -> tuple[list[str], set[str]]:
    """The generated images' names and the hashes of their pixels (a repeated seed repeats its pixels)."""
    images = sorted((run / "generated").glob("*.png"))
    return [p.name for p in images], {hashlib.sha256(read_image(p).image.tobytes()).hexdigest() for p in images}


def _check_finished(table: Path) -> None:
    for method in ("MagiCapture", "without_AR"):
        run = table / method / PAIR
        names, hashes = _seeds_and_hashes(run)
        assert [n.split("-", 1)[1] for n in names] == [f"{k}.png" for k in range(1, N + 1)]
        assert len(hashes) == N  # distinct images
        assert (run / "evaluation" / "metrics.json").is_file() and not (run / LOCK_NAME).exists()
    rows = json.loads((table / "table.json").read_text())["rows"]
    assert [(r["method"], r["pairs"], r["of"]) for r in rows] == [("MagiCapture", 1, 1), ("without AR", 1, 1)]


def _wait_for(what: str, condition, proc: subprocess.Popen | None = None, seconds: float = 300) -> None:
    """Poll `condition` (a file, a process) until true; fail naming `what` after a generous deadline."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc is None or proc.poll() is None, f"{what}: the worker ended first: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_two_shard_workers_on_one_file_run_each_run_once_and_a_killed_ones_run_is_continued(tmp_path, tiny_model,
                                                                                            prepared_data):
    pairs = _sweep_file(tmp_path, tiny_model[0], *prepared_data)
    table = tmp_path / "table"
    run_a, run_b = table / "MagiCapture" / PAIR, table / "without_AR" / PAIR
    # a worker killed while it trains A: its training dies with it, its job lock stays behind
    killed = _start("--sweep", pairs, "--shard", "1/1")
    _wait_for("A's training", lambda: isinstance(_trainer_pid(run_a), int), killed)
    trainer = _trainer_pid(run_a)
    killed.kill()
    killed.communicate()
    _wait_for("the orphaned training's end", lambda: not _alive(trainer), seconds=60)
    assert not (run_a / "magicapture.safetensors").exists() and read_lock(run_a)["pid"] == killed.pid

    # the same shard started twice: each run is claimed by one of them, the other passes it over
    first, second = _start("--sweep", pairs, "--shard", "1/1"), _start("--sweep", pairs, "--shard", "1/1")
    outs = _finish(first) + _finish(second)
    assert outs.count(f"note: {run_a}: took over the job lock of process {killed.pid} on") == 1, outs[-4000:]
    for where in (A, B):
        assert outs.count(f"sweep: {where}: training in") == 1
        assert outs.count(f"sweep: {where}: finished\n") == 1
    _check_finished(table)

    # B as an interrupted generation leaves it (whole images of the first seeds, no evaluation): topped up
    # with the next seed, so the evaluated set holds no copy of seed 1
    (run_b / "evaluation" / "metrics.json").unlink()
    (run_b / "generated" / f"00001-{N}.png").unlink()
    again = _finish(_start("--sweep", pairs))
    assert f"{A}: finished earlier, skipped" in again
    assert f"sweep: {B}: generating 1 image (seed {N})" in again and "training" not in again
    _check_finished(table)


def _trainer_pid(run: Path) -> int | None:
    """The pid in the trainer's own lock record (`.training.lock`), once it has written it."""
    try:
        return json.loads((run / ".training.lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def test_ray_on_a_local_cluster_retries_a_killed_worker(tmp_path, tiny_model, prepared_data):
    pytest.importorskip("ray")
    pairs = _sweep_file(tmp_path, tiny_model[0], *prepared_data)
    table = tmp_path / "table"
    driver = _start("--sweep", pairs, "--ray")
    folders = [table / m / PAIR for m in ("MagiCapture", "without_AR")]
    # a worker in the middle of training: its job lock and the trainer's own lock are both there
    _wait_for("a training", lambda: any(_trainer_pid(f) and read_lock(f).get("pid") for f in folders), driver)
    victim = next(f for f in folders if _trainer_pid(f) and read_lock(f).get("pid"))
    worker = read_lock(victim)["pid"]
    assert worker != driver.pid
    os.kill(worker, signal.SIGKILL)
    out = _finish(driver)
    where = {"MagiCapture": A, "without_AR": B}[victim.parent.name]
    assert f"note: {victim}: took over the job lock of process {worker}" in out, out[-4000:]
    assert out.count(f"sweep: {where}: training") == 2  # the killed attempt and its retry
    for w in (A, B):  # the driver's line per job: each done once
        assert out.count(f"sweep: {w}: job done\n") == 1 and f"sweep: {w}: job failed" not in out
    assert out.splitlines()[-1].startswith("wrote table.json") and "failed" not in out.splitlines()[-1]
    _check_finished(table)


def test_ray_missing_is_one_line_naming_the_requirements_file(tmp_path, tiny_model, prepared_data, monkeypatch):
    from library.evaluation.sweep_ray import run_on_ray

    sweep = read_sweep(_sweep_file(tmp_path, tiny_model[0], *prepared_data))
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives `import ray`
    with pytest.raises(SweepError, match=r"^--ray needs Ray.* ; pip install -r requirements-cluster.txt$"):
        run_on_ray(sweep, sweep.runs, None, ROOT)
