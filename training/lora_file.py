"""LoRA files in the kohya format core's LoraLoader reads, saved under models/loras atomically.

Keys follow kohya-ss sd-scripts, the de-facto standard every UI loads: per adapted weight
`lora_unet_<module path with dots as underscores>` + `.lora_down.weight` [rank, in],
`.lora_up.weight` [out, rank] and `.alpha` (scale alpha / rank). The module path is the one
sd-scripts trains on: diffusers names for SD1.x/2.x ("lora_unet_up_blocks_1_attentions_0_…"),
the original (LDM) names for SDXL ("lora_unet_output_blocks_0_1_…"). Core's key map accepts both.

A file is written to a hidden temporary name in the target folder and renamed at the end, so an
interrupted prompt or a crash mid-write never leaves a half-written `.safetensors` where loaders
look.
"""
from __future__ import annotations

import os
from pathlib import Path

import comfy.model_base
import comfy.utils
import safetensors.torch
import torch

LORA_SUFFIX = ".safetensors"
DIFFUSION_PREFIX = "diffusion_model."


def _ldm_to_diffusers(unet_config: dict) -> dict[str, str]:
    """LDM weight path ("input_blocks.1.1.….weight") -> diffusers path, from core's own table."""
    return {ldm: diffusers for diffusers, ldm in comfy.utils.unet_to_diffusers(unet_config).items()}


def kohya_names(model, weight_keys: list[str]) -> dict[str, str]:
    """The kohya LoRA name (without suffix) of each BaseModel weight key of a UNet model."""
    base = getattr(model, "model", model)
    sgm_names = isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))
    to_diffusers = {} if sgm_names else _ldm_to_diffusers(base.model_config.unet_config)
    names = {}
    for key in weight_keys:
        if not key.startswith(DIFFUSION_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"{key} is not a UNet weight")
        path = key[len(DIFFUSION_PREFIX):]
        path = to_diffusers.get(path, path)
        names[key] = "lora_unet_" + path[:-len(".weight")].replace(".", "_")
    return names


def lora_state_dict(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """kohya state dict of `factors`: weight key -> (up [out, rank], down [rank, in])."""
    names = kohya_names(model, list(factors))
    sd: dict[str, torch.Tensor] = {}
    for key, (up, down) in factors.items():
        name = names[key]
        sd[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        sd[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def normalized_lora_name(name: str) -> str:
    """`name` as a path relative to models/loras ending in .safetensors; ValueError if it would
    leave that folder or is empty."""
    cleaned = name.strip().replace("\\", "/")
    if cleaned.lower().endswith(LORA_SUFFIX):
        cleaned = cleaned[:-len(LORA_SUFFIX)]
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if not parts or cleaned.startswith("/") or ".." in parts or ":" in cleaned:
        raise ValueError(f"{name!r} is not a file name inside models/loras; use a relative name such as "
                         "'StyleKit/dreambooth_sks_dog'")
    return "/".join(parts) + LORA_SUFFIX


def lora_path(name: str) -> Path:
    """Where the LoRA `name` goes: the first models/loras folder ComfyUI knows."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / normalized_lora_name(name)


def save_atomically(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write to a hidden temporary file beside `path`, then rename over it; nothing half-written
    ever carries the final name (the temporary name has no .safetensors suffix, so no loader
    lists it, and it is removed if writing fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        safetensors.torch.save_file(state_dict, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def load_lora_file(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a file in models/loras."""
    import folder_paths

    path = folder_paths.get_full_path_or_raise("loras", name)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return comfy.utils.load_torch_file(path, safe_load=True), metadata
