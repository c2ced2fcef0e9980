"""What the pipeline's command lines share: one-line usage errors and one-line failures, no traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like every other error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(err).__name__


def run_cli(name: str, work: Callable[[], None], user_errors: tuple[type[Exception], ...],
            interrupted: str = "nothing written") -> int:  # fmt: skip
    """Run a command's work: 0, or one line on stderr and 1 (130 when interrupted)."""
    try:
        work()
    except user_errors as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except Exception as err:  # unexpected: still one line, the traceback would bury the message
        print(f"{name}: error: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return 1
    return 0
