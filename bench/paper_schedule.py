"""The paper's whole schedule, end to end through train_magicapture.py, timed per stage (issue 12).

    python bench/paper_schedule.py --work /tmp/ps --json out.json                # SD 1.5 shapes, on the GPU
    python bench/paper_schedule.py --tiny --steps-scale 0.05 --json out.json     # a CPU run of the same path
    python bench/paper_schedule.py --config configs/low_vram.toml --steps-scale 0.17 --plain --levers

What runs: random SD 1.5-shaped weights written once as a single file (the tiny model with --tiny),
the demo photos prepared at 512 px (dataset_tools.demo_photos + dataset_tools.prepare, as `make demo`),
a random ArcFace so the identity loss runs (a full-size r50; a small one with --tiny), then
`train_magicapture.main` with the config's own values.
Stage times come from the trainer's timings.json (library/training/timing.py), peak memory from
torch.cuda.max_memory_allocated ("n/a" on the CPU).

--steps-scale F runs round(F x steps) of each phase, and the preview and checkpoint intervals scaled
alike; the whole schedule is then *projected*: each phase as its first step (compile, autotuning) plus
the other steps at their measured rate, previews and checkpoints at their measured cost per event times
the number the full schedule makes (see :func:`project`). The output says which numbers are projected.

--plain adds the plain loop (one task and one sample per UNet pass) timed in the same process with
bench/bench_train.py's harness, for the samples/s ratio; --levers times phase-2 steps with each speed
lever on and off (same harness). Absolute times mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

STAGES = ("load", "cache", "setup", "phase1", "phase2", "previews", "checkpoints", "export")


# ------------------------------------------------------------------ arithmetic (tested by hand)
def scaled_steps(steps: int, scale: float) -> int:
    """Steps of a phase in the scaled run: round(scale x steps), at least 2 (a first step and a timed one)."""
    return max(2, round(steps * scale)) if steps else 0


def scaled_every(every: int, scale: float) -> int:
    """An interval (sample.every, output.save_every) in the scaled run; 0 stays off."""
    return max(1, round(every * scale)) if every else 0


def preview_count(phase: int, steps: int, every: int) -> int:
    """Previews a phase makes: one every `every` steps, plus one at the end of phase 1 when that is not on a
    multiple (step_log.preview_tag)."""
    if not every or not steps:
        return 0
    return steps // every + (1 if phase == 1 and steps % every else 0)


def checkpoint_count(steps: int, every: int) -> int:
    """Checkpoints a phase writes: every `every` steps before its last, plus one at its end."""
    if not steps:
        return 0
    return ((steps - 1) // every if every else 0) + 1


def project_phase(seconds: float, first: float, run_steps: int, full_steps: int) -> float:
    """A phase's seconds over `full_steps`: the first step as measured (compile, autotuning happen once),
    the other full_steps - 1 at the mean rate of the run's other run_steps - 1."""
    if run_steps <= 1:
        return seconds * full_steps / max(run_steps, 1)
    return first + (seconds - first) * (full_steps - 1) / (run_steps - 1)


def project(timings: dict, full: dict, run: dict) -> dict:
    """The whole schedule's seconds per stage from a scaled run.

    `timings`: the trainer's timings.json; `full` / `run`: {"phase1": steps, "phase2": steps,
    "previews": count, "checkpoints": count} of the full schedule and of the run. load, cache, setup and
    export happen once either way and are taken as measured."""
    sec, first = timings["seconds"], timings["first_step_seconds"]
    out = {k: sec.get(k, 0.0) for k in ("load", "cache", "setup", "export")}
    for phase in ("phase1", "phase2"):
        out[phase] = project_phase(sec.get(phase, 0.0), first.get(phase, 0.0), run[phase], full[phase])
    for event in ("previews", "checkpoints"):
        per = sec.get(event, 0.0) / run[event] if run[event] else 0.0
        out[event] = per * full[event]
    out["total"] = sum(out.values())
    return out


def break_even_steps(off: dict, on: dict) -> str:
    """Steps after which a lever's extra warm-up (compilation) is won back by its faster steps:
    (on warm-up - off warm-up) / (off - on seconds per step); "never" if it is not faster, "0" if the
    warm-up costs nothing extra. off / on: {"ms_per_step", "warmup_s"}."""
    saved = (off["ms_per_step"] - on["ms_per_step"]) / 1000
    extra = on["warmup_s"] - off["warmup_s"]
    if saved <= 0:
        return "never"
    return str(max(0, math.ceil(extra / saved)))


# ------------------------------------------------------------------ inputs
def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def _write_full_size(family: str, single: Path) -> None:
    """Random full-size weights of `family` as one original-layout file (SD 1.5 or SDXL 1.0 shapes)."""
    from testkit.tiny import build_components, save_single_file
    from testkit.tiny_sdxl import build_sdxl_components, save_sdxl_single_file

    t = time.perf_counter()
    if family == "sdxl":
        save_sdxl_single_file(build_sdxl_components(full_size=True), single)
    else:
        save_single_file(build_components(sd15_size=True), single)
    print(f"wrote {single} ({time.perf_counter() - t:.0f} s)", flush=True)


def make_inputs(work: Path, tiny: bool, family: str = "sd1") -> dict[str, str]:
    """Model (single file of `family`: "sd1" or "sdxl"), random ArcFace and the prepared demo photos under
    `work`, each written once."""
    from testkit.tiny import save_model, save_random_arcface
    from testkit.tiny_sdxl import save_sdxl_model

    work.mkdir(parents=True, exist_ok=True)
    inputs = {"arcface": str(work / ("arcface_random.pth" if tiny else "arcface_r50_random.pth"))}
    name = {"sd1": "sd15", "sdxl": "sdxl"}[family]
    if tiny:  # a single file of the tiny model needs its own component configs: the folder beside it
        folder, single = work / f"tiny_{name}", work / f"tiny_{name}.safetensors"
        if not single.is_file():
            (save_sdxl_model if family == "sdxl" else save_model)(folder)
        inputs |= {"model": str(single), "config_dir": str(folder)}
    else:
        single = work / f"random_{name}.safetensors"
        if not single.is_file():
            _write_full_size(family, single)
        inputs |= {"model": str(single), "config_dir": ""}
    if not Path(inputs["arcface"]).is_file():
        if tiny:
            save_random_arcface(Path(inputs["arcface"]))
        else:  # full-size r50 (the real identity network's cost), as bench_train.py's harness uses
            from library.models.iresnet import iresnet50

            torch.manual_seed(0)
            torch.save(iresnet50().state_dict(), inputs["arcface"])
    raw, data = work / "demo_raw", work / "demo"
    if not (data / "reference").is_dir():
        _run([sys.executable, "-m", "dataset_tools.demo_photos", str(raw)])
        for kind in ("source", "reference"):
            _run([sys.executable, "-m", "dataset_tools.prepare", kind, str(raw / kind), str(data / kind), "--resolution", "512"])
    return inputs | {"source": str(data / "source"), "reference": str(data / "reference")}


# ------------------------------------------------------------------ the schedule
def run_schedule(args, inputs: dict[str, str]) -> dict:
    """train_magicapture.main on the config with scaled steps; -> the report's "schedule" part."""
    import train_magicapture
    from library.config import load_config

    cfg = load_config(args.config, check_paths=False)
    scale = args.steps_scale
    out_dir = args.work / f"out_{Path(args.config).stem}"
    run = {"phase1": scaled_steps(cfg.phase1.steps, scale), "phase2": scaled_steps(cfg.phase2.steps, scale)}
    sample_every, save_every = scaled_every(cfg.sample.every, scale), scaled_every(cfg.output.save_every, scale)
    overrides = [
        f'model.pretrained="{inputs["model"]}"', f'model.config_dir="{inputs["config_dir"]}"',
        f'data.source_dir="{inputs["source"]}"', f'data.reference_dir="{inputs["reference"]}"',
        f'loss.identity_weights="{inputs["arcface"]}"', f'output.dir="{out_dir}"',
        f"phase1.steps={run['phase1']}", f"phase2.steps={run['phase2']}",
        f"sample.every={sample_every}", f"output.save_every={save_every}",
    ]
    if args.tiny:  # the CPU: fp32, torch's AdamW, a small resolution, previews of 4 sampler steps
        overrides += [f"data.resolution={args.tiny_resolution}", 'train.mixed_precision="no"', 'optimizer.name="AdamW"',
                      "sample.steps=4", "sample.n=1"]
    overrides += args.overrides
    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    rc = train_magicapture.main(["--config", str(args.config), *overrides])
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"error: train_magicapture.py exited with {rc} on {args.config}")
    effective = load_config(out_dir / "effective_config.toml", check_paths=False)
    timings = json.loads((out_dir / "timings.json").read_text(encoding="utf-8"))
    run |= {"previews": timings["counts"].get("previews", 0), "checkpoints": timings["counts"].get("checkpoints", 0)}
    full = {"phase1": cfg.phase1.steps, "phase2": cfg.phase2.steps,
            "previews": preview_count(1, cfg.phase1.steps, cfg.sample.every) + preview_count(2, cfg.phase2.steps, cfg.sample.every),
            "checkpoints": checkpoint_count(cfg.phase1.steps, cfg.output.save_every) + checkpoint_count(cfg.phase2.steps, cfg.output.save_every)}
    batch = {"phase1": effective.phase1.batch_size, "phase2": effective.phase2.batch_size}
    rates = {p: {"steps_per_s": timings["steps_per_second"].get(p, 0.0),
                 "samples_per_s": timings["steps_per_second"].get(p, 0.0) * batch[p]} for p in ("phase1", "phase2")}
    return {
        "config": str(args.config), "steps_scale": scale, "projected": scale != 1.0,
        "run_steps": run, "full_steps": full, "measured_seconds": {k: timings["seconds"].get(k, 0.0) for k in STAGES},
        "first_step_seconds": timings["first_step_seconds"], "measured_wall_seconds": wall, "rates": rates,
        "projected_seconds": project(timings, full, run),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else "n/a",
        "compile": effective.train.compile, "mixed_precision": effective.train.mixed_precision,
        "optimizer": effective.optimizer.name,
    }


# ------------------------------------------------------------------ plain loop and levers (bench_train's harness)
_HARNESS: list = []  # one harness trainer for --plain and --levers (building SD 1.5 weights takes a while)


def _harness(args):
    if not _HARNESS:
        from bench.bench_train import make_trainer

        device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
        hargs = SimpleNamespace(tiny=args.tiny, resolution=512, optimizer="AdamW",
                                precision="bf16" if device == "cuda" else "no")
        trainer = make_trainer(hargs, args.work / "harness")
        _HARNESS.append((trainer, trainer.setup_phase(2), device))
    return _HARNESS[0]


def run_plain(args, batch: int) -> dict:
    """The plain loop (one task, one sample per UNet pass: `batch` passes) against the batched step."""
    from bench.bench_train import time_variant

    trainer, state, device = _harness(args)
    rows = [time_variant(trainer, state, name, batch, accum, args.bench_steps, args.bench_warmup, device)
            for name, accum in (("plain", batch), ("batched", 1))]
    return {"rows": rows, "batched_vs_plain": rows[1]["samples_per_s"] / rows[0]["samples_per_s"]}


def run_levers(args, batch: int, save_row=lambda rows: None) -> list[dict]:
    """Phase-2 ms/step with each lever off and on; the other levers at their defaults."""
    from bench.bench_train import time_variant
    from library.config import OptimizerConfig
    from library.training.optim import build_lr_scheduler, build_optimizer

    trainer, (pcfg, optimizer, scheduler, sampler, params), device = _harness(args)

    def state_with(name: str, kernel: dict | None = None):
        groups = trainer.trainables.param_groups(2, pcfg)
        if kernel is None:
            opt = build_optimizer(OptimizerConfig(name=name), groups)
        else:
            opt = torch.optim.AdamW(groups, **kernel)
        return pcfg, opt, build_lr_scheduler(pcfg, opt), sampler, params

    cases = [
        ("host_sync_every_step", {"sync_every_step": True}, {}),
        ("optimizer_foreach_vs_fused", {"state": state_with("AdamW", {"foreach": True})},
         {"state": state_with("AdamW", {"fused": True})} if device == "cuda" else None),
        ("optimizer_AdamW8bit_vs_AdamW", {"state": state_with("AdamW8bit")}, {}),
        ("channels_last", {}, {"channels_last": True}),
        # inductor's C++ code generation for the SD UNet takes many minutes on a CPU: measured on CUDA only
        ("compile", {}, {"compile": True} if device == "cuda" else None),
    ]
    rows = []
    for lever, off, on in cases:
        row = {"lever": lever}
        for which, switches in (("off", off), ("on", on)):
            if switches is None:
                row[which] = "n/a on this device"
                continue
            switches = dict(switches)
            state = switches.pop("state", (pcfg, optimizer, scheduler, sampler, params))
            try:
                r = time_variant(trainer, state, lever, batch, 1, args.bench_steps, args.bench_warmup, device, **switches)
                row[which] = {"ms_per_step": r["ms_per_step"], "warmup_s": r["warmup_s"], "peak_gib": r["peak_gib"]}
            except Exception as err:  # a lever that cannot run here (bitsandbytes on the CPU, inductor) is reported
                row[which] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
        save_row(rows)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------ report
def table(report: dict) -> str:
    """The schedule's stages as a Markdown table: measured, and projected to the whole schedule."""
    if "schedule" not in report:
        return _harness_tables(report)
    s = report["schedule"]
    lines = [f"| stage | measured s ({s['run_steps']['phase1']}+{s['run_steps']['phase2']} steps) | "
             f"projected s ({s['full_steps']['phase1']}+{s['full_steps']['phase2']} steps) |", "|---|---:|---:|"]
    for k in STAGES:
        lines.append(f"| {k} | {s['measured_seconds'][k]:.2f} | {s['projected_seconds'][k]:.2f} |")
    lines.append(f"| **total** | {sum(s['measured_seconds'].values()):.2f} | {s['projected_seconds']['total']:.2f} |")
    for p in ("phase1", "phase2"):
        r = s["rates"][p]
        lines.append(f"\n{p}: {r['steps_per_s']:.2f} steps/s, {r['samples_per_s']:.2f} samples/s")
    peak = s["peak_gib"]
    lines.append(f"peak memory: {peak if isinstance(peak, str) else f'{peak:.2f} GiB'}")
    if "plain" in report:
        plain = report["plain"]["rows"][0]["samples_per_s"]
        lines.append(f"plain loop: {plain:.2f} samples/s; schedule phase 2 / plain = "
                     f"{s['rates']['phase2']['samples_per_s'] / plain:.2f}x; batched step / plain = "
                     f"{report['plain']['batched_vs_plain']:.2f}x")
    return "\n".join(lines + [_harness_tables({k: v for k, v in report.items() if k == "levers"})])


def _harness_tables(report: dict) -> str:
    """The plain-loop line and the lever table, for a report without a schedule."""
    lines = []
    if "plain" in report:
        rows = report["plain"]["rows"]
        lines.append(f"plain loop: {rows[0]['samples_per_s']:.2f} samples/s; batched step: {rows[1]['samples_per_s']:.2f} "
                     f"samples/s ({report['plain']['batched_vs_plain']:.2f}x)")
    if "levers" in report:
        lines += ["", "| lever (phase-2 step, batch in one pass) | off ms/step | on ms/step | on / off | warm-up s off / on "
                  "| break-even steps |", "|---|---:|---:|---:|---:|---:|"]
        for row in report["levers"]:
            cells = [f"{row[w]['ms_per_step']:.1f}" if isinstance(row[w], dict) else row[w] for w in ("off", "on")]
            ratio = warm = even = "-"
            if all(isinstance(row[w], dict) for w in ("off", "on")):
                off, on = row["off"], row["on"]
                ratio, warm = f"{on['ms_per_step'] / off['ms_per_step']:.2f}", f"{off['warmup_s']:.1f} / {on['warmup_s']:.1f}"
                even = break_even_steps(off, on)
            lines.append(f"| {row['lever']} | {cells[0]} | {cells[1]} | {ratio} | {warm} | {even} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Extra section.key=value arguments go to the trainer after the benchmark's own.")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "magicapture_sd15.toml")
    parser.add_argument("--work", type=Path, default=Path("out/paper_schedule"), help="model, photos and runs go here")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (relative numbers only)")
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                        help="random weights of this family (give its config too, e.g. configs/magicapture_sdxl.toml)")
    parser.add_argument("--tiny-resolution", type=int, default=64, help="training resolution with --tiny")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="fraction of each phase's steps to run (projected)")
    parser.add_argument("--plain", action="store_true", help="also time the plain loop (same process)")
    parser.add_argument("--levers", action="store_true", help="also time phase-2 steps with each speed lever off/on")
    parser.add_argument("--bench-steps", type=int, default=8, help="timed steps per --plain / --levers variant")
    parser.add_argument("--bench-warmup", type=int, default=3)
    parser.add_argument("--skip-schedule", action="store_true", help="only --plain / --levers (no training run)")
    parser.add_argument("--json", type=Path, help="write the report here (rewritten after each part)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for the trainer")
    args = parser.parse_args(argv)
    if not 0 < args.steps_scale <= 1:
        parser.error("--steps-scale must be in (0, 1]")
    if args.family == "sdxl" and (args.plain or args.levers):
        parser.error("--plain and --levers time bench_train.py's SD 1.5 harness; run them without --family sdxl")
    args.work = args.work.resolve()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    shape = {"sd1": "SD 1.5", "sdxl": "SDXL 1.0"}[args.family]
    report = {"device": device, "model": f"tiny {shape}-shaped (CPU, relative only)" if args.tiny else f"{shape}-shaped, random weights",
              "torch": torch.__version__}
    def save() -> None:  # after every part, so that a run stopped by a time limit keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")

    if not args.skip_schedule:
        inputs = make_inputs(args.work, args.tiny, args.family)
        report["schedule"] = run_schedule(args, inputs)
        save()
        gc.collect()
    if args.plain:
        report["plain"] = run_plain(args, _phase2_batch(args))
        save()
    if args.levers:
        report["levers"] = run_levers(args, _phase2_batch(args), save_row=lambda rows: (report.update(levers=rows), save()))
    print(f"\n{device}, {report['model']}, {args.config}" + (f", steps x {args.steps_scale} (projected)" if args.steps_scale != 1 else ""))
    print(table(report))
    save()
    return 0


def _phase2_batch(args) -> int:
    from library.config import load_config

    return load_config(args.config, args.overrides, check_paths=False).phase2.batch_size


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
