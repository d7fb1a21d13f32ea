"""Inputs sent by strangers: block names are matched in linear time, long texts are refused
before they are parsed, and errors quote them only in part."""
from __future__ import annotations

import time

import pytest

from stylekit.host.block_map import block_map
from stylekit.host.block_weights import CUSTOM, MAX_SPEC_CHARS, BlockWeightsError, block_weights_for, resolve_block_weights
from stylekit.host.blocks import MAX_LIST_CHARS
from stylekit.host.echo import ECHO_LIMIT
from stylekit.host.layer_select import parse_blocks

MEGABYTE = 1 << 20


def test_a_one_megabyte_block_name_is_refused_within_a_tenth_of_a_second(sd15):
    bm = block_map(sd15.model)
    key = "output" + " " * MEGABYTE + "x"        # the input that took a quadratic matcher hours
    started = time.perf_counter()
    with pytest.raises(BlockWeightsError) as err:
        resolve_block_weights(bm, {key: 1.0})
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1, f"{elapsed:.3f} s for a 1 MB key"
    assert len(str(err.value)) < 2 * ECHO_LIMIT + 400   # the key is quoted only in part
    assert "characters in all" in str(err.value)


def test_a_one_megabyte_spec_text_is_refused_before_parsing_and_names_the_limit(sd15):
    bm = block_map(sd15.model)
    text = '{"output' + " " * MEGABYTE + 'x": 1.0}'
    started = time.perf_counter()
    with pytest.raises(BlockWeightsError, match=str(MAX_SPEC_CHARS)):
        block_weights_for(bm, CUSTOM, text)
    assert time.perf_counter() - started < 0.1


def test_deeply_nested_spec_text_is_a_clear_error_not_a_recursion_crash(sd15):
    bm = block_map(sd15.model)
    with pytest.raises(BlockWeightsError):
        block_weights_for(bm, CUSTOM, "[" * 10_000)


def test_a_long_custom_block_list_is_refused_and_names_the_limit(sd15):
    bm = block_map(sd15.model)
    with pytest.raises(ValueError, match=str(MAX_LIST_CHARS)):
        parse_blocks("output 3, " * 1000, bm)
    started = time.perf_counter()
    with pytest.raises(ValueError) as err:
        parse_blocks("output" + " " * (MAX_LIST_CHARS - 20) + "x", bm)
    assert time.perf_counter() - started < 0.1
    assert len(str(err.value)) < 2 * ECHO_LIMIT + 400


def test_every_float_input_of_every_node_refuses_nan_naming_the_node_and_the_input(comfy_host):
    from comfy_api.latest import io

    from stylekit.nodes import all_nodes

    checked = 0
    for node in all_nodes():
        schema = node.define_schema()
        for spec in schema.inputs:
            if not isinstance(spec, io.Float.Input):
                continue
            # Only the NaN input is given: the check must run before the node reads anything else.
            with pytest.raises(ValueError) as err:
                node.execute(**{spec.id: float("nan")})
            message = str(err.value)
            assert message.startswith(f"{schema.display_name}: input '{spec.id}': nan is not a number"), message
            checked += 1
    assert checked >= 16


def test_prompt_batch_refuses_padding_beyond_four_times_the_shortest_prompt_before_encoding(sd15):
    from stylekit.nodes.prompt_batch import StyleKitPromptBatch
    from stylekit.sampling.conditioning import MAX_PAD_FACTOR

    encoded = []
    clip = sd15.clip.clone()
    original = clip.encode_from_tokens_scheduled
    clip.encode_from_tokens_scheduled = lambda tokens, **kw: encoded.append(1) or original(tokens, **kw)
    lines = "\n".join("word " * (75 * n - 5) for n in range(1, 13))   # 1 to 12 CLIP chunks
    started = time.perf_counter()
    with pytest.raises(ValueError) as err:
        StyleKitPromptBatch.execute(clip=clip, text=lines)
    assert time.perf_counter() - started < 1.0
    assert f"{MAX_PAD_FACTOR}x the shortest" in str(err.value) and "StyleKit Prompt Batch: input 'text'" in str(err.value)
    assert not encoded
    # Lines of one and two chunks pad to 2x: allowed, as core allows it.
    cond = StyleKitPromptBatch.execute(clip=sd15.clip, text="a cat\n" + "word " * 100).result[0]
    assert cond[0][0].shape[:2] == (2, 154)


def test_prompt_batch_refuses_too_many_lines(sd15):
    from stylekit.nodes.prompt_batch import StyleKitPromptBatch
    from stylekit.sampling.conditioning import MAX_LINES

    with pytest.raises(ValueError, match=f"limit of {MAX_LINES}"):
        StyleKitPromptBatch.execute(clip=sd15.clip, text="a cat\n" * (MAX_LINES + 1))


def test_inversion_refuses_a_trajectory_beyond_its_memory_bound_before_sampling(sd15):
    import torch

    from stylekit.nodes.inversion import MAX_TRAJECTORY_BYTES, StyleKitDDIMInversion

    latent = {"samples": torch.zeros(4, 4, 128, 128)}
    with pytest.raises(ValueError, match="input 'steps'.*GiB") as err:
        StyleKitDDIMInversion.execute(model=sd15.model, positive=None, negative=None, latent_image=latent,
                                      steps=10000, cfg=2.0, scheduler="ddim_uniform", fixed_point_iterations=0)
    assert f"{MAX_TRAJECTORY_BYTES / 2**30:.0f} GiB" in str(err.value)


def test_class_images_refuse_count_times_pixels_beyond_the_bound_before_sampling(sd15):
    from stylekit.nodes.dreambooth import StyleKitClassImages

    with pytest.raises(ValueError, match="input 'count'.*beyond the limit"):
        StyleKitClassImages.execute(model=sd15.model, clip=sd15.clip, vae=sd15.vae, class_noun="dog", count=2000,
                                    width=4096, height=4096, steps=1, cfg=1.0, sampler_name="euler",
                                    scheduler="normal", seed=0, batch_size=1)


def test_noised_reference_accepts_the_largest_seed():
    import torch

    from stylekit.sampling.reference import NoisedReference

    at = NoisedReference(torch.zeros(1, 4, 8, 8), 2**64 - 1).bind(lambda x: x, torch.tensor([2.0, 1.0, 0.0]))
    assert torch.isfinite(at(1.0)).all()


def test_a_replaced_file_whose_mtime_was_restored_is_read_again(comfy_host, tmp_path):
    import os

    from stylekit.host import model_files

    folder = "stylekit_test_loaded_once"
    reads = []
    class Loaded:   # a weak-referencable stand-in for a loaded model
        pass

    cache = model_files.LoadedOnce(folder, lambda path: reads.append(path) or Loaded())
    model_files.register_models_folder(folder)
    import folder_paths

    target = os.path.join(folder_paths.get_folder_paths(folder)[0], "model.bin")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        with open(target, "wb") as f:
            f.write(b"version 1")
        kept = cache.load("model.bin")
        times = os.stat(target)
        assert cache.load("model.bin") is kept and len(reads) == 1      # same version: one read
        time.sleep(0.01)
        with open(target, "wb") as f:                                    # same size, same inode...
            f.write(b"version 2")
        os.utime(target, ns=(times.st_atime_ns, times.st_mtime_ns))     # ... and the old mtime
        assert cache.load("model.bin") is not kept and len(reads) == 2
    finally:
        os.unlink(target)


def test_csd_preprocessing_of_a_1x16384_image_stays_small():
    import torch

    from stylekit.style_discriminator.csd import preprocess

    out = preprocess(torch.rand(1, 1, 16384, 3))
    assert out.shape == (1, 3, 224, 224) and torch.isfinite(out).all()


def test_patch_shuffle_refuses_an_empty_batch(comfy_host):
    import torch

    from stylekit.nodes.styleadapter import StyleKitPatchShuffle

    with pytest.raises(ValueError, match="StyleKit Patch Shuffle: input 'image': the image batch is empty"):
        StyleKitPatchShuffle.execute(image=torch.zeros(0, 64, 64, 3), grid=2, seed=0)


def test_errors_quote_control_and_format_characters_escaped_not_as_themselves():
    from stylekit.host.echo import echo
    from stylekit.training.lora_file import normalized_lora_name

    assert echo("a\0b\nc\x1b[2Jd\u202ee") == r"'a\x00b\nc\x1b[2Jd\u202ee'"
    assert echo("plain name.safetensors") == "'plain name.safetensors'"
    with pytest.raises(ValueError) as err:
        normalized_lora_name("StyleKit/a\0b\nc")
    message = str(err.value)
    assert "control character" in message and r"a\x00b\nc" in message
    assert message.isprintable(), repr(message)
