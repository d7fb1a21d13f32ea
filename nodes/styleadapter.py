"""StyleAdapter nodes: the two-path cross-attention in one node, and its decoupling strategies as
nodes that work with every adapter of the pack.

Graph shapes:
  Loader + Load CLIP Vision + Load Image(s) -> StyleKit StyleAdapter -> KSampler         (one node)
  Load Image -> StyleKit Patch Shuffle -> StyleKit IP-Adapter Encode -> StyleKit Remove Class Token
     -> StyleKit IP-Adapter Apply Embeds (combine: joint for several references)          (composed)
"""
from __future__ import annotations

from comfy_api.latest import io

from ..ip_adapter.encode import COMBINE, ClipVisionMismatch, CombineError, check_clip_vision
from ..host.block_weights import CUSTOM, BlockWeightsError
from ..patching.ip_adapter import AdapterMismatch
from ..styleadapter.decoupling import shuffle_patches
from ..styleadapter.stages import ClassTokenError, StyleAdapterSettings, apply_style_adapter, remove_class_token
from ._common import DISPLAY_NAMES, MAX_REFERENCES, category, check_images, node_error
from .ip_adapter import ImageEmbedsType, IPAdapterType, injection_inputs, settings_from_inputs

CATEGORY = category("StyleAdapter")
MAX_GRID = 64


def _grid_input(name: str, default: int) -> io.Int.Input:
    return io.Int.Input(name, default=default, min=1, max=MAX_GRID, step=1,
                        tooltip="Cells per side: the reference is cut into grid x grid equal cells that are permuted "
                                "(no pixel lost). 1 = no shuffle (neutral). Coarse grids (2-4) keep textures and "
                                "strokes; fine grids (8+) keep little more than colours.")


def _seed_input(name: str) -> io.Int.Input:
    return io.Int.Input(name, default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the cell permutation.")


class StyleKitPatchShuffle(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitPatchShuffle",
            display_name=DISPLAY_NAMES["StyleKitPatchShuffle"],
            category=CATEGORY,
            description=("StyleAdapter decoupling: cuts each image into a grid of equal cells and permutes them, so "
                         "an image prompt keeps the reference's colours and textures but not its layout or subject. "
                         "Put it before any image-prompt encoder (IP-Adapter Encode, StyleAdapter). Every pixel is "
                         "kept; rows or columns that do not fill a cell stay in place."),
            inputs=[io.Image.Input("image", tooltip="Reference image(s); each gets its own permutation."),
                    _grid_input("grid", 4), _seed_input("seed")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, grid, seed) -> io.NodeOutput:
        check_images("StyleKit Patch Shuffle", "image", image, MAX_REFERENCES)
        try:
            return io.NodeOutput(shuffle_patches(image, grid, seed))
        except ValueError as err:
            raise node_error(DISPLAY_NAMES["StyleKitPatchShuffle"], "grid", err) from err


class StyleKitRemoveClassToken(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitRemoveClassToken",
            display_name=DISPLAY_NAMES["StyleKitRemoveClassToken"],
            category=CATEGORY,
            description=("StyleAdapter decoupling: drops the CLIP class token (the one that summarises what the "
                         "picture shows) from encoded references and keeps the 256 patch tokens, for the cond and the "
                         "uncond features. For token-sequence adapters: IP-Adapter plus, full-face, StyleAdapter. "
                         "Base IP-Adapters read the pooled embedding, which has no class token."),
            inputs=[ImageEmbedsType.Input("embeds", tooltip="From StyleKit IP-Adapter Encode.")],
            outputs=[ImageEmbedsType.Output(display_name="embeds")],
        )

    @classmethod
    def execute(cls, embeds) -> io.NodeOutput:
        try:
            return io.NodeOutput(remove_class_token(embeds))
        except ClassTokenError as err:
            raise node_error(DISPLAY_NAMES["StyleKitRemoveClassToken"], "embeds", err) from err


def _shared_inputs() -> list:
    """IP-Adapter's window and block inputs (same presets and block_weights forms)."""
    return [i for i in injection_inputs() if i.id in ("start_percent", "end_percent", "blocks", "block_weights")]


class StyleKitStyleAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitStyleAdapter",
            display_name=DISPLAY_NAMES["StyleKitStyleAdapter"],
            category=CATEGORY,
            description=("StyleAdapter: two-path cross-attention, F = Attn(Q, K_text, V_text) + style_scale x "
                         "Attn(Q, K_style, V_style), with the style tokens of one or more references stripped of "
                         "their subject by patch shuffle and class-token removal and merged into one token set. Runs "
                         "with IP-Adapter plus / full-face weights (their image K/V as the style path), base "
                         "weights (shuffle only) or a StyleAdapter checkpoint. Works on a copy of the model."),
            inputs=[
                io.Model.Input("model"),
                IPAdapterType.Input("ipadapter", tooltip="From StyleKit IP-Adapter Loader: an IP-Adapter plus / "
                                                         "full-face / base file, or a StyleAdapter checkpoint."),
                io.ClipVision.Input("clip_vision", tooltip="Must match the adapter (ViT-H for the SD1.5 files)."),
                io.Image.Input("image", tooltip="One or more references of one style (a batch: Batch Images)."),
                io.Float.Input("style_scale", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="λ, the style path's scale (times the per-block weights); 0 leaves the model "
                                       "unchanged (neutral)."),
                _grid_input("shuffle_grid", 1),
                _seed_input("shuffle_seed"),
                io.Boolean.Input("remove_class_token", default=True,
                                 tooltip="Drop the CLIP class token (token-sequence adapters; turn off for base "
                                         "IP-Adapters, which read the pooled embedding)."),
                io.Combo.Input("merge", options=list(COMBINE), default="joint",
                               tooltip="Several references: joint = one token set read from all references' patch "
                                       "tokens (StyleAdapter); concat = each reference's tokens side by side; "
                                       "average = their CLIP features averaged."),
                *_shared_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, style_scale, shuffle_grid, shuffle_seed,
                remove_class_token, merge, start_percent, end_percent, blocks, block_weights) -> io.NodeOutput:
        node = DISPLAY_NAMES["StyleKitStyleAdapter"]
        check_images(node, "image", image, MAX_REFERENCES)
        if merge not in COMBINE:
            raise node_error(node, "merge", f"choose one of {', '.join(COMBINE)}")
        injection = settings_from_inputs(node, style_scale, start_percent, end_percent, blocks, block_weights, merge)
        settings = StyleAdapterSettings(
            style_scale=style_scale, shuffle_grid=shuffle_grid, shuffle_seed=shuffle_seed,
            remove_class_token=remove_class_token, merge=merge, start_percent=injection.start_percent,
            end_percent=injection.end_percent, blocks=injection.blocks, block_weights=injection.block_weights)
        if shuffle_grid > min(image.shape[1:3]):
            raise node_error(node, "shuffle_grid", f"a grid of {shuffle_grid} does not fit a "
                             f"{image.shape[2]}x{image.shape[1]} image; use at most {min(image.shape[1:3])}")
        try:
            check_clip_vision(ipadapter, clip_vision)
        except ClipVisionMismatch as err:
            raise node_error(node, "clip_vision", err) from err
        try:
            return io.NodeOutput(apply_style_adapter(model, ipadapter, clip_vision, image, settings))
        except ClassTokenError as err:
            raise node_error(node, "remove_class_token", f"{err}; set remove_class_token to false") from err
        except CombineError as err:
            raise node_error(node, "merge", err) from err
        except AdapterMismatch as err:
            raise node_error(node, "ipadapter", err) from err
        except BlockWeightsError as err:
            raise node_error(node, "block_weights" if blocks == CUSTOM else "blocks", err) from err


NODES = [StyleKitStyleAdapter, StyleKitPatchShuffle, StyleKitRemoveClassToken]
