"""InstantX SD3.5-Large IP-Adapter on a ModelPatcher clone: one joint-block replace per weighted block.

Each patch runs whatever was installed at the block before (another adapter's replace, another
pack's, or core's block) with an attention override chained in front of the one already in
transformer_options. That override computes the adapter's term w·m ⊙ Attn(n_q(q), [n_k(k);
n_ipk(K_ip)], [v; V_ip]) (diffusers' SD3IPAdapterJointAttnProcessor2_0) from the q, k, v of the
block's own joint attention (the adapter's norms from the block's RMS QK-norm, dit_adapters.
mmdit_stream.renormed: no second qkv projection), adds it to the x part of the joint attention
output, before the output projection, and hands everything else through unchanged. A block whose
QK-norm cannot be inverted gets its raw x-stream q, k, v recomputed (x_stream_qkv) instead.

A mask per adapter (regional image prompts) weights the term per image token, resized to the
token grid that an APPLY_MODEL wrapper records (patching.dit_masks): tokens outside it get exactly
the plain block (every later operation of the x stream in the block is per token).

The resampler is timestep-aware: its tokens and temb are recomputed once per sampling step at
timestep = sigma·1000 (SD3's) for the cond and uncond (zero) features, shared by every block.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from comfy.ldm.modules.attention import optimized_attention

from ..attention.dit_image_prompt import joint_ip_attention
from ..dit_adapters.instantx_sd35 import InstantXSD35Adapter, JointIPLayer
from ..dit_adapters.mmdit_stream import check_large_joint_block, renormed, rms_qk_gains, x_stream_qkv
from ..host.batch import chunks
from ..host.block_map import MMDIT_JOINT, BlockMap, block_map
from ..host.block_weights import ALL, CUSTOM, BlockWeightsError, parse_spec, resolve_block_weights
from ..host.schedule import SigmaWindow, current_sigma, percent_window
from .dit_masks import DiTTokenMask, record_token_grid
from .ip_adapter import AdapterMismatch

OVERRIDE = "optimized_attention_override"


class ResamplerTokens:
    """The resampler's (tokens, temb) for cond and uncond features at the current step, cached for
    the last timestep seen (every block of one step shares it). Shared by clones."""

    def __init__(self, adapter: InstantXSD35Adapter, cond: torch.Tensor, uncond: torch.Tensor):
        self.adapter, self.cond, self.uncond = adapter, cond, uncond
        self._key, self._value = None, None

    def __deepcopy__(self, memo):
        return self

    def get(self, timestep: float, device, dtype) -> tuple[torch.Tensor, ...]:
        """(tokens_cond, temb_cond, tokens_uncond, temb_uncond): tokens [1, N·Q, out], temb [1, W]."""
        key = (timestep, str(device), dtype)
        if key != self._key:
            out = []
            with torch.no_grad():
                for feats in (self.cond, self.uncond):
                    t = torch.full((feats.shape[0],), timestep)
                    tokens, temb = self.adapter.resampler(feats.float(), t)
                    out += [tokens.reshape(1, -1, tokens.shape[-1]).to(device, dtype), temb[:1].to(device, dtype)]
            self._key, self._value = key, tuple(out)
        return self._value


class _AddTerm:
    """Attention override for one joint block call: the chained override's (or core's) joint attention,
    plus the IP term on the x tokens (after the text tokens)."""

    def __init__(self, previous: Callable | None, term: torch.Tensor, text: int):
        self.previous, self.term, self.text = previous, term, text

    @staticmethod
    def unwrap(override: Callable | None) -> Callable | None:
        while isinstance(override, _AddTerm):
            override = override.previous
        return override

    def term_for(self, q, k, v) -> torch.Tensor:
        return self.term

    def __call__(self, func, *args, **kwargs):
        out = self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)
        term = self.term_for(*args[:3])
        return torch.cat([out[:, :self.text], out[:, self.text:] + term.to(out.dtype)], dim=1)


class _AddTermFromJointQKV(_AddTerm):
    """_AddTerm whose term comes from the q, k, v core hands the joint attention (q, k [B, L, H·D] after
    the block's RMS QK-norm, v [B, L, H, D]; text then image tokens)."""

    def __init__(self, previous: Callable | None, text: int, term: Callable):
        super().__init__(previous, None, text)
        self.compute = term

    def term_for(self, q, k, v) -> torch.Tensor:
        x = slice(self.text, None)
        return self.compute(q[:, x], k[:, x], v[:, x].flatten(2) if v.ndim == 4 else v[:, x])


class JointIPBlockPatch:
    """("double_block", i) replace on an MMDiT: the wrapped block with this adapter's term added."""

    def __init__(self, previous: Callable | None, block: torch.nn.Module, layer: JointIPLayer,
                 tokens: ResamplerTokens, weight: float, window: SigmaWindow, mask: DiTTokenMask | None = None):
        self.previous, self.block, self.layer, self.tokens = previous, block, layer, tokens
        self.weight, self.window, self.mask = weight, window, mask

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        sigma = current_sigma(options)
        if sigma is None or not self.window.contains(sigma):
            return self._run(args, extra)
        x, txt = args["img"], args["txt"]
        check_large_joint_block(self.block)
        tok_c, temb_c, tok_u, temb_u = self.tokens.get(sigma * 1000.0, x.device, x.dtype)
        parts = chunks(options, x.shape[0])
        rows = parts[0].rows.stop - parts[0].rows.start
        kv = {False: self.layer.image_kv(tok_c, temb_c), True: self.layer.image_kv(tok_u, temb_u)}
        ip_k = torch.cat([kv[c.is_uncond][0].expand(rows, -1, -1) for c in parts])
        ip_v = torch.cat([kv[c.is_uncond][1].expand(rows, -1, -1) for c in parts])
        heads = x.shape[-1] // self.layer.norm_q.shape[0]
        # The IP attention itself goes through the user's override (sage, another pack's), not through
        # another StyleKit adapter's term adder stacked on this block.
        kernel_options = {**options, OVERRIDE: _AddTerm.unwrap(options.get(OVERRIDE))}
        if kernel_options[OVERRIDE] is None:
            del kernel_options[OVERRIDE]
        kernel = partial(optimized_attention, heads=heads, transformer_options=kernel_options)
        mask = None if self.mask is None else self.mask.for_batch(options, x.shape[1], len(parts), rows, x.device, x.dtype)
        gains = rms_qk_gains(self.block)
        if gains is not None:   # the adapter's q, k from the block's own normed ones, inside its attention call
            def term(q, k, v):
                q, k = renormed(q, gains[0], self.layer.norm_q), renormed(k, gains[1], self.layer.norm_k)
                return joint_ip_attention(q, k, v, ip_k, ip_v, self.weight, kernel, mask)
            add_term = _AddTermFromJointQKV(options.get(OVERRIDE), txt.shape[1], term)
        else:                   # raw q, k, v recomputed from the block's modules
            q, k, v = x_stream_qkv(self.block, x, args["vec"])
            q, k = self.layer.queries_keys(q, k)
            add_term = _AddTerm(options.get(OVERRIDE), joint_ip_attention(q, k, v, ip_k, ip_v, self.weight, kernel, mask),
                                txt.shape[1])
        return self._run({**args, "transformer_options": {**options, OVERRIDE: add_term}}, extra)

    def _run(self, args: dict, extra: dict) -> dict:
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)

    def __deepcopy__(self, memo):
        return self

    def to(self, device) -> "JointIPBlockPatch":
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device)
        return self

    def models(self) -> list:
        return self.previous.models() if hasattr(self.previous, "models") else []


def joint_block_weights(bm: BlockMap, blocks: str, block_weights: object) -> dict[int, float]:
    joints = [s for s in bm if s.kind == MMDIT_JOINT]
    if blocks == ALL:
        return {s.block[1]: 1.0 for s in joints}
    if blocks != CUSTOM:
        raise BlockWeightsError(f"preset '{blocks}' names UNet blocks; on SD3.5 choose '{ALL}' or '{CUSTOM}'")
    spec = parse_spec(block_weights) if isinstance(block_weights, str) else block_weights
    if spec is None:
        raise BlockWeightsError(f"preset '{CUSTOM}' needs a spec, e.g. \"joint 0-37\"")
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(joints):
            raise BlockWeightsError(f"a list of scales needs one per joint block ({len(joints)}), got {len(spec)}")
        spec = {f"joint {s.block[1]}": v for s, v in zip(joints, spec)}
    per_layer = resolve_block_weights(bm, spec)
    return {s.block[1]: per_layer[s.layers()[0]] for s in joints}


@dataclass(frozen=True)
class SD35IPSettings:
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    blocks: str = ALL
    block_weights: object = ""
    attn_mask: torch.Tensor | None = None   # [M, H, W] in [0, 1]; M = 1 or one per latent
    node: str = "StyleKit IP-Adapter"


def apply_sd35_ip_adapter(model_patcher, adapter: InstantXSD35Adapter, features: torch.Tensor,
                          settings: SD35IPSettings, negative: torch.Tensor | None = None):
    """A clone with the adapter on the MMDiT's joint blocks. features: SigLIP penultimate hidden
    states [N, S, clip_width]; negative: the uncond features (zeros, as diffusers, if None)."""
    bm = block_map(model_patcher)
    joints = [s for s in bm if s.kind == MMDIT_JOINT]
    if not joints:
        raise AdapterMismatch(f"{adapter.name} is an InstantX SD3.5-Large IP-Adapter but the model is not an SD3/SD3.5 "
                              "MMDiT; load an adapter made for this model")
    if sorted(adapter.layers) != [s.block[1] for s in joints] or adapter.layers[0].norm_q.shape[0] != joints[0].dim_head:
        raise AdapterMismatch(f"{adapter.name} has IP weights for {len(adapter.layers)} joint blocks but the model has "
                              f"{len(joints)}; load an adapter made for this model (SD3.5-Large)")
    if features.ndim != 3 or features.shape[-1] != adapter.clip_width:
        raise AdapterMismatch(f"{adapter.name} reads {adapter.clip_width}-d SigLIP hidden states but got features of "
                              f"shape {tuple(features.shape)}; load the SigLIP so400m vision model")
    weights = joint_block_weights(bm, settings.blocks, settings.block_weights)
    window = percent_window(model_patcher, settings.start_percent, settings.end_percent)
    # zero features as a broadcast view: a zeros_like per application held 3.4 MB (729 x 1152 fp32) in every clone
    uncond = features.new_zeros(()).expand(features.shape) if negative is None else negative
    tokens = ResamplerTokens(adapter, features, uncond)
    mask = DiTTokenMask(settings.attn_mask, settings.node) if settings.attn_mask is not None else None
    m = model_patcher.clone()
    replaces = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for index, w in weights.items():
        w = settings.weight * w
        if w == 0:
            continue
        block = m.get_model_object(f"diffusion_model.joint_blocks.{index}")
        m.set_model_patch_replace(JointIPBlockPatch(replaces.get(("double_block", index)), block,
                                                    adapter.layers[index], tokens, w, window, mask),
                                  "dit", "double_block", index)
    if mask is not None:
        record_token_grid(m, at_apply_model=True)
    return m


def apply_sd35_ip_adapter_embeds(model_patcher, adapter: InstantXSD35Adapter, embeds, settings):
    """apply_sd35_ip_adapter from the IP-Adapter nodes' inputs (ImageEmbeds of penultimate hidden
    states, IPAdapterSettings); several references give their tokens side by side (concat)."""
    from ..ip_adapter.encode import CombineError

    if settings.combine != "concat":
        raise CombineError(f"the InstantX SD3.5 adapter takes each reference's tokens side by side: choose concat, "
                           f"not {settings.combine}")
    if embeds.source != adapter.clip_input:
        raise AdapterMismatch(f"{adapter.name} reads SigLIP {adapter.clip_input} but the embeds hold {embeds.source}; "
                              "encode the references for this adapter")
    sd35 = SD35IPSettings(weight=settings.weight, start_percent=settings.start_percent, end_percent=settings.end_percent,
                          blocks=settings.blocks, block_weights=settings.block_weights, attn_mask=settings.attn_mask,
                          node=settings.node)
    return apply_sd35_ip_adapter(model_patcher, adapter, embeds.cond, sd35, negative=embeds.uncond)
