"""Whether a process on this machine still runs: the one check behind every lock that names its holder's
pid (the page's run lock, the sweep's job locks)."""

from __future__ import annotations

import os

from library.files.text import TextFileError, read_text_file


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a finished child not yet waited for: it holds
    nothing and runs nothing, yet still answers ``kill(pid, 0)``). Another user's process counts as alive;
    where /proc cannot be read (not Linux) an existing process counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # field 3 of /proc/PID/stat, after the parenthesised command name, is the state
        return read_text_file(f"/proc/{pid}/stat").split(")")[-1].split()[0] != "Z"
    except (OSError, TextFileError, IndexError):
        return True
