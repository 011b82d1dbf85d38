"""Throughput of `prepare source` on one CPU thread, excluding process start-up.

    python bench/bench_prepare.py [--n 16] [--size 1024] [--repeat 2] [--profile] [--turn 180]

Pinned to one core (sched_setaffinity), OMP/cv2/torch threads 1. Builds N photos of skimage's astronaut upscaled to a 1024 px short side (small crops, flips,
brightness changes and JPEG qualities, so no two files are alike), runs one warm-up image, then times
`prepare_folder("source", ...)` over the N files (detector start-up included, imports not) and prints
one line: images per second. Target: >= 10 img/s. `--turn 90|180|270` saves every photo turned that many
degrees counter-clockwise without an EXIF tag (prepare turns them back: the cost of a turned photo).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
           "TF_NUM_INTRAOP_THREADS"):
    os.environ[_v] = "1"

# one core for real: mediapipe's TFLite graphs start their own threads; pin the process before they do
if hasattr(os, "sched_setaffinity"):
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except OSError:
        pass

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402

cv2.setNumThreads(1)

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset_tools.prepare import prepare_folder  # noqa: E402


def make_photos(dest: Path, n: int, size: int, turn: int = 0) -> None:
    from skimage import data

    base = Image.fromarray(data.astronaut()).resize((size + 64, size + 64), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dx, dy = (int(v) for v in rng.integers(0, 64, 2))
        im = base.crop((dx, dy, dx + size, dy + size))
        if i % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.85, 1.15)))
        if turn:
            im = im.rotate(turn, expand=True)
        im.save(dest / f"astro_{i:03d}.jpg", quality=int(rng.integers(85, 96)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs; the best is reported")
    ap.add_argument("--profile", action="store_true", help="print the top cProfile entries of one run")
    ap.add_argument("--turn", type=int, default=0, choices=(0, 90, 180, 270),
                    help="save the photos turned this many degrees counter-clockwise, no EXIF tag")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "in", args.n, args.size, args.turn)
        warm = tmp / "warm"
        warm.mkdir()
        (warm / "w.jpg").write_bytes((tmp / "in" / "astro_000.jpg").read_bytes())
        prepare_folder("source", warm, tmp / "warm_out")  # imports, model load, first-call costs
        best = best_cpu = None
        for r in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            s = prepare_folder("source", tmp / "in", tmp / f"out{r}")
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert len(s.used) == args.n, s.format()
            assert all(m["rotation"] == args.turn for m in s.items), s.format()  # PIL turns counter-clockwise
            best = dt if best is None else min(best, dt)
            best_cpu = dc if best_cpu is None else min(best_cpu, dc)
        if args.profile:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            prepare_folder("source", tmp / "in", tmp / "outp")
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    turned = f" turned {args.turn}" if args.turn else ""
    print(f"bench_prepare: prepare source, {args.n} images {args.size}px{turned}, {cores} core, 1 thread: "
          f"{args.n / best:.1f} img/s wall ({1000 * best / args.n:.0f} ms/img); "
          f"{args.n / best_cpu:.1f} img/s of process CPU time ({1000 * best_cpu / args.n:.0f} ms/img; "
          f"the wall figure drops when other processes share the core)")


if __name__ == "__main__":
    main()
