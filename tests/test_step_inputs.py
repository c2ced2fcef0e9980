"""A decode step's DecoderBatch from its six integers per row: the one-launch kernel against the PyTorch
definition (on the GPU where there is one, else in Triton's interpreter)."""

from __future__ import annotations

import dataclasses

import torch

from serve.runtime.step_inputs import HOST_TOKEN, RowTables, decoder_batch_reference, decoder_batch_triton


def test_kernel_matches_reference(kernel_device):
    g = torch.Generator().manual_seed(0)
    rows, width, cross_width, block = 9, 6, 5, 4
    t = RowTables(
        torch.randint(100, (rows, width), generator=g).to(kernel_device),
        torch.randint(100, (rows, cross_width), generator=g).to(kernel_device),
        torch.randint(1, 20, (rows,), generator=g).to(kernel_device),
        block,
    )
    chosen = torch.tensor([70, 71, 72, 73], device=kernel_device)
    inputs = torch.tensor(
        [
            [3, 0, 3, 8, 5],  # table rows (one fed two positions)
            [11, 12, 13, 14, 15],  # host tokens
            [5, 0, 6, 23, 1],  # positions
            [0, 1, 0, 0, 1],  # EOS blocked
            [HOST_TOKEN, 2, HOST_TOKEN, 0, 3],  # sources: some take the previous launch's choice
            [5, 0, 5, 23, 1],  # fresh_from
        ],
        device=kernel_device,
    )
    for widths in (None, (6, 2)):  # a graph's full tables, and an eager step's trimmed ones
        got = decoder_batch_triton(inputs, chosen, t, widths)
        want = decoder_batch_reference(inputs, chosen, t, widths)
        for field in dataclasses.fields(want):
            a, b = getattr(got, field.name), getattr(want, field.name)
            assert (a is None) == (b is None), field.name
            assert a is None or torch.equal(a, b), (field.name, widths, a, b)
    assert got.tokens.tolist() == [11, 72, 13, 70, 73]
    assert got.slots[0].item() == t.tables[3, 1].item() * block + 1
