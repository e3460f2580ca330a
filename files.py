"""Writing files so that a reader never sees half of one: everything this project writes (videos,
annotation files, preference pairs, predictions, checkpoints) goes to a temporary name beside the
target and is renamed over it only when complete.

    atomic_path(final)     a context manager yielding the temporary path (file or directory)
"""
from __future__ import annotations

import os
import shutil
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
