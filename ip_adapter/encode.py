"""The encode stages of an image prompt, each public so other methods can work between them:

    images --encode_images--> ImageEmbeds --(transforms)--> ImageEmbeds --image_tokens--> ImageTokens
    (IMAGE [N,H,W,3])         (CLIP vision features,                      (projected tokens in the
                               cond + uncond)                              UNet's context width)

Transforms between the stages act on ImageEmbeds: InstantStyle's content subtraction
(content.py), StyleAdapter's class-token removal (styleadapter/decoupling.py). Several references
are merged when they are projected (image_tokens' `combine`).

Unconditional features follow the reference implementations (tencent-ailab/IP-Adapter and
diffusers), not the incumbent ComfyUI pack:
  - global image embeds (base adapters): zeros, so the uncond tokens are projection(0);
  - hidden states (plus, full-face): the CLIP encoding of an all-zero *normalised* image, i.e.
    `torch.zeros_like(pixel_values)` after CLIP normalisation (a mean-grey picture). The incumbent
    pack encodes a black image instead (zeros before normalisation).
A negative image, when given, replaces the unconditional reference.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import comfy.model_management
import torch

from .model import CLIP_VISION_FILE, CLIP_VISION_NAME, IMAGE_EMBEDS, PENULTIMATE, IPAdapter

COMBINE = ("concat", "average", "joint")


class ClipVisionMismatch(ValueError):
    """The CLIP vision model does not give the features the adapter was trained on."""


class CombineError(ValueError):
    """The references cannot be merged that way for these features; the message says why."""


@dataclass(frozen=True, eq=False)
class ImageEmbeds:
    """CLIP vision features of N reference images, with the unconditional features beside them.

    source IMAGE_EMBEDS: cond, uncond [N, D] (projected global embedding);
    source PENULTIMATE:  cond, uncond [N, S, H] (penultimate hidden states, S = 257 with the
    class token first; class_token False once it was removed, S = 256). Shared, never mutated:
    deepcopy returns the object.
    """
    cond: torch.Tensor
    uncond: torch.Tensor
    source: str
    class_token: bool = True

    def __post_init__(self):
        if self.cond.shape != self.uncond.shape:
            raise ValueError(f"cond {tuple(self.cond.shape)} and uncond {tuple(self.uncond.shape)} features differ in shape")

    def __deepcopy__(self, memo):
        return self

    @property
    def width(self) -> int:
        return self.cond.shape[-1]

    @property
    def count(self) -> int:
        return self.cond.shape[0]


@dataclass(frozen=True, eq=False)
class ImageTokens:
    """Image tokens of one adapter application. cond, uncond: [1, T, C]."""
    cond: torch.Tensor
    uncond: torch.Tensor

    def __deepcopy__(self, memo):
        return self


def clip_vision_widths(clip_vision) -> dict[str, int]:
    """The widths of a core CLIP_VISION model's outputs: image embeds and hidden states."""
    model = clip_vision.model
    hidden = model.vision_model.post_layernorm.normalized_shape[0]
    return {IMAGE_EMBEDS: getattr(model.visual_projection, "out_features", hidden), PENULTIMATE: hidden}


def check_clip_vision(adapter: IPAdapter, clip_vision) -> None:
    """Raise ClipVisionMismatch unless clip_vision gives what the adapter reads, at its width."""
    have = clip_vision_widths(clip_vision)[adapter.clip_input]
    if have == adapter.clip_width:
        return
    what = "image embeds" if adapter.clip_input == IMAGE_EMBEDS else "hidden states"
    given = CLIP_VISION_NAME.get((adapter.clip_input, have), "another model")
    needed = adapter.clip_vision
    hint = f" (load {CLIP_VISION_FILE[needed]})" if needed in CLIP_VISION_FILE else ""
    raise ClipVisionMismatch(
        f"{adapter.name} needs {adapter.clip_width}-d CLIP {what} ({needed}) but this CLIP vision model gives "
        f"{have}-d ({given}); load the {needed} vision model{hint} with Load CLIP Vision")


# Unconds that depend only on the vision model (an all-zero normalised image; a black image, which
# is black at any size after CLIP's resize and crop) are computed once per loaded model, not at
# every apply: a CLIP forward each time (about 10 s for ViT-L on CPU). Keyed weakly, so an unloaded
# model takes its entries with it; callers get a copy, so nothing they do reaches the cache.
_UNCOND_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_uncond(clip_vision, key: tuple, compute) -> torch.Tensor:
    per_model = _UNCOND_CACHE.setdefault(clip_vision, {})
    if key not in per_model:
        per_model[key] = compute()
    return per_model[key].clone()


def _zero_image_features(clip_vision, count: int) -> torch.Tensor:
    """Penultimate hidden states of an all-zero normalised image (the reference uncond), [count, S, H]."""
    def compute() -> torch.Tensor:
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        size = clip_vision.image_size
        pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
        hidden = clip_vision.model(pixel_values=pixels, intermediate_output=-2)[1]
        return hidden.to(comfy.model_management.intermediate_device()).float()
    return _cached_uncond(clip_vision, ("zero-normalised",), compute).expand(count, -1, -1)


def _black_image_features(clip_vision, source: str, crop: bool) -> torch.Tensor:
    """The features of a black picture (zeros before CLIP's normalisation), [1, ...]."""
    size = clip_vision.image_size
    return _cached_uncond(clip_vision, ("black", source, crop),
                          lambda: _encode(clip_vision, torch.zeros(1, size, size, 3), source, crop))


def _encode(clip_vision, images: torch.Tensor, source: str, crop: bool) -> torch.Tensor:
    return clip_vision.encode_image(images, crop=crop)[source].float()


@torch.no_grad()  # inference only; with autograd on, core's fp16->fp32 weight casts stay alive (GBs)
def encode_images(clip_vision, images: torch.Tensor, source: str, negative_images: torch.Tensor | None = None,
                  crop: bool = True, zero_uncond: bool = False, black_uncond: bool = False) -> ImageEmbeds:
    """CLIP vision features of a batch of reference images (IMAGE [N, H, W, 3]) for an adapter that
    reads `source`, with the reference-implementation uncond, or the negative images' features.
    `zero_uncond`: zero features whatever the source (InstantX SD3.5's uncond), so no zero image is encoded;
    `black_uncond`: a black image's features (XLabs Flux, as diffusers' Flux pipeline encodes it)."""
    if source not in (IMAGE_EMBEDS, PENULTIMATE):
        raise ValueError(f"unknown CLIP vision output {source!r}")
    cond = _encode(clip_vision, images, source, crop)
    if negative_images is not None:
        if negative_images.shape[0] not in (1, cond.shape[0]):
            raise ValueError(f"{negative_images.shape[0]} negative images for {cond.shape[0]} reference images: "
                             "give one negative image, or one per reference image")
        uncond = _encode(clip_vision, negative_images, source, crop).expand_as(cond)
    elif black_uncond:
        uncond = _black_image_features(clip_vision, source, crop).expand_as(cond)
    elif source == IMAGE_EMBEDS or zero_uncond:
        uncond = torch.zeros_like(cond)
    else:
        uncond = _zero_image_features(clip_vision, cond.shape[0])
    return ImageEmbeds(cond=cond, uncond=uncond.contiguous(), source=source)


def check_embeds(adapter: IPAdapter, embeds: ImageEmbeds) -> None:
    """Raise ClipVisionMismatch unless the embeds are the CLIP output the adapter reads, at its width."""
    if embeds.source != adapter.clip_input:
        what = {IMAGE_EMBEDS: "global image embeds", PENULTIMATE: "penultimate hidden states"}
        raise ClipVisionMismatch(f"the embeds are CLIP {what[embeds.source]} but {adapter.name} ({adapter.kind}) "
                                 f"reads {what[adapter.clip_input]}; encode the images for this adapter")
    if embeds.width != adapter.clip_width:
        raise ClipVisionMismatch(f"the embeds are {embeds.width}-d but {adapter.name} reads {adapter.clip_width}-d "
                                 f"CLIP features ({adapter.clip_vision}); encode with the matching CLIP vision model")


@torch.no_grad()
def image_tokens(adapter: IPAdapter, embeds: ImageEmbeds, combine: str = "concat") -> ImageTokens:
    """Project reference features to image tokens [1, T, C].

    combine "concat": each reference is projected and their tokens are concatenated (N·T tokens,
    as diffusers does for several images per adapter); "average": the features are averaged first
    (T tokens, one blended reference); "joint" (StyleAdapter's multi-reference): the token
    sequences of all references are concatenated into one sequence [1, N·S, H] and projected once,
    so a projection with learned queries (plus Resampler, StyleAdapter StyEmb) reads every
    reference and gives T tokens; a per-token projection (full-face) gives N·S, as concat does.
    Global image embeds have no token sequence: "joint" raises CombineError for them.
    """
    check_embeds(adapter, embeds)
    if combine not in COMBINE:
        raise CombineError(f"combine must be one of {COMBINE}, not {combine!r}")
    if combine == "joint" and embeds.source == IMAGE_EMBEDS:
        raise CombineError(f"'joint' concatenates the references' token sequences, but {adapter.name} reads one "
                           "global image embedding per image; use 'concat' or 'average' with this adapter")
    projection_dtype = next(adapter.projection.parameters()).dtype
    tokens = []
    for features in (embeds.cond, embeds.uncond):
        x = features.to("cpu", projection_dtype)
        if combine == "average":
            x = x.mean(dim=0, keepdim=True)
        elif combine == "joint":
            x = x.reshape(1, -1, x.shape[-1])                          # [1, N·S, H]
        projected = adapter.projection(x)                              # [N, T, C]
        tokens.append(projected.reshape(1, -1, projected.shape[-1]))   # [1, N·T, C]
    return ImageTokens(cond=tokens[0], uncond=tokens[1])
