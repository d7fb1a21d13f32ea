"""An IP-Adapter as loaded from an official file: its projection, its per-layer K/V weights and
what it needs (which CLIP vision output, how wide; which UNet context width).

Everything is read from tensor shapes (DESIGN §3), never from the file name:
  kind          base | plus | full-face, from the image_proj keys;
  context_dim   width of the to_k_ip / to_v_ip input: 768 = SD1.x, 1024 = SD2.x, 2048 = SDXL;
  clip input    base reads the projected image embedding (1024 ViT-H, 1280 ViT-bigG), plus and
                full-face the penultimate hidden states (1280 ViT-H, 1664 ViT-bigG).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .projection import build_projection

IMAGE_EMBEDS = "image_embeds"                    # CLIP vision output read by base adapters
PENULTIMATE = "penultimate_hidden_states"        # ... by plus and full-face adapters

MODEL_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
CLIP_VISION_NAME = {  # (CLIP output, width) -> the vision tower that gives it
    (IMAGE_EMBEDS, 1024): "ViT-H/14", (IMAGE_EMBEDS, 1280): "ViT-bigG/14", (IMAGE_EMBEDS, 768): "ViT-L/14",
    (PENULTIMATE, 1280): "ViT-H/14", (PENULTIMATE, 1664): "ViT-bigG/14", (PENULTIMATE, 1024): "ViT-L/14",
}
CLIP_VISION_FILE = {
    "ViT-H/14": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    "ViT-bigG/14": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
}


class IPAdapterFileError(ValueError):
    """The file is not an IP-Adapter this pack can read; the message says what is wrong."""


@dataclass(frozen=True, eq=False)
class IPAdapter:
    """A loaded IP-Adapter. Immutable and shared: ModelPatcher clones deep-copy their options,
    so __deepcopy__ returns the object itself and the weights exist once however many clones
    hold it."""
    name: str
    kind: str                                       # "base" | "plus" | "full-face" | "styleadapter"
    projection: nn.Module
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # key number -> (to_k_ip, to_v_ip) weights
    tokens: int                                     # image tokens per reference image
    context_dim: int                                # K/V input width = the UNet's cross-attention width
    clip_input: str                                 # IMAGE_EMBEDS or PENULTIMATE
    clip_width: int                                 # width of that CLIP output

    def __deepcopy__(self, memo):
        return self

    @property
    def family(self) -> str:
        return MODEL_FAMILY.get(self.context_dim, f"{self.context_dim}-wide context")

    @property
    def clip_vision(self) -> str:
        return CLIP_VISION_NAME.get((self.clip_input, self.clip_width), f"a {self.clip_width}-wide CLIP vision model")

    def describe(self) -> str:
        label = "StyleAdapter" if self.kind == "styleadapter" else f"IP-Adapter {self.kind}"
        return (f"{self.name}: {label} for {self.family}, {self.tokens} tokens per image, "
                f"{len(self.kv)} cross-attention layers, reads CLIP {self.clip_vision} "
                f"{'image embeds' if self.clip_input == IMAGE_EMBEDS else 'penultimate hidden states'} "
                f"({self.clip_width}-d)")


def split_state_dict(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The {"image_proj": ..., "ip_adapter": ...} form of a .safetensors file's flat keys; a
    .bin file already holds that form and passes through."""
    if isinstance(flat.get("image_proj"), dict) or isinstance(flat.get("ip_adapter"), dict):
        return {"image_proj": dict(flat.get("image_proj", {})), "ip_adapter": dict(flat.get("ip_adapter", {}))}
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value
    return parts


def _kv_weights(ip_layers: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    numbers = sorted({int(k.split(".")[0]) for k in ip_layers if k.endswith(".to_k_ip.weight")})
    kv = {}
    for n in numbers:
        k, v = ip_layers.get(f"{n}.to_k_ip.weight"), ip_layers.get(f"{n}.to_v_ip.weight")
        if k is None or v is None or k.shape != v.shape or k.ndim != 2:
            raise IPAdapterFileError(f"ip_adapter.{n}: to_k_ip and to_v_ip must be two weights of the same 2-D shape")
        kv[n] = (k, v)
    return kv


def ip_adapter_from_state_dict(parts: dict[str, dict[str, torch.Tensor]], name: str = "ip-adapter") -> IPAdapter:
    """Build an IPAdapter from the {"image_proj", "ip_adapter"} dicts of an official file."""
    if not parts.get("ip_adapter") or not parts.get("image_proj"):
        raise IPAdapterFileError("it has no `image_proj.*` and `ip_adapter.*` weights, so it is not an IP-Adapter file")
    if any(".to_k_lora." in k or ".to_q_lora." in k for k in parts["ip_adapter"]):
        raise IPAdapterFileError("it is an IP-Adapter FaceID model (LoRA weights, InsightFace embeddings), "
                                 "which StyleKit does not support")
    kv = _kv_weights(parts["ip_adapter"])
    if not kv:
        raise IPAdapterFileError("it has no `ip_adapter.N.to_k_ip.weight` keys")
    projection_sd = {k: v.float() for k, v in parts["image_proj"].items()}
    try:
        kind, projection = build_projection(projection_sd)
    except (KeyError, RuntimeError) as err:
        raise IPAdapterFileError(f"its image projection is not one StyleKit knows: {err}") from None
    context_dim = next(iter(kv.values()))[0].shape[1]
    if any(k.shape[1] != context_dim for k, _ in kv.values()):
        raise IPAdapterFileError("its to_k_ip weights read different context widths")
    out_width = {"base": lambda m: m.norm.normalized_shape[0], "plus": lambda m: m.norm_out.normalized_shape[0],
                 "full-face": lambda m: m.proj[3].normalized_shape[0]}[kind](projection)
    if out_width != context_dim:
        raise IPAdapterFileError(f"its projection makes {out_width}-wide tokens but its K/V weights read "
                                 f"{context_dim}-wide ones")
    if kind == "base":
        tokens, clip_input, clip_width = projection.tokens, IMAGE_EMBEDS, projection.proj.in_features
    elif kind == "plus":
        tokens, clip_input, clip_width = projection.latents.shape[1], PENULTIMATE, projection.proj_in.in_features
    else:
        tokens, clip_input, clip_width = 257, PENULTIMATE, projection.proj[0].in_features
    return IPAdapter(name=name, kind=kind, projection=projection, kv=kv, tokens=tokens, context_dim=context_dim,
                     clip_input=clip_input, clip_width=clip_width)
