"""One training per output folder: a lock the run holds while it writes there.

The lock is ``.training.lock`` in the output folder, locked with ``flock`` and holding a JSON record of
who holds it ({"pid", "host", "started" (unix s), "command"}). The kernel releases a ``flock`` when its
holder dies, however it dies (``kill -9``, a crash, a lost machine's NFS lease), so a lock file whose
lock is free is stale by definition: it is taken over, with a line naming the process that left it.
A second run on a held folder is refused in one line naming the first, before any model loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from library.files.atomic import OutputWriteError, ensure_folder, file_mode
from library.files.messages import UserError, one_line

LOCK_NAME = ".training.lock"

__all__ = ["LOCK_NAME", "OutputFolderBusy", "hold_output_folder", "lock_holder"]


class OutputFolderBusy(UserError, RuntimeError):
    """Another live process holds the output folder; str() is one line naming it and what to do."""


def _record(fd: int) -> dict:
    """The JSON record in the open lock file `fd` ({} when empty or not JSON: a lock being written)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        value = json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe(rec: dict) -> str:
    """'process 1234 on host, started 2026-12-07 10:02' from a lock record."""
    started = rec.get("started")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"process {rec.get('pid', '?')} on {one_line(rec.get('host', '?'), 60)}, started {when}"


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """The record of the live process that holds `folder`'s lock, or None when it is free (or absent).
    Takes and drops the lock to find out; never blocks."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _record(fd) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_output_folder(folder: str | os.PathLike, say: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold `folder` (created if missing) for the block: no other run may write there meanwhile.

    Raises OutputFolderBusy (one line naming the holder) when a live process holds it, and
    OutputWriteError when the folder cannot be written at all (read-only, full). A lock left by a process
    that died is taken over and `say` gets one line about it. On leaving, the lock file is removed, and
    the folder too when this call created it and nothing else was written there (a run refused while
    loading leaves nothing behind).
    """
    folder = Path(folder)
    created = not folder.exists()
    ensure_folder(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as err:
            raise OutputWriteError(path, err, "the run's lock file") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = _describe(_record(fd))
            os.close(fd)
            raise OutputFolderBusy(
                f"{folder}: another training is writing to this folder ({holder}); wait for it to end or stop it, "
                f"or set output.dir (--output_dir) to another folder"
            ) from err
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        left = _record(fd)
        if left.get("pid") not in (None, os.getpid()):
            say(f"note: {folder}: took over the lock left by {_describe(left)}, which is no longer running")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)[:500]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        except OSError as err:
            raise OutputWriteError(path, err, "the run's lock file") from err
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: nobody can take it in between
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
