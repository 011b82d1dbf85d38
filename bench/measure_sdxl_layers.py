"""Which SDXL cross-attention layers should attention refocusing capture: time and memory of a phase-2 step.

    python bench/measure_sdxl_layers.py                       # tiny SDXL on the CPU (relative numbers)
    python bench/measure_sdxl_layers.py --full --device cuda  # SDXL 1.0 shapes, random weights, on a GPU

Candidates, all at SDXL's lowest cross-attention resolution (32x32 at 1024 px; the capture needs the
maps of one resolution): the family's default (``down_blocks.2`` and ``up_blocks.0`` attentions, first
transformer block of each), the same attentions with every transformer block, the default plus the mid
block, and refocusing off. Every variant runs MagiCaptureTrainer.optimizer_step on the same samples in
one process. Memory is the bytes autograd saves for backward in one step (``saved_tensors_hooks``,
counted once per storage): what the capture adds to activation memory, on any device; on CUDA the
peak allocation is printed too. The tiny model's numbers are only relative (2 blocks where SDXL has 10).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.config import load_config  # noqa: E402
from library.models.family import SDXL  # noqa: E402
from testkit.tiny import save_random_arcface, write_prepared  # noqa: E402
from testkit.tiny_sdxl import build_sdxl_parts  # noqa: E402
from library.training.attention import install_attention_capture  # noqa: E402
from library.training.data import Sample  # noqa: E402


def candidates(unet) -> dict[str, list[str]]:
    """Layer sets by name; "all blocks" takes every transformer block the UNet has at that level."""
    modules = dict(unet.named_modules())
    attentions = sorted({name.split(".transformer_blocks")[0] for name in SDXL.capture_layers})
    every = [n for n in modules if n.endswith(".attn2") and n.split(".transformer_blocks")[0] in attentions]
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    return {
        "default (block 0 of 5 attentions)": list(SDXL.capture_layers),
        "all transformer blocks": every,
        "default + mid block": [*SDXL.capture_layers, mid],
        "refocusing off": [],
    }


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SDXL 1.0 shapes (2.6 B UNet parameters): GPU only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256, help="pixels (tiny default 256: a 32x32 latent)")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # steadier timings on a shared machine
    from library.training.trainer import MagiCaptureTrainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_prepared(root / "source", "source", "mcv1", n=3, size=args.resolution, seed=1)
        reference = write_prepared(root / "reference", "reference", "mcv2", n=3, size=args.resolution, seed=2)
        arcface = save_random_arcface(root / "arcface.pth")
        cfg = load_config(None, [
            f'model.pretrained="{root}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
            f"data.resolution={args.resolution}", f'output.dir="{root / "out"}"', f'loss.identity_weights="{arcface}"',
            'optimizer.name="AdamW"', "logging.tensorboard=false", "sample.every=0", "output.save_every=0",
            f"phase2.batch_size={args.batch}", "train.mixed_precision=" + ('"bf16"' if args.device != "cpu" else '"no"'),
        ])
        trainer = MagiCaptureTrainer(cfg, parts=build_sdxl_parts(full_size=args.full))
        pcfg, optimizer, scheduler, _, params = trainer.setup_phase(2)
        prompt = "a photo of a mcv1 person in the style of mcv2"
        tasks = ["source", "reference", "composed"]
        samples = [Sample(tasks[i % 3], i % 3, prompt if tasks[i % 3] == "composed" else
                          ("a photo of a mcv1 person" if i % 3 == 0 else "a painting of a person in the style of mcv2"), i % 3)
                   for i in range(args.batch)]
        sets = candidates(trainer.unet)
        best = {name: float("inf") for name in sets}
        saved, peak = {}, {}
        for _ in range(args.rounds):  # variants interleaved, best round kept: a shared machine's noise hits all alike
            for name, layers in sets.items():
                cfg.loss.attn_weight = 2.5 if layers else 0.0
                install_attention_capture(trainer.unet, trainer.store, layers or list(SDXL.capture_layers))
                step = lambda: trainer.optimizer_step(samples, 0, 2, pcfg, optimizer, scheduler, params)  # noqa: E731
                step()  # warm-up
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
                batch = trainer.build_batch(samples, 0, pcfg)
                saved[name] = saved_bytes(lambda: trainer.compute_loss(batch, 2)["loss"]) / 2**20
                optimizer.zero_grad(set_to_none=True)
                peak[name] = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else float("nan")
        rows = [(name, len(sets[name]), best[name], saved[name], peak[name]) for name in sets]
        base_t, base_m = rows[-1][2], rows[-1][3]
        print(f"{'layers':38} {'n':>3} {'s/step':>8} {'x off':>6} {'saved MiB':>10} {'x off':>6} {'peak MiB':>9}")
        for name, n, seconds, saved, peak in rows:
            print(f"{name:38} {n:3d} {seconds:8.3f} {seconds / base_t:6.2f} {saved:10.1f} {saved / base_m:6.2f} {peak:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
