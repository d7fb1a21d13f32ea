"""The incumbent ComfyUI IP-Adapter pack's weight types as per-layer weights on our block map.

Its weight of a layer depends on the layer's transformer index t (ComfyUI's forward-order counter
of SpatialTransformers, `AttentionSite.transformer_index`), on the number of transformers L (16 on
SD1.5, 11 on SDXL) and on the block kind:

    linear          w                          weak input     0.2·w in input blocks, w elsewhere
    ease in         w·(0.05 + 0.95·(1 − t/L))   weak output    0.2·w in output blocks
    ease out        w·(0.05 + 0.95·t/L)         weak middle    0.2·w in the middle block
    ease in-out     w·(0.05 + 0.95·(1 − |t − L/2| / (L/2)))      strong middle  0.2·w in input and output
    reverse in-out  w·(0.05 + 0.95·|t − L/2| / (L/2))

and the block-selecting types give w (or the composition weight) on listed indices, 0 elsewhere
(SDXL: style = t 6 = output 1, composition = t 3 = input 8; SD1.5: style = t 0-3 and 9-15,
composition = t 4 (×0.25) and 5). The "precise" types also swap the image prompt at the
composition layers (style transfer precise) or at every other layer (composition precise): there
the conditional rows get an empty image prompt and the unconditional rows get the image, which
pushes CFG away from the reference in those layers. `LayerPlan.swapped` lists those layers.

One difference is deliberate: the incumbent registers its middle-block patch under ("middle", 1),
an id ComfyUI never calls (it calls ("middle", 0)), so its middle block never gets the image. Ours
does, with the weight the type gives t = 6 (SD1.5) or 4 (SDXL); `incumbent_middle=True` gives the
middle block 0, as the incumbent behaves.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..host.block_map import BlockMap, LayerId

CURVES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out",
          "weak input", "weak output", "weak middle", "strong middle")
SELECTIONS = ("style transfer", "composition", "strong style transfer", "style and composition",
              "strong style and composition", "style transfer precise", "composition precise")
WEIGHT_TYPES = CURVES + SELECTIONS

# Transformer indices per topology (block_weights.topology): the style and composition layers.
_STYLE = {"sdxl": {6}, "sd15": {0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15}}
_STRONG_STYLE = {"sdxl": {0, 1, 2, 4, 5, 6, 7, 8, 9, 10}, "sd15": {0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}}
_COMPOSITION = {"sdxl": {3: 1.0}, "sd15": {4: 0.25, 5: 1.0}}


@dataclass(frozen=True)
class LayerPlan:
    weights: dict[LayerId, float]   # every attention layer of the model, 0 where the image is off
    swapped: frozenset[LayerId]     # layers whose cond and uncond image prompts trade places


def _curve(kind: str, t: int, layers: int, block: str, w: float) -> float:
    half = layers / 2
    if kind == "linear":
        return w
    if kind == "ease in":
        return w * (0.05 + 0.95 * (1 - t / layers))
    if kind == "ease out":
        return w * (0.05 + 0.95 * (t / layers))
    if kind == "ease in-out":
        return w * (0.05 + 0.95 * (1 - abs(t - half) / half))
    if kind == "reverse in-out":
        return w * (0.05 + 0.95 * (abs(t - half) / half))
    weak = {"weak input": ("input",), "weak output": ("output",), "weak middle": ("middle",),
            "strong middle": ("input", "output")}[kind]
    return w * 0.2 if block in weak else w


def _selection(kind: str, topo: str, w: float, w_comp: float, style_boost, composition_boost) -> dict[int, float]:
    comp = _COMPOSITION[topo]
    style = {t: w for t in _STYLE[topo]}
    if kind == "style transfer":
        return style
    if kind == "composition":
        return {t: w * f for t, f in comp.items()}
    if kind == "strong style transfer":
        return {t: w for t in _STRONG_STYLE[topo]}
    if kind in ("style and composition", "style transfer precise"):
        c = w_comp if kind == "style and composition" else (style_boost if style_boost is not None else w)
        return {**style, **{t: c * f for t, f in comp.items()}}
    if kind == "strong style and composition":
        every = {t: w for t in range(11 if topo == "sdxl" else 16)}
        if topo == "sdxl":
            return {**every, 3: w_comp}
        return {**every, 4: w_comp, 5: w_comp}
    if kind == "composition precise":
        boost = composition_boost if composition_boost is not None else w
        every = range(11 if topo == "sdxl" else 16)
        if topo == "sdxl":
            return {t: (w if t == 3 else boost if t == 6 else boost * 0.1) for t in every}
        return {t: (w * f if (f := comp.get(t)) is not None else boost * 0.1 if t in (6, 7, 8) else boost)
                for t in every}
    raise ValueError(f"unknown weight type {kind!r}; choose one of {', '.join(WEIGHT_TYPES)}")


def weight_type_plan(bm: BlockMap, weight_type: str, weight: float = 1.0, weight_composition: float | None = None,
                     style_boost: float | None = None, composition_boost: float | None = None,
                     incumbent_middle: bool = False) -> LayerPlan:
    """The weight of every attention layer (and the swapped layers) for one of WEIGHT_TYPES."""
    from ..host.block_weights import topology

    layers = len(bm)
    topo = topology(bm)
    w_comp = weight if weight_composition is None else weight_composition
    if weight_type in CURVES:
        by_site = {s.transformer_index: _curve(weight_type, s.transformer_index, layers, s.block[0], weight) for s in bm}
    elif weight_type in SELECTIONS:
        chosen = _selection(weight_type, topo, weight, w_comp, style_boost, composition_boost)
        by_site = {s.transformer_index: chosen.get(s.transformer_index, 0.0) for s in bm}
    else:
        raise ValueError(f"unknown weight type {weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    comp_layers = set(_COMPOSITION[topo])
    swap_sites = set()
    if weight_type == "style transfer precise":
        swap_sites = comp_layers
    elif weight_type == "composition precise":
        swap_sites = {s.transformer_index for s in bm} - comp_layers
    weights, swapped = {}, set()
    for s in bm:
        w = 0.0 if incumbent_middle and s.block[0] == "middle" else by_site[s.transformer_index]
        for layer in s.layers():
            weights[layer] = w
            if s.transformer_index in swap_sites and w != 0:
                swapped.add(layer)
    return LayerPlan(weights, frozenset(swapped))
