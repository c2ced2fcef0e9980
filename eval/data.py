"""The shared text data (test sets and calibration corpora), found through one setting.

`MT_DATA_ROOT` (default: `../shared/data` beside the project root) holds
`test/<set>/<src>-<tgt>.<lang>` and `calib/<lang>.txt`. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The data directory: `$MT_DATA_ROOT`, else `../shared/data` next to the project."""
    env = os.environ.get("MT_DATA_ROOT")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def calib_path(lang: str, root: Path | None = None) -> Path:
    return (root or data_root()) / "calib" / f"{lang}.txt"


def calib_languages(root: Path | None = None) -> list[str]:
    """Languages that have a calibration corpus."""
    return sorted(p.stem for p in ((root or data_root()) / "calib").glob("*.txt"))


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[:limit] if limit is not None else lines


def test_pair_paths(pair: str, test_set: str = "ntrex", root: Path | None = None) -> tuple[Path, Path]:
    """(source file, reference file) of a language pair such as `zh-en`."""
    src, tgt = pair.split("-")
    base = (root or data_root()) / "test" / test_set
    return base / f"{pair}.{src}", base / f"{pair}.{tgt}"
