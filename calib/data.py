"""Calibration and held-out text, balanced across the requested languages.

Every language X gets the same budget: `samples` sentences of `calib/X.txt` translated X->en
and the first `samples` sentences of `calib/en.txt` translated en->X. English is the pivot
(mBART-50 many-to-many serves X<->en traffic), so `--langs` names non-English languages only.
The corpora are line-aligned across languages, which means the en->X half of every language
sees the same English sentences; what differs per language is the decoder side.

Held-out text for the report comes from the test set (`test/ntrex/X-en.X` and `en-X.en`), which
shares no document with the calibration corpora (see the data README).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convert.languages import MBART_LANGUAGES
from eval.data import calib_languages, calib_path, data_root, read_lines, test_pair_paths

PIVOT = "en"


class CalibError(Exception):
    """A user-fixable problem (bad language, short corpus, bad option); `str()` is one line."""


@dataclass(frozen=True)
class Direction:
    """Source sentences to translate src -> tgt (teacher-forced on the model's own translation)."""

    lang: str  # the calibration language this direction belongs to
    src: str
    tgt: str
    texts: tuple[str, ...]
    path: str  # the file the sentences came from

    @property
    def pair(self) -> str:
        return f"{self.src}-{self.tgt}"


def resolve_languages(langs: list[str], root: Path | None = None) -> list[str]:
    """Validated, de-duplicated ISO codes; CalibError listing what is available otherwise."""
    root = root or data_root()
    available = [lang for lang in calib_languages(root) if lang in MBART_LANGUAGES]
    if PIVOT not in available:
        raise CalibError(f"the pivot corpus {calib_path(PIVOT, root)} is missing")
    choices = ", ".join(lang for lang in available if lang != PIVOT)
    out: list[str] = []
    for lang in (code.strip().lower() for code in langs):
        if not lang:
            continue
        if lang == PIVOT:
            raise CalibError(
                f"'{PIVOT}' is the pivot of every pair (X->{PIVOT}, {PIVOT}->X); choose from: {choices}"
            )
        if lang not in available:
            raise CalibError(
                f"no calibration corpus for language {lang!r} under {root / 'calib'}; available: {choices}"
            )
        if lang not in out:
            out.append(lang)
    if not out:
        raise CalibError(f"no languages given; available: {choices}")
    return out


def _first_lines(path: Path, n: int, purpose: str) -> tuple[str, ...]:
    if not path.is_file():
        raise CalibError(f"{purpose} file {path} not found")
    lines = read_lines(path)
    if len(lines) < n:
        raise CalibError(
            f"{path} has {len(lines)} sentences; {purpose} needs {n} (lower --samples or add text)"
        )
    return tuple(lines[:n])


def calibration_directions(
    langs: list[str], samples: int, root: Path | None = None
) -> dict[str, list[Direction]]:
    """Per language: X->en over `calib/X.txt[:samples]` and en->X over `calib/en.txt[:samples]`."""
    if samples < 1:
        raise CalibError(f"--samples must be >= 1, got {samples}")
    root = root or data_root()
    en_path = calib_path(PIVOT, root)
    english = _first_lines(en_path, samples, "calibration")
    out = {}
    for lang in langs:
        path = calib_path(lang, root)
        out[lang] = [
            Direction(lang, lang, PIVOT, _first_lines(path, samples, "calibration"), str(path)),
            Direction(lang, PIVOT, lang, english, str(en_path)),
        ]
    return out


def english_only_directions(
    langs: list[str], samples: int, root: Path | None = None
) -> dict[str, list[Direction]]:
    """The English-only baseline: English text on both sides (en->en, teacher-forced on the source).

    It gets the per-language run's sentence budget (2 x samples x languages), capped by the
    size of `calib/en.txt`.
    """
    root = root or data_root()
    path = calib_path(PIVOT, root)
    lines = read_lines(path)
    n = min(len(lines), 2 * samples * len(langs))
    return {PIVOT: [Direction(PIVOT, PIVOT, PIVOT, tuple(lines[:n]), str(path))]}


def heldout_directions(langs: list[str], n: int, root: Path | None = None) -> dict[str, list[Direction]]:
    """Per language: the first `n` test-set sources of X->en and en->X."""
    if n < 1:
        raise CalibError(f"--eval-samples must be >= 1, got {n}")
    out = {}
    for lang in langs:
        dirs = []
        for src, tgt in ((lang, PIVOT), (PIVOT, lang)):
            path = test_pair_paths(f"{src}-{tgt}", root=root)[0]
            dirs.append(Direction(lang, src, tgt, _first_lines(path, n, "held-out evaluation"), str(path)))
        out[lang] = dirs
    return out


def mbart_code(lang: str) -> str:
    """ISO 639-1 -> mBART language code (`zh` -> `zh_CN`)."""
    return MBART_LANGUAGES[lang][0]
