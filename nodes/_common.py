"""Names, types and input checks every node module shares."""
import torch
from comfy_api.latest import io

CATEGORY = "StyleKit"

# The one place for display names (node id -> the name users see, and that every node error
# starts with). Node modules read their names from here.
DISPLAY_NAMES = {
    "StyleKitBlockMap": "StyleKit Block Map",
    "StyleKitClassImages": "StyleKit DreamBooth Class Images",
    "StyleKitDreamBoothTrain": "StyleKit DreamBooth LoRA Train",
    "StyleKitBLoRATrain": "StyleKit B-LoRA Train",
    "StyleKitLoadBLoRA": "StyleKit Load B-LoRA",
    "StyleKitApplyBLoRA": "StyleKit Apply B-LoRA",
    "StyleKitInstantStyleContentSubtraction": "StyleKit InstantStyle Content Subtraction",
    "StyleKitDDIMInversion": "StyleKit DDIM Inversion",
    "StyleKitIPAdapterLoader": "StyleKit IP-Adapter Loader",
    "StyleKitIPAdapterEncode": "StyleKit IP-Adapter Encode",
    "StyleKitIPAdapterApplyEmbeds": "StyleKit IP-Adapter Apply Embeds",
    "StyleKitIPAdapter": "StyleKit IP-Adapter",
    "StyleKitIPAdapterAdvanced": "StyleKit IP-Adapter Advanced",
    "StyleKitIPAdapterTiled": "StyleKit IP-Adapter Tiled",
    "StyleKitPromptBatch": "StyleKit Prompt Batch",
    "StyleKitStyleAligned": "StyleKit StyleAligned",
    "StyleKitStyleAlignedReferenceSampler": "StyleKit StyleAligned Reference Sampler",
    "StyleKitStyleDiscriminatorLoader": "StyleKit Style Discriminator Loader",
    "StyleKitStyleSimilarity": "StyleKit Style Similarity",
    "StyleKitStyleGuidance": "StyleKit Style Guidance",
    "StyleKitStyleGuidanceGuider": "StyleKit Style Guidance Guider",
    "StyleKitPatchShuffle": "StyleKit Patch Shuffle",
    "StyleKitRemoveClassToken": "StyleKit Remove Class Token",
    "StyleKitStyleAdapter": "StyleKit StyleAdapter",
    "StyleKitVisualStylePrompting": "StyleKit Visual Style Prompting",
    "StyleKitVisualStylePromptingReferenceSampler": "StyleKit Visual Style Prompting Reference Sampler",
}

# The trajectory of an inversion (host.trajectory.InversionTrajectory): the inverted latent and
# x at every sigma of the schedule. Produced by StyleKit DDIM Inversion, consumed by the reference
# samplers (and by any node that needs an inversion).
Trajectory = io.Custom("STYLEKIT_TRAJECTORY")


def node_error(node: str, input_name: str, err: Exception | str) -> ValueError:
    """The pack's one error form: "<Node display name>: input '<input>': <what is wrong>; <the fix>"."""
    return ValueError(f"{node}: input '{input_name}': {err}")


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}"


def percent_inputs(what: str) -> list:
    """start_percent / end_percent inputs: the part of sampling (0 = first step) `what` acts in."""
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Where in sampling {what} starts (0 = the first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Where in sampling {what} ends (1 = the last step). start = end = 1 "
                               "turns it off: the output equals plain sampling."),
    ]


def check_images(node: str, input_name: str, images: torch.Tensor | None) -> None:
    """Refuse an IMAGE batch a node cannot use: no images, or NaN/inf pixels (e.g. decoded from a
    diverged latent), which would otherwise surface steps later as a black image or a deep error."""
    _check_batch(node, input_name, images, "image", "connect at least one image")


def check_latent(node: str, input_name: str, latent: dict | None) -> None:
    """The same for a LATENT: an empty batch, or NaN/inf values."""
    _check_batch(node, input_name, None if latent is None else latent["samples"], "latent",
                 "connect a latent with at least one image (e.g. VAE Encode of a picture)")


def _check_batch(node: str, input_name: str, tensor, what: str, fix: str) -> None:
    if tensor is None:
        return
    if tensor.shape[0] == 0:
        raise node_error(node, input_name, f"the {what} batch is empty; {fix}")
    if not torch.isfinite(tensor).all():
        raise node_error(node, input_name, f"the {what} holds NaN or inf values; check the node that "
                         "made it (a diverged sampler or a broken file)")
