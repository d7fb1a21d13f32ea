"""StyleAligned on Flux against plain sampling (goal: per-image time ratio <= 1.6 at batch 2).

Two widths, both at flux1-dev's token counts: the tiny core Flux (hidden 128) at 1024 px with 512
prompt tokens (4096 image + 512 text tokens a row) is attention-bound, so it bounds the ratio from
above; the quarter-width Flux (bench/harness.py SCALED_FLUX) keeps every FLOP share of flux1-dev at
1024 px. Same batch on both sides, so the per-step ratio is the per-image ratio. Default blocks
(every single block, patching/joint_sharing.py), cfg 5: cond and uncond rows each carry a
reference row, as in a user's graph.
"""
from __future__ import annotations

from stylekit.patching.joint_sharing import STYLE_ALIGNED, JointSharingSettings, install_joint_sharing, resolve_blocks

from .harness import Case


def flux_style_aligned(model, clip, vae):
    return install_joint_sharing(model, JointSharingSettings(STYLE_ALIGNED, resolve_blocks(model, "", STYLE_ALIGNED)))


_TINY = "tiny core Flux (hidden 128, 2+2 blocks), 4096 image + 512 text tokens, attention-bound: an upper bound"
_SCALED = ("quarter-width Flux (hidden 768, 6 heads of 128, 1+2 blocks), 1024 image + 128 text tokens: "
           "flux1-dev's FLOP shares at 1024 px")

CASES = [
    Case("Flux StyleAligned batch 2", "tiny_flux", flux_style_aligned, batch=2, side=1024, steps=1, goal=1.6,
         text_tokens=512, notes=_TINY),
    Case("Flux StyleAligned batch 4", "tiny_flux", flux_style_aligned, batch=4, side=1024, steps=1,
         text_tokens=512, notes=_TINY),
    Case("Flux StyleAligned batch 2", "scaled_flux", flux_style_aligned, batch=2, side=512, steps=1, goal=1.6,
         text_tokens=128, notes=_SCALED),
    Case("Flux StyleAligned batch 4", "scaled_flux", flux_style_aligned, batch=4, side=512, steps=1,
         text_tokens=128, notes=_SCALED),
]
