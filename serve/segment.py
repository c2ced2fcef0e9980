"""Cut a text into sentences for translation, and put the translations back in its exact layout.

mBART translates sentences, not documents: long inputs lose content when fed whole. We split with
`sentencex` (Wikimedia's segmenter, ~300 languages, handles `。！？` `؟` `।` and abbreviations),
keep every byte of whitespace between sentences (paragraph breaks, indentation, trailing
newlines) and join the translations into the same skeleton. Two gaps of the library are patched
here, both measured on the NTREX text in shared data: it misses a boundary after a full-width stop
followed by a digit or Latin letter (`。1939年…`), and it can leave an opening quote at the end of
the previous sentence (`he said. "`). Sentences still longer than the token limit are cut at
clause punctuation, then at spaces, then anywhere, so that every piece fits the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import sentencex

Tokenize = Callable[[list[str]], list[list[int]]]

_LINE = re.compile(r"[^\n]+")
# A full-width sentence end (with its closing quotes/brackets) right before a digit or Latin letter.
_CJK_STOP = re.compile(r"[。！？]+[”’」』）》〕]*(?=[0-9A-Za-z０-９Ａ-Ｚａ-ｚ])")
# Opening quotes/brackets the splitter left dangling at the end of a sentence.
_DANGLING_OPEN = re.compile(r"\s+([\"'“‘«„「『（(\[]+)$")
_CLAUSE_BREAK = re.compile(r"[,;:،؛]\s+|[，、；：]\s*")
_SPACE_BREAK = re.compile(r"\s+")


@dataclass
class Layout:
    """A text as sentences plus the exact text around them: gaps[0] s[0] gaps[1] ... s[n-1] gaps[n]."""

    sentences: list[str]
    gaps: list[str]
    token_ids: list[list[int]] = field(default_factory=list)

    def join(self, translations: list[str]) -> str:
        """The translated text in the source's layout (whitespace around each sentence is the source's)."""
        if len(translations) != len(self.sentences):
            raise ValueError(f"{len(translations)} translations for {len(self.sentences)} sentences")
        out = [self.gaps[0]]
        for text, gap in zip(translations, self.gaps[1:], strict=True):
            out += [text.strip(), gap]
        return "".join(out)


def split_sentences(text: str, lang: str | None = None) -> list[str]:
    """Sentences of one line of text, stripped, in order; each occurs verbatim in `text`."""
    text = text.strip()
    if not text:
        return []
    spans = _locate([s.strip() for s in sentencex.segment(lang or "en", text)], text)
    if spans is None:  # the library rewrote something: keep the line whole
        return [text]
    spans = _fix_dangling_quotes(spans, text)
    return [piece for a, b in spans for piece in _split_cjk(text[a:b])]


def split(
    text: str, lang: str | None = None, tokenize: Tokenize | None = None, max_tokens: int = 0
) -> Layout:
    """Cut `text` into sentences (line breaks are always boundaries) and remember the layout.

    With `tokenize` the sentences are tokenized (one batched call) and any longer than
    `max_tokens` are cut into pieces that fit; `Layout.token_ids` then holds each piece's ids.
    """
    sentences: list[str] = []
    gaps: list[str] = []
    pos = 0
    for line in _LINE.finditer(text):
        for sentence in split_sentences(line.group(), lang):
            start = text.index(sentence, max(pos, line.start()))
            gaps.append(text[pos:start])
            sentences.append(sentence)
            pos = start + len(sentence)
    gaps.append(text[pos:])
    layout = Layout(sentences, gaps)
    if tokenize is not None:
        _fit(layout, tokenize, max_tokens)
    return layout


def _locate(pieces: list[str], text: str) -> list[tuple[int, int]] | None:
    """(start, end) of each non-empty piece in `text`, searched in order; None if one is missing."""
    spans, pos = [], 0
    for piece in pieces:
        if not piece:
            continue
        start = text.find(piece, pos)
        if start < 0:
            return None
        pos = start + len(piece)
        spans.append((start, pos))
    return spans


def _fix_dangling_quotes(spans: list[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Give an opening quote left at the end of a sentence to the sentence it opens."""
    out = list(spans)
    for i in range(len(out) - 1):
        (a, b), (_, d) = out[i], out[i + 1]
        m = _DANGLING_OPEN.search(text, a, b)
        if m and m.start() > a:
            out[i], out[i + 1] = (a, m.start()), (m.start(1), d)
    return out


def _split_cjk(sentence: str) -> list[str]:
    cuts = [m.end() for m in _CJK_STOP.finditer(sentence)]
    bounds = [0, *cuts, len(sentence)]
    pieces = [sentence[a:b].strip() for a, b in zip(bounds, bounds[1:], strict=False)]
    return [p for p in pieces if p]


def _fit(layout: Layout, tokenize: Tokenize, max_tokens: int) -> None:
    """Tokenize every sentence; cut those over `max_tokens` in place, keeping the gaps exact."""
    ids = tokenize(layout.sentences) if layout.sentences else []
    if max_tokens <= 0 or all(len(x) <= max_tokens for x in ids):
        layout.token_ids = ids
        return
    sentences, gaps, token_ids = [], [layout.gaps[0]], []
    for sentence, sentence_ids, gap in zip(layout.sentences, ids, layout.gaps[1:], strict=True):
        fits = len(sentence_ids) <= max_tokens
        pieces = [(("", sentence), sentence_ids)] if fits else _cut(sentence, tokenize, max_tokens)
        for k, (piece, piece_ids) in enumerate(pieces):
            if k:
                gaps.append(piece[0])
            sentences.append(piece[1])
            token_ids.append(piece_ids)
        gaps.append(gap)
    layout.sentences, layout.gaps, layout.token_ids = sentences, gaps, token_ids


def _cut(sentence: str, tokenize: Tokenize, max_tokens: int) -> list[tuple[tuple[str, str], list[int]]]:
    """Halve `sentence` near its middle (clause mark > space > any character) until each half fits.

    Returns ((gap before the piece, piece), ids) pairs; the first gap is unused.
    """
    done: list[tuple[tuple[str, str], list[int]]] = []
    todo: list[tuple[str, str]] = [("", sentence)]
    while todo:
        gap, text = todo.pop(0)
        ids = tokenize([text])[0]
        if len(ids) <= max_tokens or len(text) < 2:
            done.append(((gap, text), ids))
            continue
        left, mid_gap, right = _halve(text)
        todo[:0] = [(gap, left), (mid_gap, right)]
    return done


def _halve(text: str) -> tuple[str, str, str]:
    """(left, whitespace between, right) with the cut at the break nearest the middle."""
    middle = len(text) / 2
    for pattern in (_CLAUSE_BREAK, _SPACE_BREAK):
        spans = [m.span() for m in pattern.finditer(text) if m.start() > 0 and m.end() < len(text)]
        if spans:
            start, end = min(spans, key=lambda s: abs((s[0] + s[1]) / 2 - middle))
            if pattern is _CLAUSE_BREAK:
                start = start + 1  # the clause mark stays with the left piece
            ws = text[start:end]
            return text[:start], ws, text[end:]
    cut = int(middle)
    return text[:cut], "", text[cut:]
