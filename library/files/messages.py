"""One-line messages: the project's errors are one line (`error: <file>: <what> ; <fix>`), whatever a file
name, a TOML key or a tensor name quoted in them holds."""

from __future__ import annotations

import re

__all__ = ["DEBUG_VARIABLE", "UserError", "one_line", "report_error"]

DEBUG_VARIABLE = "MAGICAPTURE_DEBUG"  # =1: an entry point prints the whole chain of causes under its line

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")  # what str.splitlines splits on


class UserError(Exception):
    """An error a user can cause and fix: a config, a photo, a model or weights file, a data folder, a
    checkpoint, an output folder. str() is the one line an entry point prints after ``error: ``; the
    cause stays attached (``raise ... from err``) and is printed under it with ``MAGICAPTURE_DEBUG=1``.
    The project's error classes derive from it and from the builtin they always were (ValueError, ...)."""


def report_error(err: BaseException, prefix: str = "error: ", file=None) -> None:
    """Print `err` as the one line users see (``prefix`` + str) to `file` (stderr); with the environment
    variable MAGICAPTURE_DEBUG=1 also the whole traceback with its chain of causes, for bug reports."""
    import os
    import sys
    import traceback

    file = file or sys.stderr
    print(f"{prefix}{err}", file=file)
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        traceback.print_exception(err, file=file)


def one_line(text: object, limit: int = 300, first_line: bool = False) -> str:
    """`text` (or an exception's message) as one printable line of at most `limit` characters.

    Terminal escape sequences are dropped, line breaks (every character ``str.splitlines`` breaks on)
    become " / " (with `first_line`, everything after the first line is dropped instead, for libraries
    whose messages go on with advice that does not apply) and other unprintable characters their Python
    escape (``\\x00``, ``\\u200b``), so a message that quotes a user's file name, key or tensor name stays
    one line on any terminal.
    """
    if isinstance(text, BaseException):
        text = str(text).strip() or type(text).__name__
    if first_line:
        text = (str(text).strip().splitlines() or [""])[0]
    flat = _LINE_BREAKS.sub(" / ", _ANSI.sub("", str(text))).replace("\t", " ").strip()
    flat = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
