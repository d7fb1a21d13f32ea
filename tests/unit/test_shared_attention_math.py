"""Shared attention, AdaIN and K/V swapping against the papers' formulas written out here in fp64.

The reference below follows the StyleAligned paper and the official sa_handler description
(DESIGN §4): per target row t with reference r and per head, Q̂ = AdaIN(Q_t, Q_r), K̂ = AdaIN(K_t,
K_r) (V̂ optional), logits [Q̂K̂ᵀ, s·Q̂K_rᵀ]/√d plus β on the reference keys, softmax over all keys,
weights times [V̂; V_r]; the reference row itself is plain self-attention.
"""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.attention.adain import adain, match_channel_stats, mean_std
from stylekit.attention.shared import key_bias, shared_attention, swap_kv, swapped_attention

HEADS, DIM_HEAD, TOKENS = 4, 8, 12


def naive_adain(x, y, eps=1e-5):
    """AdaIN of one [N, d] block to another, statistics per column over tokens, unbiased variance."""
    n, m = x.shape[0], y.shape[0]
    mx, my = x.sum(0) / n, y.sum(0) / m
    sx = (((x - mx) ** 2).sum(0) / (n - 1) + eps).sqrt()
    sy = (((y - my) ** 2).sum(0) / (m - 1) + eps).sqrt()
    return (x - mx) / sx * sy + my


def naive_softmax_attention(q, k, v, bias=None):
    logits = q @ k.T / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def reference_shared_attention(q, k, v, refs, aq=True, ak=True, av=False, scale=1.0, shift=0.0):
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for i, r in enumerate(refs):
        for h in range(HEADS):
            cols = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
            Q, K, V = q[i, :, cols], k[i, :, cols], v[i, :, cols]
            if i == r:
                out[i, :, cols] = naive_softmax_attention(Q, K, V)
                continue
            Qr, Kr, Vr = q[r, :, cols], k[r, :, cols], v[r, :, cols]
            Qh = naive_adain(Q, Qr) if aq else Q
            Kh = naive_adain(K, Kr) if ak else K
            Vh = naive_adain(V, Vr) if av else V
            keys = torch.cat([Kh, scale * Kr])
            bias = torch.cat([torch.zeros(K.shape[0]), torch.full((Kr.shape[0],), shift)]).double()
            out[i, :, cols] = naive_softmax_attention(Qh, keys, torch.cat([Vh, Vr]), bias)
    return out


def sdpa_kernel(q, k, v, mask):
    """A ComfyUI-style kernel: [B, N, H·D] in and out, additive mask broadcast like attention_pytorch."""
    b = q.shape[0]
    split = [t.view(b, -1, HEADS, DIM_HEAD).transpose(1, 2) for t in (q, k, v)]
    if mask is not None:
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    out = torch.nn.functional.scaled_dot_product_attention(*split, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, HEADS * DIM_HEAD)


def _qkv(batch, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Different means and scales per row, so AdaIN has something to move; magnitudes of unit
    # order, as projected attention features have (fp32 logits stay well conditioned).
    make = lambda: (torch.randn(batch, TOKENS, HEADS * DIM_HEAD, generator=g) * (0.5 + torch.rand(batch, 1, 1, generator=g))
                    + 0.5 * torch.randn(batch, 1, HEADS * DIM_HEAD, generator=g))
    return [make().to(dtype) for _ in range(3)]


# A cond/uncond batch as ComfyUI runs it: two chunks of three rows, the first row of each chunk
# is the reference (rows 0 and 3), as in the paper's "prompt 0 of each CFG half".
TWO_CHUNKS = [0, 0, 0, 3, 3, 3]


@pytest.mark.parametrize("aq,ak,av", [(True, True, False), (True, True, True), (False, False, False),
                                      (True, False, False), (False, True, True)])
@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (1.0, math.log(2)), (0.5, 0.0), (1.3, -0.7)])
def test_shared_attention_matches_the_paper_formula(aq, ak, av, scale, shift):
    q, k, v = _qkv(6)
    got = shared_attention(q, k, v, TWO_CHUNKS, sdpa_kernel, adain_queries=aq, adain_keys=ak,
                           adain_values=av, score_scale=scale, score_shift=shift)
    want = reference_shared_attention(q, k, v, TWO_CHUNKS, aq, ak, av, scale, shift)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_the_score_shift_is_a_log_weight_on_the_reference_keys():
    # β = ln 2 doubles the softmax mass of every reference key: the same as listing them twice.
    q, k, v = _qkv(2)
    shifted = shared_attention(q, k, v, [0, 0], sdpa_kernel, adain_queries=False, adain_keys=False,
                               score_shift=math.log(2))
    Q, K, V = q[1].double(), k[1].double(), v[1].double()
    doubled = torch.zeros_like(Q)
    for h in range(HEADS):
        c = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
        doubled[:, c] = naive_softmax_attention(Q[:, c], torch.cat([K[:, c], k[0, :, c].double(), k[0, :, c].double()]),
                                                torch.cat([V[:, c], v[0, :, c].double(), v[0, :, c].double()]))
    torch.testing.assert_close(shifted[1].double(), doubled, atol=1e-5, rtol=0)


def test_reference_rows_stay_plain_self_attention_exactly():
    q, k, v = _qkv(6)
    got = shared_attention(q, k, v, TWO_CHUNKS, sdpa_kernel, adain_values=True, score_scale=0.3, score_shift=2.0)
    plain = sdpa_kernel(q[[0, 3]], k[[0, 3]], v[[0, 3]], None)
    assert torch.equal(got[[0, 3]], plain)


def test_a_batch_of_references_only_is_the_plain_result():
    q, k, v = _qkv(3)
    assert torch.equal(shared_attention(q, k, v, [0, 1, 2], sdpa_kernel), sdpa_kernel(q, k, v, None))


def test_rows_follow_the_reference_they_name_not_their_position():
    # Uncond chunk first ([1, 0] order) or any other layout: only reference_rows matters.
    q, k, v = _qkv(4)
    refs = [2, 2, 2, 3]  # row 2 is the reference of rows 0, 1; row 3 stands alone
    got = shared_attention(q, k, v, refs, sdpa_kernel, score_shift=0.5)
    torch.testing.assert_close(got.double(), reference_shared_attention(q, k, v, refs, shift=0.5), atol=1e-5, rtol=0)


def test_half_precision_inputs_keep_their_dtype_and_stay_close():
    q, k, v = _qkv(6, dtype=torch.bfloat16)
    got = shared_attention(q, k, v, TWO_CHUNKS, sdpa_kernel, score_shift=math.log(2))
    assert got.dtype == torch.bfloat16
    want = reference_shared_attention(q, k, v, TWO_CHUNKS, shift=math.log(2))
    assert (got.double() - want).abs().max() < 0.1 * want.abs().max()


def test_a_wrong_number_of_reference_rows_is_an_error():
    q, k, v = _qkv(2)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        shared_attention(q, k, v, [0, 0, 0], sdpa_kernel)


def test_key_bias_is_zero_on_own_keys_and_shift_on_reference_keys():
    bias = key_bias(3, 2, 0.25, torch.float32, torch.device("cpu"))
    assert bias.shape == (1, 1, 5) and bias.flatten().tolist() == [0, 0, 0, 0.25, 0.25]


def test_adain_matches_the_formula_per_row_and_column():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 10, 16, generator=g) * 2 + 1, torch.randn(3, 7, 16, generator=g) * 0.5 - 2
    got = adain(x, y)
    for b in range(3):
        torch.testing.assert_close(got[b].double(), naive_adain(x[b].double(), y[b].double()), atol=1e-5, rtol=0)


def test_adain_to_itself_is_the_identity_and_statistics_are_fp32():
    x = torch.randn(2, 9, 8).to(torch.float16)
    mean, std = mean_std(x)
    assert mean.dtype == std.dtype == torch.float32
    assert (adain(x.float(), x.float()) - x.float()).abs().max() < 1e-5
    assert adain(x, x).dtype == torch.float16


def test_swap_replaces_keys_and_values_with_the_reference_rows():
    q, k, v = _qkv(4)
    k2, v2 = swap_kv(k, v, [0, 0, 2, 2])
    assert torch.equal(k2, k[[0, 0, 2, 2]]) and torch.equal(v2, v[[0, 0, 2, 2]])
    got = swapped_attention(q, k, v, [0, 0, 2, 2], sdpa_kernel)
    for i, r in enumerate([0, 0, 2, 2]):
        for h in range(HEADS):
            c = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
            want = naive_softmax_attention(q[i, :, c].double(), k[r, :, c].double(), v[r, :, c].double())
            torch.testing.assert_close(got[i, :, c].double(), want, atol=1e-5, rtol=0)


def test_swapping_with_oneself_is_plain_attention():
    q, k, v = _qkv(3)
    assert torch.equal(swapped_attention(q, k, v, [0, 1, 2], sdpa_kernel), sdpa_kernel(q, k, v, None))


def test_channel_calibration_moves_each_channel_to_the_reference_statistics():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, generator=g) * 3 + 1
    ref = torch.randn(1, 4, 6, 6, generator=g) * 0.2 - 1
    got = match_channel_stats(x, ref).double()
    for b in range(2):
        for c in range(4):
            xs, rs = x[b, c].double().flatten(), ref[0, c].double().flatten()
            want = (xs - xs.mean()) / (xs.std() + 1e-8) * rs.std() + rs.mean()
            torch.testing.assert_close(got[b, c].flatten(), want, atol=1e-5, rtol=0)


def test_layer_norm_sharing_would_be_a_no_op():
    # Why StyleKit offers GroupNorm sharing only: LayerNorm normalises each token over its
    # channels, so normalising [x; x_ref] jointly along tokens and keeping x's part gives x's own
    # LayerNorm (DESIGN §4, official share_layer_norm).
    g = torch.Generator().manual_seed(3)
    norm = torch.nn.LayerNorm(16)
    x, ref = torch.randn(2, 10, 16, generator=g), torch.randn(2, 10, 16, generator=g) * 4
    assert torch.equal(norm(torch.cat([x, ref], dim=-2))[..., :10, :], norm(x))
