"""Decoupled cross-attention and attention masks against an independent fp32 formula."""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.attention.decoupled import ImageKV, add_image_attention, decoupled_cross_attention
from stylekit.attention.masks import mask_to_tokens, token_grid

HEADS = 4


def naive_attention(q, k, v, heads=HEADS):
    """softmax(QKᵀ/√d)V per head, written out in float64."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


def sdpa(q, k, v):
    b, n, c = q.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, c // HEADS).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def _tensors(b=3, n=16, m=7, t=4, c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in
            [(b, n, c), (b, m, c), (b, m, c), (1, t, c), (1, t, c), (b, t + 2, c), (b, t + 2, c)]]


def test_two_masked_image_terms_match_the_formula_written_out():
    q, k, v, k1, v1, k2, v2 = _tensors()
    mask = torch.rand(3, 16, 1, generator=torch.Generator().manual_seed(1))
    terms = [ImageKV(k1, v1, 0.7), ImageKV(k2, v2, -0.3, mask)]
    expected = (naive_attention(q, k, v) + 0.7 * naive_attention(q, k1.expand(3, -1, -1), v1.expand(3, -1, -1))
                - 0.3 * mask.double() * naive_attention(q, k2, v2))
    assert torch.allclose(decoupled_cross_attention(q, k, v, terms, sdpa).double(), expected, atol=1e-5)


def test_weight_zero_is_an_exact_identity_and_skips_the_image_attention():
    q, k, v, k1, v1, *_ = _tensors()
    calls = []

    def counting(q_, k_, v_):
        calls.append(k_.shape[1])
        return sdpa(q_, k_, v_)

    text = sdpa(q, k, v)
    assert add_image_attention(text, q, [ImageKV(k1, v1, 0.0)], counting) is text
    assert torch.equal(decoupled_cross_attention(q, k, v, [ImageKV(k1, v1, 0.0)], counting), text)
    assert calls == [7]  # only the text attention ran


def test_an_all_zero_mask_gives_the_text_attention():
    q, k, v, k1, v1, *_ = _tensors()
    out = decoupled_cross_attention(q, k, v, [ImageKV(k1, v1, 1.0, torch.zeros(1, 16, 1))], sdpa)
    assert torch.equal(out, sdpa(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    q, k, v, k1, v1, *_ = (t.to(dtype) for t in _tensors())
    out = decoupled_cross_attention(q, k, v, [ImageKV(k1, v1, 0.5)], sdpa)
    assert out.dtype == dtype
    expected = naive_attention(q, k, v) + 0.5 * naive_attention(q, k1.expand(3, -1, -1), v1.expand(3, -1, -1))
    assert torch.allclose(out.double(), expected, atol=3e-2)


@pytest.mark.parametrize("latent,tokens,grid", [
    ((64, 64), 4096, (64, 64)), ((64, 64), 256, (16, 16)), ((13, 9), 117, (13, 9)), ((13, 9), 35, (7, 5)),
    ((13, 9), 12, (4, 3)), ((13, 9), 4, (2, 2)), ((8, 16), 32, (4, 8)),
])
def test_token_grid_follows_the_unet_downsampling_that_rounds_up(latent, tokens, grid):
    assert token_grid(tokens, latent) == grid


def test_a_token_count_that_is_no_level_is_refused():
    with pytest.raises(ValueError, match="no level"):
        token_grid(50, (16, 16))


def test_a_half_mask_weights_exactly_the_tokens_of_its_half():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0   # left half
    tokens = mask_to_tokens(mask, (4, 8))
    grid = tokens.reshape(4, 8)
    assert tokens.shape == (1, 32, 1)
    assert torch.equal(grid[:, :4], torch.ones(4, 4)) and torch.equal(grid[:, 4:], torch.zeros(4, 4))


def test_a_soft_mask_is_averaged_and_stays_in_range():
    mask = torch.rand(2, 40, 24, generator=torch.Generator().manual_seed(0))
    tokens = mask_to_tokens(mask, (5, 3))
    assert tokens.shape == (2, 15, 1) and tokens.min() >= 0 and tokens.max() <= 1
    assert abs(tokens.mean().item() - mask.mean().item()) < 0.02
