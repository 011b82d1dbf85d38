"""One-line messages: the project's errors are one line (`error: <file>: <what> ; <fix>`), whatever a file
name, a TOML key or a tensor name quoted in them holds."""

from __future__ import annotations

import re

__all__ = ["one_line"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")  # what str.splitlines splits on


def one_line(text: object, limit: int = 300) -> str:
    """`text` (or an exception's message) as one printable line of at most `limit` characters.

    Terminal escape sequences are dropped, line breaks (every character ``str.splitlines`` breaks on)
    become " / " and other unprintable characters their Python escape (``\\x00``, ``\\u200b``), so a
    message that quotes a user's file name, key or tensor name stays one line on any terminal.
    """
    if isinstance(text, BaseException):
        text = str(text).strip() or type(text).__name__
    flat = _LINE_BREAKS.sub(" / ", _ANSI.sub("", str(text))).replace("\t", " ").strip()
    flat = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
