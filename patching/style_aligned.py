"""StyleAligned on a ModelPatcher clone: shared attn1 (never attn2) in the chosen layers, optional
shared GroupNorm, all inside a sigma window (DESIGN §4; math in attention/shared.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ..attention.shared import shared_attention
from .attention_replace import ReplacePatch, install_replace, installed_replace
from ..host.block_map import BlockId, LayerId, block_map
from ..host.layer_select import layers_of, unshared_by_level
from ..host.reference_rows import has_targets, reference_rows
from ..host.schedule import SigmaWindow, current_sigma, percent_window
from .shared_norm import install_shared_group_norm


@dataclass(frozen=True)
class StyleAlignedSettings:
    blocks: tuple[BlockId, ...]          # resolved on the model's block map (layer_select)
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    shared_score_scale: float = 1.0      # s on the reference logits; 1 = the paper's default
    shared_score_shift: float = 0.0      # β added to the reference logits; ln 2 for real references
    share_group_norm: bool = True
    only_self_level: float = 0.0         # fraction of layers left unshared (official option)
    start_percent: float = 0.0
    end_percent: float = 1.0


class SharedAttentionPatch(ReplacePatch):
    """attn1 replace: each row attends to its own K/V and its chunk's reference row's."""

    def __init__(self, previous, settings: StyleAlignedSettings, window: SigmaWindow):
        super().__init__(previous)
        self.settings = settings
        self.window = window

    def __call__(self, q, k, v, extra_options):
        if not self.window.contains(current_sigma(extra_options)):
            return self.attention(q, k, v, extra_options)
        rows = reference_rows(extra_options, q.shape[0])
        if not has_targets(rows):
            return self.attention(q, k, v, extra_options)
        s = self.settings
        return shared_attention(
            q, k, v, rows.to(q.device),
            lambda q_, k_, v_, mask: self.attention(q_, k_, v_, extra_options, mask=mask),
            adain_queries=s.adain_queries, adain_keys=s.adain_keys, adain_values=s.adain_values,
            score_scale=s.shared_score_scale, score_shift=s.shared_score_shift)


def style_aligned_layers(model_patcher, settings: StyleAlignedSettings) -> list[LayerId]:
    bmap = block_map(model_patcher)
    unshared = unshared_by_level(bmap, settings.only_self_level)
    return [layer for layer in layers_of(bmap, settings.blocks) if layer not in unshared]


def install_style_aligned(model_patcher, settings: StyleAlignedSettings):
    """A clone of `model_patcher` with StyleAligned installed; the input is left untouched."""
    m = model_patcher.clone()
    layers = style_aligned_layers(m, settings)
    if settings.shared_score_shift != 0.0:
        taken = [layer for layer in layers if installed_replace(m, "attn1", layer) is not None]
        if taken:
            raise ValueError(
                f"another patch already replaces self-attention at {taken[0][0]} {taken[0][1]}, and a "
                "shared_score_shift needs an attention bias it cannot pass on; set shared_score_shift "
                "to 0 or remove the other self-attention patch")
    window = percent_window(m, settings.start_percent, settings.end_percent)
    for layer in layers:
        install_replace(m, "attn1", layer, lambda previous: SharedAttentionPatch(previous, settings, window))
    if settings.share_group_norm:
        install_shared_group_norm(m, window)
    return m
