"""StyleAligned and Visual Style Prompting on DiTs (Flux, SD3/3.5) on a ModelPatcher clone
(DESIGN §6; math in attention/joint_shared.py).

Three pieces, all on the clone, none taking a slot from anyone:
  - an APPLY_MODEL wrapper records the joint sequence's text and image token counts of the call
    in progress into its transformer_options (core exposes neither to the attention override;
    SD3 does not run the DIFFUSION_MODEL wrapper, APPLY_MODEL runs for both). Text tokens: the
    context's length (c_crossattn); image tokens: the latent's patches (patch 2, padded up);
  - a block replace on each chosen block (`patches_replace["dit"]`, key from the site map) that
    marks the block as sharing for the duration of the call, wrapping the replace that was there
    (another pack's, or ours) or core's original block. SD3 sets no block_index, so the block
    replace is what selects blocks on both families;
  - an attention override chained to the one already in transformer_options (sage / flash patch
    nodes use the same slot): outside a marked block, or for an attention whose sequence is not
    the joint one (SD3.5-Medium's image-only x_block.attn2), it is the previous override or core's
    kernel; inside, it runs the shared (or swapped) joint attention with that previous path as
    its kernel, so the user's backend computes every product.
A mask the caller passes to the attention (Flux's attention_mask from the conditioning, e.g. core's
StyleModelApply attn_bias) is kept, not replaced: each row's own joint keys keep it, the added
reference image keys are allowed (StyleAligned), the swapped keys keep their slots' entries (VSP).
Reference rows come from cond_or_uncond (host/reference_rows): the first row of each chunk,
whether cond and uncond run together, apart or reversed, and with Flux's guidance-distilled
single pass (one cond chunk). A reference row gets the plain joint attention, exactly.

Flux rotary positions of the reference's image keys (attention/joint_shared.py docstring has the
measurement): "aligned" keeps them (a target query meets the reference key of its own position:
spatial correspondence, the reference's layout can leak), "offset" moves them by one grid width
along the column axis (close to no positional bias: the reference is read for its look). SD3 has
no rotary positions (additive position embedding at the input): the choice does nothing there.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import comfy.patcher_extension

from ..attention.joint_shared import image_span, joint_shared_attention, joint_swapped_attention
from ..attention.rotary import axis_rotation
from ..host.block_map import BlockId, block_map, diffusion_model_of
from ..host.blocks import BlockNameError, parse_block_list, sites_named, split_entries
from ..host.reference_rows import has_targets, reference_rows
from ..host.schedule import SigmaWindow, current_sigma, percent_window

STYLE_ALIGNED, VISUAL_STYLE = "style_aligned", "visual_style"
ALIGNED, OFFSET = "aligned", "offset"
TOKENS_KEY = "stylekit_joint_tokens"      # transformer_options: (text tokens, image tokens, grid width)
WRAPPER_KEY = "stylekit_joint_tokens"
PATCH = 2                                 # Flux and SD3 latent patch size

# Default blocks (DESIGN §6). Flux StyleAligned: the single blocks, as the public Flux StyleAligned
# shares them (SplitFlux, unverified summary: single blocks carry style). Flux Visual Style
# Prompting: Stable Flow's "vital layers", where it replaces other rows' image K/V with row 0's
# (the same operation). SD3/3.5: no published study; ours: StyleAligned shares every joint block
# (as the UNet version shares every self-attention), VSP swaps in the second half only (as the
# UNet version swaps in the late decoder blocks, keeping the early layout of the target's own).
FLUX_STYLE_ALIGNED_BLOCKS = "single"
FLUX_VISUAL_STYLE_BLOCKS = "double 0-1, double 17-18, single 6, single 9, single 34-35, single 37"


def default_blocks(model_patcher, method: str) -> str:
    """The default block list of `method` on this model, as block-grammar text (module constants)."""
    bm = block_map(model_patcher)
    if bm.sites[0].block[0] in ("double", "single"):
        wanted = FLUX_STYLE_ALIGNED_BLOCKS if method == STYLE_ALIGNED else FLUX_VISUAL_STYLE_BLOCKS
    else:
        depth = len(bm)
        wanted = "joint" if method == STYLE_ALIGNED else f"joint {depth // 2}-{depth - 1}"
    present = []
    for entry in split_entries(wanted):  # a small model (tests) lacks some of the full model's blocks
        try:
            sites_named(bm, entry)
            present.append(entry)
        except BlockNameError:
            pass
    return ", ".join(present) if present else "all"


@dataclass(frozen=True)
class JointSharingSettings:
    method: str                              # STYLE_ALIGNED or VISUAL_STYLE
    blocks: tuple[BlockId, ...]              # resolved on the model's site map
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    shared_score_scale: float = 1.0
    shared_score_shift: float = 0.0
    reference_positions: str = ALIGNED       # Flux only: ALIGNED or OFFSET (module docstring)
    start_percent: float = 0.0
    end_percent: float = 1.0


def resolve_blocks(model_patcher, text: str, method: str) -> tuple[BlockId, ...]:
    """Block-grammar text (empty: the method's default) -> block ids of this DiT."""
    if not text.strip():
        text = default_blocks(model_patcher, method)
    return tuple(site.block for site in parse_block_list(block_map(model_patcher), text))


_marks = itertools.count()


def _tokens_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    if c_crossattn is not None and x.ndim == 4:
        rows, cols = -(-x.shape[-2] // PATCH), -(-x.shape[-1] // PATCH)
        transformer_options = {**transformer_options, TOKENS_KEY: (c_crossattn.shape[1], rows * cols, cols)}
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


class JointShareBlock:
    """Block replace: marks the block as sharing while it runs, then runs what was there."""

    def __init__(self, previous, mark: str):
        self.previous = previous
        self.mark = mark

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        options[self.mark] = True
        try:
            if self.previous is not None:
                return self.previous(args, extra)
            return extra["original_block"](args)
        finally:
            options.pop(self.mark, None)

    # ModelPatcher moves and loads the patches it finds in model_options; the wrapped replace sits
    # inside this one, where it cannot see it, so both calls are forwarded (as ReplacePatch does).
    def to(self, device) -> "JointShareBlock":
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device)
        return self

    def models(self) -> list:
        return self.previous.models() if hasattr(self.previous, "models") else []


class JointShareOverride:
    """The chained attention override (module docstring)."""

    def __init__(self, previous, mark: str, settings: JointSharingSettings, window: SigmaWindow,
                 axes_dim: tuple[int, ...] | None, theta: float):
        self.previous = previous
        self.mark = mark
        self.settings = settings
        self.window = window
        self.axes_dim = axes_dim
        self.theta = theta

    def _plain(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        tokens = options.get(TOKENS_KEY)
        if not options.get(self.mark) or tokens is None or len(args) < 3:
            return self._plain(func, *args, **kwargs)
        q, k, v, rest = args[0], args[1], args[2], args[3:]
        caller_mask = kwargs.get("mask")
        if len(rest) > 1:  # optimized_attention(q, k, v, heads, mask, ...) called positionally
            caller_mask, rest = rest[1], rest[:1] + rest[2:]
        heads_split = bool(kwargs.get("skip_reshape", False))
        if not heads_split and v.ndim == 4:  # core's MMDiT hands v as [B, L, H, D], q and k merged
            v = v.flatten(2)
        length = q.shape[2] if heads_split else q.shape[1]
        text, image_tokens, grid_w = tokens
        if length < text + image_tokens or not self.window.contains(current_sigma(options)):
            return self._plain(func, *args, **kwargs)  # not the joint sequence (SD3.5-M attn2), or off
        rows = reference_rows(options, q.shape[0])
        if not has_targets(rows):
            return self._plain(func, *args, **kwargs)
        rows = rows.to(q.device)
        image = image_span(text, image_tokens)

        def kernel(q_, k_, v_, mask):
            return self._plain(func, q_, k_, v_, *rest, **{**kwargs, "mask": mask})

        rotation = None
        s = self.settings
        if s.reference_positions == OFFSET and heads_split and self.axes_dim is not None:
            offsets = [0.0] * len(self.axes_dim)
            offsets[-1] = float(grid_w)  # one grid width along the column axis
            rotation = axis_rotation(offsets, self.axes_dim, self.theta).to(q.device)
        if s.method == VISUAL_STYLE:
            return joint_swapped_attention(q, k, v, rows, image, kernel, reference_rotation=rotation, mask=caller_mask)
        return joint_shared_attention(q, k, v, rows, image, kernel, adain_queries=s.adain_queries,
                                      adain_keys=s.adain_keys, adain_values=s.adain_values,
                                      score_scale=s.shared_score_scale, score_shift=s.shared_score_shift,
                                      reference_rotation=rotation, mask=caller_mask)


def _rotary(dit) -> tuple[tuple[int, ...] | None, float]:
    params = getattr(dit, "params", None)
    if params is None or not hasattr(params, "axes_dim"):
        return None, 10000.0
    return tuple(params.axes_dim), float(params.theta)


def install_joint_sharing(model_patcher, settings: JointSharingSettings):
    """A clone of `model_patcher` (a Flux or SD3/3.5 model) with the method installed; the input is
    left untouched."""
    if settings.method not in (STYLE_ALIGNED, VISUAL_STYLE):
        raise ValueError(f"unknown method {settings.method!r}")
    if settings.reference_positions not in (ALIGNED, OFFSET):
        raise ValueError(f"reference_positions must be '{ALIGNED}' or '{OFFSET}', not {settings.reference_positions!r}")
    m = model_patcher.clone()
    bm = block_map(m)
    if not bm.is_dit:
        raise TypeError("joint shared attention needs a Flux or SD3/3.5 model; use the UNet StyleAligned path")
    window = percent_window(m, settings.start_percent, settings.end_percent)
    mark = f"stylekit_joint_share_{next(_marks)}"
    for block in settings.blocks:
        key = bm.site(block).patch_key
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        m.set_model_patch_replace(JointShareBlock(replaces.get(key), mark), "dit", key[0], key[1])
    axes_dim, theta = _rotary(diffusion_model_of(m))
    options = m.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = JointShareOverride(
        options.get("optimized_attention_override"), mark, settings, window, axes_dim, theta)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _tokens_wrapper)
    return m


def installed_joint_sharing(model_patcher) -> list[str]:
    """Which StyleKit joint-sharing methods this model carries (the reference sampler refuses to
    share twice)."""
    found = set()
    override = model_patcher.model_options.get("transformer_options", {}).get("optimized_attention_override")
    while isinstance(override, JointShareOverride):
        found.add("StyleAligned" if override.settings.method == STYLE_ALIGNED else "Visual Style Prompting")
        override = override.previous
    return sorted(found)
