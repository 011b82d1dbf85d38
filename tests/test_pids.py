"""The one liveness check behind the page's run lock and the sweep's job locks (library/files/pids.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from library.files.pids import pid_alive


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_running_a_zombie_and_a_reaped_process():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid)
        child.stdin.close()  # it ends; not waited for, it stays a zombie
        deadline = time.monotonic() + 120
        while _state(child.pid) != "Z":  # an event (the kernel's state), with a generous bound
            assert time.monotonic() < deadline, "the child never ended"
            time.sleep(0.01)
        assert not pid_alive(child.pid)  # kill(pid, 0) still answers for a zombie
    finally:
        child.wait()
    assert not pid_alive(child.pid)
