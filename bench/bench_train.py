"""Phase-2 training throughput and memory: batched tasks in one UNet pass vs a plain sequential loop.

    python bench/bench_train.py                 # SD 1.5 shapes, random weights, on the GPU (bf16)
    python bench/bench_train.py --tiny --steps 2 --device cpu   # a CPU smoke run of the same code
    python bench/bench_train.py --identity dlib --variants batched,idOff   # the identity loss's cost, dlib's net

Random SD 1.5-shaped weights cost the same as real ones. Every variant runs the same trainer code
(MagiCaptureTrainer.optimizer_step) on the same samples, in one process, so the ratios are comparable;
absolute times are only meaningful on a GPU. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.config import load_config  # noqa: E402
from library.models.loading import StableDiffusionParts, _ddpm_from  # noqa: E402
from testkit.tiny import build_components, write_prepared  # noqa: E402
from library.training.speed import compile_unet  # noqa: E402


def make_trainer(args, root: Path):
    from library.models.iresnet import iresnet50
    from library.training.trainer import MagiCaptureTrainer

    comps = build_components(sd15_size=not args.tiny)
    parts = StableDiffusionParts(
        unet=comps["unet"], vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
        noise_scheduler=_ddpm_from(dict(comps["scheduler"].config)), name="random-sd15",
    )
    res = 64 if args.tiny else args.resolution
    source = write_prepared(root / "source", "source", "mcv1", n=4, size=res, seed=1)
    reference = write_prepared(root / "reference", "reference", "mcv2", n=4, size=res, seed=2)
    arcface = root / "arcface.pth"
    torch.manual_seed(0)
    torch.save(iresnet50().state_dict(), arcface)  # full-size r50: the real identity network's cost
    weights = "" if args.identity == "dlib" else str(arcface)  # "": dlib's ResNet v1, the default
    cfg = load_config(None, [
        'model.pretrained="unused"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f"data.resolution={res}", f'output.dir="{root / "out"}"', f'loss.identity_weights="{weights}"',
        f'train.mixed_precision="{args.precision}"', f'optimizer.name="{args.optimizer}"',
        "logging.tensorboard=false", "sample.every=0", "output.save_every=0",
    ], check_paths=True)
    return MagiCaptureTrainer(cfg, parts=parts)


def time_variant(trainer, phase_state: tuple, name: str, batch: int, accum: int, steps: int, warmup: int, device: str,
                 **switches) -> dict:
    cfg = trainer.cfg
    cfg.loss.id_decode_window = switches.get("window", True)
    if switches.get("checkpointing"):
        trainer.unet.enable_gradient_checkpointing()
        trainer.unet.train()
    else:
        trainer.unet.disable_gradient_checkpointing()
    trainer.unet_forward = compile_unet(trainer.unet) if switches.get("compile") else trainer.unet
    layout = torch.channels_last if switches.get("channels_last") else torch.contiguous_format
    trainer.unet.to(memory_format=layout), trainer.vae.to(memory_format=layout)
    # the trainer reads its figures every logging.every steps; reading them every step is the old behaviour
    read = (lambda figures: figures.packed()[1].tolist()) if switches.get("sync_every_step") else (lambda figures: None)
    pcfg = dataclasses.replace(cfg.phase2, batch_size=batch, grad_accum=accum)
    id_term = trainer.id_term
    if switches.get("id_off"):
        trainer.id_term = None
    try:
        return _timed(trainer, phase_state, name, batch, accum, steps, warmup, device, pcfg, read, switches)
    finally:
        trainer.id_term = id_term


def _timed(trainer, phase_state, name, batch, accum, steps, warmup, device, pcfg, read, switches) -> dict:
    _, optimizer, scheduler, sampler, params = phase_state
    draws = [sampler.draw(batch) for _ in range(warmup + steps)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for i in range(warmup):
        read(trainer.optimizer_step(draws[i], i, 2, pcfg, optimizer, scheduler, params))
    sync()
    warmup_s = time.perf_counter() - start  # with compile: the compilation
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        read(trainer.optimizer_step(draws[i], i, 2, pcfg, optimizer, scheduler, params))
    sync()
    ms = (time.perf_counter() - start) / steps * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"variant": name, "batch": batch, "micro_batches": accum, "ms_per_step": ms, "warmup_s": warmup_s,
            "samples_per_s": batch / ms * 1000, "peak_gib": peak, **switches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--optimizer", default="AdamW")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="sequential,batched,batched12,fullDecode,checkpointing,compile")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--identity", choices=("arcface_r50", "dlib"), default="arcface_r50",
                        help="the identity network: a random full-size ArcFace r50, or dlib's ResNet v1 (the default's)")
    args = parser.parse_args()
    if args.device == "cpu":
        args.precision = "no"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, Path(tmp))
        phase_state = trainer.setup_phase(2)
        plan = {
            "sequential": dict(batch=6, accum=6),  # one task sample per UNet pass: the plain loop
            "batched": dict(batch=6, accum=1),  # the trainer's default: all tasks in one pass
            "batched12": dict(batch=12, accum=1),
            "fullDecode": dict(batch=6, accum=1, window=False),  # ID decode of the whole latent
            "checkpointing": dict(batch=6, accum=1, checkpointing=True),
            "compile": dict(batch=6, accum=1, compile=True),
            "idOff": dict(batch=6, accum=1, id_off=True),  # "batched" without the identity term
        }
        rows = []
        for name in args.variants.split(","):
            spec = dict(plan[name])
            batch, accum = spec.pop("batch"), spec.pop("accum")
            try:
                row = time_variant(trainer, phase_state, name, batch, accum, args.steps, args.warmup, args.device, **spec)
            except Exception as err:  # a variant that fails (e.g. compile) is reported, the rest still run
                row = {"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"] == "sequential" and "ms_per_step" in r), None)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{device_name}, {'tiny' if args.tiny else 'SD 1.5-shaped'} model, {args.precision}, phase 2 (source+reference+composed, AR + ID on)")
    print(f"{'variant':<14}{'batch':>6}{'passes':>7}{'ms/step':>10}{'samples/s':>11}{'peak GiB':>10}{'vs seq':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<14} failed: {r['error']}")
            continue
        ratio = (r["samples_per_s"] / base["samples_per_s"]) if base else float("nan")
        print(f"{r['variant']:<14}{r['batch']:>6}{r['micro_batches']:>7}{r['ms_per_step']:>10.1f}{r['samples_per_s']:>11.2f}{r['peak_gib']:>10.2f}{ratio:>7.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
