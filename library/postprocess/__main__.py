"""The command line of the post-processing chain: `python -m library.postprocess IN OUT [options]`.

IN is an image or a folder of images, OUT an image file or a folder. Images are read by the shared reader
(library.files.images: EXIF-rotated, 8-bit RGB, transparency composited on white), so outputs are RGB. Bad options and unusable weights
fail with one line and exit 2 before any image is touched; a bad image is reported on one line and the
rest carry on (exit 1). Outputs are written to a temporary name and renamed, so none is half-written.
Kept apart from the chain (library.postprocess), which generate.py uses without any of this.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from library.postprocess.face_restore import DEFAULT_FIDELITY, _arch_id
from library.files.atomic import write_atomic
from library.files.images import read_image
from library.files.messages import one_line
from library.postprocess import DEFAULT_UPSCALE, _resolve_device, load_face_restorer, load_upscaler, postprocess

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="python -m library.postprocess",
        description="Upscale (Real-ESRGAN or LANCZOS) and restore faces (CodeFormer / GFPGAN) with your own weights.",
    )
    p.add_argument("input", metavar="IN", help="an image file or a folder of images")
    p.add_argument("output", metavar="OUT", help="an image file (for one IN file) or a folder")
    p.add_argument("--upscale", type=float, default=DEFAULT_UPSCALE, help="output size factor (default 2)")
    p.add_argument("--restore", choices=("codeformer", "gfpgan", "none"), default="codeformer", help="face restorer (default codeformer)")
    p.add_argument("--weights", help="the face restorer's .pth (CodeFormer or GFPGAN v1.3/1.4)")
    p.add_argument("--sr-weights", help="a Real-ESRGAN .pth for the background (default: LANCZOS resize)")
    p.add_argument("--fidelity", type=float, default=DEFAULT_FIDELITY, help="CodeFormer w in [0, 1] (default 0.5)")
    p.add_argument("--tile", type=int, default=512, help="super-resolution tile size in input pixels, 0 = no tiling")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    return p.parse_args(argv)


def _list_inputs(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS and not p.name.startswith("."))


def _read_image(path: Path) -> Image.Image:
    """The shared reader's RGB: EXIF-rotated, 8 bits, transparency composited on white."""
    return read_image(path).image


def _write_image(image: Image.Image, dest: Path) -> None:
    """Write in the format `dest`'s extension names, atomically (no half-written outputs)."""
    ext = dest.suffix.lower()
    if ext in (".jpg", ".jpeg") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    kwargs = {"quality": 95} if ext in (".jpg", ".jpeg", ".webp") else {}
    fmt = Image.registered_extensions()[ext]  # the temporary name ends in .tmp: PIL cannot guess
    write_atomic(dest, lambda tmp: image.save(tmp, format=fmt, **kwargs))


def _plan(src: Path, out_arg: str) -> list[tuple[Path, Path]]:
    dst = Path(out_arg)
    if not src.exists():
        raise _UsageError(f"input not found: {src}")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise _UsageError(f"IN is a folder, so OUT must be a folder: {dst}")
        if dst.exists() and dst.resolve() == src.resolve():
            raise _UsageError(f"OUT must not be the input folder: {dst}")
        dst.mkdir(parents=True, exist_ok=True)
        return [(p, dst / p.name) for p in _list_inputs(src)]
    if dst.is_dir() or out_arg.endswith(("/", os.sep)):
        dst.mkdir(parents=True, exist_ok=True)
        return [(src, dst / src.name)]
    if dst.suffix.lower() not in _IMAGE_EXTS:
        raise _UsageError(f"OUT must be a folder or an image file ({', '.join(sorted(_IMAGE_EXTS))}): {dst}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return [(src, dst)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]); returns the exit status (0, 1 = some images failed, 2)."""
    args = _parse_args(argv)
    prog = "postprocess"

    def fail(msg: str) -> int:
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2

    if args.upscale <= 0:
        return fail(f"--upscale must be positive, got {args.upscale:g}")
    if not 0.0 <= args.fidelity <= 1.0:
        return fail(f"--fidelity must be in [0, 1], got {args.fidelity:g}")
    if args.restore != "none" and not args.weights:
        return fail(f"--restore {args.restore} needs --weights RESTORER.pth (or --restore none)")
    if not Path(args.input).exists():
        return fail(f"input not found: {args.input}")
    try:
        device = _resolve_device(args.device)
        upscaler = load_upscaler(args.sr_weights, device=device) if args.sr_weights else None
        restorer = None
        if args.restore != "none":
            restorer = load_face_restorer(args.weights, device=device)
            want = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}[args.restore]
            if _arch_id(restorer) != want:
                return fail(f"{args.weights}: spandrel detected {_arch_id(restorer)}, but --restore {args.restore} expects {want}")
        jobs = _plan(Path(args.input), args.output)
    except (_UsageError, ValueError, OSError) as exc:
        return fail(one_line(exc, 200, first_line=True))
    if not jobs:
        print(f"{prog}: no images ({', '.join(sorted(_IMAGE_EXTS))}) in {args.input}", file=sys.stderr)
        return 1

    from tqdm import tqdm

    written = failed = faces = no_face = 0
    bar = tqdm(jobs, unit="img", desc=prog, disable=len(jobs) < 2, file=sys.stderr)
    for src, dst in bar:
        try:
            image = _read_image(src)
            out, notes = postprocess(image, upscaler=upscaler, restorer=restorer, upscale=args.upscale, fidelity=args.fidelity, tile=args.tile)
            _write_image(out, dst)
        except Exception as exc:  # one line per bad file, then carry on
            failed += 1
            tqdm.write(f"{src.name}: error: {one_line(exc, 200, first_line=True)}", file=sys.stderr)
            continue
        written += 1
        for note in notes:
            if note.startswith("no face"):
                no_face += 1
                tqdm.write(f"{src.name}: {note}", file=sys.stderr)
            elif note.startswith("restored "):
                faces += int(note.split()[1])
    bar.close()
    summary = f"{prog}: {written} written, {failed} failed"
    if restorer is not None:
        summary += f", {faces} face{'s' if faces != 1 else ''} restored, {no_face} without a face"
    print(f"{summary} -> {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
