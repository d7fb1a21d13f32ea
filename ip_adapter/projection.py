"""IP-Adapter image projections: CLIP vision features -> image tokens in the UNet's context width.

Module and parameter names are those of the official files' `image_proj.*` keys, so a file's
state dict loads with strict=True and nothing is renamed (DESIGN §3):
  - base (`ImageProjModel`): proj [T·C, D] + norm LayerNorm(C) -> T = 4 tokens from the global
    image embedding;
  - plus (`Resampler`, a Perceiver): latents [1, T, W], proj_in, layers.i.0 (attention: norm1,
    norm2, to_q, to_kv, to_out) and layers.i.1 (LayerNorm, Linear, GELU, Linear), proj_out,
    norm_out -> T = 16 tokens from the penultimate hidden states;
  - full-face (`MLPProjModel`): proj.0 Linear, GELU, proj.2 Linear, proj.3 LayerNorm, applied
    per token -> 257 tokens from the penultimate hidden states.
Every size is read from the tensors, never assumed (build_projection).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

RESAMPLER_DIM_HEAD = 64  # fixed in the reference Resampler; heads = inner width / 64


class LinearProjection(nn.Module):
    """Base IP-Adapter: Linear + LayerNorm. Shapes: [N, D] -> [N, T, C]."""

    def __init__(self, embed_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens, self.context_dim = tokens, context_dim
        self.proj = nn.Linear(embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(rearrange(self.proj(embeds), "n (t c) -> n t c", t=self.tokens))


class MLPProjection(nn.Module):
    """Full-face IP-Adapter: a per-token MLP. Shapes: [N, T, H] -> [N, T, C]."""

    def __init__(self, hidden_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents] (Perceiver resampler, Alayrac et al. 2022 / Flamingo)."""

    def __init__(self, dim: int, heads: int, dim_head: int = RESAMPLER_DIM_HEAD):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        q = rearrange(self.to_q(latents), "n l (h d) -> n h l d", h=self.heads)
        k, v = rearrange(self.to_kv(torch.cat([features, latents], dim=1)), "n s (two h d) -> two n h s d",
                         two=2, h=self.heads)
        # softmax in fp32: the reference does the same for fp16 stability.
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        out = torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
        return self.to_out(rearrange(out, "n h l d -> n l (h d)"))


def feed_forward(dim: int, inner: int) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear: indices 0..3 are the official keys layers.i.1.{0,1,3}."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """Plus IP-Adapter: learned latent queries read the CLIP hidden states. Shapes: [N, S, H] -> [N, T, C]."""

    def __init__(self, hidden_dim: int, dim: int, context_dim: int, tokens: int, depth: int, heads: int, ff_inner: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, tokens, dim))
        self.proj_in = nn.Linear(hidden_dim, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), feed_forward(dim, ff_inner)]) for _ in range(depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        features = self.proj_in(hidden)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def _resampler_depth(state_dict: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[1] for k in state_dict if k.startswith("layers.")})


def build_projection(state_dict: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
    """(kind, module) for an `image_proj` state dict, sizes read from its tensors; kind is
    "base", "plus" or "full-face". Raises KeyError when the keys match none of them."""
    if "latents" in state_dict:
        latents = state_dict["latents"]
        dim = latents.shape[-1]
        module = Resampler(
            hidden_dim=state_dict["proj_in.weight"].shape[1], dim=dim,
            context_dim=state_dict["proj_out.weight"].shape[0], tokens=latents.shape[1],
            depth=_resampler_depth(state_dict),
            heads=state_dict["layers.0.0.to_q.weight"].shape[0] // RESAMPLER_DIM_HEAD,
            ff_inner=state_dict["layers.0.1.1.weight"].shape[0])
        kind = "plus"
    elif "proj.3.weight" in state_dict:
        module = MLPProjection(hidden_dim=state_dict["proj.0.weight"].shape[1],
                               context_dim=state_dict["proj.3.weight"].shape[0])
        kind = "full-face"
    elif "proj.weight" in state_dict and "norm.weight" in state_dict:
        context_dim = state_dict["norm.weight"].shape[0]
        out_dim, embed_dim = state_dict["proj.weight"].shape
        if out_dim % context_dim:
            raise KeyError(f"proj.weight has {out_dim} outputs, not a whole number of {context_dim}-wide tokens")
        module = LinearProjection(embed_dim, context_dim, out_dim // context_dim)
        kind = "base"
    else:
        raise KeyError("no known image projection (expected proj.weight + norm.weight, latents + proj_in "
                       "+ layers.*, or proj.0/proj.2/proj.3)")
    module.load_state_dict(state_dict, strict=True)
    return kind, module.eval().requires_grad_(False)
