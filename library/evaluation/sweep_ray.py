"""`evaluate.py --sweep PAIRS.toml --ray [ADDRESS]`: the sweep's jobs on a Ray cluster.

One Ray task per (method, pair) run, each the same idempotent job a `--shard` worker runs (`run_job`: the
job lock in the run's folder, train, generate the missing seeds, evaluate), so Ray workers and shard
workers can share one sweep. A task asks for one GPU when the cluster has any (training, generation and
evaluation run as subprocesses that see only that GPU), else one CPU. A task whose worker dies (killed,
out of memory, a lost node) is retried up to JOB_RETRIES times; every attempt carries the same owner key
in the job lock, so the retry takes over its dead attempt's lock at once instead of waiting for the
heartbeat timeout. A bar counts the finished runs.

Without ADDRESS Ray starts on this machine (one job per core); with it (`auto`, `HOST:6379`, or
`ray://HOST:10001`) it joins that cluster, whose nodes must see this repository, the sweep's folders and
the same Python environment at the same paths (a shared file system), as the job locks need anyway.
Ray is optional: `pip install -r requirements-cluster.txt`.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from library.evaluation.sweep import BUSY, DONE, FAILED, Run, Sweep, SweepError, read_sweep, run_job, subprocess_runner
from library.files.messages import one_line

JOB_RETRIES = 3  # attempts after the first, for a task whose worker died (not for a run that failed)
SCRIPTS = ("train_magicapture.py", "generate.py", "evaluate.py")

__all__ = ["JOB_RETRIES", "run_on_ray"]


def _job(sweep_file: str, cwd: str, index: int, owner: str, scripts: str) -> str:
    """The Ray task: run `index` of the sweep in `sweep_file` as a job; returns DONE, FAILED or BUSY.
    Runs in a Ray worker process, from the driver's working folder (the sweep's relative paths)."""
    os.chdir(cwd)
    sweep = read_sweep(sweep_file)
    train, generate, evaluate = (subprocess_runner(Path(scripts) / name) for name in SCRIPTS)
    return run_job(sweep, sweep.runs[index], train, generate, evaluate, owner=owner,
                   say=lambda line: print(line, file=sys.stderr, flush=True))


def run_on_ray(sweep: Sweep, runs: list[Run], address: str | None, scripts: Path,
               **init: object) -> dict[str, list[Run]]:
    """Run `runs` (of `sweep`) as Ray tasks and wait for all; returns {DONE, FAILED, BUSY: [runs]}. Each
    finished job is a line `sweep: METHOD / PAIR: job done|failed|busy` on stderr, under a progress bar.

    `address`: None or "" starts Ray on this machine, else the cluster to join. `scripts` is the folder of
    the entry points the tasks run. `init` goes to `ray.init` (e.g. `num_cpus=2` for a local cluster). Raises SweepError
    (one line) when Ray is not installed or the cluster cannot be reached."""
    try:
        import ray
    except ImportError as err:
        raise SweepError("--ray needs Ray, which is not installed ; pip install -r requirements-cluster.txt") from err
    from tqdm import tqdm

    root = str(Path(scripts).resolve())
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    options = {"include_dashboard": False} if not address else {}
    try:
        ray.init(address=address or None, runtime_env={"env_vars": {"PYTHONPATH": path}}, logging_level="ERROR",
                 **options, **init)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise SweepError(f"--ray {address or ''}: cannot start or join Ray ({one_line(err, 160)})") from err
    results: dict[str, list[Run]] = {DONE: [], FAILED: [], BUSY: []}
    try:
        per_job = {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}
        task = ray.remote(max_retries=JOB_RETRIES, retry_exceptions=False, **per_job)(_job)
        sweep_file, cwd = str(Path(sweep.path).resolve()), os.getcwd()
        pending = {task.remote(sweep_file, cwd, sweep.runs.index(run), uuid.uuid4().hex, root): run for run in runs}
        with tqdm(total=len(pending), desc="sweep", unit="run", file=sys.stderr) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(ready[0])
                try:
                    status, why = ray.get(ready[0]), ""
                except ray.exceptions.RayError as err:  # the retries are spent, or the task raised
                    status, why = FAILED, f" ({one_line(err, 200)})"
                results[status].append(run)
                bar.update(1)
                # the driver's own line: a worker's last lines may never reach the driver before shutdown
                tqdm.write(f"sweep: {run.method} / {run.pair}: job {status}{why}", file=sys.stderr)
    finally:
        ray.shutdown()
    return results
