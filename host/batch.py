"""Which rows of a UNet batch are cond and which are uncond, from `cond_or_uncond` (DESIGN §0).

ComfyUI concatenates one chunk per conditioning it evaluates together; every chunk holds the
whole latent batch. `cond_or_uncond[i]` is 0 (cond) or 1 (uncond) for chunk i. The order varies
([1, 0] was observed), and with cfg 1, or when memory is short, cond and uncond run in separate
passes of one chunk each: never assume a layout, always go through `chunks()`.
"""
from __future__ import annotations

from dataclasses import dataclass

COND, UNCOND = 0, 1


@dataclass(frozen=True)
class Chunk:
    kind: int        # COND or UNCOND
    rows: slice      # rows of the UNet batch

    @property
    def is_uncond(self) -> bool:
        return self.kind == UNCOND


def chunks(extra_options: dict, batch_size: int) -> list[Chunk]:
    flags = extra_options.get("cond_or_uncond") or [COND]
    if batch_size % len(flags):
        raise ValueError(f"batch of {batch_size} rows does not split into {len(flags)} cond/uncond chunks")
    per_chunk = batch_size // len(flags)
    return [Chunk(flag, slice(i * per_chunk, (i + 1) * per_chunk)) for i, flag in enumerate(flags)]
