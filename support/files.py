"""Files in and out. Writing: everything this project writes (videos, annotation files, preference
pairs, predictions, checkpoints) goes to a temporary name beside the target and is renamed over it
only when complete, so a reader never sees half of one. Reading: every JSON file a user hands us
fails with one line naming it, whatever is wrong with it.

    atomic_path(final)        a context manager yielding the temporary path (file or directory; a
                              folder is replaced only when asked: support/outputs.py has the rule)
    write_json_rows(path, rows)   a JSON list, a row per line, written through atomic_path
    read_text(path, what)     UTF-8 text (a leading byte-order mark is dropped); one error naming the file
    parse_json(text, path)    json.loads; one error naming the file (and line) for bad JSON, nesting too
                              deep for the parser, an integer with more digits than Python converts, a
                              key named twice in one object (and the record of a list that holds it)
    read_json(path, what)     the two together
    read_tokenizer(dir, what) a local tokenizer directory, one error naming it
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
def atomic_path(final, replace_folder: bool = False):
    """Yield `.<stem>.tmp<suffix>` beside `final` (the suffix kept, so writers that choose a format
    by extension still can). When the block ends normally it is renamed to `final`, replacing a file
    of that name; a folder only with `replace_folder` (a training run re-saving one of its own
    checkpoints), else ValueError naming it before anything is written. When the block raises, the
    temporary is removed and `final` is untouched. A temporary left by a killed writer is cleared first."""
    final = Path(final)
    if final.is_dir() and not final.is_symlink() and not replace_folder:
        raise ValueError(f"{final}: a folder, which is never replaced by what this command writes")
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


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (json.loads would keep the last, silently)."""

    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def _duplicate_at(text: str, key: str):
    """(index, line) of the first element of a top-level JSON list that holds an object naming `key`
    twice; None when the text is not a list (json has parsed it already)."""
    dec = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return None
    pos, i = pos + 1, 0
    while True:
        pos = len(text) - len(text[pos:].lstrip())
        try:
            _, end = dec.raw_decode(text, pos)
        except DuplicateKey:
            return i, text.count("\n", 0, pos) + 1
        rest = text[end:].lstrip()
        if not rest.startswith(","):
            return None
        pos, i = len(text) - len(rest) + 1, i + 1


def parse_json(text: str, path, line: int | None = None, item: str = "record"):
    """json.loads(text), or one ValueError "path: line N: ..." (`line`: the line of a .jsonl file the
    text is) for bad JSON, nesting too deep for the parser, an integer with too many digits, an
    object that names a key twice (in a top-level list: "path: <item> i (line N): ...")."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line or e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: line {line or 1}: not valid JSON for this reader (nested more than about "
                         f"{sys.getrecursionlimit()} levels deep)") from None
    except DuplicateKey as e:
        at = None if line else _duplicate_at(text, e.key)
        where = f"{item} {at[0]} (line {at[1]})" if at else f"line {line}" if line else "an object"
        raise ValueError(f"{path}: {where}: key {show(e.key)} appears twice in one object (JSON readers keep "
                         "one of them silently; which is meant?)") from None
    except ValueError as e:  # an integer longer than sys.get_int_max_str_digits()
        raise ValueError(f"{path}: line {line or 1}: a number too long to read ({str(e).split(';')[0]})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")  # one is a tokenizer's


def read_tokenizer(directory, what: str, **kw):
    """AutoTokenizer.from_pretrained(directory, local_files_only=True, **kw), or one error naming the
    directory (`what`: how to call it) when it is missing, holds none of TOKENIZER_FILES, or
    transformers cannot read it (its own messages run over several lines, or reach for the network)."""
    from transformers import AutoTokenizer
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: {what} not found")
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{d}: not a {what} (it holds none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d}: a {what} that transformers cannot read ({show(' '.join(str(e).split()), 200)})") from None


def read_json(path, what: str = "file", item: str = "record"):
    """parse_json(read_text(path)): the JSON value in `path`, or one error naming the file."""
    return parse_json(read_text(path, what), path, item=item)


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
