"""Style discriminator (CSD) and style-loss guidance nodes (InstantStyle-Plus).

Graph shapes:
  StyleKit Style Discriminator Loader -> StyleKit Style Similarity (image, reference) -> FLOAT, text
  model -> StyleKit Style Guidance (discriminator, style image[, vae]) -> KSampler / SamplerCustomAdvanced
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..sampling.style_guidance import (DECODERS, EXACT, MODES, TAESD_DECODER, StyleGuidanceError,
                                       StyleGuidanceSettings, apply_style_guidance, style_guidance_guider)
from ..style_discriminator.files import (StyleDiscriminatorFileError, load_style_discriminator,
                                         style_discriminator_files)
from ._common import (DISPLAY_NAMES, MAX_REFERENCES, category, check_images, check_percent_order, node_error,
                      percent_inputs)

StyleDiscriminatorType = io.Custom("STYLEKIT_STYLE_DISCRIMINATOR")
CATEGORY = category("style guidance")

LOADER = DISPLAY_NAMES["StyleKitStyleDiscriminatorLoader"]
SIMILARITY = DISPLAY_NAMES["StyleKitStyleSimilarity"]
GUIDANCE = DISPLAY_NAMES["StyleKitStyleGuidance"]
GUIDER = DISPLAY_NAMES["StyleKitStyleGuidanceGuider"]



class StyleKitStyleDiscriminatorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitStyleDiscriminatorLoader",
            display_name=LOADER,
            category=CATEGORY,
            description=("Loads a CSD style discriminator (Somepalli et al. 2024) from models/style_discriminators: "
                         "the official checkpoint.pth (also published as pytorch_model.bin) or its safetensors "
                         "export, unchanged. CLIP ViT-L/14 visual tower + style head; the size is read from the "
                         "weights."),
            inputs=[io.Combo.Input("discriminator_file", options=style_discriminator_files(),
                                   tooltip="A CSD file in models/style_discriminators, e.g. checkpoint.pth.")],
            outputs=[StyleDiscriminatorType.Output(display_name="style_discriminator")],
        )

    @classmethod
    def execute(cls, discriminator_file) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_style_discriminator(discriminator_file))
        except (StyleDiscriminatorFileError, FileNotFoundError) as err:
            raise node_error(LOADER, "discriminator_file", f"{discriminator_file} is not a usable CSD file: {err}; "
                             "choose the official CSD checkpoint.pth or its safetensors export") from err


class StyleKitStyleSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitStyleSimilarity",
            display_name=SIMILARITY,
            category=CATEGORY,
            description=("Style similarity of images to reference images with the discriminator's style head: the "
                         "cosine of their CSD style embeddings (1 = same style). Outputs the mean over all "
                         "image/reference pairs and a table per image; shows the table on the node."),
            inputs=[StyleDiscriminatorType.Input("style_discriminator"),
                    io.Image.Input("image", tooltip="The images to score (a batch is scored image by image)."),
                    io.Image.Input("reference", tooltip="The style reference image(s).")],
            outputs=[io.Float.Output(display_name="similarity"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, style_discriminator, image, reference) -> io.NodeOutput:
        check_images(SIMILARITY, "image", image, MAX_REFERENCES)
        check_images(SIMILARITY, "reference", reference, MAX_REFERENCES)
        e = style_discriminator.style_embeddings(image)
        r = style_discriminator.style_embeddings(reference)
        table = e @ r.T
        lines = [f"image {i}: " + ", ".join(f"{float(v):.4f}" for v in row) for i, row in enumerate(table)]
        report = f"CSD style similarity ({style_discriminator.name}), per reference:\n" + "\n".join(lines)
        return io.NodeOutput(float(table.mean()), report, ui=ui.PreviewText(report))


def guidance_inputs() -> list:
    """The discriminator, reference and settings inputs the guidance nodes share."""
    return [
        StyleDiscriminatorType.Input("style_discriminator"),
        io.Image.Input("style_image", tooltip="The style reference (several: their losses are averaged)."),
        io.Float.Input("scale", default=100.0, min=0.0, max=100000.0, step=1.0,
                       tooltip="Guidance strength; 0 turns it off (the model is returned unpatched)."),
        io.Int.Input("every", default=1, min=1, max=1000,
                     tooltip="Guide every k-th step (1 = every step, as the official code; 3 is ~3x cheaper)."),
        *percent_inputs("style guidance"),
        io.Combo.Input("mode", options=list(MODES), default=EXACT,
                       tooltip="exact: the gradient of the loss of the CFG prediction, through the model, decoder "
                               "and discriminator (one more model forward and backward per guided step). fast "
                               "(approximation): the model's noise prediction held fixed, much cheaper; it "
                               "departs from exact at high noise (cosine 0.75 at the top sigma measured)."),
        io.Combo.Input("decoder", options=list(DECODERS), default=TAESD_DECODER,
                       tooltip="vae: the VAE input (official, fp32); taesd: core's approximate decoder from "
                               "models/vae_approx, much cheaper."),
        io.Vae.Input("vae", optional=True, tooltip="Needed by the 'vae' decoder."),
    ]


def settings_from_inputs(node: str, scale, every, start_percent, end_percent, mode, decoder) -> StyleGuidanceSettings:
    check_percent_order(node, start_percent, end_percent)
    return StyleGuidanceSettings(scale=scale, every=every, start_percent=start_percent, end_percent=end_percent,
                                 mode=mode, decoder=decoder)


def _guidance_error(node: str, err: StyleGuidanceError) -> ValueError:
    field = "vae" if "VAE" in str(err) else ("decoder" if "decoder" in str(err) else "model")
    return node_error(node, field, err)


class StyleKitStyleGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitStyleGuidance",
            display_name=GUIDANCE,
            category=CATEGORY,
            description=("Style-loss guidance (InstantStyle-Plus): at the chosen steps the predicted image is decoded, "
                         "embedded by the style discriminator, and the prediction is corrected by the gradient of "
                         "1 - cos(style, reference) with respect to the latent (D' = D - scale * sigma^2 * grad). "
                         "Works with KSampler and SamplerCustomAdvanced. 'exact' (default) differentiates the loss of "
                         "the CFG prediction through the model, decoder and discriminator (one more forward and "
                         "backward pass of the model per guided step; the official code also goes through the UNet "
                         "but scores the unconditional branch's prediction); 'fast' holds the model's noise "
                         "prediction fixed (an approximation of ours)."),
            inputs=[io.Model.Input("model"), *guidance_inputs()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, style_discriminator, style_image, scale, every, start_percent, end_percent, mode,
                decoder, vae=None) -> io.NodeOutput:
        check_images(GUIDANCE, "style_image", style_image, MAX_REFERENCES)
        settings = settings_from_inputs(GUIDANCE, scale, every, start_percent, end_percent, mode, decoder)
        try:
            return io.NodeOutput(apply_style_guidance(model, style_discriminator, style_image, settings, vae=vae))
        except StyleGuidanceError as err:
            raise _guidance_error(GUIDANCE, err) from err


class StyleKitStyleGuidanceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitStyleGuidanceGuider",
            display_name=GUIDER,
            category=CATEGORY,
            description=("A CFG guider for SamplerCustomAdvanced with style-loss guidance on: the same correction as "
                         "StyleKit Style Guidance (which also works in front of core's CFGGuider)."),
            inputs=[io.Model.Input("model"), io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                    io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                    *guidance_inputs()],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, style_discriminator, style_image, scale, every, start_percent,
                end_percent, mode, decoder, vae=None) -> io.NodeOutput:
        check_images(GUIDER, "style_image", style_image, MAX_REFERENCES)
        settings = settings_from_inputs(GUIDER, scale, every, start_percent, end_percent, mode, decoder)
        try:
            return io.NodeOutput(style_guidance_guider(model, positive, negative, cfg, style_discriminator,
                                                       style_image, settings, vae=vae))
        except StyleGuidanceError as err:
            raise _guidance_error(GUIDER, err) from err


NODES = [StyleKitStyleDiscriminatorLoader, StyleKitStyleSimilarity, StyleKitStyleGuidance,
         StyleKitStyleGuidanceGuider]
