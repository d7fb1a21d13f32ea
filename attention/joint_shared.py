"""Shared attention (StyleAligned) and K/V swapping (Visual Style Prompting) inside the joint
text + image attention of DiTs (Flux, SD3/3.5).

A DiT block attends over one joint sequence: text tokens and image tokens (Flux and core's
MMDiT put the text first, diffusers' SD3 processor the image first; Flux Kontext appends
reference-latent tokens after the image). Only the *image* tokens are shared: a target row
attends to its own joint keys/values plus the reference row's image-token keys/values, with
AdaIN of its image-token queries and keys to the reference's image-token statistics, the score
scale s and shift β of the UNet version (attention/shared.py). Text tokens are never shared:
every row keeps its own prompt. A row that is its own reference (the reference row) stays plain
joint attention, exactly.

Layout-agnostic: q, k, v are [B, heads, L, dim_head] (Flux, post-RoPE) or [B, L, heads·dim_head]
(core's MMDiT); tokens are always dim −2, AdaIN statistics are per row and per channel of the
last axes, the kernel `attention(q, k, v, mask)` is the caller's (it reshapes, it keeps the
user's backend) and its output only needs the batch first.

Rotary positions (Flux): post-RoPE keys of the reference row carry the same positions as the
target's tokens (same latent size), so a target query at position p meets the reference key of
position p at relative offset 0: "aligned", the default (nothing to do). `reference_rotation`
(attention/rotary.py, `axis_rotation`) moves the reference keys by a constant offset first.
Measured with a positional probe (Flux's axes [16, 56, 56], θ 10000, 32×32 tokens, QK-normed
q = k = c + 0.5·noise, 4 seeds; share of a target query's attention over the reference's image
keys): aligned puts 0.0104 on the same-position key and 0.071 within one token (no rotary
positions at all: 0.0010 and 0.0084) — spatial correspondence, i.e. the reference's layout can
leak into the target; an index-axis offset of 1 (Kontext's reference ids) changes neither figure
(< 1e-4: the index axis is constant over the image, so it only adds a content term); a column
offset of one grid width gives 0.0044 / 0.032, a row and column offset of one grid 0.0016 / 0.012,
close to no positional bias: the reference is then read for what it looks like, not where.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .adain import adain
from .rotary import rotate
from .shared import _rows, key_bias

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def image_span(text_tokens: int, image_tokens: int, text_first: bool = True) -> slice:
    """The image tokens' positions in a joint sequence: after the text (Flux, core's MMDiT;
    tokens after the image, such as Kontext references, are not part of it) or before it
    (diffusers' SD3 processor)."""
    return slice(text_tokens, text_tokens + image_tokens) if text_first else slice(0, image_tokens)


def _adain_image(x: torch.Tensor, reference: torch.Tensor, image: slice) -> torch.Tensor:
    """x with its image tokens AdaIN-normalised to the reference's image tokens; others unchanged."""
    out = x.clone()
    out[..., image, :] = adain(x[..., image, :], reference[..., image, :])
    return out


def _reference_keys(k: torch.Tensor, image: slice, rotation: torch.Tensor | None) -> torch.Tensor:
    keys = k[..., image, :]
    return keys if rotation is None else rotate(keys, rotation)


def _scatter(batch: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Rows computed in groups put back in batch order. parts: (row indices, rows)."""
    first = parts[0][1]
    out = first.new_empty((batch,) + tuple(first.shape[1:]))
    for index, rows in parts:
        out[index] = rows
    return out


def _mask_rows(mask: torch.Tensor | None, rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The caller's mask for some rows of the batch: per-row masks ([B, ...], 3 or 4 dims) are
    indexed, masks shared by every row ([Lq, Lk], [1, ...]) are kept as they are."""
    if mask is None or mask.ndim < 3 or mask.shape[0] == 1 or batch == 1:
        return mask
    return mask[rows.to(mask.device)]


def extend_mask(mask: torch.Tensor, extra_keys: int, shift: float, dtype: torch.dtype) -> torch.Tensor:
    """The caller's joint-attention mask over [own keys; `extra_keys` added keys]: the own keys keep
    it, the added ones are allowed, with the additive bias β = shift. A boolean mask (True = attend)
    stays boolean while β = 0, else becomes additive in `dtype` (0 / −inf).
    Shapes: mask [..., Lq, Lk] (or [Lk]) -> [..., Lq, Lk + extra_keys]."""
    if mask.dtype == torch.bool and shift == 0.0:
        return torch.cat([mask, mask.new_ones(mask.shape[:-1] + (extra_keys,))], dim=-1)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return torch.cat([mask, mask.new_full(mask.shape[:-1] + (extra_keys,), shift)], dim=-1)


def joint_shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           reference_rows: Sequence[int] | torch.Tensor, image: slice, attention: Attention, *,
                           adain_queries: bool = True, adain_keys: bool = True, adain_values: bool = False,
                           score_scale: float = 1.0, score_shift: float = 0.0,
                           reference_rotation: torch.Tensor | None = None,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """StyleAligned shared attention over a joint sequence, image tokens shared only.

    For a target row t with reference r, I the image tokens, M_t the caller's mask (additive):
    O_t = softmax([Q̂_t K̂_tᵀ, s·Q̂_t K_{r,I}ᵀ]/√d + [M_t, β])·[V̂_t; V_{r,I}], where Q̂_t, K̂_t (V̂_t)
    are Q_t, K_t (V_t) with their image tokens AdaIN-normalised to the reference's image tokens
    and text tokens as they are. The reference row gets plain joint attention under its own M_r.
    Shapes: q, k, v [B, H, L, D] or [B, L, H·D]; reference_rows [B]; image a slice of the L
    tokens; reference_rotation as attention.rotary.rotate's (heads-split layout only); mask the
    kernel's mask over the L joint keys ([L, L], [B or 1, L, L], [B or 1, H or 1, L, L]; boolean
    True = attend, or additive) -> the kernel's output, batch first.
    """
    batch = q.shape[0]
    refs = _rows(reference_rows, batch, q.device)
    is_reference = refs == torch.arange(batch, device=q.device)
    if bool(is_reference.all()):
        return attention(q, k, v, mask)

    parts = []
    ref_idx = is_reference.nonzero().squeeze(1)
    if ref_idx.numel():
        parts.append((ref_idx, attention(q[ref_idx], k[ref_idx], v[ref_idx], _mask_rows(mask, ref_idx, batch))))

    tgt_idx = (~is_reference).nonzero().squeeze(1)
    src = refs[tgt_idx]
    q_t, k_t, v_t = q[tgt_idx], k[tgt_idx], v[tgt_idx]
    q_r, k_r, v_r = q[src], k[src], v[src]
    if adain_queries:
        q_t = _adain_image(q_t, q_r, image)
    if adain_keys:
        k_t = _adain_image(k_t, k_r, image)
    if adain_values:
        v_t = _adain_image(v_t, v_r, image)
    shared_k = _reference_keys(k_r, image, reference_rotation)
    if score_scale != 1.0:
        shared_k = shared_k * score_scale
    keys = torch.cat([k_t, shared_k], dim=-2)
    values = torch.cat([v_t, v_r[..., image, :]], dim=-2)
    if mask is None:
        target_mask = None if score_shift == 0.0 else key_bias(k_t.shape[-2], shared_k.shape[-2], score_shift,
                                                                 q.dtype, q.device)
    else:
        target_mask = extend_mask(_mask_rows(mask, tgt_idx, batch), shared_k.shape[-2], score_shift, q.dtype)
    parts.append((tgt_idx, attention(q_t, keys, values, target_mask)))
    return _scatter(batch, parts)


def joint_swap_kv(k: torch.Tensor, v: torch.Tensor, reference_rows: Sequence[int] | torch.Tensor, image: slice,
                  reference_rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual Style Prompting in joint attention: every row's image-token keys and values
    *replaced* by its reference row's; text tokens, queries and reference rows keep their own.

    Shapes: k, v [B, H, L, D] or [B, L, H·D]; reference_rows [B] -> k', v' (same shapes).
    """
    refs = _rows(reference_rows, k.shape[0], k.device)
    targets = (refs != torch.arange(k.shape[0], device=k.device)).nonzero().squeeze(1)
    if not targets.numel():
        return k, v
    k, v = k.clone(), v.clone()
    src = refs[targets]
    k[targets, ..., image, :] = _reference_keys(k[src], image, reference_rotation)
    v[targets, ..., image, :] = v[src][..., image, :]
    return k, v


def joint_swapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            reference_rows: Sequence[int] | torch.Tensor, image: slice, attention: Attention,
                            reference_rotation: torch.Tensor | None = None,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """O = softmax(Q [K_text; K_{r,I}]ᵀ/√d + M)·[V_text; V_{r,I}] (VSP for DiTs). The caller's mask M
    keeps its place: the swapped keys sit at the positions of the keys they replace, so a mask
    entry still means the same token slot (a regional mask over image positions, a bias on text
    tokens). Shapes: as joint_swap_kv; mask as joint_shared_attention's."""
    k_s, v_s = joint_swap_kv(k, v, reference_rows, image, reference_rotation)
    return attention(q, k_s, v_s, mask)
