"""Shared attention and K/V swapping in DiT joint attention against the formula written out here in fp64.

Reference (issue 15; StyleAligned's formula restricted to image tokens): per target row t with
reference r, per head, I the image tokens of the joint sequence:
  Q̂ = Q_t with Q_t[I] := AdaIN(Q_t[I], Q_r[I]);  K̂ likewise (V̂ optional)
  O_t = softmax([Q̂ K̂ᵀ, s·Q̂ K_r[I]ᵀ]/√d + [0, β]) · [V̂; V_r[I]]
the reference row is plain joint attention. VSP: K_t[I], V_t[I] := K_r[I], V_r[I], then plain.
Rotary positions are written here as complex multiplication (Flux's pair rotation), independently
of attention/rotary.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.attention.joint_shared import (image_span, joint_shared_attention, joint_swap_kv,
                                             joint_swapped_attention)
from stylekit.attention.rotary import axis_rotation, rotate

HEADS, DIM_HEAD, TEXT, SIDE = 2, 16, 5, 3  # 9 image tokens on a 3×3 grid
IMAGE = SIDE * SIDE
AXES = [4, 6, 6]  # index, row, column: 16 channels per head, like Flux's [16, 56, 56] scaled down


def naive_adain(x, y, eps=1e-5):
    n, m = x.shape[0], y.shape[0]
    mx, my = x.sum(0) / n, y.sum(0) / m
    sx = (((x - mx) ** 2).sum(0) / (n - 1) + eps).sqrt()
    sy = (((y - my) ** 2).sum(0) / (m - 1) + eps).sqrt()
    return (x - mx) / sx * sy + my


def naive_attention(q, k, v, bias=None):
    logits = q @ k.T / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    w = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return (w / w.sum(dim=-1, keepdim=True)) @ v


def complex_rope(x, positions):
    """Rotate channel pairs (2i, 2i+1) of x [N, D] by angle p_a·θ^(−2j/d_a), as complex numbers."""
    angles = []
    for a, d in enumerate(AXES):
        freqs = torch.tensor([10000.0 ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
        angles.append(positions[:, a:a + 1].double() * freqs)
    phase = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=1))
    z = torch.view_as_complex(x.double().reshape(x.shape[0], -1, 2).contiguous()) * phase
    return torch.view_as_real(z).reshape(x.shape)


def reference_shared(q, k, v, refs, image, aq=True, ak=True, av=False, scale=1.0, shift=0.0, shared_keys=None,
                     masks=None):
    """q, k, v as [B, H, L, D]; shared_keys(r, h) gives the reference's image keys when they are re-positioned;
    masks(i, h) the caller's additive mask [L, L] of row i, head h (its own keys; the added ones get β)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for i, r in enumerate(refs):
        for h in range(q.shape[1]):
            Q, K, V = q[i, h].clone(), k[i, h].clone(), v[i, h].clone()
            own = torch.zeros(Q.shape[0], K.shape[0], dtype=torch.float64) if masks is None else masks(i, h)
            if i == r:
                out[i, h] = naive_attention(Q, K, V, own)
                continue
            Qr, Kr, Vr = q[r, h], k[r, h], v[r, h]
            if aq:
                Q[image] = naive_adain(Q[image], Qr[image])
            if ak:
                K[image] = naive_adain(K[image], Kr[image])
            if av:
                V[image] = naive_adain(V[image], Vr[image])
            shared = Kr[image] if shared_keys is None else shared_keys(r, h)
            bias = torch.cat([own, torch.full((Q.shape[0], shared.shape[0]), shift, dtype=torch.float64)], dim=1)
            out[i, h] = naive_attention(Q, torch.cat([K, scale * shared]), torch.cat([V, Vr[image]]), bias)
    return out


def reference_swapped(q, k, v, refs, image, masks=None):
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for i, r in enumerate(refs):
        for h in range(q.shape[1]):
            K, V = k[i, h].clone(), v[i, h].clone()
            K[image], V[image] = k[r, h][image], v[r, h][image]
            out[i, h] = naive_attention(q[i, h], K, V, None if masks is None else masks(i, h))
    return out


def heads_kernel(q, k, v, mask):
    """Flux's call: [B, H, L, D] in, [B, L, H·D] out (optimized_attention with skip_reshape)."""
    if mask is not None:
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def merged_kernel(q, k, v, mask):
    """Core MMDiT's call: [B, L, H·D] in and out, heads passed beside."""
    split = [t.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2) for t in (q, k, v)]
    return heads_kernel(*split, mask)


def _as_heads(x):  # [B, L, H·D] -> [B, H, L, D]
    return x.unflatten(-1, (HEADS, -1)).transpose(1, 2)


def _qkv(batch, seed=0, tokens=TEXT + IMAGE):
    g = torch.Generator().manual_seed(seed)
    # Rows with their own means and scales, so AdaIN moves them; unit-order magnitudes.
    make = lambda: (torch.randn(batch, HEADS, tokens, DIM_HEAD, generator=g) * (0.5 + torch.rand(batch, 1, 1, 1, generator=g))
                    + 0.5 * torch.randn(batch, HEADS, 1, DIM_HEAD, generator=g))
    return make(), make(), make()


def _positions(text=TEXT, index=0):
    """Flux ids: text all zero, image (index, row, column) on the grid."""
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    img = torch.stack([torch.full((IMAGE,), index), rows.flatten(), cols.flatten()], dim=1)
    return torch.cat([torch.zeros(text, 3, dtype=torch.long), img])


def _flux_pe(positions):
    """Our rotation matrices at absolute positions, built from axis_rotation (offset = position)."""
    return torch.cat([axis_rotation(p.tolist(), AXES) for p in positions], dim=2)


# Reference rows per layout the sampler can produce (cond_or_uncond chunks, first row of each).
LAYOUTS = {
    "batch 2, one chunk": [0, 0],
    "batch 3, one chunk": [0, 0, 0],
    "batch 8, cond and uncond together": [0, 0, 0, 0, 4, 4, 4, 4],
    "batch 4, cond or uncond apart": [0, 0, 0, 0],
    "batch 8, chunks reversed (uncond first)": [0, 0, 0, 0, 4, 4, 4, 4],
    "batch 6, three chunks of two": [0, 0, 2, 2, 4, 4],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aq,ak,av,scale,shift", [(True, True, False, 1.0, 0.0), (True, True, True, 1.0, math.log(2)),
                                                  (False, False, False, 0.7, -0.3), (True, False, False, 1.2, 0.5)])
def test_flux_heads_layout_with_rope_matches_the_formula(layout, aq, ak, av, scale, shift):
    refs = LAYOUTS[layout]
    seed = 1 if "reversed" in layout else 0
    q, k, v = _qkv(len(refs), seed)
    pos = _positions()
    # Post-RoPE inputs, as the attention override receives them in Flux.
    q = torch.stack([torch.stack([complex_rope(q[b, h], pos) for h in range(HEADS)]) for b in range(len(refs))]).float()
    k = torch.stack([torch.stack([complex_rope(k[b, h], pos) for h in range(HEADS)]) for b in range(len(refs))]).float()
    image = image_span(TEXT, IMAGE)
    got = joint_shared_attention(q, k, v, refs, image, heads_kernel, adain_queries=aq, adain_keys=ak,
                                 adain_values=av, score_scale=scale, score_shift=shift)
    want = reference_shared(q, k, v, refs, image, aq, ak, av, scale, shift)
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("text_first", [True, False])
def test_merged_layout_matches_the_formula_text_first_or_image_first(layout, text_first):
    # Core's MMDiT: [B, L, H·D], context then x; diffusers' SD3 processor: x then context.
    refs = LAYOUTS[layout]
    q, k, v = _qkv(len(refs), 2)
    image = image_span(TEXT, IMAGE, text_first)
    merged = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]
    got = joint_shared_attention(*merged, refs, image, merged_kernel, score_shift=math.log(2))
    want = reference_shared(q, k, v, refs, image, shift=math.log(2))
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)


def test_tokens_after_the_image_are_neither_normalised_nor_shared():
    # Flux Kontext appends reference-latent tokens after the image: they stay the row's own.
    refs = [0, 0, 0]
    q, k, v = _qkv(3, 3, tokens=TEXT + IMAGE + 4)
    image = image_span(TEXT, IMAGE)
    got = joint_shared_attention(q, k, v, refs, image, heads_kernel, adain_values=True)
    want = reference_shared(q, k, v, refs, image, av=True)
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset", [(1, 0, 0), (0, 0, SIDE), (0, 2.5, -4)])
def test_offset_positions_equal_rope_at_the_shifted_positions(offset):
    # Post-RoPE keys rotated by R(δ) are the pre-RoPE keys rotated at p + δ (Kontext-style index
    # offset, side-by-side column offset, any real offset).
    refs = [0, 0, 3, 3]
    q0, k0, v = _qkv(4, 4)
    pos = _positions()
    rope_rows = lambda x, p: torch.stack([torch.stack([complex_rope(x[b, h], p) for h in range(HEADS)])
                                          for b in range(x.shape[0])])
    q, k = rope_rows(q0, pos).float(), rope_rows(k0, pos).float()
    image = image_span(TEXT, IMAGE)
    shifted = pos + torch.tensor(offset)
    k_shifted = rope_rows(k0, shifted)  # fp64, at p + δ, from the pre-RoPE keys
    got = joint_shared_attention(q, k, v, refs, image, heads_kernel, score_shift=0.3,
                                 reference_rotation=axis_rotation(offset, AXES))
    want = reference_shared(q, k, v, refs, image, shift=0.3, shared_keys=lambda r, h: k_shifted[r, h][image])
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)


def test_rotation_matrices_equal_complex_rope():
    x = torch.randn(IMAGE + TEXT, DIM_HEAD, generator=torch.Generator().manual_seed(5))
    pos = _positions(index=2)
    got = rotate(x, _flux_pe(pos)[0, 0])
    torch.testing.assert_close(got.double(), complex_rope(x, pos), atol=1e-6, rtol=0)


def test_reference_rows_equal_plain_joint_attention_exactly():
    refs = [0, 0, 0, 3, 3, 3]
    q, k, v = _qkv(6, 6)
    image = image_span(TEXT, IMAGE)
    got = joint_shared_attention(q, k, v, refs, image, heads_kernel, adain_values=True, score_scale=0.4,
                                 score_shift=1.0, reference_rotation=axis_rotation((0, 0, SIDE), AXES))
    assert torch.equal(got[[0, 3]], heads_kernel(q[[0, 3]], k[[0, 3]], v[[0, 3]], None))


def test_a_batch_of_reference_rows_only_is_plain_attention():
    q, k, v = _qkv(2, 7)
    image = image_span(TEXT, IMAGE)
    assert torch.equal(joint_shared_attention(q, k, v, [0, 1], image, heads_kernel), heads_kernel(q, k, v, None))


def test_text_tokens_of_the_reference_are_not_shared():
    # Changing the reference's text keys/values changes only the reference row itself.
    refs = [0, 0, 0]
    q, k, v = _qkv(3, 8)
    image = image_span(TEXT, IMAGE)
    base = joint_shared_attention(q, k, v, refs, image, heads_kernel)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :TEXT] += 3.0
    v2[0, :, :TEXT] -= 2.0
    changed = joint_shared_attention(q, k2, v2, refs, image, heads_kernel)
    torch.testing.assert_close(changed[1:], base[1:], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[0], base[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swapped_attention_matches_the_formula(layout):
    refs = LAYOUTS[layout]
    q, k, v = _qkv(len(refs), 9)
    image = image_span(TEXT, IMAGE)
    got = joint_swapped_attention(q, k, v, refs, image, heads_kernel)
    torch.testing.assert_close(_as_heads(got).double(), reference_swapped(q, k, v, refs, image), atol=1e-5, rtol=0)
    merged = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]
    got_merged = joint_swapped_attention(*merged, refs, image_span(TEXT, IMAGE), merged_kernel)
    torch.testing.assert_close(got_merged, got, atol=1e-6, rtol=0)


def test_swapping_keeps_text_and_reference_rows_and_leaves_inputs_untouched():
    refs = [0, 0, 2, 2]
    q, k, v = _qkv(4, 10)
    k0, v0 = k.clone(), v.clone()
    image = image_span(TEXT, IMAGE)
    k_s, v_s = joint_swap_kv(k, v, refs, image)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    assert torch.equal(k_s[[0, 2]], k[[0, 2]]) and torch.equal(v_s[[0, 2]], v[[0, 2]])
    assert torch.equal(k_s[:, :, :TEXT], k[:, :, :TEXT]) and torch.equal(v_s[:, :, :TEXT], v[:, :, :TEXT])
    assert torch.equal(k_s[1, :, image], k[0, :, image]) and torch.equal(v_s[3, :, image], v[2, :, image])
    got = joint_swapped_attention(q, k, v, refs, image, heads_kernel)
    assert torch.equal(got[[0, 2]], heads_kernel(q, k, v, None)[[0, 2]])


def test_half_precision_keeps_its_dtype_and_stays_close():
    refs = [0, 0, 0]
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(3, 11))
    image = image_span(TEXT, IMAGE)
    got = joint_shared_attention(q, k, v, refs, image, heads_kernel, score_shift=math.log(2))
    assert got.dtype == torch.bfloat16
    want = reference_shared(q, k, v, refs, image, shift=math.log(2))
    assert (_as_heads(got).double() - want).abs().max() < 0.05 * want.abs().max()


def test_axis_rotation_refuses_mismatched_axes():
    with pytest.raises(ValueError, match="2 offsets for 3 position axes"):
        axis_rotation((0, 1), AXES)


def _same_position_share(offset, rotary=True, side=16, axes=(16, 56, 56)):
    """Mean attention share a target query gives the reference key at its own position (positional probe:
    QK-normed q = k = c + 0.5·noise, so the logits differ mostly through the rotary positions)."""
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([torch.zeros(side * side), rows.flatten(), cols.flatten()], 1)
    pe = torch.cat([axis_rotation(p.tolist(), axes) for p in pos], 2)[0, 0]
    c = torch.randn(sum(axes), generator=g)
    c = c / c.pow(2).mean().sqrt()
    q, k = (c + 0.5 * torch.randn(side * side, sum(axes), generator=g) for _ in range(2))
    if rotary:
        q, k = rotate(q, pe), rotate(rotate(k, pe), axis_rotation(offset, axes)[0, 0])
    return torch.softmax(q @ k.T / math.sqrt(sum(axes)), -1).diagonal().mean().item()


def test_aligned_reference_positions_favour_the_same_position_and_a_grid_offset_removes_it():
    # The measured choice documented in attention/joint_shared.py: aligned positions give spatial
    # correspondence; Kontext's index offset keeps it; an offset of one grid brings it near none.
    none = _same_position_share((0, 0, 0), rotary=False)
    aligned = _same_position_share((0, 0, 0))
    index = _same_position_share((1, 0, 0))
    grid = _same_position_share((0, 16, 16))
    assert aligned > 5 * none
    assert abs(index - aligned) < 0.05 * aligned
    assert grid < 2 * none < aligned / 2


# The caller's attention mask (Flux's attention_mask from the conditioning) inside shared blocks:
# every row keeps it over its own joint keys, the reference's added image keys are allowed (+β).
def _masks(batch, seed, tokens=TEXT + IMAGE, heads=1):
    """Per-row additive masks [B, heads, L, L] with blocked entries (−inf) and biases, as a regional or
    attn_bias mask would put them; no query loses every key."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(batch, heads, tokens, tokens, generator=g)
    blocked = torch.rand(batch, heads, tokens, tokens, generator=g) < 0.3
    blocked[..., TEXT:TEXT + 2] = False  # two image keys always open
    return bias.masked_fill(blocked, float("-inf"))


@pytest.mark.parametrize("layout", ["batch 2, one chunk", "batch 3, one chunk", "batch 8, cond and uncond together",
                                    "batch 6, three chunks of two"])
@pytest.mark.parametrize("shift", [0.0, math.log(2)])
def test_a_per_row_additive_mask_is_kept_on_own_keys_and_the_reference_keys_are_allowed(layout, shift):
    refs = LAYOUTS[layout]
    q, k, v = _qkv(len(refs), 12)
    mask = _masks(len(refs), 13)[:, 0]  # [B, L, L], as core's Flux hands it
    image = image_span(TEXT, IMAGE)
    got = joint_shared_attention(q, k, v, refs, image, heads_kernel, score_shift=shift, mask=mask)
    want = reference_shared(q, k, v, refs, image, shift=shift, masks=lambda i, h: mask[i].double())
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)
    # The mask does something: without it the result differs.
    assert not torch.allclose(got, joint_shared_attention(q, k, v, refs, image, heads_kernel, score_shift=shift))


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_a_shared_boolean_mask_combines_with_the_reference_keys(shift):
    refs = [0, 0, 0, 3, 3, 3]
    q, k, v = _qkv(6, 14)
    keep = torch.isfinite(_masks(1, 15)[0, 0])  # [L, L], True = attend, one mask for every row
    image = image_span(TEXT, IMAGE)
    got = joint_shared_attention(q, k, v, refs, image, heads_kernel, score_shift=shift, mask=keep)
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    want = reference_shared(q, k, v, refs, image, shift=shift, masks=lambda i, h: additive)
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)


def test_a_per_head_mask_in_the_merged_layout_matches_the_formula():
    # Core's MMDiT layout with a [B, H, L, L] mask (the widest shape core's kernels take).
    refs = LAYOUTS["batch 8, chunks reversed (uncond first)"]
    q, k, v = _qkv(len(refs), 16)
    mask = _masks(len(refs), 17, heads=HEADS)
    image = image_span(TEXT, IMAGE)
    merged = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]
    got = joint_shared_attention(*merged, refs, image, merged_kernel, adain_values=True, score_scale=0.8,
                                 score_shift=-0.2, mask=mask)
    want = reference_shared(q, k, v, refs, image, av=True, scale=0.8, shift=-0.2, masks=lambda i, h: mask[i, h].double())
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)


def test_reference_rows_keep_their_mask_exactly():
    refs = [0, 0, 0, 3, 3, 3]
    q, k, v = _qkv(6, 18)
    mask = _masks(6, 19)[:, 0]
    got = joint_shared_attention(q, k, v, refs, image_span(TEXT, IMAGE), heads_kernel, score_shift=1.0, mask=mask)
    assert torch.equal(got[[0, 3]], heads_kernel(q[[0, 3]], k[[0, 3]], v[[0, 3]], mask[[0, 3]]))


@pytest.mark.parametrize("layout", ["batch 3, one chunk", "batch 8, cond and uncond together"])
def test_swapped_attention_keeps_the_mask_on_its_slots(layout):
    refs = LAYOUTS[layout]
    q, k, v = _qkv(len(refs), 20)
    mask = _masks(len(refs), 21)[:, 0]
    image = image_span(TEXT, IMAGE)
    got = joint_swapped_attention(q, k, v, refs, image, heads_kernel, mask=mask)
    want = reference_swapped(q, k, v, refs, image, masks=lambda i, h: mask[i].double())
    torch.testing.assert_close(_as_heads(got).double(), want, atol=1e-5, rtol=0)
