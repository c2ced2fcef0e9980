"""Language identification for `source_lang: "auto"` and /detect, limited to what the model translates.

Default: py3langid (langid.py's naive Bayes model, 97 languages, shipped inside the wheel, no
download, ~0.1 ms per sentence on CPU; 100% on 200 NTREX sentences of each of our 11 test
languages). When `settings.langid_model` names an XLM-R classifier checkpoint, that classifier
(serve/runtime/bert.py) answers first and py3langid only covers labels the model cannot translate.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# Enough text to decide; langid cost grows with length and a paragraph is plenty.
MAX_CHARS = 2000


@functools.cache
def _base_identifier():  # noqa: ANN202
    """py3langid's model, decompressed once per process (about a second)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageDetector:
    """`detect(texts)` -> [(ISO 639-1 code, probability)] over `supported` codes only."""

    def __init__(self, supported: list[str], classifier_dir: Path | None = None):
        self._identifier = copy.copy(_base_identifier())  # set_languages rebinds, never mutates, arrays
        known = set(self._identifier.labels)
        self.supported = [c for c in supported if c in known]
        missing = sorted(set(supported) - known)
        if missing:
            log.warning("language ID cannot recognise %s; they are never detected", ", ".join(missing))
        if not self.supported:
            raise ValueError("none of the model's languages is known to the language identifier")
        self._identifier.set_languages(self.supported)
        self._supported = set(supported)
        self._classifier = None
        self._classifier_lock = threading.Lock()  # a torch model shared by request threads
        if classifier_dir is not None:
            from serve.runtime.bert import load_classifier

            self._classifier = load_classifier(classifier_dir)
            log.info("language ID: XLM-R classifier from %s", classifier_dir)

    @property
    def backend_name(self) -> str:
        return "xlmr" if self._classifier is not None else "py3langid"

    def detect(self, texts: list[str]) -> list[tuple[str, float]]:
        """Most likely supported language of each text and its probability (0-1)."""
        clipped = [t[:MAX_CHARS] for t in texts]
        out: list[tuple[str, float] | None] = [None] * len(texts)
        if self._classifier is not None:
            with self._classifier_lock:
                labels = self._classifier.classify(clipped)
            for i, (label, prob) in enumerate(labels):
                code = self._normalise(label)
                if code is not None:
                    out[i] = (code, float(prob))
        return [r if r is not None else self._langid(t) for r, t in zip(out, clipped, strict=True)]

    def _langid(self, text: str) -> tuple[str, float]:
        code, prob = self._identifier.classify(text)
        return code, float(prob)

    def _normalise(self, label: str) -> str | None:
        """`zh`, `zh_CN`, `zh-cn`, `__label__zh` -> `zh` when the model supports it."""
        base = label.lower().removeprefix("__label__").replace("-", "_").split("_")[0]
        return base if base in self._supported else None
