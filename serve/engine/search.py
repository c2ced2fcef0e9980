"""Per-request decoding state: greedy and beam search with Hugging Face `generate` semantics.

Beam search mirrors transformers' vectorised `_beam_search` (top 2*k candidates, finished
hypotheses kept in k slots with the length penalty, the early-stopping heuristic), so the
same weights give token-identical output. Lengths count from the decoder start token, as HF
does when the target language is a forced BOS token: `length_offset = len(prefix) - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from serve.engine.request import SamplingParams

NEG = -1.0e9


@dataclass
class Hypotheses:
    """Running beams (token lists and scores) and the finished slots of one request."""

    params: SamplingParams
    eos_id: int
    length_offset: int
    running: list[list[int]] = field(default_factory=lambda: [[]])
    running_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(1))
    finished: list[list[int]] = field(default_factory=list)
    finished_scores: torch.Tensor | None = None
    finished_flags: torch.Tensor | None = None
    improvable: bool = True
    done: bool = False

    def __post_init__(self):
        k = self.params.beam_size
        self.finished = [[] for _ in range(k)]
        self.finished_scores = torch.full((k,), NEG)
        self.finished_flags = torch.zeros(k, dtype=torch.bool)

    @property
    def num_generated(self) -> int:
        return len(self.running[0])

    @property
    def eos_blocked(self) -> bool:
        """EOS is not allowed yet (min_new_tokens); the device masks it before choosing."""
        return self.num_generated < self.params.min_new_tokens

    def step(self, values: torch.Tensor, ids: torch.Tensor) -> list[int]:
        """Consume the top-K log-probs and ids [len(running), K] of each running beam.

        Returns, per new running beam, the index of the beam it continues.
        """
        if self.params.beam_size == 1:
            return self.greedy(int(ids[0, 0]))
        return self._beam(values, ids)

    def greedy(self, token: int) -> list[int]:
        """Take the top-1 token (the engine calls this directly, with the id it already read)."""
        self.running[0].append(token)
        if token == self.eos_id or self.num_generated >= self.params.max_new_tokens:
            self.finished[0] = self.running[0]
            self.done = True
        return [0]

    def _beam(self, values: torch.Tensor, ids: torch.Tensor) -> list[int]:
        k, p = self.params.beam_size, self.params
        width = values.shape[-1]
        scores = (values + self.running_scores[:, None]).reshape(-1)
        top_scores, top_idx = torch.topk(scores, k=min(2 * k, scores.numel()))
        parents = (top_idx // width).tolist()
        tokens = ids.reshape(-1)[top_idx].tolist()
        n_new = self.num_generated + 1
        hits = torch.tensor([t == self.eos_id or n_new >= p.max_new_tokens for t in tokens])
        candidates = [self.running[b] + [t] for b, t in zip(parents, tokens, strict=True)]

        # Finished slots: only the first k candidates may finish (HF's top_num_beam_mask).
        just_finished = hits.clone()
        just_finished[k:] = False
        length = n_new + self.length_offset
        fin = top_scores / (length**p.length_penalty)
        if bool(self.finished_flags.all()) and p.early_stopping:
            fin = fin + NEG
        if not self.improvable:
            fin = fin + NEG
        fin = fin + (~just_finished).float() * NEG
        merged_scores = torch.cat([self.finished_scores, fin])
        merged_flags = torch.cat([self.finished_flags, just_finished])
        merged = self.finished + candidates
        keep = torch.topk(merged_scores, k=k)[1].tolist()
        self.finished = [merged[i] for i in keep]
        self.finished_scores, self.finished_flags = merged_scores[keep], merged_flags[keep]

        # Next running beams: the best k candidates that did not finish.
        run_scores = top_scores + hits.float() * NEG
        nxt = torch.topk(run_scores, k=k)[1].tolist()
        self.running = [candidates[i] for i in nxt]
        self.running_scores = run_scores[nxt]

        best_possible = self.running_scores[0] / (length**p.length_penalty)
        worst = torch.where(self.finished_flags, self.finished_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_possible > worst).any())
        all_full = bool(self.finished_flags.all()) and p.early_stopping
        self.done = not self.improvable or all_full or bool(hits.all())
        return [parents[i] for i in nxt]

    def best(self) -> tuple[list[int], str]:
        """The best finished hypothesis without its EOS, and why it ended."""
        tokens = self.finished[0] if self.finished[0] else self.running[0]
        if tokens and tokens[-1] == self.eos_id:
            return tokens[:-1], "eos"
        return tokens, "length"
