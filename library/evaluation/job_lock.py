"""One worker per sweep job: a lock file in the job's folder, claimed atomically, kept alive by a heartbeat.

A sweep's workers may run on several machines that share the output folder over a network file system,
where ``flock`` is not always honoured (the trainer's own ``.training.lock`` is an ``flock``). So the
claim is ``.sweep-job.lock`` created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3
or later), holding a JSON record ``{"host", "pid", "owner", "token", "started"}``; its modification time
is the heartbeat, refreshed (``os.utime``) every ``timeout_s / 6`` seconds while the job runs.

A lock that exists is taken over, with one line saying why, when

* its holder is dead: recorded on this host and its pid no longer runs (found at once);
* it was claimed for the same `owner`: a job scheduler that retries a job only after its worker died
  (Ray does) gives every attempt the same owner key, so a retry need not wait for the timeout;
* its heartbeat is older than `timeout_s` (a worker on another machine that died or lost the folder).

Otherwise the claim raises ``JobBusy`` and the caller moves on to another job. Takeovers are serialised
by a second ``O_EXCL`` file (``.sweep-job.lock.break``), and the breaker re-reads the lock's token
before removing it, so two workers that both find a lock stale do not both get it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from library.files.atomic import ensure_folder, file_mode
from library.files.messages import one_line
from library.files.pids import pid_alive

LOCK_NAME = ".sweep-job.lock"
DEFAULT_TIMEOUT_S = 300.0

__all__ = ["DEFAULT_TIMEOUT_S", "LOCK_NAME", "JobBusy", "JobLock", "claim_job", "hold_job", "read_lock"]


class JobBusy(RuntimeError):
    """Another live worker holds the job; str() is one line naming it and its last heartbeat."""


@dataclass
class JobLock:
    """A claimed job: `path` is the lock file, `token` this claim's id (written in the record)."""

    path: Path
    token: str

    def owned(self) -> bool:
        """True while the lock file still holds this claim (not removed or taken over)."""
        return read_lock(self.path.parent).get("token") == self.token

    def heartbeat(self) -> None:
        """Refresh the lock's modification time (the heartbeat); a lock no longer ours is left alone."""
        if self.owned():
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if it still holds this claim."""
        if self.owned():
            with contextlib.suppress(OSError):
                self.path.unlink()


def _read_record(path: Path) -> dict:
    """The JSON record of a lock file; {} when absent, empty (being written) or not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        value = json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return value if isinstance(value, dict) else {}


def read_lock(folder: str | os.PathLike) -> dict:
    """The record of `folder`'s job lock ({} when there is none): host, pid, owner, token, started (unix s)."""
    return _read_record(Path(folder) / LOCK_NAME)


def _pid_alive(pid: object) -> bool:
    """A record's pid that is not a positive int cannot be checked: only the heartbeat can tell."""
    return pid_alive(pid) if isinstance(pid, int) and pid > 0 else True


def _describe(rec: dict, age: float) -> str:
    return (f"process {rec.get('pid', '?')} on {one_line(rec.get('host', '?'), 60)}, "
            f"last heartbeat {age:.0f} s ago")


def _why_free(rec: dict, age: float, owner: str | None, timeout_s: float) -> str | None:
    """Why a held lock may be taken over, or None while its holder counts as alive."""
    if rec.get("host") == socket.gethostname() and not _pid_alive(rec.get("pid")):
        return "which is no longer running"
    if owner is not None and rec.get("owner") == owner:
        return "an earlier attempt of this job, whose worker died"
    if age > timeout_s:
        return f"whose heartbeat stopped more than {timeout_s:g} s ago"
    return None


def _create(path: Path, owner: str | None) -> JobLock | None:
    """Create the lock file exclusively and write this process's record; None when it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
    except FileExistsError:
        return None
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(), "owner": owner, "token": token,
              "started": time.time()}
    try:
        os.write(fd, json.dumps(record).encode("utf-8"))
    finally:
        os.close(fd)
    return JobLock(path, token)


def _break(path: Path, token: object, timeout_s: float, now: float) -> bool:
    """Remove the lock at `path` if it still holds `token`, under the breaker's file; False when another
    worker is breaking it at the same moment."""
    breaker = path.with_name(path.name + ".break")
    with contextlib.suppress(OSError):
        if now - breaker.stat().st_mtime > timeout_s:  # a breaker that died within its few microseconds
            breaker.unlink()
    try:
        os.close(os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode()))
    except FileExistsError:
        return False
    try:
        if _read_record(path).get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return True
    finally:
        with contextlib.suppress(OSError):
            breaker.unlink()


def claim_job(folder: str | os.PathLike, owner: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
              now: float | None = None, say: Callable[[str], None] = print) -> JobLock:
    """Claim the job whose folder is `folder` (created if missing) for this process.

    `owner` is the scheduler's key for this job (the same for every attempt), `timeout_s` how old a
    heartbeat may be before its lock counts as abandoned, `now` the time (unix s) to judge it at (a test
    makes a lock stale without waiting). A lock taken over gives `say` one line naming its holder.
    Raises JobBusy (one line) when a live worker holds the job, OSError when the folder is not writable.
    """
    folder = Path(folder)
    ensure_folder(folder)
    path = folder / LOCK_NAME
    for _ in range(3):  # a lock released or broken between our attempts: try again
        lock = _create(path, owner)
        if lock is not None:
            return lock
        rec = _read_record(path)
        try:
            age = (time.time() if now is None else now) - path.stat().st_mtime
        except FileNotFoundError:
            continue
        why = _why_free(rec, age, owner, timeout_s) if rec else (
            f"whose heartbeat stopped more than {timeout_s:g} s ago" if age > timeout_s else None)
        if why is None:
            raise JobBusy(f"{folder}: held by {_describe(rec, age)}")
        if not _break(path, rec.get("token"), timeout_s, time.time() if now is None else now):
            raise JobBusy(f"{folder}: another worker is taking over its lock")
        lock = _create(path, owner)
        if lock is not None:
            say(f"note: {folder}: took over the job lock of {_describe(rec, age)}, {why}")
            return lock
    raise JobBusy(f"{folder}: its lock changed hands while claiming it")


@contextlib.contextmanager
def hold_job(folder: str | os.PathLike, owner: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
             say: Callable[[str], None] = print) -> Iterator[JobLock]:
    """Claim the job (see `claim_job`) for the block, refreshing the heartbeat every `timeout_s / 6`
    seconds from a daemon thread; on leaving, the lock is removed. Raises JobBusy as `claim_job` does."""
    lock = claim_job(folder, owner, timeout_s, say=say)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(timeout_s / 6):
            lock.heartbeat()

    thread = threading.Thread(target=beat, name="sweep-job-heartbeat", daemon=True)
    thread.start()
    try:
        yield lock
    finally:
        stop.set()
        thread.join()
        lock.release()
