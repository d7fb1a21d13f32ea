"""CSD files, read unchanged from `models/style_discriminators`.

The official training script saves `checkpoint.pth` as a torch dict {"model_state_dict": ...,
"opt_bb", "opt_proj", "iter", "args" (an argparse.Namespace)}; the state dict comes from a
DistributedDataParallel model, so every key starts with `module.`: `module.backbone.conv1.weight`,
`module.backbone.transformer.resblocks.N.attn.in_proj_weight`, ..., `module.backbone.ln_post.*`,
`module.last_layer_style` and `module.last_layer_content` ([width, 768] raw matrices; no
`backbone.proj`, which CSD sets to None). The safetensors variant holds the same tensors flat,
with or without the prefix. The ViT's size is read from the shapes (real CSD: ViT-L/14, width
1024, 24 layers, 224 px), never from the file name.
"""
from __future__ import annotations

import argparse
import os

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..host.model_files import LoadedOnce, register_models_folder
from .csd import CSDModel, ViTConfig

FOLDER = "style_discriminators"
PREFIX = "module."


class StyleDiscriminatorFileError(ValueError):
    """The file is not a CSD checkpoint; the message says what is missing."""


def register_folder() -> None:
    register_models_folder(FOLDER)


register_folder()


def style_discriminator_files() -> list[str]:
    register_folder()
    return folder_paths.get_filename_list(FOLDER)


def _read(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return comfy.utils.load_torch_file(path, safe_load=True)
    # weights_only, with the one non-tensor class the official checkpoint pickles (its args).
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "model_state_dict" in data:
        data = data["model_state_dict"]
    if not isinstance(data, dict):
        raise StyleDiscriminatorFileError("it holds no state dict")
    return data


def csd_state_dict(raw: dict[str, torch.Tensor]) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """The config and our model's state dict for an official CSD state dict (prefix optional)."""
    sd = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    needed = ("backbone.conv1.weight", "backbone.transformer.resblocks.0.attn.in_proj_weight",
              "backbone.positional_embedding", "last_layer_style")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise StyleDiscriminatorFileError(f"missing {', '.join(missing)} (a CSD checkpoint has an OpenAI-CLIP "
                                          "visual tower under backbone.* and the heads last_layer_style / "
                                          "last_layer_content)")
    width, _, patch, _ = sd["backbone.conv1.weight"].shape
    tokens = sd["backbone.positional_embedding"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("backbone.transformer.resblocks."))
    config = ViTConfig(width=width, layers=layers, patch_size=patch, image_size=round((tokens - 1) ** 0.5) * patch,
                       mlp_width=sd["backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                       embed_dim=sd["last_layer_style"].shape[1])
    if sd["last_layer_style"].shape[0] != width:
        raise StyleDiscriminatorFileError(f"last_layer_style is {tuple(sd['last_layer_style'].shape)}, expected "
                                          f"[{width}, D] for a width-{width} tower")
    sd.pop("backbone.proj", None)
    heads = {k: sd.pop(k) for k in list(sd) if not k.startswith("backbone.")}
    backbone = comfy.clip_vision.convert_to_transformers(dict(sd), "backbone.")
    out = {"backbone." + k[len("vision_model."):]: v for k, v in backbone.items() if k.startswith("vision_model.")}
    out["last_layer_style"] = heads["last_layer_style"]
    content = heads.get("last_layer_content")
    # A 'custom' content head (an MLP) is not a matrix; the style head is what CSD measures with.
    out["last_layer_content"] = content if isinstance(content, torch.Tensor) and content.shape == \
        heads["last_layer_style"].shape else torch.zeros_like(heads["last_layer_style"])
    return config, out


class StyleDiscriminator:
    """A loaded CSD model with its ModelPatcher (device placement, as core's CLIP vision). Clones
    of a patched model share it (`__deepcopy__` returns itself)."""

    def __init__(self, name: str, config: ViTConfig, state_dict: dict[str, torch.Tensor]):
        self.name = name
        self.config = config
        self.load_device = comfy.model_management.text_encoder_device()
        offload = comfy.model_management.text_encoder_offload_device()
        # fp32 where compute is fp32 anyway (CPU); the file's precision is kept on accelerators.
        self.dtype = torch.float32 if self.load_device.type == "cpu" else torch.float16
        with torch.inference_mode(False):
            self.model = CSDModel(config, dtype=self.dtype, device=offload)
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise StyleDiscriminatorFileError(f"keys do not match the CSD layout: missing {missing[:4]}, "
                                              f"unexpected {unexpected[:4]}")
        self.model.requires_grad_(False).eval()
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=self.load_device, offload_device=offload)

    def __deepcopy__(self, memo):
        return self

    def load(self) -> CSDModel:
        comfy.model_management.load_models_gpu([self.patcher])
        return self.model

    def style_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit style embeddings of IMAGE [N, H, W, C] in [0, 1]: [N, D] (fp32, on the CPU)."""
        from .csd import preprocess

        model = self.load()
        with torch.no_grad():
            pixels = preprocess(images.to(self.load_device, torch.float32))
            return model.style(pixels).float().cpu()  # fp32 in: manual_cast computes in fp32


def read_style_discriminator(path: str) -> StyleDiscriminator:
    try:
        raw = _read(path)
    except StyleDiscriminatorFileError:
        raise
    except Exception as err:  # damaged or foreign files raise many types
        raise StyleDiscriminatorFileError(f"it could not be read as .pth or .safetensors weights ({err})") from None
    config, sd = csd_state_dict(raw)
    return StyleDiscriminator(os.path.basename(path), config, sd)


_loaded = LoadedOnce(FOLDER, read_style_discriminator)


def load_style_discriminator(filename: str) -> StyleDiscriminator:
    """The discriminator `filename` of models/style_discriminators, read once per file version."""
    return _loaded.load(filename)
