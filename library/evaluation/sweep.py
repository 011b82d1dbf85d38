"""The paper's Table 1 protocol over many identity/style pairs: train, generate, evaluate, tabulate.

    python evaluate.py --sweep PAIRS.toml [--shard 2/4 | --ray [ADDRESS]]

PAIRS.toml:

    config = "configs/magicapture_sd15.toml"   # the base training config (paths relative to the working folder)
    out = "out/table1"                          # one folder per method and pair below it, and the table
    n = 16                                      # images per pair, generated with the composed prompt
    steps = 50                                  # sampling steps (default: generate.py's)
    overrides = []                              # section.key=value for every run
    identity_weights = ""                       # for CSIM (default: the config's [loss], else dlib)
    clip = ""                                   # style and aesthetic (default: the config's [evaluation])
    aesthetic = ""
    lock_timeout = 300                          # s without a heartbeat before a job's lock counts as abandoned

    [[pair]]                                    # as many as wanted
    name = "person1_style1"
    source = "data/person1"
    reference = "data/style1"

    [[method]]                                  # rows of the table; default: one "MagiCapture" row
    name = "without AR"
    overrides = ["loss.attn_weight=0"]

Every (method, pair) run is one idempotent job in `out/<method>/<pair>/`: a worker claims it with the
job lock there (library/evaluation/job_lock.py; a run another live worker holds is passed over), a
finished run (its `evaluation/metrics.json` exists) is skipped, an interrupted training continues from its
last checkpoint (`--resume latest`), and generation makes only the images still missing: image k (k from
0) has seed 1 + k, the seeds already in `generated/` (`NNNNN-SEED.png`) are skipped. `--shard i/n` (i
from 1 to n) takes every n-th run starting at the i-th, so n machines given the same file share the work
with any job scheduler; in a SLURM job array without --shard the array task's position is the shard
(`shard_from_env`). Each worker ends by writing the table from every run finished so far (`table.md`,
`table.csv`, `table.json`): rows are methods, columns CSIM, masked-CLIP style and aesthetic, each the mean
over the pairs of the pair's mean (± the standard deviation over pairs), with how many pairs are in it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from library.evaluation.job_lock import DEFAULT_TIMEOUT_S, JobBusy, hold_job
from library.files.atomic import write_text
from library.files.messages import UserError, one_line
from library.files.text import TextFileError, read_text_file

COLUMNS = (("csim", "CSIM"), ("style", "Masked CLIP (style)"), ("aesthetic", "Aesthetic"))
_KEYS = {"config", "out", "n", "steps", "overrides", "identity_weights", "clip", "aesthetic", "lock_timeout", "pair",
         "method"}
SEED_BASE = 1  # image k of a run has seed SEED_BASE + k
_SEEDED = re.compile(r"^\d{5}-(\d+)$")  # generate.py's NNNNN-SEED name (stem)


class SweepError(UserError, ValueError):
    """A sweep file or shard that cannot run; str() is one line naming the file and the fix."""


@dataclass
class Run:
    method: str
    pair: str
    source: str
    reference: str
    overrides: list[str]
    folder: Path


@dataclass
class Sweep:
    path: Path
    config: str
    out: Path
    n: int = 4
    steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    identity_weights: str | None = None
    clip: str | None = None
    aesthetic: str | None = None
    lock_timeout: float = DEFAULT_TIMEOUT_S
    methods: list[tuple[str, list[str]]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)


def slug(name: str) -> str:
    """A folder name for a method or pair name (letters, digits, - and _ kept)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "unnamed"


def _strings(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{where} must be a list of strings like \"loss.attn_weight=0\"")
    return list(value)


def read_sweep(path: str | os.PathLike) -> Sweep:
    """Parse PAIRS.toml (see the module docstring). Raises SweepError (one line) for a missing key, a
    wrong type, an unknown key, a missing folder or two pairs or methods with the same folder name."""
    path = Path(path)
    try:
        data = tomllib.loads(read_text_file(path))
    except FileNotFoundError as err:
        raise SweepError(f"{path}: no such file ; give a sweep file (see evaluate.py --help)") from err
    except (TextFileError, tomllib.TOMLDecodeError, RecursionError) as err:
        raise SweepError(f"{path}: not a readable TOML file ({err})") from err
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r} ; the keys are {', '.join(sorted(_KEYS))}")
    for key in ("config", "out"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise SweepError(f"{path}: `{key}` is missing ; give {key} = \"...\"")
    if not Path(data["config"]).is_file():
        raise SweepError(f"{path}: config {data['config']!r} does not exist")
    n = data.get("n", 4)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SweepError(f"{path}: n must be a positive whole number of images per pair")
    steps = data.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise SweepError(f"{path}: steps must be a positive whole number")
    sweep = Sweep(path, data["config"], Path(data["out"]), n, steps, _strings(data.get("overrides", []), f"{path}: overrides"))
    for key in ("identity_weights", "clip", "aesthetic"):
        if key in data:
            if not isinstance(data[key], str):
                raise SweepError(f"{path}: {key} must be a path string")
            setattr(sweep, key, data[key])
    timeout = data.get("lock_timeout", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < 1e9:
        raise SweepError(f"{path}: lock_timeout must be a positive number of seconds")
    sweep.lock_timeout = float(timeout)
    methods = data.get("method", [{"name": "MagiCapture"}])
    pairs = data.get("pair", [])
    if not isinstance(pairs, list) or not pairs:
        raise SweepError(f"{path}: no [[pair]] ; add [[pair]] tables with name, source and reference")
    if not isinstance(methods, list) or not methods:
        raise SweepError(f"{path}: [[method]] must be tables with a name and overrides")
    for i, m in enumerate(methods):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or set(m) - {"name", "overrides"}:
            raise SweepError(f"{path}: method {i + 1} needs name = \"...\" and optionally overrides = [...], nothing else")
        sweep.methods.append((m["name"], _strings(m.get("overrides", []), f"{path}: method {m['name']!r} overrides")))
    for i, p in enumerate(pairs):
        if not isinstance(p, dict) or set(p) != {"name", "source", "reference"} or not all(isinstance(v, str) for v in p.values()):
            raise SweepError(f"{path}: pair {i + 1} needs exactly name, source and reference (strings)")
        for key in ("source", "reference"):
            if not Path(p[key]).is_dir():
                raise SweepError(f"{path}: pair {p['name']!r}: {key} {p[key]!r} is not a folder ; prepare it with dataset_tools.prepare")
    for what, names in (("method", [m for m, _ in sweep.methods]), ("pair", [p["name"] for p in pairs])):
        slugs = [slug(x) for x in names]
        if len(set(slugs)) != len(slugs):
            raise SweepError(f"{path}: two {what}s share the folder name {next(s for s in slugs if slugs.count(s) > 1)!r} ; rename one")
    for method, extra in sweep.methods:
        for p in pairs:
            sweep.runs.append(Run(method, p["name"], p["source"], p["reference"], extra,
                                  sweep.out / slug(method) / slug(p["name"])))
    return sweep


def shard(runs: list[Run], spec: str | None) -> list[Run]:
    """The runs of shard "i/n" (1 <= i <= n): every n-th run from the i-th. None: all of them.

    Raises SweepError (one line) for anything else; "0/n" says that shards count from 1, so a 0-based
    job array that passes its task id here fails loudly instead of never running its last shard."""
    if spec is None:
        return list(runs)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if m and int(m.group(1)) == 0 and int(m.group(2)) > 0:
        raise SweepError(f"--shard {spec!r}: shards count from 1 (1/{m.group(2)} to {m.group(2)}/{m.group(2)}) ; "
                         "in a SLURM array leave --shard out (the task id is read) or give $((ID + 1))/n")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise SweepError(f"--shard {spec!r}: give i/n with 1 <= i <= n, e.g. --shard 1/4")
    i, n = int(m.group(1)), int(m.group(2))
    return runs[i - 1::n]


def shard_from_env(env: Mapping[str, str]) -> str | None:
    """The shard "i/n" (1-based) of this SLURM job-array task, or None outside an array.

    i is the task's position in the array: (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    SLURM_ARRAY_TASK_STEP + 1, so `--array=0-3` and `--array=1-4` both give shards 1/4 to 4/4; n is
    SLURM_ARRAY_TASK_COUNT. An array whose ids are not one evenly stepped range (`--array=1,2,7`) would
    skip runs, so it raises SweepError (one line) instead."""
    task = env.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")
    values = [env.get(name, default) for name, default in zip(names, (task, "0", "1", None))]
    if not all(v is not None and v.strip().isdigit() for v in values):
        raise SweepError(f"SLURM job array: {', '.join(f'{k}={v}' for k, v in zip(names, values))} are not all whole "
                         "numbers ; give --shard i/n")
    task_id, low, step, count = (int(v) for v in values)
    position, off_step = divmod(task_id - low, max(step, 1))
    if off_step or not 0 <= position < count:
        raise SweepError(f"SLURM job array: task {task_id} is not one of {count} evenly stepped ids from {low} "
                         f"(step {step}) ; submit --array=0-{max(count - 1, 0)} or give --shard i/n")
    return f"{position + 1}/{count}"


def run_overrides(sweep: Sweep, run: Run) -> list[str]:
    """The overrides a run trains and generates with: the sweep's, the method's, then its folders."""
    return [*sweep.overrides, *run.overrides, f"data.source_dir={run.source}", f"data.reference_dir={run.reference}",
            f"output.dir={run.folder.as_posix()}"]


def generated_seeds(folder: Path) -> dict[int | None, list[Path]]:
    """The images of a generated folder by seed ({seed: [paths]}, from generate.py's `NNNNN-SEED` names);
    images named otherwise are under None. The grid is not an image of the set."""
    from library.evaluation.folders import _is_grid
    from library.files.images import IMAGE_EXTENSIONS

    seeds: dict[int | None, list[Path]] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_grid(p.stem):
                m = _SEEDED.match(p.stem)
                seeds.setdefault(int(m.group(1)) if m else None, []).append(p)
    return seeds


def seed_spans(seeds: list[int]) -> list[tuple[int, int]]:
    """Sorted seeds as (first, count) runs of consecutive seeds: one generate.py call each."""
    spans: list[tuple[int, int]] = []
    for s in sorted(seeds):
        if spans and spans[-1][0] + spans[-1][1] == s:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((s, 1))
    return spans


def _generate_missing(sweep: Sweep, run: Run, generate: Callable[[list[str]], int], overrides: list[str],
                      say: Callable[[str], None]) -> bool:
    """Make the images of seeds SEED_BASE .. SEED_BASE + n - 1 that `generated/` lacks; False on failure."""
    where, folder = f"{run.method} / {run.pair}", run.folder / "generated"
    have = generated_seeds(folder)
    twice = [paths for seed, paths in have.items() if seed is not None and len(paths) > 1]
    others = [p for seed, paths in have.items() for p in paths
              if seed is None or not SEED_BASE <= seed < SEED_BASE + sweep.n]
    if twice or others:
        names = [p.name for p in (twice[0] if twice else others)]
        say(f"sweep: {where}: warning: {folder} holds {'one seed twice' if twice else 'images outside seeds'} "
            f"({', '.join(names[:3])}) ; they are evaluated too, remove them for a clean set")
    missing = [SEED_BASE + k for k in range(sweep.n) if SEED_BASE + k not in have]
    steps = ["--steps", str(sweep.steps)] if sweep.steps else []
    for first, count in seed_spans(missing):
        say(f"sweep: {where}: generating {count} image{'s' if count != 1 else ''} (seed "
            f"{first}{f' to {first + count - 1}' if count > 1 else ''})")
        if generate(["--config", sweep.config, "--n", str(count), "--seed", str(first), *steps, "--no-grid",
                     "--out", str(folder), *overrides]) != 0:
            say(f"sweep: {where}: generation failed ; see its messages above")
            return False
    return True


def run_one(sweep: Sweep, run: Run, train: Callable[[list[str]], int], generate: Callable[[list[str]], int],
            evaluate: Callable[[list[str]], int], say: Callable[[str], None] = print) -> bool:
    """Train (or continue), generate and evaluate one run; the callables take a command line (the
    entry point's argv) and return its exit code. True when the run is finished. Call it holding the
    run's job lock (`run_job`): two of it at once on one folder would train and generate twice."""
    where = f"{run.method} / {run.pair}"
    if (run.folder / "evaluation" / "metrics.json").is_file():
        say(f"sweep: {where}: finished earlier, skipped")
        return True
    overrides = run_overrides(sweep, run)
    from library.config import load_config

    name = load_config(sweep.config, overrides, check_paths=False).output.name
    if not (run.folder / f"{name}.safetensors").is_file():
        resume = ["--resume", "latest"] if any(run.folder.glob("checkpoint-*")) else []
        say(f"sweep: {where}: training{' (continuing)' if resume else ''} in {run.folder}")
        if train(["--config", sweep.config, *resume, *overrides]) != 0:
            say(f"sweep: {where}: training failed ; see its messages above, then run the sweep again")
            return False
    if not _generate_missing(sweep, run, generate, overrides, say):
        return False
    args = ["--generated", str(run.folder / "generated"), "--source", run.source, "--reference", run.reference,
            "--out", str(run.folder / "evaluation"), "--config", sweep.config]
    for key in ("identity_weights", "clip", "aesthetic"):
        if getattr(sweep, key) is not None:
            args += [f"--{key.replace('_', '-')}", getattr(sweep, key)]
    if evaluate([*args, *overrides]) != 0:
        say(f"sweep: {where}: evaluation failed ; see its messages above")
        return False
    say(f"sweep: {where}: finished")
    return True


DONE, FAILED, BUSY = "done", "failed", "busy"


def run_job(sweep: Sweep, run: Run, train: Callable[[list[str]], int], generate: Callable[[list[str]], int],
            evaluate: Callable[[list[str]], int], owner: str | None = None,
            say: Callable[[str], None] = print) -> str:
    """One run as an idempotent job: claim its lock (`owner`: the scheduler's key for this job, the same
    on every attempt), `run_one`, release. Returns DONE (finished now or before), FAILED, or BUSY when
    another live worker holds it (one line says who)."""
    if (run.folder / "evaluation" / "metrics.json").is_file():
        say(f"sweep: {run.method} / {run.pair}: finished earlier, skipped")
        return DONE
    try:
        with hold_job(run.folder, owner, sweep.lock_timeout, say=say):
            return DONE if run_one(sweep, run, train, generate, evaluate, say=say) else FAILED
    except JobBusy as err:
        say(f"sweep: {run.method} / {run.pair}: passed over, another worker has it ({one_line(err)})")
        return BUSY


def subprocess_runner(script: Path) -> Callable[[list[str]], int]:
    """argv -> exit code of `python script argv`: one process per training or generation (each loads its
    model afresh and frees it when done). On Linux the child is killed when the worker running it dies,
    so a killed worker leaves no training holding the run's GPU and folder for its retry."""
    import subprocess
    import sys

    preexec = None
    if sys.platform == "linux":
        import ctypes
        import signal

        prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # resolved before the fork

        def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the worker died before the line above
                os._exit(137)

    def run(argv: list[str]) -> int:
        return subprocess.run([sys.executable, str(script), *argv], preexec_fn=preexec).returncode

    return run


def table(sweep: Sweep) -> dict:
    """The table from every finished run: {"rows": [{"method", "pairs", "of", csim/style/aesthetic:
    {"mean", "std"} | None}], "networks": the identity networks used}."""
    rows, networks = [], set()
    for method, _ in sweep.methods:
        runs = [r for r in sweep.runs if r.method == method]
        found = []
        for r in runs:
            f = r.folder / "evaluation" / "metrics.json"
            if f.is_file():
                data = json.loads(read_text_file(f))
                found.append(data["summary"])
                networks.add(data["networks"].get("identity") or "none")
        row = {"method": method, "pairs": len(found), "of": len(runs)}
        for key, _ in COLUMNS:
            values = [s[key]["mean"] for s in found if s.get(key, {}).get("mean") is not None]
            row[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "pairs": len(values)} if values else None
        rows.append(row)
    return {"rows": rows, "networks": sorted(networks)}


def write_table(sweep: Sweep) -> list[Path]:
    """table.json, table.csv and table.md in the sweep's `out` (atomically); returns their paths."""
    t = table(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    cell = lambda c: "-" if c is None else f"{c['mean']:.3f} ± {c['std']:.3f}"  # noqa: E731
    md = ["| Method | " + " | ".join(title for _, title in COLUMNS) + " | pairs |",
          "| --- |" + " --- |" * (len(COLUMNS) + 1)]
    csv = ["method," + ",".join(f"{k}_mean,{k}_std" for k, _ in COLUMNS) + ",pairs,of"]
    for row in t["rows"]:
        md.append(f"| {row['method']} | " + " | ".join(cell(row[k]) for k, _ in COLUMNS) + f" | {row['pairs']}/{row['of']} |")
        csv.append(",".join([json.dumps(row["method"])] + [("" if row[k] is None else f"{row[k][s]:.6f}")
                                                           for k, _ in COLUMNS for s in ("mean", "std")]
                            + [str(row["pairs"]), str(row["of"])]))
    md.append("")
    md.append(f"Identity network: {', '.join(t['networks']) or 'none'} (CSIM is comparable with the paper's only from ArcFace).")
    paths = [sweep.out / "table.json", sweep.out / "table.csv", sweep.out / "table.md"]
    write_text(paths[0], json.dumps(t, indent=2, ensure_ascii=False) + "\n")
    write_text(paths[1], "\n".join(csv) + "\n")
    write_text(paths[2], "\n".join(md) + "\n")
    return paths
