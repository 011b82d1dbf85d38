"""Sample with the trained files: `python generate.py --config configs/x.toml [--prompt ...] [section.key=value ...]`.

Loads the base model of the config's [model] (SD 1.x, SDXL, Z-Image or FLUX.2 Klein, read from the model), the two
embeddings and the LoRA that training wrote to [output].dir, samples (SD: Euler ancestral, 50 steps, CFG 7, LoRA 0.6
UNet / 0.9 text encoder by default; a Z-Image / Klein base: its family's flow-matching settings, docs/dit.md),
and writes PNGs with A1111 "parameters" text; optionally upscales and restores faces.
"""

from __future__ import annotations

import argparse
import logging
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    from library.generation.pipeline import (
        DEFAULT_CFG,
        DEFAULT_FIDELITY,
        DEFAULT_LORA_SCALE,
        DEFAULT_SCHEDULER,
        DEFAULT_STEPS,
        DEFAULT_TE_SCALE,
        RESTORERS,
        scheduler_names,
    )

    p = _Parser(
        prog="generate.py",
        description="Sample with a MagiCapture run's LoRA and embeddings, then optionally upscale and restore faces.",
        epilog="Overrides: section.key=value, as for training, e.g. output.dir=out/x model.pretrained=models/sd15.safetensors",
    )
    p.add_argument("--config", required=True, help="the TOML file the run was trained with")
    p.add_argument("--prompt", help='default: "a photo of a {source} person in the style of {reference}"')
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--seed", type=int, help="image i uses seed + i (default or -1: random)")
    p.add_argument("--steps", type=int, help=f"sampling steps (default: the base's; SD {DEFAULT_STEPS}, DiT bases: docs/dit.md)")
    p.add_argument("--cfg", type=float, help=f"classifier-free guidance scale (default: the base's; SD {DEFAULT_CFG:g}, DiT bases: docs/dit.md)")
    p.add_argument("--lora-scale", type=float, help=f"LoRA multiplier on the UNet / transformer (default: SD {DEFAULT_LORA_SCALE}, DiT bases 1)")
    p.add_argument("--te-scale", type=float, help=f"LoRA multiplier on the text encoder(s) (default {DEFAULT_TE_SCALE}; DiT LoRAs have none)")
    p.add_argument("--no-lora", action="store_true", help="embeddings only: do not load the LoRA")
    p.add_argument("--scheduler", help=f"SD sampler: {', '.join(scheduler_names())} (default {DEFAULT_SCHEDULER}); "
                   "a DiT base has its own flow-matching Euler")
    p.add_argument("--width", type=int, help="default: data.resolution if the config sets it, else the model's (512 SD 1.x, 1024 SDXL and DiT bases)")
    p.add_argument("--height", type=int, help="default: as --width")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet pass (default 1)")
    p.add_argument("--upscale", type=float, help="post-processing size factor (default: 1, or the --sr-weights model's)")
    p.add_argument("--sr-weights", help="a Real-ESRGAN .pth for --upscale (default: LANCZOS resize)")
    p.add_argument("--restore", choices=RESTORERS, help="face restorer (default: codeformer with --restore-weights, else none)")
    p.add_argument("--restore-weights", help="the CodeFormer or GFPGAN .pth")
    p.add_argument("--fidelity", type=float, default=DEFAULT_FIDELITY, help=f"CodeFormer w in [0, 1] (default {DEFAULT_FIDELITY})")
    p.add_argument("--out", help="output folder (default: <output.dir>/generated)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--precision", default="auto", help="auto (on CUDA fp16, bf16 for DiT bases; else fp32), fp32, fp16 or bf16")
    p.add_argument("--no-grid", action="store_true", help="do not write the grid")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from library.config import load_config
    from library.files.messages import UserError, report_error

    try:
        cfg = load_config(args.config, list(args.overrides), check_paths=False)  # data folders are not needed here
        from library.generation.pipeline import generate

        paths = generate(
            cfg,
            prompt=args.prompt,
            negative=args.negative,
            n=args.n,
            seed=args.seed,
            steps=args.steps,
            cfg_scale=args.cfg,
            lora_scale=args.lora_scale,
            te_scale=args.te_scale,
            scheduler=args.scheduler,
            width=args.width,
            height=args.height,
            upscale=args.upscale,
            restore=args.restore,
            restore_weights=args.restore_weights,
            sr_weights=args.sr_weights,
            fidelity=args.fidelity,
            out_dir=args.out,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            use_lora=not args.no_lora,
            grid=not args.no_grid,
            quiet=True,
        )
    except UserError as err:  # one line; MAGICAPTURE_DEBUG=1 adds the chain of causes
        report_error(err)
        return 2
    except KeyboardInterrupt:
        return 130
    if paths:
        print(f"wrote {len(paths)} image{'s' if len(paths) != 1 else ''} to {paths[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
