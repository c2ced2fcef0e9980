"""The one error type the converter reports to users.

Everything the user can fix (bad architecture, TP size, paths, weights) is raised as
`ConvertError` with a one-line message; the CLI prints it and exits non-zero, no traceback.
"""

from __future__ import annotations


class ConvertError(Exception):
    """A user-facing conversion failure; `str(err)` is a single line."""
