from stylekit.tests.support.workflows import TINY_SIDE, TINY_STEPS, tiny


def test_sizes_shrink_to_the_tiny_side_keeping_aspect_and_multiples_of_8():
    out = tiny({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 2}}})
    inputs = out["1"]["inputs"]
    assert inputs["width"] == TINY_SIDE and inputs["height"] == 48 and inputs["batch_size"] == 2


def test_steps_shrink_and_step_indices_scale_with_them():
    out = tiny({"1": {"class_type": "KSamplerAdvanced",
                      "inputs": {"steps": 40, "start_at_step": 20, "end_at_step": 10000, "seed": 5}}})
    inputs = out["1"]["inputs"]
    assert inputs["steps"] == TINY_STEPS
    assert inputs["start_at_step"] == TINY_STEPS // 2
    assert inputs["end_at_step"] == 10000 and inputs["seed"] == 5


def test_links_and_small_values_are_left_alone_and_input_is_not_mutated():
    prompt = {"1": {"class_type": "X", "inputs": {"width": ["2", 0], "height": 32, "steps": 3}}}
    out = tiny(prompt)
    assert out == prompt and out is not prompt


def test_flux_text_encodes_become_tensor_conditioning_on_the_graphs_model_and_the_t5_loader_goes():
    from stylekit.tests.support.workflows import without_t5

    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "a", "clip_name2": "b", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "guidance": 2.5}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0]}},
    }
    out = without_t5(prompt)
    assert "2" not in out and out["5"] == prompt["5"]
    assert {out[n]["class_type"] for n in ("3", "4")} == {"TestDiTConditioning"}
    assert out["3"]["inputs"]["model"] == ["1", 0] and out["3"]["inputs"]["guidance"] == 2.5
    assert out["3"]["inputs"]["seed"] != out["4"]["inputs"]["seed"]
    sd_graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
                "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1]}}}
    assert without_t5(sd_graph) == sd_graph


def test_sd3_text_encodes_become_tensor_conditioning_on_the_checkpoints_model_and_the_clip_loader_goes():
    from stylekit.tests.support.workflows import without_t5

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_large.safetensors"}},
        "2": {"class_type": "TripleCLIPLoader",
              "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                         "clip_name3": "t5xxl_fp16.safetensors"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a lighthouse"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0]}},
    }
    out = without_t5(prompt)
    assert "2" not in out and out["5"] == prompt["5"] and out["1"] == prompt["1"]
    assert {out[n]["class_type"] for n in ("3", "4")} == {"TestDiTConditioning"}
    assert out["3"]["inputs"]["model"] == ["1", 0] and out["3"]["inputs"]["seed"] != out["4"]["inputs"]["seed"]
    dual = {**prompt, "2": {"class_type": "DualCLIPLoader",
                            "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                       "type": "sd3"}}}
    assert "2" not in without_t5(dual)


def test_a_prompt_batch_on_a_dit_text_encoder_becomes_a_tensor_prompt_batch():
    from stylekit.tests.support.workflows import without_t5

    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "a", "clip_name2": "b", "type": "flux"}},
        "3": {"class_type": "StyleKitPromptBatch", "inputs": {"clip": ["2", 0], "text": "a cat\na dog"}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": ["3", 1]}},
    }
    out = without_t5(prompt)
    assert "2" not in out and out["4"] == prompt["4"]
    assert out["3"]["class_type"] == "TestDiTPromptBatch"
    assert out["3"]["inputs"]["model"] == ["1", 0] and out["3"]["inputs"]["text"] == "a cat\na dog"
