"""Official IP-Adapter files load unchanged; type, base model and CLIP pairing come from shapes."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from stylekit.ip_adapter.files import FOLDER, ip_adapter_files, load_ip_adapter, read_ip_adapter
from stylekit.ip_adapter.model import IMAGE_EMBEDS, PENULTIMATE, IPAdapterFileError
from stylekit.tests.fixtures.registry import IP_ADAPTERS

# (file, kind, family, tokens per image, CLIP input, CLIP width, cross-attention layers), from DESIGN §3.
EXPECTED = {
    "ip-adapter_sd15.safetensors": ("base", "SD1.x", 4, IMAGE_EMBEDS, 1024, 16),
    "ip-adapter_sd15_light_v11.bin": ("base", "SD1.x", 4, IMAGE_EMBEDS, 1024, 16),
    "ip-adapter-plus_sd15.safetensors": ("plus", "SD1.x", 16, PENULTIMATE, 1280, 16),
    "ip-adapter-full-face_sd15.safetensors": ("full-face", "SD1.x", 257, PENULTIMATE, 1280, 16),
    "ip-adapter_sdxl_vit-h.safetensors": ("base", "SDXL", 4, IMAGE_EMBEDS, 1024, 70),
    "ip-adapter-plus_sdxl_vit-h.safetensors": ("plus", "SDXL", 16, PENULTIMATE, 1280, 70),
    "ip-adapter_sdxl.safetensors": ("base", "SDXL", 4, IMAGE_EMBEDS, 1280, 70),
}


def test_every_fixture_is_listed_in_models_ipadapter(comfy_host):
    assert sorted(EXPECTED) == sorted(f.filename for f in IP_ADAPTERS)
    assert set(EXPECTED) <= set(ip_adapter_files())


@pytest.mark.parametrize("filename", sorted(EXPECTED))
def test_type_model_and_clip_vision_are_detected_from_tensor_shapes(comfy_host, filename):
    adapter = load_ip_adapter(filename)
    kind, family, tokens, clip_input, clip_width, layers = EXPECTED[filename]
    assert (adapter.kind, adapter.family, adapter.tokens, adapter.clip_input, adapter.clip_width, len(adapter.kv)) == (
        kind, family, tokens, clip_input, clip_width, layers)
    assert sorted(adapter.kv) == list(range(1, 2 * layers, 2))


def test_detection_ignores_the_file_name(comfy_host, tmp_path):
    """A plus SDXL adapter saved under a base SD1.5 name is still a plus SDXL adapter."""
    source = next(f for f in IP_ADAPTERS if f.filename == "ip-adapter-plus_sdxl_vit-h.safetensors").linked_path()
    renamed = tmp_path / "ip-adapter_sd15.safetensors"
    renamed.symlink_to(source)
    adapter = read_ip_adapter(str(renamed))
    assert (adapter.kind, adapter.family) == ("plus", "SDXL")


def test_bin_and_safetensors_of_the_same_weights_load_alike(comfy_host):
    a, b = load_ip_adapter("ip-adapter_sd15.safetensors"), load_ip_adapter("ip-adapter_sd15_light_v11.bin")
    assert all(torch.equal(a.kv[n][0], b.kv[n][0]) and torch.equal(a.kv[n][1], b.kv[n][1]) for n in a.kv)
    assert all(torch.equal(x, y) for x, y in zip(a.projection.state_dict().values(), b.projection.state_dict().values()))


def test_loading_a_file_twice_shares_one_set_of_weights(comfy_host):
    assert load_ip_adapter("ip-adapter_sd15.safetensors") is load_ip_adapter("ip-adapter_sd15.safetensors")


def _save(path, tensors: dict):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("tensors,message", [
    ({"model.diffusion_model.out.0.weight": torch.ones(4)}, "not an IP-Adapter file"),
    ({"ip_adapter.1.to_k_ip.weight": torch.ones(320, 768), "ip_adapter.1.to_v_ip.weight": torch.ones(320, 768)},
     "not an IP-Adapter file"),
    ({"image_proj.weird.weight": torch.ones(3, 3), "ip_adapter.1.to_k_ip.weight": torch.ones(320, 768),
      "ip_adapter.1.to_v_ip.weight": torch.ones(320, 768)}, "image projection is not one StyleKit knows"),
    ({"image_proj.proj.weight": torch.ones(3072, 1024), "image_proj.norm.weight": torch.ones(768),
      "image_proj.norm.bias": torch.ones(768), "image_proj.proj.bias": torch.ones(3072),
      "ip_adapter.1.to_k_ip.weight": torch.ones(320, 2048), "ip_adapter.1.to_v_ip.weight": torch.ones(320, 2048)},
     "makes 768-wide tokens but its K/V weights read 2048-wide"),
    ({"image_proj.proj.0.weight": torch.ones(1024, 512), "ip_adapter.0.to_q_lora.down.weight": torch.ones(128, 320),
      "ip_adapter.1.to_k_ip.weight": torch.ones(320, 768), "ip_adapter.1.to_v_ip.weight": torch.ones(320, 768)},
     "FaceID"),
])
def test_files_that_are_not_usable_adapters_say_why(tmp_path, comfy_host, tensors, message):
    with pytest.raises(IPAdapterFileError, match=message):
        read_ip_adapter(_save(tmp_path / "x.safetensors", tensors))


def test_a_damaged_file_is_refused_with_a_clear_error(tmp_path, comfy_host):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(IPAdapterFileError, match="could not be read"):
        read_ip_adapter(str(path))


def test_models_ipadapter_is_registered_like_the_incumbent_pack(comfy_host):
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    assert any(p.endswith("models/ipadapter") for p in paths)
    assert {".safetensors", ".bin"} <= set(extensions)
