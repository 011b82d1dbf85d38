"""The one reader of text files: configs, captions, JSON sidecars, scheduler configs.

Editors on Windows save captions and configs as Windows-1252, UTF-16 or UTF-8 with a byte-order mark;
Python's default decoding either dies with a traceback that names no file or keeps the mark as a
character (which CLIP then tokenises into junk in front of the prompt). Every text file the project reads
goes through :func:`read_text_file`, so each of those cases has one answer: decoded correctly, or one
:class:`TextFileError` line naming the file and the fix.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from library.files.messages import UserError

FIX = "re-save it as UTF-8"

# UTF-32's marks begin with UTF-16's: test them first, or UTF-32 text would decode as UTF-16 garbage
_REFUSED_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"))
_BOMS = (
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


class TextFileError(UserError, ValueError):
    """A text file that cannot be read as UTF-8 or UTF-16; the message is one line: the file, what is
    wrong, and ``re-save it as UTF-8``."""


def decode_text(data: bytes, name: str | os.PathLike) -> str:
    """Decode the bytes of a text file called `name` (used in the error message only).

    Accepted: UTF-8 with or without a byte-order mark, UTF-16 LE or BE with a byte-order mark. The mark
    is dropped and line ends become ``\\n`` (as Python's text mode does). Anything else, including text
    holding a NUL character (binary data, or UTF-16 saved without a mark), raises TextFileError.
    """
    for bom, label in _REFUSED_BOMS:
        if data.startswith(bom):
            raise TextFileError(f"{name}: {label} text is not supported; {FIX}")
    codec, label, skipped = "utf-8", "UTF-8", 0
    for bom, bom_codec, bom_label in _BOMS:
        if data.startswith(bom):
            data, codec, label, skipped = data[len(bom):], bom_codec, bom_label, len(bom)
            break
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as err:
        if label == "UTF-8":
            what = f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start + skipped} is invalid)"
        else:
            what = f"broken {label} text ({err.reason} at offset {err.start + skipped})"
        raise TextFileError(f"{name}: {what}; {FIX}") from err
    nul = text.find("\x00")
    if nul >= 0:
        raise TextFileError(
            f"{name}: not text (a NUL character at character {nul}: binary data, or UTF-16 without a "
            f"byte-order mark); {FIX}"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: str | os.PathLike) -> str:
    """The text of the file at `path` (see :func:`decode_text` for what is accepted).

    Raises FileNotFoundError when there is no such file (callers decide whether that is an error), and
    TextFileError for any other reason it cannot be read (undecodable, a folder, no permission).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise TextFileError(f"{path}: cannot be read ({err.strerror or err}); check that it is a readable file") from err
    return decode_text(data, path)


def read_json_lines(path: str | os.PathLike) -> list[tuple[str, object]]:
    """(line, parsed value) for each line of a JSON-lines file (the trainer's ``loss_history.jsonl``) that
    parses; a line that does not (a run killed in mid-write cuts one short) is passed over.

    Read leniently, unlike :func:`read_text_file`: the file is the project's own, and a kill can cut a
    line inside a multi-byte character, so undecodable bytes are replaced rather than refused.
    Missing file: [].
    """
    import json

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            continue
    return out
