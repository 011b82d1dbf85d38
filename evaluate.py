"""Measure the likeness: `python evaluate.py --generated DIR --source DIR --reference DIR [--config X.toml] [--out DIR]`.

The paper's metrics (CSIM, masked-CLIP style, LAION aesthetic) plus the share of images with a face and
the share the identity network calls the same person, per generated image and as mean ± std, written to
metrics.json, metrics.csv and report.html (default folder: the generated folder's parent / evaluation).
A metric whose weights are not given is skipped with one line saying what to give. See README,
"Evaluation".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate.py", description="Score generated images against the source (identity) and reference (style) sets.")
    p.add_argument("--generated", help="folder of generated images (generate.py's output)")
    p.add_argument("--source", help="source photos: a dataset_tools.prepare folder or plain photos")
    p.add_argument("--reference", help="reference photos: a prepared folder (its masks are used) or plain photos")
    p.add_argument("--sweep", help="PAIRS.toml: train, generate and evaluate every method x pair, then write the table "
                                   "(see library/evaluation/sweep.py)")
    p.add_argument("--shard", help="with --sweep: i/n runs every n-th run from the i-th (1 <= i <= n; default: "
                                   "the SLURM array task's position, else every run)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="with --sweep: run every run as a Ray job, one per GPU (or core), on this machine or on the "
                        "cluster at ADDRESS (auto, HOST:6379); needs requirements-cluster.txt")
    p.add_argument("--config", help="a training TOML: [loss] identity_weights, [evaluation] clip and aesthetic")
    p.add_argument("--out", help="output folder (default: GENERATED/../evaluation)")
    p.add_argument("--clip", help="CLIP ViT-L/14 folder in transformers layout (style and aesthetic)")
    p.add_argument("--aesthetic", help="LAION improved aesthetic predictor .pth (sac+logos+ava1-l14-linearMSE.pth)")
    p.add_argument("--identity-weights", help="ArcFace .onnx/.pth for CSIM (default: the config's, else dlib's network)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("overrides", nargs="*", help="section.key=value for --config")
    return p


def _face_mask_finder():
    """face_mask(rgb) -> bool mask (True = face) from the project's face masks, or None without a face."""
    from library.faces import FaceAnalyzer, quiet_native_stderr

    analyzer = None

    def face_mask(rgb):
        nonlocal analyzer
        with quiet_native_stderr():
            if analyzer is None:
                analyzer = FaceAnalyzer()
            found = analyzer.analyze(rgb, fix_rotation=False)
        return None if found.face_mask is None else found.face_mask > 127

    return face_mask


def _settings(args) -> tuple[str, str, str]:
    """(identity weights, CLIP folder, aesthetic file): the command line's, else the config's, else ""."""
    identity, clip, aesthetic = "", "", ""
    if args.config:
        from library.config import load_config

        cfg = load_config(args.config, list(args.overrides), check_paths=False)
        identity, clip, aesthetic = cfg.loss.identity_weights, cfg.evaluation.clip, cfg.evaluation.aesthetic
    elif args.overrides:
        raise ValueError(f"overrides {args.overrides[0]!r}... need --config")
    pick = lambda given, default: default if given is None else given  # noqa: E731 - "" on the command line turns it off
    return pick(args.identity_weights, identity), pick(args.clip, clip), pick(args.aesthetic, aesthetic)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (scancel, a job scheduler's stop): release the job lock on the way out


def sweep_main(args) -> int:
    """--sweep: the runs of this shard (or all of them on Ray), then the table of every run finished so far."""
    import os
    import signal

    from library.evaluation.sweep import (BUSY, DONE, FAILED, SweepError, read_sweep, run_job, shard, shard_from_env,
                                          subprocess_runner, write_table)
    from library.files.messages import UserError, report_error
    from library.files.text import read_text_file

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.generated or args.source or args.reference or args.overrides:
            raise SweepError("--sweep takes the folders and overrides from its file ; drop --generated, --source, "
                             "--reference and overrides")
        sweep = read_sweep(args.sweep)
        spec = args.shard
        if spec is None and args.ray is None and (spec := shard_from_env(os.environ)) is not None:
            say(f"sweep: shard {spec} (SLURM_ARRAY_TASK_ID={os.environ['SLURM_ARRAY_TASK_ID']})")
        runs = shard(sweep.runs, spec)
    except UserError as err:  # one line; MAGICAPTURE_DEBUG=1 adds the chain of causes
        report_error(err)
        return 2
    here = Path(__file__).resolve().parent
    results = {DONE: [], FAILED: [], BUSY: []}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.ray is not None:
            from library.evaluation.sweep_ray import run_on_ray

            results = run_on_ray(sweep, runs, args.ray, here)
        else:
            train, generate = subprocess_runner(here / "train_magicapture.py"), subprocess_runner(here / "generate.py")
            for run in runs:
                results[run_job(sweep, run, train, generate, main, say=say)].append(run)
    except UserError as err:  # one line; MAGICAPTURE_DEBUG=1 adds the chain of causes
        report_error(err)
        return 2
    except KeyboardInterrupt:
        return 130
    paths = write_table(sweep)
    print(read_text_file(paths[2]), end="")
    counts = [(len(results[FAILED]), "failed"), (len(results[BUSY]), "held by other workers (not run here)")]
    print(f"wrote {', '.join(p.name for p in paths)} to {sweep.out}"
          + "".join(f"; {k} run{'s' if k != 1 else ''} {what}" for k, what in counts if k))
    return 1 if results[FAILED] else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.sweep:
        return sweep_main(args)
    if args.shard or args.ray is not None:
        print("evaluate.py: error: --shard and --ray go with --sweep (see --help)", file=sys.stderr)
        return 2
    missing = [f"--{k}" for k in ("generated", "source", "reference") if not getattr(args, k)]
    if missing:
        print(f"evaluate.py: error: the following arguments are required: {', '.join(missing)} (or --sweep PAIRS.toml)",
              file=sys.stderr)
        return 2
    from library.evaluation.clip_scores import ClipImageEmbedder, load_aesthetic
    from library.evaluation.folders import read_folder
    from library.evaluation.metrics import evaluate_images
    from library.evaluation.report import COMPARABILITY, likeness_lines, write_outputs
    from library.files.messages import UserError, one_line, report_error

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        identity_weights, clip_dir, aesthetic_file = _settings(args)
        generated = read_folder(args.generated, warn=say)
        source = read_folder(args.source, warn=say)
        reference = read_folder(args.reference, reference_masks=True, warn=say)
        skips: list[str] = []
        identity = None
        try:
            from library.evaluation.face_identity import load_identity_network

            identity = load_identity_network(identity_weights, device=device)
        except ValueError as err:
            if identity_weights:
                raise
            skips.append(f"skipped CSIM, face found and same person: {one_line(err)}")
        except ImportError as err:
            skips.append(f"skipped CSIM, face found and same person: no identity network ({one_line(err, 120)}) ; "
                         "install dlib-bin and face_recognition_models (requirements.txt) or give --identity-weights")
        clip = ClipImageEmbedder(clip_dir, device=device) if clip_dir else None
        aesthetic = load_aesthetic(aesthetic_file, clip.dim) if (aesthetic_file and clip is not None) else None
        if clip is None:
            skips.append("skipped style: no CLIP weights ; give --clip FOLDER (openai/clip-vit-large-patch14 in "
                         "transformers layout) or [evaluation] clip in the config")
        if aesthetic is None:
            need = [] if aesthetic_file else ["--aesthetic sac+logos+ava1-l14-linearMSE.pth"]
            need += [] if clip is not None else ["--clip FOLDER"]
            skips.append(f"skipped aesthetic: it needs the predictor and CLIP ViT-L/14 ; give {' and '.join(need)}")
    except UserError as err:  # one line; MAGICAPTURE_DEBUG=1 adds the chain of causes
        report_error(err)
        return 2
    except ValueError as err:  # a library's refusal of a file it was given (e.g. an image it cannot decode)
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    for line in skips:
        say(line)
    from tqdm import tqdm

    try:
        ev = evaluate_images(
            generated, source, reference, identity=identity, clip=clip, aesthetic=aesthetic,
            face_mask=_face_mask_finder() if clip is not None else None,
            progress=lambda items: tqdm(items, desc="evaluating", unit="image", file=sys.stderr, leave=False),
            note=say,
        )
    except KeyboardInterrupt:
        return 130
    ev.notes[:0] = skips
    out = Path(args.out) if args.out else Path(args.generated).resolve().parent / "evaluation"
    folders = {"generated": str(args.generated), "source": str(args.source), "reference": str(args.reference)}
    try:
        paths = write_outputs(out, ev, generated, source, reference, folders)
    except OSError as err:
        print(f"error: {out}: cannot write the report ({one_line(err, 160)}) ; give a writable --out", file=sys.stderr)
        return 2
    for key, title in (("csim", "CSIM"), ("style", "style"), ("aesthetic", "aesthetic"),
                       ("face_found", "face found"), ("same_person", "same person")):
        entry = ev.summary[key]
        if entry["mean"] is not None:
            print(f"{title}: {entry['mean']:.3f} ± {entry['std']:.3f} (n={entry['n']})")
        elif key == "csim" and identity is not None:
            print("CSIM: none (no face found in any generated image)" if ev.source_faces else
                  "CSIM: none (no face found in any source image)")
    for line in likeness_lines(ev.likeness):
        print(line)
    if identity is not None:
        print(f"identity network: {identity.name}. {COMPARABILITY}")
    print(f"wrote {', '.join(p.name for p in paths)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
