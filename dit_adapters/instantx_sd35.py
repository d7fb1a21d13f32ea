"""InstantX SD3.5-Large IP-Adapter: its timestep-aware resampler and per-joint-block IP weights.

File (InstantX/SD3.5-Large-IP-Adapter `ip-adapter.bin`, a dict {"image_proj": ..., "ip_adapter": ...};
a flat .safetensors with those prefixes reads the same). Resampler keys, read from its shapes:
  latents [1, Q, W]; proj_in (embed -> W); time_embedding.linear_{1,2} (320 -> W -> W);
  layers.{i}.0: norm1 (image features), norm2 (latents), to_q, to_kv, to_out (no biases)
  layers.{i}.1: 0 LayerNorm, 1 Linear(W -> 4W), GELU, 3 Linear(4W -> W) (no biases)
  layers.{i}.2: SiLU, 1 Linear(W -> 4W): shift/scale of the attention and feed-forward inputs
  proj_out (W -> out), norm_out
with 64-wide heads (real file: Q 64, W 1280, 20 heads, depth 4, embed 1152 = SigLIP so400m,
out 2432 = SD3.5-Large's width). Its attention scales q and k by dim_head^(-1/4) each and takes
the softmax in fp32. The timestep embedding (sinusoidal, cos first, 320 channels, then the MLP)
is added to proj_in(x) and modulates every layer; it is returned with the tokens because each
joint block's `norm_ip` AdaLayerNorm reads it. Timestep = the transformer's (SD3: sigma·1000).
Per joint block j: {j}.norm_ip.linear (W_t -> 2·out: shift, then scale), {j}.to_k_ip,
{j}.to_v_ip (out -> out, no bias), {j}.norm_q, {j}.norm_k, {j}.norm_ip_k (RMSNorm per head).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.dit_image_prompt import rms_norm
from ..ip_adapter.model import split_state_dict

DIM_HEAD = 64
RMS_EPS = 1e-6
LAYER_KEY = re.compile(r"^(\d+)\.(.+)$")


def timestep_features(timesteps: torch.Tensor, channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, cos half first, frequencies exp(−ln(P)·i/(C/2)).
    Shapes: [N] -> [N, channels] (fp32)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class _TimeEmbedding(nn.Module):
    def __init__(self, channels: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _LatentAttention(nn.Module):
    """Latents attend over [image features; latents] (perceiver attention, fused K/V)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents) * (1 + scale[:, None]) + shift[:, None]
        heads = self.to_q.out_features // DIM_HEAD
        q = self.to_q(latents).unflatten(-1, (heads, DIM_HEAD)).transpose(1, 2)
        k, v = (t.unflatten(-1, (heads, DIM_HEAD)).transpose(1, 2)
                for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        s = DIM_HEAD ** -0.25
        weights = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        return self.to_out((weights @ v).transpose(1, 2).flatten(2))


def _layer(width: int, ffn_ratio: int) -> nn.ModuleList:
    feed_forward = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ffn_ratio * width, bias=False), nn.GELU(),
                                 nn.Linear(ffn_ratio * width, width, bias=False))
    return nn.ModuleList([_LatentAttention(width), feed_forward, nn.Sequential(nn.SiLU(), nn.Linear(width, 4 * width))])


class TimeResampler(nn.Module):
    """The InstantX resampler, parameter names as in the file (state dict loads unchanged).
    forward(x [N, S, embed], timesteps [N]) -> (tokens [N, Q, out], temb [N, W])."""

    def __init__(self, embed_dim: int, width: int, out_dim: int, depth: int, queries: int,
                 time_channels: int = 320, ffn_ratio: int = 4):
        super().__init__()
        self.time_channels = time_channels
        self.latents = nn.Parameter(torch.zeros(1, queries, width))
        self.proj_in = nn.Linear(embed_dim, width)
        self.time_embedding = _TimeEmbedding(time_channels, width)
        self.layers = nn.ModuleList([_layer(width, ffn_ratio) for _ in range(depth)])
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.time_embedding(timestep_features(timesteps, self.time_channels).to(x.dtype))
        x = self.proj_in(x) + temb[:, None]
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, feed_forward, modulation in self.layers:
            shift_msa, scale_msa, shift_mlp, scale_mlp = modulation(temb).chunk(4, dim=1)
            latents = attention(x, latents, shift_msa, scale_msa) + latents
            normed = feed_forward[0](latents) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            latents = feed_forward[3](feed_forward[2](feed_forward[1](normed))) + latents
        return self.norm_out(self.proj_out(latents)), temb


@dataclass(frozen=True)
class JointIPLayer:
    """One joint block's IP weights. Heads = width / 64."""
    norm_ip_weight: torch.Tensor
    norm_ip_bias: torch.Tensor
    to_k_ip: torch.Tensor
    to_v_ip: torch.Tensor
    norm_q: torch.Tensor
    norm_k: torch.Tensor
    norm_ip_k: torch.Tensor

    def _heads_rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.unflatten(-1, (-1, weight.shape[0])), weight, RMS_EPS).flatten(-2)

    def queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's own RMS norms on the block's raw x-stream q, k. Shapes: [B, N, H·64] each."""
        return self._heads_rms(q, self.norm_q), self._heads_rms(k, self.norm_k)

    def image_kv(self, tokens: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm_ip_k(to_k_ip(e)), to_v_ip(e)) with e = AdaLayerNorm(tokens, temb): LayerNorm without
        affine (eps 1e-6), ·(1 + scale) + shift, [shift, scale] = Linear(SiLU(temb)).
        Shapes: tokens [N, T, out], temb [N, W_t] -> 2 × [N, T, out]."""
        w = self.to_k_ip
        tokens, temb = tokens.to(device=w.device, dtype=w.dtype), temb.to(device=w.device, dtype=w.dtype)
        shift, scale = F.linear(F.silu(temb), self.norm_ip_weight, self.norm_ip_bias).chunk(2, dim=1)
        e = F.layer_norm(tokens, tokens.shape[-1:], eps=RMS_EPS) * (1 + scale[:, None]) + shift[:, None]
        return self._heads_rms(F.linear(e, w), self.norm_ip_k), F.linear(e, self.to_v_ip)


@dataclass(frozen=True, eq=False)
class InstantXSD35Adapter:
    """A loaded InstantX SD3.5 IP-Adapter. Immutable and shared by clones (__deepcopy__ is itself)."""
    name: str
    resampler: TimeResampler
    layers: dict[int, JointIPLayer] = field(repr=False)  # joint block index -> its IP weights
    tokens: int
    clip_width: int
    hidden: int

    kind = "instantx_sd35"
    clip_input = "penultimate_hidden_states"
    clip_vision = "SigLIP so400m-patch14-384"

    def __deepcopy__(self, memo):
        return self

    def describe(self) -> str:
        return (f"{self.name}: InstantX SD3.5 IP-Adapter, {self.tokens} tokens per image, {len(self.layers)} joint "
                f"blocks, reads SigLIP penultimate hidden states ({self.clip_width}-d)")


def is_instantx_sd35(sd: dict) -> bool:
    parts = split_state_dict(sd)
    return "proj_in.weight" in parts["image_proj"] and "time_embedding.linear_1.weight" in parts["image_proj"]


def instantx_sd35_from_state_dict(sd: dict, name: str = "instantx_sd35") -> InstantXSD35Adapter:
    """Read an InstantX SD3.5 IP-Adapter ({"image_proj", "ip_adapter"} dict or flat prefixed keys)."""
    parts = split_state_dict(sd)
    proj, ip = parts["image_proj"], parts["ip_adapter"]
    try:
        embed_dim, width = proj["proj_in.weight"].shape[1], proj["proj_in.weight"].shape[0]
        out_dim, queries = proj["proj_out.weight"].shape[0], proj["latents"].shape[1]
        time_channels = proj["time_embedding.linear_1.weight"].shape[1]
        ffn_ratio = proj["layers.0.1.1.weight"].shape[0] // width
    except KeyError as missing:
        raise ValueError(f"{name}: not an InstantX SD3.5 IP-Adapter (no image_proj.{missing.args[0]})") from None
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    resampler = TimeResampler(embed_dim, width, out_dim, depth, queries, time_channels, ffn_ratio)
    try:
        resampler.load_state_dict(proj)
    except RuntimeError as error:
        raise ValueError(f"{name}: the resampler weights do not fit its layout: {error}") from None
    resampler.eval().requires_grad_(False)

    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ip.items():
        match = LAYER_KEY.match(key)
        if match:
            per_layer.setdefault(int(match[1]), {})[match[2]] = value
    layers = {}
    for index, p in sorted(per_layer.items()):
        try:
            layers[index] = JointIPLayer(p["norm_ip.linear.weight"], p["norm_ip.linear.bias"], p["to_k_ip.weight"],
                                         p["to_v_ip.weight"], p["norm_q.weight"], p["norm_k.weight"], p["norm_ip_k.weight"])
        except KeyError as missing:
            raise ValueError(f"{name}: joint block {index} lacks ip_adapter.{index}.{missing.args[0]}") from None
        if layers[index].to_k_ip.shape[1] != out_dim:
            raise ValueError(f"{name}: joint block {index} reads {layers[index].to_k_ip.shape[1]}-wide tokens, "
                             f"the resampler gives {out_dim}")
    if not layers:
        raise ValueError(f"{name}: no ip_adapter.* joint-block weights")
    return InstantXSD35Adapter(name, resampler, layers, queries, embed_dim, out_dim)
