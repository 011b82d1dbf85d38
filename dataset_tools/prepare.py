"""Prepare a folder of photos for MagiCapture training.

    python -m dataset_tools.prepare source    IN_DIR OUT_DIR [--token WORD] [--resolution 512] [--parser-weights PATH]
    python -m dataset_tools.prepare reference IN_DIR OUT_DIR [--token WORD] ...

For every image in IN_DIR (jpg, jpeg, png, webp, bmp, heic, heif, avif; not recursive) OUT_DIR gets, one stem per image:
NAME.png (RGB, EXIF-rotated, short side <= 2 x resolution), NAME.mask.png (8-bit, 255 = trains: the face
for source, everything but the face for reference), NAME.txt (caption), NAME.json (face box, 5 ArcFace
landmarks, score, mask coverage, rotation, face angle, warnings), preview/NAME.jpg and preview/contact.jpg.
A source photo whose face is on its side or upside down (no EXIF tag said so) is turned upright, with
the turn in NAME.json's "rotation" (degrees clockwise) and a warning; a reference photo is only reported
(see library.faces.analyzer).
Exit status: 0 when at least one image was usable, 2 when none was or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from library.files.atomic import write_bytes
from library.files.messages import UserError, one_line, report_error
from library.files.text import TextFileError, read_text_file

from dataset_tools.records import json_bytes as _json_bytes, round_list as _round, small_face_warning
from dataset_tools.images import IMAGE_EXTENSIONS, IMAGE_EXTENSIONS_TEXT, ImageLoadError, encode_png, load_image
from dataset_tools.identity_pass import IdentityWeightsError, embed_one as _embed_one, identity_network as _identity_network, identity_pass as _identity_pass
from dataset_tools.previews import THUMB, encode_jpg as _encode_jpg, fit as _fit, make_contact_sheet, make_preview

KINDS = ("source", "reference")
DEFAULT_TOKENS = {"source": "mcv1", "reference": "mcv2"}
CAPTIONS = {
    "source": "a photo of a {token} person",
    "reference": "a photo of a person in the style of {token}",
}
CONTACT_MAX = 400
PNG_LEVEL = 1  # fast; the files are read once to cache latents
MIN_RECOMMENDED = 3
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]+")


class PrepareError(UserError):
    """A problem with the arguments or the folders as a whole (exit status 2); str() is one line."""


@dataclass
class Summary:
    kind: str
    in_dir: str
    out_dir: str
    token: str
    read: list[str] = field(default_factory=list)  # image files read (attempted)
    used: list[str] = field(default_factory=list)  # image files that produced a training item
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (file, why): not images
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (file or "", message)
    items: list[dict] = field(default_factory=list)  # the NAME.json records written
    different_person: list[str] = field(default_factory=list)  # source photos the identity check flagged
    identity: str = ""  # the identity check's network and largest distance, when it ran

    @property
    def ok(self) -> bool:
        return bool(self.used)

    def lines(self) -> list[str]:
        out = [
            f"prepare {self.kind}: {len(self.read)} image file(s) read, {len(self.used)} used, "
            f"{len(self.skipped)} skipped -> {self.out_dir}"
        ]
        out += [f"skipped  {name}: {reason}" for name, reason in self.skipped]
        out += [f"ignored  {name}: {why}" for name, why in self.ignored]
        if self.different_person:
            out.append(f"identity: {len(self.different_person)} photo(s) look like a different person: "
                       f"{', '.join(self.different_person)}")
        elif self.identity:
            out.append(f"identity: every photo shows the same person ({self.identity})")
        out += [f"warning  {name}: {msg}" if name else f"warning  {msg}" for name, msg in self.warnings]
        return out

    def format(self) -> str:
        return "\n".join(self.lines())


# ------------------------------------------------------------------------------------------------
# small helpers


def _assign_stems(names: list[str]) -> dict[str, str]:
    """Output stem per input file name, unique (case-insensitively) and clear of mask/contact names."""
    taken: set[str] = {"contact"}
    stems: dict[str, str] = {}
    for name in names:
        base, ext = os.path.splitext(name)
        if base.lower().endswith(".mask"):
            base = base[: -len(".mask")] + "_mask"
        cand = base or "image"
        if cand.lower() in taken:
            cand = f"{base}_{ext.lstrip('.').lower()}"
            i = 2
            while cand.lower() in taken:
                cand = f"{base}_{ext.lstrip('.').lower()}{i}"
                i += 1
        taken.add(cand.lower())
        stems[name] = cand
    return stems


def _check_dirs(in_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    if not in_dir.exists():
        raise PrepareError(f"input folder not found: {in_dir}")
    if not in_dir.is_dir():
        raise PrepareError(f"input is not a folder: {in_dir}")
    if not os.access(in_dir, os.R_OK | os.X_OK):
        raise PrepareError(f"input folder is not readable: {in_dir}")
    rin, rout = in_dir.resolve(), out_dir.resolve()
    if rout == rin or rin in rout.parents:
        raise PrepareError(f"output folder {out_dir} must not be the input folder or inside it")
    if rout.exists() and not rout.is_dir():
        raise PrepareError(f"output path exists and is not a folder: {out_dir}")
    return rin, rout


def _list_inputs(in_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    try:
        entries = sorted(os.scandir(in_dir), key=lambda e: e.name)
    except OSError as exc:
        raise PrepareError(f"cannot read input folder {in_dir}: {exc.strerror or one_line(exc, 200)}") from exc
    images, ignored = [], []
    for e in entries:
        if e.name.startswith("."):
            continue  # hidden files (.DS_Store, editor temp files)
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            ignored.append((e.name + "/", "subfolder not searched (only the folder's own files are read)"))
            continue
        ext = os.path.splitext(e.name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(e.name)
        else:
            shown = ext or "no extension"
            ignored.append((e.name, f"unsupported extension '{shown}' (reads {' '.join(IMAGE_EXTENSIONS)})"))
    return images, ignored


class _Skip(Exception):
    pass


def _process_one(path: Path, stem: str, kind: str, token: str, max_short: int, analyzer, out_dir: Path,
                 preview_dir: Path) -> tuple[dict, np.ndarray, np.ndarray, object]:
    try:
        loaded = load_image(path, max_short)
    except ImageLoadError as exc:
        raise _Skip(str(exc)) from exc
    rgb = np.asarray(loaded.image)
    if not rgb.flags.c_contiguous:
        rgb = np.ascontiguousarray(rgb)
    warns = list(loaded.warnings)
    # a source photo is of the person: a face on its side means a lost EXIF tag, so it is turned upright;
    # a reference photo's composition may be meant (a reclining figure): reported, not turned
    fa = analyzer.analyze(rgb, fix_rotation=kind == "source")
    if fa.rotation:
        rgb = fa.image
    h, w = rgb.shape[:2]
    warns += fa.warnings
    face = fa.face
    if face is None:
        if kind == "source":
            raise _Skip("no face found (a source image needs the person's face)")
        mask = np.full((h, w), 255, np.uint8)
        warns.append("no face found: the whole image trains as style (all-white mask)")
    else:
        if len(fa.faces) > 1:
            bw, bh = face.box[2] - face.box[0], face.box[3] - face.box[1]
            which = "the largest" if face.area >= max(f.area for f in fa.faces) else "the largest confirmed one"
            if kind == "source":
                warns.append(
                    f"{len(fa.faces)} faces found; using {which} ({bw:.0f}x{bh:.0f} px at "
                    f"{face.box[0]:.0f},{face.box[1]:.0f}). A group photo can teach the wrong person: "
                    "crop it to one face"
                )
            else:
                warns.append(f"{len(fa.faces)} faces found; only {which} is masked out of the style region")
        mask = fa.face_mask if kind == "source" else 255 - fa.face_mask
        small = small_face_warning(face.box, w, h) if kind == "source" else None
        if small:
            warns.append(small)
    coverage = float(np.count_nonzero(mask)) / mask.size
    if coverage == 0.0:
        raise _Skip("the mask is empty (nothing would train)")

    meta = {
        "image": f"{stem}.png",
        "kind": kind,
        "token": token,
        "width": int(w),
        "height": int(h),
        "face_box": None if face is None else _round(face.box),
        "score": None if face is None else round(float(face.score), 4),
        "landmarks": None if fa.landmarks is None else [_round(p) for p in fa.landmarks],
        "mask_coverage": round(coverage, 5),
        "num_faces": len(fa.faces),
        "detector": fa.detector,
        "rotation": fa.rotation,
        "face_angle": None if fa.angle is None else round(float(fa.angle), 1),
        "warnings": warns,
        "source_file": path.name,
        "mask_method": fa.mask_method if face is not None else "all",
    }
    preview = make_preview(rgb, mask, None if face is None else face.box, fa.landmarks,
                           [f.box for f in fa.faces[1:]])
    outputs = [
        (out_dir / f"{stem}.png", lambda: encode_png(rgb)),
        (out_dir / f"{stem}.mask.png", lambda: encode_png(mask)),
        (out_dir / f"{stem}.txt", lambda: CAPTIONS[kind].format(token=token).encode("utf-8")),
        (preview_dir / f"{stem}.jpg", lambda: _encode_jpg(preview)),
        # the record goes last: a NAME.json means every file of NAME is complete
        (out_dir / f"{stem}.json", lambda: _json_bytes(meta)),
    ]
    _write_outputs(outputs)
    thumb, _ = _fit(preview, THUMB)
    return meta, thumb, rgb, fa


def _write_outputs(outputs: list) -> None:
    """Write (path, encode) pairs in order, each atomically; on failure remove the ones written."""
    written: list[Path] = []
    try:
        for target, encode in outputs:
            write_bytes(target, encode())
            written.append(target)
    except BaseException as exc:
        for p in written:  # no half item: an image without its mask or record must not train
            try:
                p.unlink()
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise _Skip(f"cannot write outputs: {exc.strerror or one_line(exc, 200)}") from exc
        raise


# ------------------------------------------------------------------------------------------------
# public API


def validate_token(token: str) -> str:
    if not token or not _TOKEN_RE.fullmatch(token):
        raise PrepareError(
            f"bad token {token!r}: use one word of letters, digits, '_' or '-' (it names an embedding file)"
        )
    return token


def prepare_folder(kind: str, in_dir, out_dir, token: str | None = None, resolution: int = 512,
                   parser_weights=None, progress: bool = False, identity_check: bool = True,
                   identity_weights=None) -> Summary:
    """Prepare every image of `in_dir` into `out_dir`; returns what was read, used and skipped.

    A source set also gets the identity check (`dataset_tools.identity_check`; dlib's network, or the
    ArcFace file `identity_weights`) unless `identity_check` is false. Raises PrepareError (one-line
    message) for bad arguments or unusable folders; a bad image never raises, it lands in
    `Summary.skipped` with the reason.
    """
    from library.faces import FaceAnalyzer, quiet_native_stderr

    if kind not in KINDS:
        raise PrepareError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    token = validate_token(DEFAULT_TOKENS[kind] if token is None else token)
    try:
        resolution = int(resolution)
    except (TypeError, ValueError) as err:
        raise PrepareError(f"resolution must be an integer, not {resolution!r}") from err
    if resolution < 64:
        raise PrepareError(f"resolution must be at least 64, not {resolution}")
    max_short = 2 * resolution
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _check_dirs(in_dir, out_dir)
    if parser_weights is not None and not Path(parser_weights).is_file():
        raise PrepareError(f"face-parsing weights not found: {parser_weights}")
    names, ignored = _list_inputs(in_dir)
    summary = Summary(kind=kind, in_dir=str(in_dir), out_dir=str(out_dir), token=token, ignored=ignored)
    if not names:
        summary.warnings.append(("", f"no image files in {in_dir} (reads {' '.join(IMAGE_EXTENSIONS)})"))
        return summary
    preview_dir = out_dir / "preview"
    try:
        preview_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create output folder {out_dir}: {exc.strerror or one_line(exc, 200)}") from exc
    stems = _assign_stems(names)
    try:
        network = _identity_network(summary, identity_weights) if kind == "source" and identity_check else None
    except IdentityWeightsError as exc:
        raise PrepareError(str(exc)) from exc
    id_records: list[dict] = []

    from library.faces.bisenet import ParserLoadError

    thumbs: list[tuple[str, np.ndarray]] = []
    with quiet_native_stderr() as stream:
        try:
            analyzer = FaceAnalyzer(parser_weights=parser_weights)
        except ParserLoadError as exc:
            raise PrepareError(str(exc)) from exc
        try:
            from tqdm import tqdm

            bar = tqdm(names, desc=f"prepare {kind}", unit="img", file=stream, disable=not progress,
                       dynamic_ncols=True, leave=False)
            for name in bar:
                summary.read.append(name)
                try:
                    meta, thumb, rgb, fa = _process_one(in_dir / name, stems[name], kind, token, max_short,
                                                        analyzer, out_dir, preview_dir)
                except _Skip as exc:
                    summary.skipped.append((name, str(exc)))
                    continue
                except MemoryError:
                    summary.skipped.append((name, "not enough memory to process this image"))
                    continue
                except OSError as exc:
                    summary.skipped.append((name, f"cannot process: {exc.strerror or one_line(exc, 200)}"))
                    continue
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the folder
                    summary.skipped.append((name, f"unexpected error: {type(exc).__name__}: {one_line(exc, 200)}"))
                    continue
                summary.used.append(name)
                summary.items.append(meta)
                summary.warnings += [(name, w) for w in meta["warnings"]]
                if stems[name] != os.path.splitext(name)[0]:
                    summary.warnings.append((name, f"written as {stems[name]}.png (another file has the same name)"))
                if len(thumbs) < CONTACT_MAX:
                    thumbs.append((meta["image"][:-4], thumb))
                if network is not None:
                    _embed_one(network, name, stems[name], meta, rgb, fa, id_records, summary)
                del rgb, fa
            bar.close()
            if network is not None:
                _identity_pass(network, id_records, analyzer, out_dir, preview_dir, summary, thumbs)
        finally:
            analyzer.close()

    if thumbs:
        try:
            write_bytes(preview_dir / "contact.jpg", _encode_jpg(make_contact_sheet(thumbs), 88))
        except OSError as exc:
            summary.warnings.append(("", f"cannot write preview/contact.jpg: {exc.strerror or one_line(exc, 200)}"))
        if len(summary.used) > CONTACT_MAX:
            summary.warnings.append(("", f"contact sheet shows the first {CONTACT_MAX} images only"))
    if summary.used and len(summary.used) < MIN_RECOMMENDED:
        summary.warnings.append(
            ("", f"only {len(summary.used)} usable image(s); MagiCapture expects 4 to 6 per set")
        )
    _note_stale(summary, out_dir)
    return summary


def _note_stale(summary: Summary, out_dir: Path) -> None:
    written = {m["image"][:-4] for m in summary.items}
    stale = []
    try:
        for p in sorted(out_dir.glob("*.json")):
            if p.stem in written:
                continue
            try:
                rec = json.loads(read_text_file(p))
            except TextFileError as exc:
                if p.with_suffix(".png").is_file():  # an item's sidecar: training would stop on it
                    summary.warnings.append(("", f"{exc} (or delete that item; training stops on it)"))
                continue
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("kind") in KINDS and "image" in rec:
                stale.append(p.stem)
    except OSError:
        return
    if stale:
        shown = ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else "")
        summary.warnings.append(
            ("", f"{len(stale)} item(s) in {out_dir} come from an earlier run and will also train: {shown} "
                 "(delete them if they should not)")
        )


# ------------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no traceback
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m dataset_tools.prepare",
        description="Turn a folder of photos into a MagiCapture training set (images, masks, captions, "
        "landmarks, previews).",
    )
    p.add_argument("kind", choices=KINDS, help="source: photos of the person; reference: photos of the style")
    p.add_argument("in_dir", help=f"folder of photos ({IMAGE_EXTENSIONS_TEXT}; not searched recursively)")
    p.add_argument("out_dir", help="output folder (created; must not be IN_DIR or inside it)")
    p.add_argument("--token", default=None,
                   help="special token word (default: mcv1 for source, mcv2 for reference)")
    p.add_argument("--resolution", type=int, default=512,
                   help="training resolution; images keep a short side of at most twice this (default 512)")
    p.add_argument("--identity-weights", default=None, metavar="PATH",
                   help="ArcFace file (.onnx/.pth) for the source set's identity check (default: dlib's network)")
    p.add_argument("--no-identity-check", action="store_true",
                   help="skip the source set's identity check (different person, group photos)")
    p.add_argument("--parser-weights", default=None, metavar="PATH",
                   help="BiSeNet face-parsing weights (face-parsing.PyTorch 79999_iter.pth) for the face mask")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare_folder(args.kind, args.in_dir, args.out_dir, token=args.token,
                                 resolution=args.resolution, parser_weights=args.parser_weights, progress=True,
                                 identity_check=not args.no_identity_check, identity_weights=args.identity_weights)
    except UserError as exc:  # one line; MAGICAPTURE_DEBUG=1 adds the chain of causes
        report_error(exc)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback
        print(f"error: unexpected failure: {type(exc).__name__}: {one_line(exc, 200)}", file=sys.stderr)
        return 2
    print(summary.format(), flush=True)
    if not summary.used:
        print(f"error: no usable image in {args.in_dir} ({len(summary.read)} read)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
