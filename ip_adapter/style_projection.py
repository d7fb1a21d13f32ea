"""The StyleAdapter checkpoint interface: what a StyleAdapter file must hold for StyleKit to load it.

One more projection kind of the IP-Adapter engine (beside base, plus and full-face): the engine's
loader reads it, so the engine imports no plug-in; styleadapter/ holds the method's stages.

No official StyleAdapter code or weights are public (DESIGN §4). This module fixes the layout a
checkpoint would need, after the paper: a StyEmb module (learned style embeddings that read the
CLIP vision patch tokens through a few transformer layers) and, per cross-attention layer, the
style path's own K/V projections and an optional learned scale λ. Flat keys in a .safetensors file
(a .bin may hold the same keys, or {"style_emb": {...}, "style_adapter": {...}}):

  style_emb.style_tokens                      [1, M, W]   M learned style embeddings
  style_emb.proj_in.weight / .bias            [W, H], [W] CLIP patch tokens (H wide) -> W
  style_emb.layers.{i}.norm1.weight / .bias   [W]         pre-norm transformer layer i over
  style_emb.layers.{i}.attn.in_proj_weight    [3W, W]     [patch tokens; style embeddings]
  style_emb.layers.{i}.attn.in_proj_bias      [3W]        (torch MultiheadAttention names,
  style_emb.layers.{i}.attn.out_proj.weight   [W, W]       64-d heads: W / 64 heads)
  style_emb.layers.{i}.attn.out_proj.bias     [W]
  style_emb.layers.{i}.norm2.weight / .bias   [W]
  style_emb.layers.{i}.mlp.0.weight / .bias   [F, W], [F] Linear, GELU, Linear
  style_emb.layers.{i}.mlp.2.weight / .bias   [W, F], [W]
  style_emb.norm_out.weight / .bias           [W]         on the M style embeddings
  style_emb.proj_out.weight / .bias           [C, W], [C] -> the UNet's context width C
  style_adapter.{N}.to_k_style.weight         [channels, C]  style K of cross-attention layer N
  style_adapter.{N}.to_v_style.weight         [channels, C]  style V
  style_adapter.{N}.scale                     [1] optional   learned λ of layer N (1 if absent)

N numbers the cross-attention layers as IP-Adapter's `ip_adapter.N` keys do (DESIGN §2: the
block map's ip_adapter_keys), so the IP-Adapter engine places each pair on its layer. Every size
(M, W, H, F, depth, C) is read from the shapes. StyEmb reads the penultimate CLIP hidden states
of the vision tower whose width is H (1280: ViT-H/14, 1024: ViT-L/14), class token removed or not.

Detection: a file is a StyleAdapter when it has `style_emb.*` keys. The loader returns the pack's
IPAdapter object (kind "styleadapter"), so every image-prompt node and stage takes it. λ is folded
into the V weights at load time: Attn(Q, K, λV) = λ·Attn(Q, K, V) exactly, since the softmax
weights do not depend on V.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import PENULTIMATE, IPAdapter, IPAdapterFileError

KIND = "styleadapter"
STYLE_EMB, STYLE_ADAPTER = "style_emb", "style_adapter"
DIM_HEAD = 64


class StyEmbLayer(nn.Module):
    """A pre-norm transformer layer: x + Attn(norm1(x)), then x + MLP(norm2(x))."""

    def __init__(self, width: int, ff_inner: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, max(1, width // DIM_HEAD), batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, ff_inner), nn.GELU(), nn.Linear(ff_inner, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class StyEmb(nn.Module):
    """StyleAdapter's style embedder: M learned embeddings attend, with the CLIP patch tokens, through
    a few transformer layers; their outputs are the style tokens. Shapes: [N, S, H] -> [N, M, C]
    (any S: one reference's 257 or 256 tokens, or several references' sequences joined)."""

    def __init__(self, hidden_dim: int, width: int, context_dim: int, tokens: int, depth: int, ff_inner: int):
        super().__init__()
        self.tokens = tokens
        self.style_tokens = nn.Parameter(torch.zeros(1, tokens, width))
        self.proj_in = nn.Linear(hidden_dim, width)
        self.layers = nn.ModuleList(StyEmbLayer(width, ff_inner) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, context_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.proj_in(hidden), self.style_tokens.expand(hidden.shape[0], -1, -1)], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.proj_out(self.norm_out(x[:, -self.tokens:]))


def is_style_adapter(state_dict: dict) -> bool:
    """Whether a loaded file (flat keys, or the {"style_emb", ...} dict form) is a StyleAdapter."""
    return STYLE_EMB in state_dict or any(k.startswith(STYLE_EMB + ".") for k in state_dict)


def _flat(state_dict: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in state_dict.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _part(flat: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    return {k[len(head) + 1:]: v for k, v in flat.items() if k.startswith(head + ".")}


def build_style_emb(sd: dict[str, torch.Tensor]) -> StyEmb:
    """The StyEmb module for a `style_emb` state dict, sizes read from its tensors (strict load)."""
    _, tokens, width = sd["style_tokens"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    ff_inner = sd["layers.0.mlp.0.weight"].shape[0] if depth else 4 * width
    module = StyEmb(hidden_dim=sd["proj_in.weight"].shape[1], width=width, context_dim=sd["proj_out.weight"].shape[0],
                    tokens=tokens, depth=depth, ff_inner=ff_inner)
    module.load_state_dict(sd, strict=True)
    return module.eval().requires_grad_(False)


def _style_kv(layers: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    numbers = sorted({int(k.split(".")[0]) for k in layers if k.endswith(".to_k_style.weight")})
    kv = {}
    for n in numbers:
        k, v = layers.get(f"{n}.to_k_style.weight"), layers.get(f"{n}.to_v_style.weight")
        if k is None or v is None or k.shape != v.shape or k.ndim != 2:
            raise IPAdapterFileError(f"style_adapter.{n}: to_k_style and to_v_style must be two weights of the same "
                                     "2-D shape")
        scale = layers.get(f"{n}.scale")
        if scale is not None:
            if scale.numel() != 1:
                raise IPAdapterFileError(f"style_adapter.{n}.scale must hold one number, not {tuple(scale.shape)}")
            v = v.float() * scale.float().reshape(())  # λ folded into V: Attn(Q, K, λV) = λ·Attn(Q, K, V)
        kv[n] = (k, v)
    return kv


def style_adapter_from_state_dict(state_dict: dict, name: str = "styleadapter") -> IPAdapter:
    """An IPAdapter (kind "styleadapter") from a checkpoint in the layout of this module's docstring."""
    flat = _flat(state_dict)
    layers = _part(flat, STYLE_ADAPTER)
    kv = _style_kv(layers)
    if not kv:
        raise IPAdapterFileError("it has StyleAdapter `style_emb.*` weights but no `style_adapter.N.to_k_style.weight` "
                                 "keys")
    try:
        projection = build_style_emb({k: v.float() for k, v in _part(flat, STYLE_EMB).items()})
    except (KeyError, RuntimeError, ValueError) as err:
        raise IPAdapterFileError(f"its StyEmb weights do not have the documented StyleAdapter layout: {err}") from None
    context_dim = projection.proj_out.out_features
    if any(k.shape[1] != context_dim for k, _ in kv.values()):
        raise IPAdapterFileError(f"its StyEmb makes {context_dim}-wide tokens but its style K/V weights read other widths")
    return IPAdapter(name=name, kind=KIND, projection=projection, kv=kv, tokens=projection.tokens,
                     context_dim=context_dim, clip_input=PENULTIMATE, clip_width=projection.proj_in.in_features)
