"""Files in and out. Writing: everything this project writes (videos, annotation files, preference
pairs, predictions, checkpoints) goes to a temporary name beside the target and is renamed over it
only when complete, so a reader never sees half of one. Reading: every JSON file a user hands us
fails with one line naming it, whatever is wrong with it.

    atomic_path(final)        a context manager yielding the temporary path (file or directory)
    write_json_rows(path, rows)   a JSON list, a row per line, written through atomic_path
    read_text(path, what)     UTF-8 text (a leading byte-order mark is dropped); one error naming the file
    parse_json(text, path)    json.loads; one error naming the file (and line) for bad JSON, nesting too
                              deep for the parser, an integer with more digits than Python converts
    read_json(path, what)     the two together
    is_text(x), is_number(x), show(x)   what a value read from JSON holds, and how an error quotes it
    safetensors_file(path), read_tensors(path), weight_map(index)
                              safetensors shards and their index, a truncated or foreign one refused by name
    check_exactly(expected, given, source, shown)   a file's tensor names and shapes against a model's
    WEIGHTS, QFORMER_TOKENIZER  the names Hugging Face directories give them (ours and the released use them)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

SHOWN = 60  # characters of a bad value quoted in an error message
WEIGHTS = "model.safetensors"  # the single-file weights of a Hugging Face directory (ours: the non-LoRA tensors)
QFORMER_TOKENIZER = "qformer_tokenizer"  # InstructBLIP's Q-Former tokenizer folder (bert-base-uncased + [DEC])


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


def write_json_rows(path, rows) -> None:
    """A JSON list of `rows`, one per line (annotation files, preference pairs), through atomic_path."""
    with atomic_path(path) as tmp:
        tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")


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


# ---------------------------------------------------------------------------------------------
# What a value read from JSON holds

def is_text(x) -> bool:
    """x is a str that UTF-8 can encode. JSON lets a lone surrogate ("\\ud800") through; tokenizers,
    MiniLM and the Java scoring tools reject it."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_number(x) -> bool:
    """x is a finite int or float (not a bool; not an integer beyond float's range)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def show(x, n: int = SHOWN) -> str:
    """repr(x) on one line, cut to n characters."""
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


# ---------------------------------------------------------------------------------------------
# safetensors files

@contextmanager
def safetensors_file(path):
    """safetensors' safe_open(path) (headers read, tensors on demand), with a truncated or foreign
    file refused in one line naming it (at open or at a tensor read)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged ({e})") from None


def read_tensors(path) -> dict:
    """Every tensor of a safetensors file, {name: tensor}; one error naming a bad file."""
    with safetensors_file(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def weight_map(index) -> dict:
    """{tensor: shard file} of a model.safetensors.index.json; one error naming it when it is not one."""
    doc = read_json(index)
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(f, str) and "/" not in f and f != ".." for f in wmap.values()):
        raise ValueError(f"{index}: not a safetensors index (a 'weight_map' of tensor -> shard file in this folder)")
    return wmap


def check_exactly(expected: dict, given: dict, source, shown) -> None:
    """expected / given: {name: shape}. Raises one error naming `source` and the first tensor (as
    shown(name) names it) that is unknown, of another shape, or missing."""
    for k, shape in given.items():
        if k not in expected:
            raise ValueError(f"{source}: tensor {shown(k)} has no place in this model")
        if tuple(shape) != tuple(expected[k]):
            raise ValueError(f"{source}: tensor {shown(k)} has shape {tuple(shape)}, this model "
                             f"expects {tuple(expected[k])} (check the config's widths and vocabularies)")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(f"{source}: tensor {shown(missing[0])} is missing ({len(missing)} in all)")
