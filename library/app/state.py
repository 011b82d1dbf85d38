"""What the page knows lives in folders, not in the browser: the prepared photo folders under the data
folder and the run folders under the output folder. A page reload, a second browser or a restarted
``app.py`` reads the same state back.

Layout (under ``--data-dir``)::

    photos/<kind>/NAME.jpg        what was uploaded (kind: source or reference)
    prepared/<kind>/NAME.png ...  dataset_tools.prepare's output (NAME.png, .mask.png, .txt, .json)
    prepared/<kind>/excluded/     items the user took out of training (the trainer reads only the folder)
    prepared/<kind>/original_masks/NAME.mask.png   the mask prepare made, kept before the first brush edit
    prepared/<kind>/edits/NAME.mask.png, NAME.txt  the user's painted mask and caption, put back after every
                                                   prepare (they are the user's; prepare writes automatic ones)
    prepared/<kind>/app_prepare.json               the last prepare run's skipped files and warnings

Every path typed into the page goes through :class:`Sandbox`: it must resolve (symlinks followed) inside
the data folder, the output folder or the models folder (read only), else :class:`PathRefused`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from library.files.atomic import write_bytes, write_text
from library.files.messages import one_line
from library.files.text import TextFileError, read_text_file

PROJECT = Path(__file__).resolve().parents[2]
KINDS = ("source", "reference")
EXCLUDED = "excluded"
ORIGINAL_MASKS = "original_masks"
EDITS = "edits"
PREPARE_LOG = "app_prepare.json"
ITEM_SUFFIXES = (".png", ".mask.png", ".txt", ".json")  # one prepared item = these four files of one stem


class PathRefused(ValueError):
    """A path typed into the page that lies outside the folders the page may use; one line."""


class StateError(ValueError):
    """A request the folders cannot satisfy (no such photo, an unreadable record); one line."""


@dataclass(frozen=True)
class Sandbox:
    """The folders the page may touch: `writable` (data, output) and `readable` (those plus models)."""

    writable: tuple[Path, ...]
    readable: tuple[Path, ...]

    @classmethod
    def make(cls, data_dir: str | os.PathLike, output_dir: str | os.PathLike,
             models_dir: str | os.PathLike | None = None) -> Sandbox:
        """Folders are created if missing (except `models_dir`) and kept as resolved absolute paths."""
        roots = []
        for d in (data_dir, output_dir):
            p = Path(d)
            p.mkdir(parents=True, exist_ok=True)
            roots.append(p.resolve())
        extra = (Path(models_dir).resolve(),) if models_dir else ()
        return cls(writable=tuple(roots), readable=tuple(roots) + extra)

    def resolve(self, path: str | os.PathLike, write: bool = False, base: Path | None = None) -> Path:
        """`path` (relative ones are taken from `base`, default the current folder) as an absolute path
        inside the allowed folders; PathRefused (one line naming the path and the folders) otherwise.
        Symlinks are followed first, so a link inside pointing outside is refused too."""
        text = str(path).strip()
        if not text or "\x00" in text:
            raise PathRefused(f"{one_line(text)!r}: not a path; give a file or folder inside {self._where(write)}")
        p = Path(text).expanduser()
        if not p.is_absolute():
            p = (base or Path.cwd()) / p
        real = p.resolve()
        if not within(real, self.writable if write else self.readable):
            raise PathRefused(f"{self.show(text)}: outside the folders this page may {'write' if write else 'read'}; "
                              f"give a path inside {self._where(write)}")
        return real

    def files(self, folder: str | os.PathLike, base: Path | None = None) -> tuple[list[Path], list[str]]:
        """The files of a typed folder that the page may read, file by file after following links, and
        one line for each file that resolves outside the allowed folders (a link inside pointing out)."""
        d = self.resolve(folder, base=base)
        if not d.is_dir():
            raise PathRefused(f"{self.show(d)}: not a folder")
        ok, refused = [], []
        for p in sorted(d.iterdir()):
            if not within(p.resolve(), self.readable):
                refused.append(f"{p.name}: {LINK_OUT}")
            elif p.is_file():
                ok.append(p.resolve())
        return ok, refused

    def show(self, path: str | os.PathLike) -> str:
        """`path` as a person reads it: relative to the project folder (the current one) when inside it."""
        return relative(path)

    def _where(self, write: bool) -> str:
        return " or ".join(relative(r) for r in (self.writable if write else self.readable))


LINK_OUT = "a link to a file outside the data, output and models folders; not read"


# the command-line tools' advice, said as the page's buttons say it (longest first: a phrase inside a longer one)
FOR_PEOPLE = (
    ("continue with --resume latest", "press Resume to continue"),
    ("start again without --resume", "press Start instead of Resume"),
    ("train again without --resume", "press Start instead of Resume"),
    ("use --resume latest", "press Resume"),
    ("--resume latest", "Resume"),
    ("--resume: ", "Resume: "),
    ("set output.dir (--output_dir) to another folder", "choose another output name"),
    ("not a plain-tensor pickle", "a file that could run code when opened, so it is not opened"),
)


def for_people(message: str) -> str:
    """A one-line message as the page shows it: paths relative to the project, the command line's
    advice put as the page's buttons."""
    text = one_line(message).replace(str(PROJECT) + os.sep, "")
    for said, shown in FOR_PEOPLE:
        text = text.replace(said, shown)
    return text


def within(path: str | os.PathLike, roots: tuple[Path, ...] | list[Path]) -> bool:
    """Whether `path`, links followed, lies inside one of the resolved folders `roots`."""
    real = Path(path).resolve()
    return any(real == r or r in real.parents for r in roots)


def relative(path: str | os.PathLike) -> str:
    """`path` relative to the project folder when inside it, else as given: messages name files as the
    person sees them in the project, not as absolute paths."""
    text = one_line(str(path))
    try:
        return str(Path(text).resolve().relative_to(PROJECT)) if Path(text).is_absolute() else text
    except ValueError:
        return text


class Workspace:
    """The data folder's photo state (see the module docstring); every method reads the folders afresh."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).resolve()

    def uploads(self, kind: str) -> Path:
        """Folder of the uploaded photos of `kind` ("source" / "reference")."""
        return self.data_dir / "photos" / _kind(kind)

    def prepared(self, kind: str) -> Path:
        """Folder dataset_tools.prepare writes for `kind`; what data.source_dir / reference_dir point at."""
        return self.data_dir / "prepared" / _kind(kind)

    def items(self, kind: str) -> list[dict]:
        """Every prepared item of `kind`, included ones first then excluded, each its NAME.json record plus
        "stem", "excluded" (bool), "caption" (NAME.txt, "" if absent), "mask_edited" (bool) and "folder"."""
        out = []
        for excluded, folder in ((False, self.prepared(kind)), (True, self.prepared(kind) / EXCLUDED)):
            for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                if meta_path.name == PREPARE_LOG or not meta_path.with_suffix(".png").is_file():
                    continue
                try:
                    rec = json.loads(read_text_file(meta_path))
                except (TextFileError, ValueError, OSError):
                    continue  # prepare's own listing reports it; the page shows what it can read
                if not isinstance(rec, dict):
                    continue
                stem = meta_path.stem
                if not self.inside(folder, stem):
                    continue  # listed by outside_links(); never opened
                caption = folder / f"{stem}.txt"
                rec.update(stem=stem, excluded=excluded, folder=str(folder),
                           caption=read_text_file(caption).strip() if caption.is_file() else "",
                           mask_edited=(self.prepared(kind) / EDITS / f"{stem}.mask.png").is_file())
                out.append(rec)
        return out

    def inside(self, folder: Path, stem: str) -> bool:
        """Whether every file of item `stem` in `folder` resolves (links followed) inside the data folder."""
        return all(within(folder / f"{stem}{suffix}", (self.data_dir,)) for suffix in ITEM_SUFFIXES)

    def outside_links(self, kind: str) -> list[str]:
        """One line for each file of `kind` (uploads and prepared items) that is a link leading out of the
        data folder: the page does not read it, and preparing is refused while an upload is one."""
        lines = []
        for folder in (self.uploads(kind), self.prepared(kind), self.prepared(kind) / EXCLUDED):
            for p in sorted(folder.iterdir()) if folder.is_dir() else []:
                if not within(p, (self.data_dir,)):
                    lines.append(f"{relative(p)}: {LINK_OUT}")
        return lines

    def item_folder(self, kind: str, stem: str) -> Path:
        """The folder holding item `stem` now (prepared or its excluded/); StateError if neither."""
        _stem(stem)
        for folder in (self.prepared(kind), self.prepared(kind) / EXCLUDED):
            if (folder / f"{stem}.json").is_file() and self.inside(folder, stem):
                return folder
        raise StateError(f"no prepared photo {stem!r} in {self.prepared(kind)}; prepare the photos again")

    def set_excluded(self, kind: str, stem: str, excluded: bool) -> None:
        """Move item `stem`'s four files into excluded/ (the trainer does not read subfolders) or back."""
        src = self.item_folder(kind, stem)
        dst = self.prepared(kind) / EXCLUDED if excluded else self.prepared(kind)
        if src == dst:
            return
        dst.mkdir(parents=True, exist_ok=True)
        # the record last (out) / first (back): a NAME.json means every file of NAME is complete
        order = ITEM_SUFFIXES if excluded else tuple(reversed(ITEM_SUFFIXES))
        for suffix in order:
            f = src / f"{stem}{suffix}"
            if f.is_file():
                os.replace(f, dst / f.name)

    def set_caption(self, kind: str, stem: str, caption: str) -> None:
        """Write NAME.txt (one line; line breaks become spaces)."""
        folder = self.item_folder(kind, stem)
        text = " ".join(caption.split()) + "\n"
        write_text(folder / f"{stem}.txt", text)
        write_text(self._edits(kind) / f"{stem}.txt", text)

    def save_mask(self, kind: str, stem: str, png: bytes) -> Path:
        """Replace NAME.mask.png with `png` (8-bit gray PNG bytes, same size as NAME.png); the mask prepare
        made is copied to original_masks/ the first time. Returns the mask path."""
        folder = self.item_folder(kind, stem)
        mask = folder / f"{stem}.mask.png"
        keep = self.prepared(kind) / ORIGINAL_MASKS / mask.name
        if mask.is_file() and not keep.is_file():
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mask, keep)
        write_bytes(mask, png)
        write_bytes(self._edits(kind) / mask.name, png)
        return mask

    def _edits(self, kind: str) -> Path:
        folder = self.prepared(kind) / EDITS
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def reapply_edits(self, kind: str) -> list[str]:
        """After prepare rewrote the items: put the user's painted masks and captions back (prepare's new
        mask becomes the kept original). Returns one line per edit dropped: its photo is gone, or the new
        image has another size than the painted mask."""
        from library.files.images import ImageLoadError, read_image

        dropped = []
        edits = self.prepared(kind) / EDITS
        for path in sorted(edits.iterdir()) if edits.is_dir() else []:
            stem = path.name[: -len(".mask.png")] if path.name.endswith(".mask.png") else path.stem
            try:
                folder = self.item_folder(kind, stem)
            except (StateError, PathRefused):
                path.unlink()
                dropped.append(f"{stem}: no longer prepared; its edit is dropped")
                continue
            if path.suffix == ".txt":
                shutil.copyfile(path, folder / path.name)
                continue
            try:
                same = read_image(path).image.size == read_image(folder / f"{stem}.png").image.size
            except ImageLoadError:
                same = False
            if not same:
                path.unlink()
                dropped.append(f"{stem}: the photo changed size; paint its mask again")
                continue
            keep = self.prepared(kind) / ORIGINAL_MASKS / path.name
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / path.name, keep)
            shutil.copyfile(path, folder / path.name)
        return dropped

    def delete(self, kind: str, stem: str) -> None:
        """Remove photo `stem`: its upload, its prepared files (wherever they are) and its edits."""
        folder = self.item_folder(kind, stem)
        rec = json.loads(read_text_file(folder / f"{stem}.json"))
        upload = str(rec.get("source_file", "")) if isinstance(rec, dict) else ""
        if upload and Path(upload).name == upload:
            (self.uploads(kind) / upload).unlink(missing_ok=True)
        for suffix in ITEM_SUFFIXES:
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)
        for extra in (self.prepared(kind) / ORIGINAL_MASKS / f"{stem}.mask.png",
                      self.prepared(kind) / EDITS / f"{stem}.mask.png", self.prepared(kind) / EDITS / f"{stem}.txt",
                      self.prepared(kind) / "preview" / f"{stem}.jpg"):
            extra.unlink(missing_ok=True)

    def save_prepare_log(self, kind: str, skipped: list[tuple[str, str]], warnings: list[tuple[str, str]]) -> None:
        """Keep what the last prepare run said about files that produced no item (and folder-wide notes),
        so that a reload still shows why a photo is missing."""
        doc = {"skipped": [list(s) for s in skipped], "warnings": [list(w) for w in warnings]}
        self.prepared(kind).mkdir(parents=True, exist_ok=True)
        write_text(self.prepared(kind) / PREPARE_LOG, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    def prepare_log(self, kind: str) -> dict:
        """The last prepare run's {"skipped": [[file, reason]], "warnings": [[file or "", message]]}."""
        try:
            doc = json.loads(read_text_file(self.prepared(kind) / PREPARE_LOG))
        except (FileNotFoundError, TextFileError, ValueError):
            return {"skipped": [], "warnings": []}
        return doc if isinstance(doc, dict) else {"skipped": [], "warnings": []}


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise StateError(f"kind must be source or reference, not {one_line(kind)!r}")
    return kind


def _stem(stem: str) -> str:
    if not stem or "/" in stem or "\\" in stem or stem in (".", "..") or "\x00" in stem:
        raise PathRefused(f"{one_line(stem)!r}: not a photo name")
    return stem
