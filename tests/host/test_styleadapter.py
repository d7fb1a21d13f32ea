"""StyleAdapter on the real host: the checkpoint interface is detected and loaded, the decoupling
stages act on real CLIP features, several references merge as documented, and the patched
cross-attention layer is the two-path formula."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from stylekit.ip_adapter.encode import CombineError, ImageEmbeds, encode_images, image_tokens
from stylekit.ip_adapter.files import FOLDER, load_ip_adapter, read_ip_adapter
from stylekit.ip_adapter.model import IMAGE_EMBEDS, PENULTIMATE, IPAdapterFileError
from stylekit.nodes.styleadapter import StyleKitRemoveClassToken, StyleKitStyleAdapter
from stylekit.patching.attention_replace import installed_replace
from stylekit.host.block_map import block_map
from stylekit.host.block_weights import CUSTOM
from stylekit.patching.ip_adapter import IPAdapterPatch
from stylekit.styleadapter.stages import (ClassTokenError, StyleAdapterSettings, apply_style_adapter,
                                          remove_class_token, style_tokens)
from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H, STYLE_ADAPTER_SD15
from stylekit.tests.support.host import load_clip_vision

STYLE = STYLE_ADAPTER_SD15.filename
PLUS, FULL_FACE, BASE = "ip-adapter-plus_sd15.safetensors", "ip-adapter-full-face_sd15.safetensors", "ip-adapter_sd15.safetensors"


@pytest.fixture(autouse=True)
def _as_comfy_runs_prompts():
    with torch.inference_mode():
        yield


@pytest.fixture
def vit_h(comfy_host):
    return load_clip_vision(CLIP_VISION_VIT_H.filename)


def _images(n: int, seed: int = 0, side: int = 224) -> torch.Tensor:
    return torch.rand(n, side, side, 3, generator=torch.Generator().manual_seed(seed))


def _features(n: int, width: int = 1280, seed: int = 0) -> ImageEmbeds:
    g = torch.Generator().manual_seed(seed)
    return ImageEmbeds(torch.randn(n, 257, width, generator=g), torch.randn(n, 257, width, generator=g), PENULTIMATE)


def test_a_checkpoint_in_the_documented_layout_loads_as_a_styleadapter(sd15):
    adapter = load_ip_adapter(STYLE)
    assert (adapter.kind, adapter.family, adapter.tokens, adapter.clip_input, adapter.clip_width) == (
        "styleadapter", "SD1.x", 8, PENULTIMATE, 1280)
    assert "StyleAdapter for SD1.x, 8 tokens" in adapter.describe()
    raw = safetensors.torch.load_file(str(STYLE_ADAPTER_SD15.linked_path()))
    keys = sorted(k for site in block_map(sd15.model) for k in site.ip_adapter_keys)
    assert sorted(adapter.kv) == keys
    for n in keys:  # the learned λ of each layer is folded into its V weights
        k, v = adapter.kv[n]
        assert torch.equal(k, raw[f"style_adapter.{n}.to_k_style.weight"])
        lam = raw[f"style_adapter.{n}.scale"].float()
        assert torch.allclose(v, raw[f"style_adapter.{n}.to_v_style.weight"].float() * lam)


def test_a_file_with_style_emb_keys_in_another_layout_is_refused_with_the_reason(comfy_host, tmp_path):
    raw = safetensors.torch.load_file(str(STYLE_ADAPTER_SD15.linked_path()))
    broken = {k: v for k, v in raw.items() if k != "style_emb.norm_out.weight"}
    safetensors.torch.save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(IPAdapterFileError, match="documented StyleAdapter layout"):
        read_ip_adapter(str(tmp_path / "broken.safetensors"))
    no_kv = {k: v for k, v in raw.items() if k.startswith("style_emb.")}
    safetensors.torch.save_file(no_kv, str(tmp_path / "no_kv.safetensors"))
    with pytest.raises(IPAdapterFileError, match="no `style_adapter.N.to_k_style.weight`"):
        read_ip_adapter(str(tmp_path / "no_kv.safetensors"))


def test_class_token_removal_drops_one_token_per_image_from_real_clip_features(vit_h):
    embeds = encode_images(vit_h, _images(2), PENULTIMATE)
    without = remove_class_token(embeds)
    assert without.cond.shape == without.uncond.shape == (2, 256, 1280) and not without.class_token
    assert torch.equal(without.cond, embeds.cond[:, 1:]) and torch.equal(without.uncond, embeds.uncond[:, 1:])
    with pytest.raises(ClassTokenError, match="already removed"):
        remove_class_token(without)
    with pytest.raises(ClassTokenError, match="pooled.*no class token"):
        remove_class_token(encode_images(vit_h, _images(1), IMAGE_EMBEDS))


@pytest.mark.parametrize("filename,combine,tokens", [
    (PLUS, "concat", 3 * 16), (PLUS, "average", 16), (PLUS, "joint", 16),
    (FULL_FACE, "concat", 3 * 256), (FULL_FACE, "average", 256), (FULL_FACE, "joint", 3 * 256),
    (STYLE, "concat", 3 * 8), (STYLE, "average", 8), (STYLE, "joint", 8),
])
def test_three_references_give_the_documented_token_count(comfy_host, filename, combine, tokens):
    adapter = load_ip_adapter(filename)
    embeds = remove_class_token(_features(3))
    out = image_tokens(adapter, embeds, combine)
    assert out.cond.shape == out.uncond.shape == (1, tokens, adapter.context_dim)


@pytest.mark.parametrize("filename", [PLUS, STYLE])
def test_joint_projects_the_references_sequences_as_one_and_average_their_mean(comfy_host, filename):
    adapter = load_ip_adapter(filename)
    embeds = remove_class_token(_features(3, seed=4))
    one_sequence = torch.cat([embeds.cond[0], embeds.cond[1], embeds.cond[2]])[None]   # [1, 3·256, H]
    assert torch.allclose(image_tokens(adapter, embeds, "joint").cond, adapter.projection(one_sequence), atol=1e-5)
    mean = (embeds.cond[0] + embeds.cond[1] + embeds.cond[2])[None] / 3
    assert torch.allclose(image_tokens(adapter, embeds, "average").cond, adapter.projection(mean), atol=1e-5)
    concat = image_tokens(adapter, embeds, "concat").cond
    assert torch.allclose(concat[:, adapter.tokens:2 * adapter.tokens], adapter.projection(embeds.cond[1:2]), atol=1e-5)


def test_joint_is_refused_for_global_image_embeds(comfy_host):
    adapter = load_ip_adapter(BASE)
    embeds = ImageEmbeds(torch.randn(2, 1024), torch.zeros(2, 1024), IMAGE_EMBEDS)
    with pytest.raises(CombineError, match="one global image embedding per image; use 'concat' or 'average'"):
        image_tokens(adapter, embeds, "joint")


def naive_attention(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.double().reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("filename", [STYLE, PLUS])
def test_the_patched_layer_is_the_two_path_formula_with_its_block_scale(sd15, vit_h, filename):
    """F = Attn(Q, K_txt, V_txt) + λ·w_block·Attn(Q, c·W'k, c·W'v), uncond rows with the uncond tokens;
    K/V weights read from the file itself (StyleAdapter: V times the file's learned scale)."""
    import folder_paths

    adapter = load_ip_adapter(filename)
    settings = StyleAdapterSettings(style_scale=0.8, shuffle_grid=4, shuffle_seed=2, merge="joint",
                                    blocks=CUSTOM, block_weights='{"output 4": 0.5, "middle 0": 1.0}')
    images = _images(2, seed=3)
    m = apply_style_adapter(sd15.model, adapter, vit_h, images, settings)
    bm = block_map(sd15.model)
    patched = {layer for layer in bm.layers() if isinstance(installed_replace(m, "attn2", layer), IPAdapterPatch)}
    assert patched == {("output", 4, 0), ("middle", 0, 0)}

    site = bm.site(("output", 4))
    raw = safetensors.torch.load_file(folder_paths.get_full_path(FOLDER, filename))
    key = site.ip_adapter_keys[0]
    if adapter.kind == "styleadapter":
        w_k = raw[f"style_adapter.{key}.to_k_style.weight"].double()
        w_v = raw[f"style_adapter.{key}.to_v_style.weight"].double() * raw[f"style_adapter.{key}.scale"].double()
    else:
        w_k, w_v = raw[f"ip_adapter.{key}.to_k_ip.weight"].double(), raw[f"ip_adapter.{key}.to_v_ip.weight"].double()
    tokens = style_tokens(adapter, vit_h, images, settings)
    assert tokens.cond.shape[1] == adapter.tokens  # two references, one token set

    g = torch.Generator().manual_seed(11)
    c = site.channels
    q, k, v = torch.randn(4, 64, c, generator=g), torch.randn(4, 77, c, generator=g), torch.randn(4, 77, c, generator=g)
    patch = installed_replace(m, "attn2", ("output", 4, 0))
    out = patch(q, k, v, {"n_heads": site.heads, "cond_or_uncond": [1, 0]}).double()

    expected = naive_attention(q, k, v, site.heads)
    for rows, t in ((slice(0, 2), tokens.uncond), (slice(2, 4), tokens.cond)):
        k_s, v_s = (t.double() @ w_k.T).expand(2, -1, -1), (t.double() @ w_v.T).expand(2, -1, -1)
        expected[rows] += 0.8 * 0.5 * naive_attention(q[rows], k_s, v_s, site.heads)
    assert (out - expected).abs().max() < 1e-5


def test_style_scale_zero_installs_no_patch(sd15, vit_h):
    m = apply_style_adapter(sd15.model, load_ip_adapter(STYLE), vit_h, _images(1), StyleAdapterSettings(style_scale=0.0))
    assert not any(isinstance(installed_replace(m, "attn2", layer), IPAdapterPatch) for layer in block_map(m).layers())


NODE_INPUTS = dict(style_scale=1.0, shuffle_grid=1, shuffle_seed=0, remove_class_token=True, merge="joint",
                   start_percent=0.0, end_percent=1.0, blocks="all blocks", block_weights="")


@pytest.mark.parametrize("filename,change,input_name,message", [
    (BASE, {}, "remove_class_token", "no class token to remove.*set remove_class_token to false"),
    (BASE, dict(remove_class_token=False), "merge", "use 'concat' or 'average'"),
    (STYLE, dict(shuffle_grid=64), "shuffle_grid", "does not fit a 32x32 image; use at most 32"),
])
def test_the_styleadapter_node_names_the_input_to_fix(sd15, vit_h, filename, change, input_name, message):
    inputs = dict(NODE_INPUTS, **change)
    with pytest.raises(ValueError, match=rf"^StyleKit StyleAdapter: input '{input_name}': .*{message}"):
        StyleKitStyleAdapter.execute(model=sd15.model, ipadapter=load_ip_adapter(filename), clip_vision=vit_h,
                                     image=_images(1, side=32), **inputs)


def test_remove_class_token_node_names_base_embeds(comfy_host):
    embeds = ImageEmbeds(torch.zeros(1, 1024), torch.zeros(1, 1024), IMAGE_EMBEDS)
    with pytest.raises(ValueError, match=r"^StyleKit Remove Class Token: input 'embeds': .*plus, full-face, StyleAdapter"):
        StyleKitRemoveClassToken.execute(embeds=embeds)
