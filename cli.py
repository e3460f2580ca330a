"""How the commands end on bad input: one line on stderr and exit code 2, no traceback.

    run(main)    calls main(); an expected error (a bad file, record, setting or directory: the
                 errors this project raises with a message naming what is wrong) prints
                 "error: <message>" and exits 2. `--debug` on the command line, or D2VLM_DEBUG=1,
                 prints the traceback instead. Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

EXIT_BAD_INPUT = 2  # argparse's code for a bad command line; ours for bad input of any kind
DEBUG_FLAG, DEBUG_ENV = "--debug", "D2VLM_DEBUG"
EXPECTED = (ValueError, OSError, json.JSONDecodeError)  # what our checks raise (FileNotFoundError is an OSError)


def run(main):
    """Run `main()` (which reads sys.argv) as a command; see the module docstring."""
    debug = DEBUG_FLAG in sys.argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if DEBUG_FLAG in sys.argv:
        sys.argv.remove(DEBUG_FLAG)
    try:
        return main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        _fail(e, debug)
    except EXPECTED as e:
        _fail(e, debug)


def _fail(e, debug):
    if debug:
        traceback.print_exc()
    else:
        print(f"error: {e.code if isinstance(e, SystemExit) else e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
