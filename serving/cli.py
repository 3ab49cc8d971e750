"""Shared command-line plumbing: bad arguments and bad input end in one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (exit 2) instead of usage plus message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message: str, code: int = 1):
    """Print `prog: error: message` on one line and exit with `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)
