"""The one way this project writes a file or a folder: to a temporary name beside it, then renamed.

A reader (a frontend, another run, a crash) sees the old file or the complete new one, never half of
one. The temporary name is hidden (``.NAME.XXXXXXXX.tmp``) so that no folder listing takes it for an
output, and is removed when the writer fails. Before the rename the data is fsynced, so a power cut
cannot leave an empty or partial file under the final name (file systems may otherwise commit the
rename before the data), and the file gets the mode an ordinary file gets from
the process umask (0o666 & ~umask, folders 0o777 & ~umask): ``tempfile.mkstemp`` and safetensors'
``save_file`` create 0600 files and a rename keeps the mode, so without the chmod a frontend running as
another user (a Docker container, a shared server) could not read the outputs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    "atomic_folder", "atomic_path", "current_umask", "file_mode", "folder_mode", "write_atomic", "write_bytes",
    "write_text",
]


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # elsewhere the only way to read it is to set it; 0o077 for that instant errs on the private side
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits a newly created ordinary file gets: 0o666 & ~umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """Permission bits a newly created folder gets: 0o777 & ~umask (0o755 under umask 022)."""
    return 0o777 & ~current_umask()


def _temporary_name(path: Path) -> tuple[str, str]:
    return f".{path.name}.", ".tmp"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Make a rename inside `path` durable; some file systems refuse fsync on a folder, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends normally, that file becomes `path`.

    Write the whole file to the yielded path inside the block (by name: ``save_file(t, str(tmp))``,
    ``image.save(tmp, format="PNG")``; its name ends in ``.tmp``, so give formats explicitly). On leaving
    it is fsynced, given `file_mode()` and renamed over `path`. If the block raises (Ctrl-C included) the
    temporary is removed, `path` is left as it was, and the exception propagates. The folder of `path`
    must exist. Raises FileNotFoundError if the block wrote nothing.
    """
    path = Path(path)
    prefix, suffix = _temporary_name(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # The folder is not fsynced after the rename: that would only make the rename itself survive a power
    # cut (without it the old complete file may come back, which is fine), and it costs ~4 ms a file,
    # 20 ms per prepared photo.


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp)`` to write the whole file at a temporary path, then move it to `path` (see
    `atomic_path`); returns `path`. Whatever `writer` raises propagates and leaves no file behind."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically with an ordinary file mode; returns `path`."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` as UTF-8 (no BOM, newlines as given) to `path` atomically; returns `path`."""
    return write_bytes(path, text.encode("utf-8"))


def _finish_tree(root: Path) -> None:
    """Ordinary modes and durable contents for everything under a freshly written folder."""
    fmode, dmode = file_mode(), folder_mode()
    for folder, subfolders, files in os.walk(root):
        for name in files:
            p = Path(folder) / name
            if p.is_symlink():
                continue
            _fsync_file(p)
            os.chmod(p, fmode)
        for name in subfolders:
            os.chmod(Path(folder) / name, dmode)
        _fsync_folder(Path(folder))
    os.chmod(root, dmode)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends normally it becomes `path`.

    Everything written inside gets ordinary modes (files `file_mode()`, folders `folder_mode()`) and is
    fsynced before the rename. An existing `path` is replaced: it is moved aside first and removed only
    after the new folder is in place, so `path` is missing for two renames at most; if the second rename
    fails the old folder is put back. If the block raises, the temporary folder is removed and `path` is
    left as it was. The parent folder must exist.
    """
    path = Path(path)
    prefix, suffix = _temporary_name(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    aside: Path | None = None
    try:
        yield tmp
        _finish_tree(tmp)
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".old"))
            os.replace(path, aside)  # replaces the empty placeholder folder mkdtemp made
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:
                os.replace(aside, path)
                aside = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and path.exists():  # the move aside itself failed: drop its placeholder
            shutil.rmtree(aside, ignore_errors=True)
        raise
    _fsync_folder(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def stale_temporaries(folder: str | os.PathLike, name_pattern: str) -> list[Path]:
    """What atomic writes of files or folders whose final name matches the regex `name_pattern` left behind
    when the process was killed: ``.NAME.<random>.tmp`` (the write itself) and ``.NAME.<random>.old`` (a
    replaced folder moved aside). Sorted; nothing is removed (see :func:`remove_tree`)."""
    pattern = re.compile(rf"^\.(?:{name_pattern})\.[A-Za-z0-9_]+\.(?:tmp|old)$")
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if pattern.match(p.name)) if folder.is_dir() else []


def remove_tree(path: Path) -> None:
    """Remove a file or a folder with everything in it; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
