"""Names, types and input checks every node module shares."""
import functools
import inspect
import math

import torch
from comfy_api.latest import io

from ..host.echo import echo

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
    "StyleKitImageBatch": "StyleKit Image Batch",
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


# Bounds on what one prompt may make a node hold (a shared server has no per-user quota).
MAX_REFERENCES = 64                    # reference images of one image prompt (IP-Adapter, StyleAdapter, CSD)
MAX_TRAINING_PIXELS = 256 * 1024 * 1024  # class / subject images: count x height x width (~3 GB as IMAGE)


def check_images(node: str, input_name: str, images: torch.Tensor | None, limit: int | None = None) -> None:
    """Refuse an IMAGE batch a node cannot use: no images, more than `limit`, or NaN/inf pixels
    (e.g. decoded from a diverged latent), which would otherwise surface steps later as a black
    image or a deep error."""
    if images is not None and limit is not None:
        check_count(node, input_name, images.shape[0], limit, "images",
                    "pass fewer (e.g. pick them with Image From Batch)")
    _check_batch(node, input_name, images, "image", "connect at least one image")


def check_pixels(node: str, input_name: str, count: int, height: int, width: int,
                 limit: int = MAX_TRAINING_PIXELS) -> None:
    """Refuse image sets whose count x height x width exceeds `limit` before any is made or encoded."""
    if count * height * width > limit:
        raise node_error(node, input_name, f"{count} images of {width}x{height} are "
                         f"{count * height * width:,} pixels, beyond the limit of {limit:,} "
                         f"(e.g. {limit // (1024 * 1024)} images of 1024x1024); use fewer or smaller images")


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


def check_finite_floats(node: str, floats: dict, inputs: dict) -> None:
    """Refuse NaN (JSON lets it through core's min/max checks) and inf in any FLOAT input, naming it."""
    for name, spec in floats.items():
        value = inputs.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            bounds = f"from {spec.min} to {spec.max}" if spec.min is not None and spec.max is not None else "a finite number"
            what = "not a number" if math.isnan(value) else "not a finite number"
            raise node_error(node, name, f"{value} is {what}; give a number {bounds}")


def guard_inputs(node_cls: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Wrap the node's execute so that every FLOAT input is checked by check_finite_floats before
    any work, and the error names this node (not the one a NaN would surface in later); and give
    the node a validate_inputs (literal_validator) so that literal inputs are refused at /prompt.
    Idempotent; nodes/__init__.py applies it to every node of the pack."""
    if getattr(node_cls, "_stylekit_guarded", False):
        return node_cls
    schema = node_cls.define_schema()
    floats = {i.id: i for i in schema.inputs if isinstance(i, io.Float.Input)}
    func = node_cls.__dict__["execute"].__func__

    @functools.wraps(func)
    def execute(cls, *args, **kwargs):
        check_finite_floats(schema.display_name or schema.node_id, floats, kwargs)
        return func(cls, *args, **kwargs)

    node_cls.execute = classmethod(execute)
    node_cls.validate_inputs = literal_validator(node_cls, schema)
    node_cls._stylekit_guarded = True
    return node_cls


# -- Refusal at /prompt, before anything runs ------------------------------------------------------
# Core calls a V3 node's validate_inputs while validating the prompt (execution.validate_inputs, on
# 0.3.75 and 0.33 alike), before any node of the prompt executes: a refusal there costs no model
# load. What core passes and skips is decided by the method's signature:
#   - only the inputs named in it are passed; a linked input arrives as None (its value does not
#     exist yet), an input the prompt leaves out does not arrive at all;
#   - core skips its own min/max (and combo) checks for every input named in it, and for all
#     inputs if the method takes **kwargs; so the validator names only what it checks and redoes
#     those checks itself (check_literal_value);
#   - a returned string fails validation; core reports it once per named input
#     ("Custom validation failed for node: <input> - <text>"), the text being our node_error.
# The node's own checks in execute stay: they cover linked values, which exist only then.


def check_literal_value(node: str, spec, value) -> None:
    """What core would check of a literal input named in validate_inputs (its range, its
    options), and NaN / inf in a FLOAT, with the pack's error form."""
    if isinstance(spec, io.Float.Input):
        check_finite_floats(node, {spec.id: spec}, {spec.id: value})
    if isinstance(spec, (io.Float.Input, io.Int.Input)):
        bounds = f"give a number from {spec.min} to {spec.max}"
        if spec.min is not None and value < spec.min:
            raise node_error(node, spec.id, f"{value} is below the minimum of {spec.min}; {bounds}")
        if spec.max is not None and value > spec.max:
            raise node_error(node, spec.id, f"{value} is above the maximum of {spec.max}; {bounds}")
    if isinstance(spec, io.Combo.Input) and spec.options is not None and value not in spec.options:
        shown = ", ".join(map(str, spec.options[:12])) + (", ..." if len(spec.options) > 12 else "")
        raise node_error(node, spec.id, f"{echo(str(value))} is not one of its options; choose one of {shown}")


def literal_validator(node_cls: type[io.ComfyNode], schema: io.Schema) -> classmethod:
    """The node's validate_inputs: every FLOAT input (NaN, inf, range), then the node's own checks
    of literal values (nodes/_literal_checks.py: text lengths, block grammar, counts, names), each
    raising the same node_error that execute would. A validate_inputs the node defines itself
    runs after these, with the inputs its signature asks for."""
    from ._literal_checks import literal_checks

    node = schema.display_name or schema.node_id
    specs = {i.id: i for i in schema.inputs}
    names, check = literal_checks(node_cls, schema)
    named = [i for i in specs if isinstance(specs[i], io.Float.Input) or i in names]
    own = node_cls.__dict__.get("validate_inputs")
    own_func = own.__func__ if isinstance(own, classmethod) else None
    own_spec = inspect.getfullargspec(own_func) if own_func else None
    if own_spec:
        named += [a for a in own_spec.args[1:] if a not in named]

    def validate_inputs(cls, **inputs):
        literal = {k: v for k, v in inputs.items() if v is not None and k in specs}
        try:
            for name in (specs if own_spec and own_spec.varkw else named):
                if name in literal and name in specs:
                    check_literal_value(node, specs[name], literal[name])
            if check is not None:
                check(node, literal)
        except ValueError as err:
            return str(err)
        if own_func is None:
            return True
        wanted = inputs if own_spec.varkw else {k: v for k, v in inputs.items() if k in own_spec.args}
        return own_func(cls, **wanted)

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in named]
    if own_spec and own_spec.varkw:
        params.append(inspect.Parameter(own_spec.varkw, inspect.Parameter.VAR_KEYWORD))
    validate_inputs.__signature__ = inspect.Signature(params)
    validate_inputs.__qualname__ = f"{node_cls.__name__}.validate_inputs"
    return classmethod(validate_inputs)


def check_percent_order(node: str, start_percent: float, end_percent: float) -> None:
    """A start/end percent window (IP-Adapter family, style guidance): both in 0..1, start first."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise node_error(node, "end_percent", f"start_percent {start_percent} must not be after end_percent "
                         f"{end_percent}; set end_percent >= start_percent")


def check_count(node: str, input_name: str, count: int, limit: int, what: str, fix: str) -> None:
    """Refuse more than `limit` items (references, lines, images) before any work on them."""
    if count > limit:
        raise node_error(node, input_name, f"{count} {what}, beyond the limit of {limit}; {fix}")


def check_text_length(node: str, input_name: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise node_error(node, input_name, f"the text is {len(text)} characters long, beyond the "
                         f"limit of {limit}; shorten it")
