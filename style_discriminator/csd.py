"""The CSD model: OpenAI CLIP's ViT visual tower without its projection, plus two heads.

The official `CSD_CLIP` (learn2phoenix/CSD, `CSD/model.py`) takes CLIP ViT-L/14's visual tower,
copies its projection (a raw [width, out] matrix, applied as `feature @ proj`) into
`last_layer_style` and `last_layer_content`, and sets the tower's `proj` to None. Its forward
returns (feature, normalised content embedding, normalised style embedding); the style head is
the one the paper measures with.

The tower is core's own CLIP vision transformer (`comfy.clip_model.CLIPVision`, the class core's
CLIP vision loader builds), configured from the file's tensor shapes. We run its modules with
out-of-place residual additions: core's layer forward adds in place (`x += attn(norm(x))`), which
autograd refuses to differentiate (the norm saved `x` for backward), and style guidance needs
the gradient with respect to the input image.

Shapes: pixels [N, 3, S, S] (CLIP-normalised) -> feature [N, width] -> embeddings [N, out].
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.clip_model
import comfy.ops
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import optimized_attention_for_device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ViTConfig:
    """The visual tower's size, read from the weights (OpenAI CLIP: heads = width / 64)."""
    width: int
    layers: int
    patch_size: int
    image_size: int
    mlp_width: int
    embed_dim: int          # head output (768 for ViT-L/14)

    @property
    def heads(self) -> int:
        return max(1, self.width // 64)

    def core_config(self) -> dict:
        """The dict core's CLIPVision takes (the keys of its clip_vision_config_*.json)."""
        return {"num_hidden_layers": self.layers, "hidden_size": self.width, "num_attention_heads": self.heads,
                "intermediate_size": self.mlp_width, "hidden_act": "quick_gelu", "model_type": "clip_vision_model",
                "num_channels": 3, "patch_size": self.patch_size, "image_size": self.image_size,
                "layer_norm_eps": 1e-5}


class CSDModel(torch.nn.Module):
    """CLIP visual tower (core's class, keys in core's transformers layout) + style/content heads."""

    def __init__(self, config: ViTConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        self.backbone = comfy.clip_model.CLIPVision(config.core_config(), dtype, device, comfy.ops.manual_cast)
        self.last_layer_style = torch.nn.Parameter(torch.empty(config.width, config.embed_dim, dtype=dtype, device=device),
                                                   requires_grad=False)
        self.last_layer_content = torch.nn.Parameter(torch.empty(config.width, config.embed_dim, dtype=dtype,
                                                                 device=device), requires_grad=False)

    def feature(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's pooled output: post-LayerNorm of the class token (no projection)."""
        tower = self.backbone
        x = tower.pre_layrnorm(tower.embeddings(pixels))
        attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
        for layer in tower.encoder.layers:
            x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
        return tower.post_layernorm(x[:, 0, :])

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature, content embedding, style embedding), embeddings L2-normalised, as CSD_CLIP."""
        feature = self.feature(pixels)
        content = F.normalize(feature @ self.last_layer_content.to(feature.dtype), dim=1, p=2)
        style = F.normalize(feature @ self.last_layer_style.to(feature.dtype), dim=1, p=2)
        return feature, content, style

    def style(self, pixels: torch.Tensor) -> torch.Tensor:
        feature = self.feature(pixels)
        return F.normalize(feature @ self.last_layer_style.to(feature.dtype), dim=1, p=2)


def _centre_band(x: torch.Tensor, new_h: int, new_w: int, size: int) -> tuple[torch.Tensor, int, int]:
    """The centre band of `x` that covers the centre `size` x `size` crop of its resize to
    new_h x new_w, plus the bicubic filter's support, and that band's resized size."""
    h, w = x.shape[-2:]
    scale = max(h / new_h, w / new_w)                 # source pixels per output pixel
    keep = int(size * 2 * scale + 8 * max(scale, 1.0)) + 2  # the crop, doubled, plus the support
    if w > h:
        band = min(w, keep)
        left = (w - band) // 2
        return x[..., left:left + band], new_h, max(size, round(band / scale))
    band = min(h, keep)
    top = (h - band) // 2
    return x[..., top:top + band, :], max(size, round(band / scale)), new_w


def preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """CSD's evaluation preprocessing (learn2phoenix/CSD and InstantStyle-Plus's reference
    embeddings), differentiable: bicubic resize of the shorter side to `size` (antialiased, as
    torchvision's Resize), centre crop, CLIP mean/std. Used for reference embeddings and the
    similarity node; guidance scores its decoded predictions with `guidance_preprocess`.

    Shapes: images [N, H, W, C] in [0, 1] (ComfyUI IMAGE) -> [N, 3, size, size].
    """
    x = images[..., :3].movedim(-1, 1)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        # torchvision's Resize(int): the shorter side becomes `size`, the longer one int(size·long/short).
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        if new_h * new_w > 4 * size * size:
            # Extreme aspect ratios (a 1x16384 image would be resized to 224x3.7M, ~10 GB): crop
            # the centre of the long side first, keeping the filter's support on both sides, and
            # resize only that. Ratios up to 4:1 take the exact path below, unchanged.
            x, new_h, new_w = _centre_band(x, new_h, new_w, size)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # as CenterCrop
        x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def guidance_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The preprocessing InstantStyle-Plus's guidance applies to its decoded prediction,
    differentiable: `transforms.Resize(size)` on a tensor (bilinear, antialiased, shorter side to
    `size`), no crop, CLIP mean/std. The official code only ever feeds square images (a ViT with a
    fixed position table takes no other); a non-square one is centre-cropped here (ours).

    Shapes: images [N, H, W, C] in [0, 1] (ComfyUI IMAGE) -> [N, 3, size, size].
    """
    x = images[..., :3].movedim(-1, 1)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
