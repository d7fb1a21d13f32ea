"""DreamBooth with prior preservation and B-LoRA, trained inside the graph (training/)."""
from __future__ import annotations

import comfy.samplers
import folder_paths
from comfy_api.latest import io, ui

from ..training.blora import apply_blora
from ..training.class_images import sample_class_images
from ..training.dreambooth import TrainingJob, run_training
from ..training.errors import InputError
from ..training.lora_file import load_lora_file, normalized_lora_name
from ..training.targets import ALL_ATTENTION, BLOCK_LIST, BLORA_CONTENT_STYLE, PRESETS
from ..training.trainer import TrainSettings
from ._common import DISPLAY_NAMES, MAX_REFERENCES, category, check_images, check_pixels, node_error

CATEGORY = category("training")
LoraModel = io.Custom("LORA_MODEL")  # core's type for LoRA weights in the graph (nodes_train.py)


MAX_WORD_CHARS = 200   # an identifier or class noun: a few words, one CLIP chunk


def _text(name: str, value: str, node: str) -> str:
    if len(value) > MAX_WORD_CHARS:
        raise node_error(node, name, f"{len(value)} characters, beyond the limit of {MAX_WORD_CHARS}; "
                         "enter a word or two")
    if not value.strip():
        raise node_error(node, name, "it is empty; enter a word")
    return value.strip()


def _lora_name(value: str, node: str) -> str:
    try:
        return normalized_lora_name(value)
    except ValueError as err:
        raise node_error(node, "lora_name", err) from None


def _train(node: str, job: TrainingJob, model, clip, vae, images, prior_images=None) -> io.NodeOutput:
    try:
        outcome = run_training(job, model, clip, vae, images, prior_images)
    except InputError as err:
        raise node_error(node, err.input, err) from None
    last = outcome.losses[-1]
    import folder_paths

    saved = outcome.path.relative_to(folder_paths.get_folder_paths("loras")[0]).as_posix()
    summary = (f"saved models/loras/{saved} ({len(outcome.lora) // 3} LoRA layers)\n"
               f"last step: subject loss {last.subject:.4f}" + (f", prior loss {last.prior:.4f}" if last.prior_weight else ""))
    return io.NodeOutput(outcome.model, outcome.lora, outcome.loss_curve, ui=ui.PreviewText(summary))


def _seed_input() -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                        tooltip="Seeds the LoRA initialisation, the image order, the noise and the timesteps.")


def _lora_name_input(default: str) -> io.String.Input:
    return io.String.Input("lora_name", default=default,
                           tooltip="File name under models/loras (.safetensors is added). If that file exists, the "
                                   "LoRA is saved as name_00001_.safetensors (the next free number) unless overwrite "
                                   "is on; a cancelled or failed run writes nothing.")


def _overwrite_input() -> io.Boolean.Input:
    return io.Boolean.Input("overwrite", default=False, optional=True,
                            tooltip="Replace an existing LoRA of that name, but only one StyleKit trained (its "
                                    "metadata says so); any other file is never replaced. Off: a numbered name.")


def _training_outputs() -> list:
    return [io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
            LoraModel.Output(display_name="lora", tooltip="The trained LoRA weights (kohya keys), as saved."),
            io.Image.Output(display_name="loss_curve", tooltip="Per-step loss and its moving average.")]


class StyleKitClassImages(io.ComfyNode):
    DISPLAY = DISPLAY_NAMES["StyleKitClassImages"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitClassImages",
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description=(
                "Samples DreamBooth's class images 'a <class_noun>' from the frozen model, for the "
                "prior-preservation term of StyleKit DreamBooth LoRA Train (the paper uses 100-300 "
                "per class). Mini-batched; image k depends only on the seed, not on the batch size."),
            inputs=[
                io.Model.Input("model", tooltip="The model you will fine-tune, before training."),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.String.Input("class_noun", default="dog",
                                tooltip="The subject's class; the prompt is 'a <class_noun>', as in training."),
                io.Int.Input("count", default=100, min=1, max=2000, tooltip="How many class images to sample."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("steps", default=25, min=1, max=200),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras"),
                _seed_input(),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images sampled together; lower it if memory runs short."),
            ],
            outputs=[io.Image.Output(display_name="class_images")],
        )

    @classmethod
    def execute(cls, model, clip, vae, class_noun, count, width, height, steps, cfg, sampler_name, scheduler,
                seed, batch_size) -> io.NodeOutput:
        noun = _text("class_noun", class_noun, cls.DISPLAY)
        check_pixels(cls.DISPLAY, "count", count, height, width)
        images = sample_class_images(model, clip, vae, f"a {noun}", count, width, height, steps, cfg,
                                     sampler_name, scheduler, seed, batch_size)
        return io.NodeOutput(images)


class StyleKitDreamBoothTrain(io.ComfyNode):
    DISPLAY = DISPLAY_NAMES["StyleKitDreamBoothTrain"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitDreamBoothTrain",
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description=(
                "DreamBooth (Ruiz et al. 2023) as a LoRA: fine-tunes on 3-5 images of a subject with the "
                "prompt 'a <identifier> <class_noun>' plus the prior-preservation loss on class images "
                "with 'a <class_noun>' (loss = MSE(subject) + prior_weight * MSE(prior), in the model's "
                "own prediction type). Trains LoRAs on the attention projections of the chosen blocks, "
                "saves a kohya-format LoRA under models/loras that LoraLoader reads, and returns the "
                "model with it applied."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="Encodes the instance and class prompts."),
                io.Vae.Input("vae", tooltip="Encodes the subject and class images to latents."),
                io.Image.Input("images", tooltip="The subject, 3-5 images batched (e.g. with Image Batch), all "
                                                 "one size: the training resolution."),
                io.String.Input("identifier", default="sks", tooltip="A rare token that will name your subject."),
                io.String.Input("class_noun", default="dog", tooltip="The subject's class, e.g. dog, backpack."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="λ of the prior-preservation term; the paper uses 1. 0 trains on the "
                                       "subject alone (then no class images are needed)."),
                io.Int.Input("steps", default=800, min=1, max=100000,
                             tooltip="Optimizer steps; DreamBooth-LoRA uses 500-800."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=1e-7),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (alpha = rank)."),
                io.Combo.Input("target_blocks", options=list(PRESETS), default=ALL_ATTENTION,
                               tooltip="Which attention blocks get LoRAs: all, B-LoRA's SDXL content/style "
                                       "blocks, or the blocks named in block_list."),
                io.String.Input("block_list", default="",
                                tooltip="For 'block list': ComfyUI ids or ranges ('output 1', 'output 3-5'; 'output' = "
                                        "every output block) or diffusers names and prefixes "
                                        "('up_blocks.0.attentions.1', 'up_blocks.1', 'mid_block'), comma "
                                        "separated. See StyleKit Block Map."),
                _seed_input(),
                _lora_name_input("StyleKit/dreambooth_sks_dog"),
                _overwrite_input(),
                io.Image.Input("prior_images", optional=True,
                               tooltip="Class images from StyleKit DreamBooth Class Images (or your own); "
                                       "needed when prior_weight > 0."),
            ],
            outputs=_training_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, vae, images, identifier, class_noun, prior_weight, steps, learning_rate, rank,
                target_blocks, block_list, seed, lora_name, prior_images=None, overwrite=False) -> io.NodeOutput:
        token = _text("identifier", identifier, cls.DISPLAY)
        noun = _text("class_noun", class_noun, cls.DISPLAY)
        _lora_name(lora_name, cls.DISPLAY)
        check_images(cls.DISPLAY, "images", images, MAX_REFERENCES)
        check_images(cls.DISPLAY, "prior_images", prior_images)
        for name, batch in (("images", images), ("prior_images", prior_images)):
            if batch is not None:
                check_pixels(cls.DISPLAY, name, *batch.shape[:3])
        if prior_weight > 0 and prior_images is None:
            raise node_error(cls.DISPLAY, "prior_images", f"prior_weight {prior_weight} needs class images; "
                             "connect StyleKit DreamBooth Class Images, or set prior_weight to 0")
        if target_blocks == BLOCK_LIST and not block_list.strip():
            raise node_error(cls.DISPLAY, "block_list", "empty while target_blocks is 'block list'; "
                             "name blocks such as 'output 1', or pick another preset")
        job = TrainingJob("DreamBooth", f"a {token} {noun}", f"a {noun}", target_blocks, block_list, lora_name,
                          TrainSettings(steps, learning_rate, rank, prior_weight, seed), overwrite)
        return _train(cls.DISPLAY, job, model, clip, vae, images, prior_images)


class StyleKitBLoRATrain(io.ComfyNode):
    DISPLAY = DISPLAY_NAMES["StyleKitBLoRATrain"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitBLoRATrain",
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description=(
                "B-LoRA (Frenkel et al. 2024): trains a LoRA on one image with the prompt 'A <identifier>' "
                "on SDXL's up_blocks.0.attentions.0 (content) and .1 (style) only, so the two parts can be "
                "applied apart with StyleKit Apply B-LoRA. Saves a kohya-format LoRA under models/loras."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="An SDXL model."),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Image.Input("image", tooltip="The image to separate into content and style (1024 px for SDXL)."),
                io.String.Input("identifier", default="[v]", tooltip="The prompt is 'A <identifier>'; the paper uses [v]."),
                io.Int.Input("steps", default=1000, min=1, max=100000),
                io.Float.Input("learning_rate", default=5e-5, min=1e-7, max=1.0, step=1e-6, round=1e-7),
                io.Int.Input("rank", default=64, min=1, max=256, tooltip="LoRA rank (alpha = rank); the paper uses 64."),
                _seed_input(),
                _lora_name_input("StyleKit/blora"),
                _overwrite_input(),
            ],
            outputs=_training_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, vae, image, identifier, steps, learning_rate, rank, seed, lora_name,
                overwrite=False) -> io.NodeOutput:
        token = _text("identifier", identifier, cls.DISPLAY)
        _lora_name(lora_name, cls.DISPLAY)
        check_images(cls.DISPLAY, "image", image)
        job = TrainingJob("B-LoRA", f"A {token}", None, BLORA_CONTENT_STYLE, "", lora_name,
                          TrainSettings(steps, learning_rate, rank, 0.0, seed), overwrite)
        return _train(cls.DISPLAY, job, model, clip, vae, image)


class StyleKitLoadBLoRA(io.ComfyNode):
    DISPLAY = DISPLAY_NAMES["StyleKitLoadBLoRA"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitLoadBLoRA",
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description=("Loads a B-LoRA file from models/loras: one saved by StyleKit B-LoRA Train, or an "
                         "official B-LoRA (diffusers format). Apply its parts with StyleKit Apply B-LoRA."),
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"))],
            outputs=[LoraModel.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        try:
            lora, _ = load_lora_file(lora_name)
        except Exception as err:  # safetensors raises several types for a damaged or foreign file
            raise node_error(cls.DISPLAY, "lora_name", f"{lora_name} could not be read as a LoRA "
                             f"file ({err}); choose a .safetensors LoRA (a B-LoRA from StyleKit B-LoRA Train, "
                             "or an official one)") from None
        return io.NodeOutput(lora)


class StyleKitApplyBLoRA(io.ComfyNode):
    DISPLAY = DISPLAY_NAMES["StyleKitApplyBLoRA"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StyleKitApplyBLoRA",
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description=(
                "Applies a B-LoRA's content part (SDXL up_blocks.0.attentions.0) and/or style part "
                "(up_blocks.0.attentions.1). Chain two to combine the content of one image with the "
                "style of another; prompt 'A <content id> in <style id> style'."),
            inputs=[
                io.Model.Input("model", tooltip="An SDXL model."),
                LoraModel.Input("lora", tooltip="From StyleKit B-LoRA Train or StyleKit Load B-LoRA."),
                io.Float.Input("content_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Scale of the content part; 0 leaves it out (neutral)."),
                io.Float.Input("style_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Scale of the style part; 0 leaves it out (neutral). The paper uses ~1.0-1.1."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, lora, content_strength, style_strength) -> io.NodeOutput:
        try:
            patched = apply_blora(model, lora, content_strength, style_strength)
        except InputError as err:
            raise node_error(cls.DISPLAY, err.input, err) from None
        return io.NodeOutput(patched)


NODES = [StyleKitClassImages, StyleKitDreamBoothTrain, StyleKitBLoRATrain, StyleKitLoadBLoRA, StyleKitApplyBLoRA]
