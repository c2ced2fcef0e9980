"""Per-language, per-layer measurements taken with forward hooks on the full-precision HF model.

Hooks sit on every HF linear of the encoder and the decoder and see only real tokens: rows
under padding are dropped using the batch's masks (encoder mask for encoder layers and for
cross-attention k/v, which read the encoder output; decoder mask otherwise). Results are keyed
by the TRT-LLM module (`decoder/transformer.layers.0.cross_attention.qkv`), fused members
pooled, because that is the layer that gets one set of scales.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from calib.hf import Batch
from calib.trtllm_quant import LinearGroup

Observer = Callable[[LinearGroup, int, torch.Tensor, torch.Tensor], None]


def _reads_encoder(member: str) -> bool:
    return member.startswith("model.encoder.") or member.endswith(
        ("encoder_attn.k_proj", "encoder_attn.v_proj")
    )


@contextmanager
def observe(
    model: torch.nn.Module, groups: list[LinearGroup], observer: Observer
) -> Iterator[Callable[[Batch], None]]:
    """Call `observer(group, member_index, x [N, in], y [N, out])` for each real-token row set.

    Yields a function `set_batch(batch)` to call before each forward.
    """
    masks: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(group: LinearGroup, idx: int):
        which = "enc" if _reads_encoder(group.members[idx]) else "dec"

        def hook(_module, args, output):
            mask = masks[which]
            x, y = args[0], output
            if x.shape[:2] == mask.shape:
                x, y = x[mask], y[mask]
            else:  # not the padded batch layout (should not happen for mBART); keep every row
                x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            observer(group, idx, x.detach().float(), y.detach().float())

        return hook

    for g in groups:
        for i, name in enumerate(g.members):
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(g, i)))

    def set_batch(batch: Batch) -> None:
        masks["enc"] = batch.attention_mask.bool()
        masks["dec"] = batch.decoder_attention_mask.bool()

    try:
        yield set_batch
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_batches(model: torch.nn.Module, set_batch: Callable[[Batch], None], batches: Iterable[Batch],
                progress: Callable[[int], object] | None = None) -> None:  # fmt: skip
    for b in batches:
        set_batch(b)
        model(**b.kwargs())
        if progress is not None:
            progress(int(b.input_ids.shape[0]))


class ActivationStats:
    """Input statistics of each TRT-LLM linear: per-channel amax and mean |x| over real tokens."""

    def __init__(self) -> None:
        self.amax: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = defaultdict(int)

    def __call__(self, group: LinearGroup, idx: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        key = group.key
        amax, total = x.abs().amax(0), x.abs().sum(0)
        self.amax[key] = torch.maximum(self.amax[key], amax) if key in self.amax else amax
        self.abs_sum[key] = self.abs_sum[key] + total if key in self.abs_sum else total
        self.rows[key] += x.shape[0]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer: amax, mean |x|, outlier ratio (largest channel amax / median channel amax), rows."""
        out = {}
        for key, amax in self.amax.items():
            median = float(amax.median())
            out[key] = {
                "amax": float(amax.max()),
                "mean_abs": float(self.abs_sum[key].sum() / (self.rows[key] * amax.numel())),
                "outlier_ratio": float(amax.max()) / median if median > 0 else float("inf"),
                "rows": self.rows[key],
            }
        return out


class LayerError:
    """Relative output error ||y_q - y|| / ||y|| of each quantized layer on the same inputs.

    `layers[key]` is the quantized TRT-LLM module (a runtime `QuantLinear` over all fused rows);
    member i of a fused group is compared on its own rows `[offset_i, offset_i + out_i)`.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], offsets: dict[str, list[int]]):
        self.layers, self.offsets = layers, offsets
        self.err: dict[str, float] = defaultdict(float)
        self.ref: dict[str, float] = defaultdict(float)

    @torch.no_grad()
    def __call__(self, group: LinearGroup, idx: int, x: torch.Tensor, y: torch.Tensor) -> None:
        layer = self.layers.get(group.key)
        if layer is None or x.shape[0] == 0:
            return
        start = self.offsets[group.key][idx]
        yq = layer(x)[:, start : start + y.shape[1]]
        self.err[group.key] += float((yq - y).pow(2).sum())
        self.ref[group.key] += float(y.pow(2).sum())

    def summary(self) -> dict[str, float]:
        return {k: (self.err[k] / self.ref[k]) ** 0.5 if self.ref[k] > 0 else 0.0 for k in self.err}
