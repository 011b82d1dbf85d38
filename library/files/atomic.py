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
import errno
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator
from library.files.messages import UserError

__all__ = [
    "OutputWriteError", "append_text", "atomic_folder", "atomic_path", "current_umask", "ensure_folder", "file_mode",
    "folder_mode", "write_atomic", "write_bytes", "write_safetensors", "write_text", "write_torch",
]

# what to do about a failed write, by errno; the rest get the system's own words only
_WRITE_ADVICE = {
    errno.ENOSPC: "free some space on that disk, or choose a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free some space, or choose a folder on another disk",
    errno.EFBIG: "the file is larger than this file system allows; choose a folder on another disk",
    errno.EROFS: "that disk is mounted read-only; choose a folder you can write to",
    errno.EACCES: "you may not write there; choose a folder you can write to",
    errno.EPERM: "you may not write there; choose a folder you can write to",
    errno.EIO: "the disk reported an input/output error; check it, or choose a folder on another disk",
}


class OutputWriteError(UserError, OSError):
    """A file or folder could not be written (no space, read-only, quota, permissions); str() is one line
    naming the folder, what was being written and what to do. Nothing half-written is left under the name.
    Keeps the cause's errno, so ``except OSError`` still catches it."""

    def __init__(self, path: str | os.PathLike, cause: OSError, what: str = ""):
        path = Path(path)
        code = cause.errno or 0
        self.reason = getattr(cause, "reason", None) or cause.strerror or str(cause) or type(cause).__name__
        advice = _WRITE_ADVICE.get(code, "check the disk and the folder's permissions")
        self.path, self.what = path, what or path.name
        self.message = f"cannot write {self.what} in {path.parent}: {self.reason}; {advice}"
        super().__init__(code, self.reason)  # strerror stays the system's words, for callers that add their own

    def __str__(self) -> str:
        return self.message


def _write_failure(path: Path, err: BaseException, what: str = "") -> BaseException:
    """`err` as an OutputWriteError about `path` when it is an OSError (already one: unchanged); else `err`."""
    if isinstance(err, OutputWriteError) or not isinstance(err, OSError) or isinstance(err, FileNotFoundError):
        return err
    return OutputWriteError(path, err, what)


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
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    except OSError as err:
        raise _write_failure(path, err) from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        failure = _write_failure(path, err)
        if failure is err:
            raise
        raise failure from err
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


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` ({name: torch tensor}) as a .safetensors file at `path`, atomically; returns `path`.

    The file is serialised in memory first (``safetensors.torch.save``), so that a failed write is the
    operating system's error (one line, :class:`OutputWriteError`) and not the serialiser's."""
    from safetensors.torch import save

    return write_bytes(path, save(tensors, metadata=metadata))


def write_torch(path: str | os.PathLike, obj: object) -> Path:
    """``torch.save(obj)`` to `path`, atomically; returns `path`. Serialised in memory first, for the same
    reason as :func:`write_safetensors` (torch's zip writer reports a full disk as a RuntimeError)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` (UTF-8) to `path`, creating it with an ordinary mode; a failed write is an
    :class:`OutputWriteError`. Not atomic: for logs read line by line, where a cut-short last line is skipped."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise _write_failure(path, err) from err


def ensure_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p`` with an ordinary mode; a folder that cannot be made is an :class:`OutputWriteError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as cause:
        raise OutputWriteError(path, OSError(errno.ENOTDIR, "a file of that name is in the way"), "the folder") from cause
    except OSError as err:
        raise OutputWriteError(path, err, f"the folder {path.name}") from err
    return path


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
    left as it was; an OSError propagates as an :class:`OutputWriteError` naming `path`. The parent
    folder must exist.
    """
    path = Path(path)
    prefix, suffix = _temporary_name(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    except OSError as err:
        raise _write_failure(path, err) from err
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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and path.exists():  # the move aside itself failed: drop its placeholder
            shutil.rmtree(aside, ignore_errors=True)
        if isinstance(err, OutputWriteError) and tmp in err.path.parents:  # a file inside: named in the final folder
            inner = err.path.relative_to(tmp)
            err = OutputWriteError(path / inner, err, f"{path.name}/{inner}")
            raise err from err
        failure = _write_failure(path, err)
        if failure is err:
            raise
        raise failure from err
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
