"""The paper's Table 1 protocol over many identity/style pairs: train, generate, evaluate, tabulate.

    python evaluate.py --sweep PAIRS.toml [--shard 2/4]

PAIRS.toml:

    config = "configs/magicapture_sd15.toml"   # the base training config (paths relative to the working folder)
    out = "out/table1"                          # one folder per method and pair below it, and the table
    n = 16                                      # images per pair, generated with the composed prompt
    steps = 50                                  # sampling steps (default: generate.py's)
    overrides = []                              # section.key=value for every run
    identity_weights = ""                       # for CSIM (default: the config's [loss], else dlib)
    clip = ""                                   # style and aesthetic (default: the config's [evaluation])
    aesthetic = ""

    [[pair]]                                    # as many as wanted
    name = "person1_style1"
    source = "data/person1"
    reference = "data/style1"

    [[method]]                                  # rows of the table; default: one "MagiCapture" row
    name = "without AR"
    overrides = ["loss.attn_weight=0"]

Every (method, pair) run lives in `out/<method>/<pair>/`: a finished run (its `evaluation/metrics.json`
exists) is skipped; an interrupted training continues from its last checkpoint (`--resume latest`);
generated images already there count towards `n`. `--shard i/n` (i from 1 to n) takes every n-th run
starting at the i-th, so n machines given the same file share the work with any job scheduler. Each
shard ends by writing the table from every run finished so far (`table.md`, `table.csv`, `table.json`):
rows are methods, columns CSIM, masked-CLIP style and aesthetic, each the mean over the pairs of the
pair's mean (± the standard deviation over pairs), with how many pairs are in it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from library.files.atomic import write_text
from library.files.text import TextFileError, read_text_file

COLUMNS = (("csim", "CSIM"), ("style", "Masked CLIP (style)"), ("aesthetic", "Aesthetic"))
_KEYS = {"config", "out", "n", "steps", "overrides", "identity_weights", "clip", "aesthetic", "pair", "method"}


class SweepError(ValueError):
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
    except FileNotFoundError:
        raise SweepError(f"{path}: no such file ; give a sweep file (see evaluate.py --help)") from None
    except (TextFileError, tomllib.TOMLDecodeError, RecursionError) as err:
        raise SweepError(f"{path}: not a readable TOML file ({err})") from None
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
    """The runs of shard "i/n" (1 <= i <= n): every n-th run from the i-th. None: all of them."""
    if spec is None:
        return list(runs)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise SweepError(f"--shard {spec!r}: give i/n with 1 <= i <= n, e.g. --shard 1/4")
    i, n = int(m.group(1)), int(m.group(2))
    return runs[i - 1::n]


def run_overrides(sweep: Sweep, run: Run) -> list[str]:
    """The overrides a run trains and generates with: the sweep's, the method's, then its folders."""
    return [*sweep.overrides, *run.overrides, f"data.source_dir={run.source}", f"data.reference_dir={run.reference}",
            f"output.dir={run.folder.as_posix()}"]


def _generated_count(folder: Path) -> int:
    from library.files.images import IMAGE_EXTENSIONS
    from library.evaluation.folders import _is_grid

    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_grid(p.stem))


def run_one(sweep: Sweep, run: Run, train: Callable[[list[str]], int], generate: Callable[[list[str]], int],
            evaluate: Callable[[list[str]], int], say: Callable[[str], None] = print) -> bool:
    """Train (or continue), generate and evaluate one run; the callables take a command line (the
    entry point's argv) and return its exit code. True when the run is finished."""
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
    missing = sweep.n - _generated_count(run.folder / "generated")
    if missing > 0:
        steps = ["--steps", str(sweep.steps)] if sweep.steps else []
        say(f"sweep: {where}: generating {missing} image{'s' if missing != 1 else ''}")
        if generate(["--config", sweep.config, "--n", str(missing), "--seed", "1", *steps, "--no-grid",
                     "--out", str(run.folder / "generated"), *overrides]) != 0:
            say(f"sweep: {where}: generation failed ; see its messages above")
            return False
    args = ["--generated", str(run.folder / "generated"), "--source", run.source, "--reference", run.reference,
            "--out", str(run.folder / "evaluation"), "--config", sweep.config]
    for key in ("identity_weights", "clip", "aesthetic"):
        if getattr(sweep, key) is not None:
            args += [f"--{key.replace('_', '-')}", getattr(sweep, key)]
    if evaluate([*args, *overrides]) != 0:
        say(f"sweep: {where}: evaluation failed ; see its messages above")
        return False
    return True


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
