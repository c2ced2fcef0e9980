"""The one error type the CLI turns into a single line and a non-zero exit."""

from __future__ import annotations


class EvalError(Exception):
    """A user-facing failure (bad input, missing data, unreachable server); `str(err)` is one line."""
