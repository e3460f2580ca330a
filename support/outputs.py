"""What a command may write, and over what (docs/bad-input.md, "What a command writes").

    A folder is never replaced. Nothing is written inside a checkpoint (a folder holding MANIFEST)
    or a run folder (one holding LOCK) except by that run; evaluate.py's results go to the run
    folder's RESULTS subfolder, which is theirs. An existing file is replaced only when it is the
    same command's earlier output: recorded in its folder's REGISTRY by the command that wrote it
    (with what it was made from and its sha256), unchanged since, and made from the same inputs and
    settings; one line then says what was replaced. Any other file is refused, naming what made it.
    A generated folder (event_videos.py) is recorded in the same way (the entry "." of its
    REGISTRY), so the generator recognises its own folder before writing over it.

    guarded(path)                       why only its own run may write at path (None: anyone may)
    check_file(path, flag, made_by, inputs)   before any work: SystemExit naming the flag when the file
                                        may not be written; the earlier output it will replace, or None
    output(path, made_by)               a context manager: the temporary path, renamed over path
                                        (files.atomic_path) and recorded, with the line that says what
                                        it replaced
    claim_folder(root, flag, made_by)   a generated folder: new, empty, or this generator's own
    check_folder(path, flag, inputs)    a folder a command creates or writes in (runs, results, exports)

made_by: a JSON object naming the command ("command") and what the output is made from (resolved
paths, settings); two outputs are the same command's when their made_by are equal.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from support.files import atomic_path, parse_json

MANIFEST = "manifest.json"     # a checkpoint's sha256 of every other file, written last (checkpoint.py)
LOCK = ".d2vlm-run.lock"       # held by the one run writing a run directory; it marks a run folder
RESULTS = "eval"               # evaluate.py's results beside the checkpoints of a run folder (checkpoint.results_dir)
REGISTRY = ".d2vlm-outputs.json"  # per folder: {file name (or "." for the folder): {made_by, sha256, written}}
FOLDER = "."                   # the registry entry of a generated folder itself


def resolved(path, flag: str | None = None) -> Path:
    """Path.resolve, with a loop of symbolic links reported as the user's error (naming `flag`), not a
    traceback."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # Python 3.11: RuntimeError("Symlink loop ..."); 3.13: OSError ELOOP
        raise SystemExit(f"{flag + ' ' if flag else ''}{path}: a loop of symbolic links") from None


def guarded(path) -> str | None:
    """Why nothing but its own run may write at `path` ("inside the checkpoint X: ...", "inside the
    run folder X, ..."), or None. A run folder's RESULTS subfolder is evaluate.py's."""
    p = resolved(path)
    for d in (p, *p.parents):
        if (d / MANIFEST).is_file():
            return f"inside the checkpoint {d}: its manifest would no longer match (--resume would pass it over)"
        if (d / LOCK).is_file():
            rel = p.relative_to(d).parts
            return None if rel and rel[0] == RESULTS else \
                f"inside the run folder {d}, where only its run writes (evaluations go to its {RESULTS}/)"
    return None


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _registry(folder: Path) -> dict:
    """A folder's REGISTRY ({} when there is none, or when it is not one: nothing is then recognised)."""
    f = folder / REGISTRY
    try:
        reg = parse_json(f.read_text(encoding="utf-8"), f)
    except (OSError, ValueError):
        return {}
    return reg if isinstance(reg, dict) else {}


def _describe(made_by: dict, other: dict | None = None) -> str:
    """`command` and what differs from `other` (all of made_by's settings when other is None)."""
    keys = [k for k in made_by if k != "command" and (other is None or made_by.get(k) != other.get(k))]
    return f"{made_by.get('command', '?')} (" + ", ".join(f"{k}={made_by.get(k)!r}" for k in keys) + ")"


def _refuse(flag, path, why):
    """SystemExit for an existing file or folder that stays as it is."""
    advice = f"move it, or write {flag} elsewhere" if flag.startswith("--") else "move it"
    raise SystemExit(f"{flag} {path}: {why}; it is left as it is ({advice})")


def _refuse_inputs(flag, path, inputs) -> Path:
    """SystemExit when `path` is one of `inputs` ({flag: path}); returns it resolved."""
    real = resolved(path, flag)
    for other, q in (inputs or {}).items():
        if q is not None and real == resolved(q, other):
            raise SystemExit(f"{flag} {path} is {other} {q}: it would be overwritten; write {flag} elsewhere")
    return real


def _refuse_guarded(flag, path) -> None:
    why = guarded(path)
    if why:
        raise SystemExit(f"{flag} {path} is {why}; write {flag} elsewhere")


def check_file(path, flag: str, made_by: dict, inputs: dict | None = None) -> dict | None:
    """Whether the file `path` may be written by the command of `made_by` (checked before any work).
    SystemExit naming `flag` when it is a folder, one of `inputs` ({flag: path}), guarded, under a
    file, or an existing file that is not this command's unchanged earlier output from the same
    inputs and settings. Returns the REGISTRY entry of the earlier output it will replace, or None."""
    path = Path(path)
    real = _refuse_inputs(flag, path, inputs)
    if path.is_dir():
        raise SystemExit(f"{flag} {path}: a folder, which is never replaced; {flag} names a file")
    _refuse_guarded(flag, path)
    above = next((d for d in real.parents if d.exists()), None)
    if above is not None and not above.is_dir():
        raise SystemExit(f"{flag} {path}: {above} is a file, not a folder")
    if not path.exists() and not path.is_symlink():
        return None
    entry = _registry(path.parent).get(path.name)
    if not isinstance(entry, dict) or not isinstance(entry.get("made_by"), dict):
        _refuse(flag, path, "exists, and no command of this project wrote it")
    if not path.is_file() or sha256(path) != entry.get("sha256"):
        _refuse(flag, path, f"was changed since {entry['made_by'].get('command', '?')} wrote it")
    if entry["made_by"] != made_by:
        _refuse(flag, path, f"holds the output of {_describe(entry['made_by'], made_by)}, not of "
                            f"{_describe(made_by, entry['made_by'])}")
    return entry


@contextmanager
def _locked(folder: Path):
    """An exclusive flock on the folder itself while its REGISTRY is read and rewritten."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _record(folder: Path, name: str, made_by: dict, sha: str | None) -> None:
    """Enter `name` (a file of `folder`, or FOLDER) in the folder's REGISTRY."""
    with _locked(folder):
        reg = _registry(folder)
        reg[name] = {"made_by": made_by, "sha256": sha, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        with atomic_path(folder / REGISTRY) as tmp:
            tmp.write_text(json.dumps(reg, indent=1), encoding="utf-8")


@contextmanager
def output(path, made_by: dict, flag: str = "output", owned: bool = False):
    """Yield a temporary path beside `path`; when the block ends it is renamed over `path` and
    recorded in the folder's REGISTRY (made_by, sha256). check_file's rule is applied again first
    (`owned`: the folder is the command's own, claim_folder's; any earlier output of it is replaced),
    and one line says what was replaced."""
    path = Path(path)
    if owned:
        earlier = _registry(path.parent).get(path.name) if path.is_file() else None
    else:
        earlier = check_file(path, flag, made_by)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        yield tmp
    _record(path.parent, path.name, made_by, sha256(path))
    if earlier is not None:
        print(f"replaced {path}: the earlier output of the same {made_by.get('command', 'command')}, written "
              f"{earlier.get('written', '?')}", file=sys.stderr)


def check_folder(path, flag: str, inputs: dict | None = None) -> None:
    """A folder a command creates or writes into (train.py's --out, evaluate.py's --results, an
    export) is a folder, none of `inputs`, and not guarded. SystemExit naming the flag otherwise."""
    path = Path(path)
    _refuse_inputs(flag, path, inputs)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{flag} {path}: not a folder")
    _refuse_guarded(flag, path)


def claim_folder(root, flag: str, made_by: dict, names=()) -> None:
    """Make `root` the generated folder of made_by's command: a new or empty folder, or one that
    command generated before (its REGISTRY's FOLDER entry) whose recorded files are unchanged and
    where none of `names` (the files it will write) is another's. SystemExit naming `flag` otherwise."""
    root = Path(root)
    check_folder(root, flag)
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    reg = _registry(root)
    folder = reg.get(FOLDER)
    mine = isinstance(folder, dict) and isinstance(folder.get("made_by"), dict) \
        and folder["made_by"].get("command") == made_by["command"]
    if entries and not mine:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        _refuse(flag, root, f"holds files {made_by['command']} did not generate ({shown}); it writes only a new or "
                            "empty folder, or one it generated")
    for name, entry in reg.items():
        f = root / name
        if name != FOLDER and f.is_file() and isinstance(entry, dict) and sha256(f) != entry.get("sha256"):
            _refuse(flag, root, f"its {name} was changed since {made_by['command']} wrote it")
    for name in names:
        if (root / name).exists() and name not in reg:
            _refuse(flag, root, f"its {name} was not written by {made_by['command']}")
    root.mkdir(parents=True, exist_ok=True)
    _record(root, FOLDER, made_by, None)
