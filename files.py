"""Files in and out. Writing: everything this project writes (videos, annotation files, preference
pairs, predictions, checkpoints) goes to a temporary name beside the target and is renamed over it
only when complete, so a reader never sees half of one. Reading: every JSON file a user hands us
fails with one line naming it, whatever is wrong with it.

    atomic_path(final)        a context manager yielding the temporary path (file or directory)
    read_text(path, what)     UTF-8 text (a leading byte-order mark is dropped); one error naming the file
    parse_json(text, path)    json.loads; one error naming the file (and line) for bad JSON, nesting too
                              deep for the parser, an integer with more digits than Python converts
    read_json(path, what)     the two together
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(final):
    """Yield `.<stem>.tmp<suffix>` beside `final` (the suffix kept, so writers that choose a format
    by extension still can). When the block ends normally it is renamed to `final`, replacing a file
    or directory of that name; when it raises, the temporary is removed and `final` is untouched.
    A temporary left by a killed writer is cleared first."""
    final = Path(final)
    tmp = final.with_name(f".{final.stem}.tmp{final.suffix}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():  # os.replace cannot replace a non-empty directory
        shutil.rmtree(final)
    os.replace(tmp, final)


def read_text(path, what: str = "file") -> str:
    """The UTF-8 text of `path` (a byte-order mark at the start dropped). FileNotFoundError or
    ValueError naming the file: missing, a folder, not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def parse_json(text: str, path, line: int | None = None):
    """json.loads(text), or one ValueError "path: line N: ..." (`line`: the line of a .jsonl file the
    text is) for bad JSON, nesting too deep for the parser, an integer with too many digits."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line or e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: line {line or 1}: not valid JSON for this reader (nested more than about "
                         f"{sys.getrecursionlimit()} levels deep)") from None
    except ValueError as e:  # an integer longer than sys.get_int_max_str_digits()
        raise ValueError(f"{path}: line {line or 1}: a number too long to read ({str(e).split(';')[0]})") from None


def read_json(path, what: str = "file"):
    """parse_json(read_text(path)): the JSON value in `path`, or one error naming the file."""
    return parse_json(read_text(path, what), path)
