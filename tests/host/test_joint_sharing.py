"""DiT StyleAligned and Visual Style Prompting on a clone (patching/joint_sharing.py), on core's tiny
Flux (RoPE, double and single blocks) and MMDiT (SD3.5 layout, RMS QK-norm).

The attention outputs of the patched model are checked against the formula written in
tests/unit/test_joint_shared_attention_math.py (fp64, per row and head): a recording override
installed *on top of* the patch sees the raw q, k, v core hands over and the patch's output. The
reference rows are computed here from cond_or_uncond (first row of each chunk), the image tokens
from the conditioning and latent sizes; blocks not chosen must give plain attention.
"""
from __future__ import annotations

import math

import comfy.sample
import comfy.samplers
import pytest
import torch

from stylekit.patching.joint_sharing import (ALIGNED, OFFSET, STYLE_ALIGNED, VISUAL_STYLE, JointSharingSettings,
                                             default_blocks, install_joint_sharing, resolve_blocks)
from stylekit.tests.host.sharing_support import cond_and_uncond_apart
from stylekit.tests.support.tiny_dits import dit_conditioning, tiny_flux, tiny_mmdit
from stylekit.tests.unit.test_joint_shared_attention_math import reference_shared, reference_swapped

SIDE = 8                       # latent side; patch 2 -> 16 image tokens
IMAGE = (SIDE // 2) ** 2
TEXT = 8                       # dit_conditioning's tokens


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=1)


@pytest.fixture(scope="module")
def mmdit():
    return tiny_mmdit(seed=2, depth=2)


def recorder(model):
    """Install a recording override on top of whatever `model` (a clone) has; returns the call list."""
    calls = []
    options = model.model_options.setdefault("transformer_options", {})
    below = options.get("optimized_attention_override")

    def override(func, *args, **kwargs):
        out = below(func, *args, **kwargs) if below is not None else func(*args, **kwargs)
        o = kwargs.get("transformer_options", {})
        calls.append(dict(q=args[0], k=args[1], v=args[2], out=out, split=kwargs.get("skip_reshape", False),
                          heads=args[3] if len(args) > 3 else kwargs["heads"], where=(o.get("block_type"), o.get("block_index"))))
        return out

    options["optimized_attention_override"] = override
    return calls


def _heads(t, heads, split):  # -> [B, H, L, D]; core's MMDiT hands v as [B, L, H, D], q and k as [B, L, H·D]
    if split:
        return t
    return (t if t.ndim == 4 else t.unflatten(-1, (heads, -1))).transpose(1, 2)


def chunk_refs(flags, per_chunk):
    return [c * per_chunk for c in range(len(flags)) for _ in range(per_chunk)]


def apply(model, flags, per_chunk, seed=0, attention_mask=None):
    """One model call the way the sampler makes it: chunks per cond_or_uncond, every chunk the batch."""
    batch = len(flags) * per_chunk
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, SIDE, SIDE, generator=g)
    cond = dit_conditioning(model, batch=batch, tokens=TEXT, seed=seed)[0]
    sigma = torch.full((batch,), 0.6)
    options = {**model.model_options["transformer_options"], "cond_or_uncond": list(flags), "sigmas": sigma,
               "wrappers": model.wrappers}  # the sampler merges the patcher's wrappers in the same way
    extra = {"y": cond[1]["pooled_output"]}
    if hasattr(model.model.diffusion_model, "double_blocks"):
        extra["guidance"] = torch.full((batch,), 3.5)
    if attention_mask is not None:
        extra["attention_mask"] = attention_mask
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=cond[0], transformer_options=options, **extra)


LAYOUTS = {"one chunk": [0], "together": [0, 1], "reversed": [1, 0]}


@pytest.mark.parametrize("per_chunk", [2, 3, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_patched_joint_attention_matches_the_formula(family, layout, per_chunk, flux, mmdit):
    base = flux if family == "flux" else mmdit
    blocks = "double 1, single 0" if family == "flux" else "joint 1"
    shared_where = {("double", 1), ("single", 0)} if family == "flux" else {1}
    for method in (STYLE_ALIGNED, VISUAL_STYLE):
        settings = JointSharingSettings(method, resolve_blocks(base, blocks, method), adain_values=True,
                                        shared_score_scale=1.1, shared_score_shift=0.3)
        m = install_joint_sharing(base, settings)
        calls = recorder(m)
        apply(m, LAYOUTS[layout], per_chunk)
        assert len(calls) == (4 if family == "flux" else 2)
        refs = chunk_refs(LAYOUTS[layout], per_chunk)
        image = slice(TEXT, TEXT + IMAGE)
        for n, c in enumerate(calls):
            where = c["where"] if family == "flux" else n
            q, k, v = (_heads(c[t], c["heads"], c["split"]) for t in "qkv")
            if where not in shared_where:
                want = reference_shared(q, k, v, list(range(q.shape[0])), image)
            elif method == STYLE_ALIGNED:
                want = reference_shared(q, k, v, refs, image, av=True, scale=1.1, shift=0.3)
            else:
                want = reference_swapped(q, k, v, refs, image)
            got = c["out"].unflatten(-1, (c["heads"], -1)).transpose(1, 2).double()
            assert (got - want).abs().max() < 1e-5, (method, where)
            assert q.shape[2] == TEXT + IMAGE


@pytest.mark.parametrize("layout", ["together", "reversed"])
@pytest.mark.parametrize("method", [STYLE_ALIGNED, VISUAL_STYLE])
def test_a_text_attention_mask_is_combined_with_the_shared_keys_not_replaced(flux, method, layout):
    # Core's Flux hands the conditioning's attention_mask ([B, L, L], additive; e.g. StyleModelApply's
    # attn_bias) to every attention: each row keeps it over its own joint keys, the reference's
    # image keys are allowed (+β); rows outside shared blocks get core's plain masked attention.
    flags, per_chunk = LAYOUTS[layout], 3
    batch = len(flags) * per_chunk
    g = torch.Generator().manual_seed(3)
    mask = torch.randn(batch, TEXT + IMAGE, TEXT + IMAGE, generator=g)
    mask[:, :, 2:TEXT] = float("-inf")            # text keys 2.. blocked for every query: a padded prompt
    m = install_joint_sharing(flux, JointSharingSettings(method, resolve_blocks(flux, "double 1, single 0", method),
                                                         shared_score_shift=0.3))
    calls = recorder(m)
    apply(m, flags, per_chunk, attention_mask=mask)
    refs, image = chunk_refs(flags, per_chunk), slice(TEXT, TEXT + IMAGE)
    own = lambda i, h: mask[i].double()
    for c in calls:
        q, k, v = c["q"], c["k"], c["v"]
        if c["where"] not in {("double", 1), ("single", 0)}:
            want = reference_shared(q, k, v, list(range(batch)), image, masks=own)
        elif method == STYLE_ALIGNED:
            want = reference_shared(q, k, v, refs, image, shift=0.3, masks=own)
        else:
            want = reference_swapped(q, k, v, refs, image, masks=own)
        got = c["out"].unflatten(-1, (c["heads"], -1)).transpose(1, 2).double()
        assert (got - want).abs().max() < 1e-5, c["where"]
    unmasked = reference_shared(q, k, v, list(range(batch)), image)
    assert (got - unmasked).abs().max() > 1e-3  # the mask mattered


def test_offset_positions_rotate_the_reference_keys_by_one_grid_width(flux):
    # Flux's rotation of pair j of axis a by angle p·θ^(−2j/d_a), written as complex numbers here.
    blocks = resolve_blocks(flux, "single 1", STYLE_ALIGNED)
    m = install_joint_sharing(flux, JointSharingSettings(STYLE_ALIGNED, blocks, reference_positions=OFFSET))
    calls = recorder(m)
    apply(m, [0], 2)
    c = [c for c in calls if c["where"] == ("single", 1)][0]
    axes, grid = flux.model.diffusion_model.params.axes_dim, SIDE // 2
    freqs = torch.cat([torch.zeros(d // 2, dtype=torch.float64) if a < len(axes) - 1 else
                       torch.tensor([10000.0 ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)
                       for a, d in enumerate(axes)])
    phase = torch.polar(torch.ones_like(freqs), grid * freqs)

    def moved(r, h):
        keys = c["k"][r, h, TEXT:TEXT + IMAGE].double()
        return torch.view_as_real(torch.view_as_complex(keys.unflatten(-1, (-1, 2)).contiguous()) * phase).flatten(-2)

    want = reference_shared(c["q"], c["k"], c["v"], [0, 0], slice(TEXT, TEXT + IMAGE), shared_keys=moved)
    got = c["out"].unflatten(-1, (2, -1)).transpose(1, 2).double()
    assert (got - want).abs().max() < 1e-5


def sample(model, batch, cfg, seed=7):
    conds = (dit_conditioning(model, seed=1, tokens=TEXT), dit_conditioning(model, seed=2, tokens=TEXT))
    noise = torch.randn(batch, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3).cpu()
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, *conds,
                                      torch.zeros_like(noise), disable_pbar=True, seed=0)


@pytest.mark.parametrize("family,cfg", [("flux", 1.0), ("flux", 2.0), ("sd35", 3.0)])
@pytest.mark.parametrize("method", [STYLE_ALIGNED, VISUAL_STYLE])
def test_reference_row_is_the_unpatched_models_and_the_next_plain_prompt_is_untouched(family, cfg, method, flux,
                                                                                      mmdit, monkeypatch):
    base = flux if family == "flux" else mmdit
    plain = sample(base, 3, cfg)
    m = install_joint_sharing(base, JointSharingSettings(method, resolve_blocks(base, "all", method),
                                                         shared_score_shift=math.log(2) if method == STYLE_ALIGNED else 0.0))
    shared = sample(m, 3, cfg)
    scale = plain.abs().max()
    assert (shared[0] - plain[0]).abs().max() < 1e-5 * scale      # the reference row stays plain
    assert (shared[1:] - plain[1:]).abs().max() > 1e-3 * scale     # the targets change
    if cfg > 1.0:
        with cond_and_uncond_apart(m, monkeypatch, 3):
            apart = sample(m, 3, cfg)
        assert (apart - shared).abs().max() < 1e-4 * scale
    assert torch.equal(sample(base, 3, cfg), plain)                # the input model is untouched


def test_defaults_name_blocks_of_the_model(flux, mmdit):
    assert default_blocks(flux, STYLE_ALIGNED) == "single"
    assert default_blocks(flux, VISUAL_STYLE) == "double 0-1"      # the tiny Flux has no block 17, 18 or single 6+
    assert default_blocks(mmdit, STYLE_ALIGNED) == "joint"
    assert default_blocks(mmdit, VISUAL_STYLE) == "joint 1-1"
    assert resolve_blocks(flux, "", STYLE_ALIGNED) == (("single", 0), ("single", 1))


def test_the_stylekit_nodes_take_dit_models(flux, mmdit):
    from stylekit.nodes.style_aligned import StyleKitStyleAligned
    from stylekit.nodes.visual_style_prompting import StyleKitVisualStylePrompting

    out = StyleKitStyleAligned.execute(flux, True, True, True, False, 1.0, 0.0, "custom", "", 0.0, 0.0, 1.0,
                                       reference_positions="offset").result[0]
    override = out.model_options["transformer_options"]["optimized_attention_override"]
    assert override.settings.blocks == (("single", 0), ("single", 1))
    assert override.settings.reference_positions == OFFSET
    out = StyleKitVisualStylePrompting.execute(mmdit, "highest-resolution up block", "", 0.0, 1.0, 0.0, 3).result[0]
    assert out.model_options["transformer_options"]["optimized_attention_override"].settings.blocks == (("joint", 1),)
    with pytest.raises(ValueError, match="StyleKit Visual Style Prompting: input 'blocks'"):
        StyleKitVisualStylePrompting.execute(mmdit, "up blocks only", "", 0.0, 1.0, 0.0, 3)
    with pytest.raises(ValueError, match="input 'custom_blocks'"):
        StyleKitStyleAligned.execute(flux, True, True, True, False, 1.0, 0.0, "custom", "output 3", 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="input 'shared_score_shift'"):
        StyleKitStyleAligned.execute(flux, True, True, True, False, 1.0, float("nan"), "custom", "", 0.0, 0.0, 1.0)


def test_a_block_replace_already_there_still_runs_inside_ours(flux):
    # Another pack's replace on a shared block (e.g. a DiT IP-Adapter) keeps running, and is moved and
    # loaded through ours.
    m = flux.clone()
    ran, moved = [], []

    class Theirs:
        def __call__(self, args, extra):
            ran.append(args["transformer_options"]["block_index"])
            return extra["original_block"](args)

        def to(self, device):
            moved.append(device)
            return self

        def models(self):
            return ["their model"]

    m.set_model_patch_replace(Theirs(), "dit", "single_block", 0)
    shared = install_joint_sharing(m, JointSharingSettings(STYLE_ALIGNED, resolve_blocks(m, "single", STYLE_ALIGNED)))
    ours = shared.model_options["transformer_options"]["patches_replace"]["dit"][("single_block", 0)]
    assert ours.to("cpu") is ours and moved == ["cpu"] and ours.models() == ["their model"]
    apply(shared, [0], 2)
    assert ran == [0]
