"""XLabs Flux IP-Adapter (v1 and v2 files, unchanged): the image projection and per-double-block K/V.

File layout (XLabs-AI/flux-ip-adapter, flux-ip-adapter-v2; read by diffusers' FluxIPAdapterMixin):
  ip_adapter_proj_model.proj.{weight,bias}   Linear(clip_width -> tokens·context_dim)
  ip_adapter_proj_model.norm.{weight,bias}   LayerNorm(context_dim)
  double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}
                                             Linear(context_dim -> hidden), one pair per double block
Everything is read from shapes: tokens = proj rows / norm width (v1: 4, v2: 16; diffusers tells
them apart by proj rows 65,536 at context 4096, the same answer on the real files), clip_width
768 (CLIP ViT-L/14 image embeds), context_dim 4096, hidden 3072 (Flux.1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PROJ = "ip_adapter_proj_model."
KV_KEY = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")


class ImageProjection(nn.Module):
    """Linear(clip_width -> tokens·context_dim), reshaped to tokens, then LayerNorm (as the
    XLabs/IP-Adapter base projection). Shapes: [N, clip_width] -> [N, tokens, context_dim]."""

    def __init__(self, clip_width: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(clip_width, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(embeds.shape[0], self.tokens, -1))


@dataclass(frozen=True)
class BlockKV:
    """One double block's image K/V projections (Linear with bias each)."""
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor

    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K', V') of projected image tokens. Shapes: [N, T, context_dim] -> 2 × [N, T, hidden]."""
        w = self.k_weight
        tokens = tokens.to(device=w.device, dtype=w.dtype)
        return F.linear(tokens, w, self.k_bias), F.linear(tokens, self.v_weight, self.v_bias)


@dataclass(frozen=True, eq=False)
class XLabsFluxAdapter:
    """A loaded XLabs Flux IP-Adapter. Immutable and shared by clones (__deepcopy__ is itself)."""
    name: str
    projection: ImageProjection
    kv: dict[int, BlockKV] = field(repr=False)  # double block index -> its K/V projections
    tokens: int
    clip_width: int
    context_dim: int
    hidden: int

    kind = "xlabs_flux"
    clip_input = "image_embeds"
    clip_vision = "ViT-L/14"

    def __deepcopy__(self, memo):
        return self

    @property
    def version(self) -> str:
        return {4: "v1", 16: "v2"}.get(self.tokens, f"{self.tokens}-token")

    def describe(self) -> str:
        return (f"{self.name}: XLabs Flux IP-Adapter {self.version}, {self.tokens} tokens per image, "
                f"{len(self.kv)} double blocks, reads CLIP ViT-L/14 image embeds ({self.clip_width}-d)")


def is_xlabs_flux(sd: dict[str, torch.Tensor]) -> bool:
    return f"{PROJ}proj.weight" in sd and any(KV_KEY.match(k) for k in sd)


def xlabs_flux_from_state_dict(sd: dict[str, torch.Tensor], name: str = "xlabs_flux") -> XLabsFluxAdapter:
    """Read an XLabs Flux IP-Adapter state dict (the file's own keys); ValueError on anything else."""
    try:
        proj_w, norm_w = sd[f"{PROJ}proj.weight"], sd[f"{PROJ}norm.weight"]
    except KeyError as missing:
        raise ValueError(f"{name}: not an XLabs Flux IP-Adapter (no {missing.args[0]})") from None
    context_dim, clip_width = norm_w.shape[0], proj_w.shape[1]
    if proj_w.shape[0] % context_dim:
        raise ValueError(f"{name}: projection rows {proj_w.shape[0]} are no multiple of the token width {context_dim}")
    tokens = proj_w.shape[0] // context_dim
    projection = ImageProjection(clip_width, context_dim, tokens)
    try:
        projection.load_state_dict({k[len(PROJ):]: v for k, v in sd.items() if k.startswith(PROJ)})
    except RuntimeError as error:
        raise ValueError(f"{name}: the image projection weights do not fit its layout: {error}") from None
    projection.eval().requires_grad_(False)

    parts: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        match = KV_KEY.match(key)
        if match:
            parts.setdefault(int(match[1]), {})[f"{match[2]}_{match[3]}"] = value
    kv = {}
    for block, p in sorted(parts.items()):
        if len(p) != 4:
            raise ValueError(f"{name}: double block {block} lacks {sorted({'k_weight', 'k_bias', 'v_weight', 'v_bias'} - set(p))}")
        if p["k_weight"].shape[1] != context_dim or p["v_weight"].shape != p["k_weight"].shape:
            raise ValueError(f"{name}: double block {block} K/V shapes {tuple(p['k_weight'].shape)}, "
                             f"{tuple(p['v_weight'].shape)} do not read {context_dim}-wide tokens")
        kv[block] = BlockKV(**p)
    if not kv:
        raise ValueError(f"{name}: no double_blocks.*.processor.ip_adapter_double_stream_* weights")
    hidden = next(iter(kv.values())).k_weight.shape[0]
    return XLabsFluxAdapter(name, projection, kv, tokens, clip_width, context_dim, hidden)
