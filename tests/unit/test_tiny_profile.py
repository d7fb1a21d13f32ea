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
