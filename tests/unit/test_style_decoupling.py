"""StyleAdapter's decoupling strategies on tensors: patch shuffle is a permutation of cells, class-token
removal drops exactly one token per image; the two-path cross-attention against the formula."""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.attention.two_path import two_path_cross_attention
from stylekit.styleadapter.decoupling import drop_class_token, patch_permutations, shuffle_patches

HEADS = 4


def _images(n=3, h=24, w=36, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _cells(image, grid):
    """The grid x grid cells of one image [H, W, C], row-major, cut out by plain slicing."""
    ch, cw = image.shape[0] // grid, image.shape[1] // grid
    return [image[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] for r in range(grid) for c in range(grid)]


@pytest.mark.parametrize("grid", [2, 3, 4, 12])
def test_shuffle_moves_whole_cells_and_loses_no_pixel(grid):
    images = _images()
    out = shuffle_patches(images, grid, seed=7)
    assert out.shape == images.shape
    for i in range(images.shape[0]):
        before, after = _cells(images[i], grid), _cells(out[i], grid)
        # every output cell is exactly one input cell, each input cell used once: a permutation
        sources = [next(j for j, cell in enumerate(before) if torch.equal(cell, moved)) for moved in after]
        assert sorted(sources) == list(range(grid * grid))
        assert sources != list(range(grid * grid))
    assert torch.equal(images.flatten().sort().values, out.flatten().sort().values)


def test_rows_and_columns_that_fill_no_cell_stay_in_place():
    images = _images(h=26, w=37)                       # 26 = 4·6 + 2, 37 = 4·9 + 1
    out = shuffle_patches(images, 4, seed=1)
    assert torch.equal(out[:, 24:], images[:, 24:]) and torch.equal(out[:, :, 36:], images[:, :, 36:])
    assert torch.equal(images.flatten().sort().values, out.flatten().sort().values)


def test_shuffle_is_a_function_of_the_seed():
    images = _images()
    assert torch.equal(shuffle_patches(images, 4, seed=3), shuffle_patches(images, 4, seed=3))
    assert not torch.equal(shuffle_patches(images, 4, seed=3), shuffle_patches(images, 4, seed=4))
    perms = patch_permutations(3, 16, seed=3)
    assert not torch.equal(perms[0], perms[1])         # each image of a batch gets its own permutation


def test_grid_one_is_the_identity_and_a_grid_larger_than_the_image_is_refused():
    images = _images(h=8, w=10)
    assert torch.equal(shuffle_patches(images, 1, seed=0), images)
    with pytest.raises(ValueError, match="does not fit a 10x8 image; use 1 to 8"):
        shuffle_patches(images, 9, seed=0)


def test_class_token_removal_drops_exactly_the_first_token_of_each_image():
    features = torch.randn(3, 257, 32)
    out = drop_class_token(features)
    assert out.shape == (3, 256, 32)
    assert torch.equal(out, torch.stack([features[i, 1:] for i in range(3)]))


def naive_attention(q, k, v, heads=HEADS):
    """softmax(QKᵀ/√d)V per head, written out in float64."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


def sdpa(q, k, v):
    c = q.shape[-1]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], HEADS, c // HEADS).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], c)


@pytest.mark.parametrize("scale", [0.0, 0.6, 1.3])
def test_two_path_cross_attention_matches_the_formula_written_out(scale):
    g = torch.Generator().manual_seed(5)
    q, k_txt, v_txt = torch.randn(2, 16, 32, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    k_s, v_s = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    expected = naive_attention(q, k_txt, v_txt) + scale * naive_attention(q, k_s.expand(2, -1, -1), v_s.expand(2, -1, -1))
    out = two_path_cross_attention(q, k_txt, v_txt, k_s, v_s, scale, sdpa)
    assert (out.double() - expected).abs().max() < 1e-5
    if scale == 0.0:
        assert torch.equal(out, sdpa(q, k_txt, v_txt))
