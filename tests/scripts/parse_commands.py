"""Run by tests/test_readme.py in a checkout: every documented `flowmo fit|validate|test` command parsed with
--print_config in this one interpreter (configs load, options and choices parse, nothing runs), instead of one
interpreter per command (~6 s of imports each). Reads a JSON list of argument lists on stdin; prints the ones that
fail with their exit status and error, and exits 1 if any did."""

from __future__ import annotations

import contextlib
import io
import json
import sys

from flowmo.commands import main


def parses(argv: list[str]) -> tuple[int, str]:
    """(exit status, what it said on stderr) of `flowmo <argv> --print_config`."""
    errors = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
        try:
            status = main([*argv, "--print_config"])
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return status, errors.getvalue()


if __name__ == "__main__":
    failed = [(argv, *parses(argv)) for argv in json.load(sys.stdin)]
    failed = [(argv, status, said) for argv, status, said in failed if status != 0]
    for argv, status, said in failed:
        print(f"`flowmo {' '.join(argv)}` exited {status}:\n{said[-2000:]}")
    sys.exit(1 if failed else 0)
