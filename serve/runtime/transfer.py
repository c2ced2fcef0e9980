"""Host-to-device copies that do not wait for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronizes the
stream, so it would wait for the decode step already running there. The engine builds the next
step while the device runs the current one, so every upload on that path goes through `upload`:
it stages the values in pinned memory and copies them in stream order, without a host wait.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(
    values: Sequence | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """`values` (a list or a CPU tensor) on `device`, queued behind the work already there."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
