"""The user's files: every read decodes with an error naming the file (and line), every write of
a user-visible file is atomic (a temporary file renamed into place), and outputs are checked
before long work starts. Problems raise UserError, which the CLI turns into exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

from coordexp.errors import UserError


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def decode_utf8(data: bytes, where: str | Path) -> str:
    """UTF-8 text; an undecodable byte is a UserError naming where and its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start})") from None


def read_text(path: str | Path) -> str:
    return decode_utf8(read_bytes(path), path)


def parse_json(text: str, where: str) -> object:
    """json.loads with every failure (syntax, a number too long, nesting) as one UserError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})"
                        ) from None
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        raise UserError(f"{where}: malformed JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None


def load_json(path: str | Path) -> object:
    return parse_json(read_text(path), str(path))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file beside path, flush it to disk, then rename it into place:
    a kill at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_output_file(path: str | Path, flag: str) -> Path:
    """An output file path that can be written (not a directory, in a writable folder or one
    that can be made); nothing is created yet."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file path")
    _check_creatable(path.parent, flag)
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """An output folder that exists or can be made, and is writable; nothing is created yet."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    _check_creatable(path, flag)
    return path


def _check_creatable(folder: Path, flag: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {existing} is not writable")
