"""What an entry point said on stderr, as the tests read it (not a test)."""

from __future__ import annotations


def one_error_line(stderr: str) -> str:
    """The one line of `stderr` that starts with ``error:``; asserts there is exactly one and no traceback
    (progress bars of a loading model share stderr, so other lines are allowed)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]
