"""Visual Style Prompting on a ModelPatcher clone: in the chosen layers, attn1 keys and values are
replaced by the reference row's (attn2 untouched), inside a sigma window (DESIGN §4)."""
from __future__ import annotations

from dataclasses import dataclass

from ..attention.shared import swapped_attention
from ..host.trajectory import step_position
from .attention_replace import ReplacePatch, install_replace
from ..host.block_map import BlockId, block_map
from ..host.layer_select import layers_of
from ..host.reference_rows import has_targets, reference_rows
from ..host.schedule import SigmaWindow, current_sigma, percent_window


@dataclass(frozen=True)
class VisualStyleSettings:
    blocks: tuple[BlockId, ...]      # official: the highest-resolution up block (layer_select)
    start_percent: float = 0.0       # official: every step
    end_percent: float = 1.0
    first_steps_cfg: float = 0.0     # official generated-reference sampling: 20 ...
    first_steps: int = 3             # ... for the first 3 steps; 0 cfg = off (the sampler's cfg)


def first_steps_guidance(cfg: float, steps: int):
    """Post-CFG function: plain CFG at `cfg` instead of the sampler's for the first `steps`
    sampling steps (the official VSP pipeline's "advanced sampling", 20 for 3 of 50 steps)."""
    def post_cfg(args: dict):
        sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        uncond = args.get("uncond_denoised")
        if sigmas is None or uncond is None:
            return args["denoised"]
        step, _ = step_position(sigmas.cpu(), float(args["sigma"].flatten()[0]))
        if step >= steps:
            return args["denoised"]
        return uncond + cfg * (args["cond_denoised"] - uncond)
    return post_cfg


class SwapKVPatch(ReplacePatch):
    """attn1 replace: every row's queries attend to its chunk's reference row's keys and values."""

    def __init__(self, previous, window: SigmaWindow):
        super().__init__(previous)
        self.window = window

    def __call__(self, q, k, v, extra_options):
        if not self.window.contains(current_sigma(extra_options)):
            return self.attention(q, k, v, extra_options)
        rows = reference_rows(extra_options, q.shape[0])
        if not has_targets(rows):
            return self.attention(q, k, v, extra_options)
        return swapped_attention(q, k, v, rows.to(q.device),
                                 lambda q_, k_, v_, mask: self.attention(q_, k_, v_, extra_options, mask=mask))


def install_visual_style_prompting(model_patcher, settings: VisualStyleSettings):
    """A clone of `model_patcher` with the K/V swap installed; the input is left untouched."""
    m = model_patcher.clone()
    window = percent_window(m, settings.start_percent, settings.end_percent)
    for layer in layers_of(block_map(m), settings.blocks):
        install_replace(m, "attn1", layer, lambda previous: SwapKVPatch(previous, window))
    if settings.first_steps_cfg > 0.0 and settings.first_steps > 0:
        m.set_model_sampler_post_cfg_function(first_steps_guidance(settings.first_steps_cfg, settings.first_steps))
    return m
