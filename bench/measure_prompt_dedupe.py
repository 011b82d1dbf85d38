"""What encoding each distinct prompt of a batch once saves: phase-1 and phase-2 steps on the tiny SD 1.x model.

    python bench/measure_prompt_dedupe.py                 # tiny SD 1.x on the CPU
    python bench/measure_prompt_dedupe.py --device cuda --sd15

The trainer encodes the U distinct prompts of a batch and indexes the result back to the B samples
(PromptEncoder.batch / encode, the trainer's ``prompts``); the other variant encodes all B rows, as one text
encoder call per sample row would. Both run MagiCaptureTrainer.optimizer_step on the same samples drawn
by the phase's TaskSampler (templates repeat: U < B in most steps). Prints seconds per step and the
text encoders' share measured alone (forward + backward of PromptEncoder.encode).
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
from library.models.loading import StableDiffusionParts, _ddpm_from  # noqa: E402
from testkit.tiny import build_components, save_random_arcface, write_prepared  # noqa: E402


def every_row(trainer):
    """PromptEncoder.batch without the dedupe: U = B, each sample its own row."""
    def prompt_batch(prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.stack([trainer.prompts.ids(p) for p in prompts]),
                "unique_input_ids": torch.stack([trainer.prompts.encoder_ids(p) for p in prompts], 1),
                "prompt_index": torch.arange(len(prompts))}
    return prompt_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="SD 1.5 shapes (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    from library.training.trainer import MagiCaptureTrainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        res = 512 if args.sd15 else 64
        source = write_prepared(root / "source", "source", "mcv1", n=4, size=res, seed=1)
        reference = write_prepared(root / "reference", "reference", "mcv2", n=4, size=res, seed=2)
        arcface = save_random_arcface(root / "arcface.pth")
        comps = build_components(sd15_size=args.sd15)
        parts = StableDiffusionParts(unet=comps["unet"], vae=comps["vae"], text_encoder=comps["text_encoder"],
                                     tokenizer=comps["tokenizer"], noise_scheduler=_ddpm_from(dict(comps["scheduler"].config)),
                                     name="random-sd15")
        cfg = load_config(None, [
            f'model.pretrained="{root}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
            f"data.resolution={res}", f'output.dir="{root / "out"}"', f'loss.identity_weights="{arcface}"',
            'optimizer.name="AdamW"', "logging.tensorboard=false", "sample.every=0", "output.save_every=0",
            f"phase1.batch_size={args.batch}", f"phase2.batch_size={args.batch}",
        ])
        trainer = MagiCaptureTrainer(cfg, parts=parts)
        deduped = trainer.prompts.batch
        print(f"{'phase':6} {'variant':10} {'s/step':>8} {'encode s':>9} {'mean U/B':>9}")
        for phase in (1, 2):
            pcfg, optimizer, scheduler, sampler, params = trainer.setup_phase(phase)
            draws = [sampler.draw(pcfg.batch_size) for _ in range(args.steps + 1)]
            share = sum(len({s.prompt for s in d}) for d in draws) / sum(len(d) for d in draws)
            times = {}
            for name, batcher in (("every row", every_row(trainer)), ("deduped", deduped)):
                trainer.prompts.batch = batcher
                trainer.optimizer_step(draws[0], 0, phase, pcfg, optimizer, scheduler, params)  # warm-up
                start = time.perf_counter()
                for d in draws[1:]:
                    trainer.optimizer_step(d, 0, phase, pcfg, optimizer, scheduler, params)
                step = (time.perf_counter() - start) / args.steps
                start = time.perf_counter()
                for d in draws[1:]:  # the text encoders alone, forward and backward
                    batch = trainer.build_batch(d, 0, pcfg)
                    hidden = trainer.prompts.encode(batch["unique_input_ids"], batch["prompt_index"])["hidden"]
                    hidden.float().square().mean().backward()
                optimizer.zero_grad(set_to_none=True)
                encode = (time.perf_counter() - start) / args.steps
                times[name] = (step, encode)
                print(f"{phase:<6} {name:10} {step:8.4f} {encode:9.4f} {share if name == 'deduped' else 1.0:9.2f}")
            (s0, e0), (s1, e1) = times["every row"], times["deduped"]
            print(f"phase {phase}: deduped / every row = {s1 / s0:.2f} per step, {e1 / e0:.2f} for the text encoder")
        trainer.prompts.batch = deduped
    return 0


if __name__ == "__main__":
    sys.exit(main())
