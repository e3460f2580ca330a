"""How the commands start and end: flags checked when they are read, one line on bad input.

    run(main)        calls main(); an expected error (a bad file, record, flag, setting or directory:
                     the errors this project raises with a message naming what is wrong) prints
                     "error: <message>" and exits 2. `--debug` on the command line, or D2VLM_DEBUG=1,
                     prints the traceback instead. Anything else (a bug) keeps its traceback. Library
                     warnings and progress bars a user cannot act on (QUIET) are switched off first.
    ArgumentParser   argparse's, but a bad flag is that one line too (not the usage text)
    at_least(low), between(low, high), seed, non_negative, positive
                     argparse `type=`s: the flag is checked, and named, before anything starts
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings

from config import SHOWN
from support.files import is_number, show

EXIT_BAD_INPUT = 2  # argparse's code for a bad command line; ours for bad input of any kind
DEBUG_FLAG, DEBUG_ENV = "--debug", "D2VLM_DEBUG"
EXPECTED = (ValueError, OSError, json.JSONDecodeError)  # what our checks raise (FileNotFoundError is an OSError)
SEED_MAX = 2**32 - 1  # the largest seed every generator we seed takes (numpy's bound)
# (category, message start) of library warnings a user cannot act on: transformers 5 deprecates a
# name that peft 0.21 still calls when it wraps the LLM
QUIET = ((FutureWarning, "`is_gradient_checkpointing` is deprecated"),)


def run(main):
    """Run `main()` (which reads sys.argv) as a command; see the module docstring."""
    debug = DEBUG_FLAG in sys.argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if DEBUG_FLAG in sys.argv:
        sys.argv.remove(DEBUG_FLAG)
    quiet_libraries()
    try:
        return main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        _fail(e, debug)
    except EXPECTED as e:
        _fail(e, debug)


def quiet_libraries() -> None:
    """Switch off what QUIET lists, and transformers' weight-loading progress bars (our commands
    report their own progress)."""
    for category, message in QUIET:
        warnings.filterwarnings("ignore", message=message, category=category)
    from transformers.utils import logging
    logging.disable_progress_bar()


def _fail(e, debug):
    if debug:
        traceback.print_exc()
    else:
        print(f"error: {e.code if isinstance(e, SystemExit) else e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (SystemExit with the message, which run()
    prints as "error: ..."), not the usage text."""

    def error(self, message):
        raise SystemExit(f"{message} (--help lists the flags)")


def _number(text, kind):
    try:
        v = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                         f"{show(text, SHOWN)}") from None
    if isinstance(v, float) and not is_number(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def at_least(low: int):
    """An integer flag of at least `low`."""
    def parse(text):
        v = _number(text, int)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def between(low: int, high: int):
    """An integer flag in [low, high]."""
    def parse(text):
        v = _number(text, int)
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {v}")
        return v
    parse.__name__ = f"integer in {low}..{high}"
    return parse


seed = between(0, SEED_MAX)


def non_negative(text) -> float:
    """A finite number >= 0."""
    v = _number(text, float)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {v:g}")
    return v


def positive(text) -> float:
    """A finite number > 0."""
    v = _number(text, float)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {v:g}")
    return v
