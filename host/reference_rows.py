"""Which row of a UNet batch is each row's style reference, for methods that share across a batch.

The reference of a row is the first row of its cond/uncond chunk (the paper's "prompt 0 of each
CFG half"), located through `host.batch.chunks`, so the same rows pair up whether ComfyUI
runs cond and uncond together (in either order) or in separate passes.
"""
from __future__ import annotations

import torch

from .batch import chunks


def reference_rows(extra_options: dict, batch_size: int) -> torch.Tensor:
    """[batch_size] long tensor: entry i is the row whose features row i shares (itself for a reference)."""
    rows = torch.empty(batch_size, dtype=torch.long)
    for chunk in chunks(extra_options, batch_size):
        rows[chunk.rows] = chunk.rows.start
    return rows


def has_targets(rows: torch.Tensor) -> bool:
    """True when some row has a reference other than itself (a batch of 1 per chunk has none)."""
    return bool((rows != torch.arange(rows.numel())).any())
