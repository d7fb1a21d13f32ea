"""Refusal at /prompt: core's prompt validation calls every StyleKit node's validate_inputs
(nodes._common.literal_validator) before any node of the prompt runs, so a literal input the node
would refuse costs no model load. Checked through core's own execution.validate_inputs, on
whichever core runs the host layer (0.3.75 pinned, 0.33 in `make test-host`)."""
from __future__ import annotations

import asyncio
import time

import pytest

MEGABYTE = 1 << 20


@pytest.fixture(scope="module")
def registered(comfy_host):
    """Our nodes in core's registry, as the server has them (the host layer loads no custom nodes)."""
    import nodes

    from stylekit.nodes import all_nodes

    ours = {n.define_schema().node_id: n for n in all_nodes()}
    saved = {k: nodes.NODE_CLASS_MAPPINGS.get(k) for k in ours}
    nodes.NODE_CLASS_MAPPINGS.update(ours)
    yield ours
    for key, value in saved.items():
        if value is None:
            nodes.NODE_CLASS_MAPPINGS.pop(key, None)
        else:
            nodes.NODE_CLASS_MAPPINGS[key] = value


def validate(prompt: dict, node_id: str = "1") -> list[dict]:
    """Core's validation of one node of `prompt`: its error list (empty when valid)."""
    import execution

    ok, errors, _ = asyncio.run(execution.validate_inputs("stylekit-test", prompt, node_id, {}))
    assert ok is (not errors)
    return errors


def ours(errors: list[dict]) -> set[str]:
    """The texts of the errors our validate_inputs gave (core repeats one per input it names)."""
    return {e["details"].split(" - ", 1)[1] for e in errors if e["type"] == "custom_validation_failed"}


def one(class_type: str, **inputs) -> dict:
    return {"1": {"class_type": class_type, "inputs": inputs}}


def test_nan_and_inf_in_every_float_input_of_every_node_are_refused_at_validation(registered):
    from comfy_api.latest import io

    checked = 0
    for node_id, node in registered.items():
        schema = node.define_schema()
        for spec in schema.inputs:
            if not isinstance(spec, io.Float.Input):
                continue
            for value, says in ((float("nan"), "nan is not a number"), (float("inf"), "inf is not a finite number"),
                                (float("-inf"), "-inf is not a finite number")):
                texts = ours(validate(one(node_id, **{spec.id: value})))
                assert texts == {f"{schema.display_name}: input '{spec.id}': {says}; give a number from "
                                 f"{spec.min} to {spec.max}"}, (node_id, spec.id, texts)
            checked += 1
    assert checked >= 16


def test_range_checks_core_leaves_to_validate_inputs_are_still_made(registered):
    errors = validate(one("StyleKitIPAdapter", weight=-5.0))
    assert ours(errors) == {"StyleKit IP-Adapter: input 'weight': -5.0 is below the minimum of -1.0; "
                            "give a number from -1.0 to 5.0"}
    assert ours(validate(one("StyleKitClassImages", width=8192))) == {
        "StyleKit DreamBooth Class Images: input 'width': 8192 is above the maximum of 4096; give a number from 64 to 4096"}
    assert "is not one of its options" in next(iter(ours(validate(one("StyleKitIPAdapter", blocks="every other")))))
    # An input our validator does not name keeps core's own check.
    errors = validate(one("StyleKitDreamBoothTrain", steps=0))
    assert any(e["type"] == "value_smaller_than_min" and e["details"] == "steps" for e in errors)


def test_a_linked_input_is_left_to_execute(registered):
    prompt = {"1": {"class_type": "StyleKitIPAdapter", "inputs": {
                  "weight": ["2", 0], "start_percent": 0.0, "end_percent": 1.0, "blocks": "all blocks", "block_weights": "",
                  "combine": "concat"}},
              "2": {"class_type": "PrimitiveFloat", "inputs": {"value": float("nan")}}}
    assert not ours(validate(prompt))


def _block_weights_1mb() -> str:
    return '{"output' + " " * MEGABYTE + 'x": 1.0}'


# (class type, literal inputs, what the refusal says, execute's own text for the same input is compared
# where execute reaches the check without models)
LITERAL_CASES = [
    ("StyleKitIPAdapter", dict(blocks="custom (block_weights)", block_weights=_block_weights_1mb()),
     f"StyleKit IP-Adapter: input 'block_weights': the text is {len(_block_weights_1mb())} characters long, "
     "beyond the limit of 20000"),
    ("StyleKitIPAdapter", dict(blocks="custom (block_weights)", block_weights="{'down': {'block_2': [0.0,"),
     "StyleKit IP-Adapter: input 'block_weights': cannot read it as JSON"),
    ("StyleKitIPAdapter", dict(start_percent=0.8, end_percent=0.2),
     "StyleKit IP-Adapter: input 'end_percent': start_percent 0.8 must not be after end_percent 0.2"),
    ("StyleKitIPAdapterAdvanced", dict(frame_weights="1, x"),
     "StyleKit IP-Adapter Advanced: input 'frame_weights': '1, x' is not a list of numbers"),
    ("StyleKitStyleGuidance", dict(start_percent=0.5, end_percent=0.1),
     "StyleKit Style Guidance: input 'end_percent': start_percent 0.5 must not be after end_percent 0.1"),
    ("StyleKitPromptBatch", dict(text="a lighthouse\n" * 300),
     "StyleKit Prompt Batch: input 'text' holds 300 prompt lines, beyond the limit of 256"),
    ("StyleKitStyleAligned", dict(blocks="custom", custom_blocks="output" + " " * 40_000 + "x"),
     "StyleKit StyleAligned: input 'custom_blocks': the block list is 40007 characters long, beyond the limit of 4000"),
    ("StyleKitVisualStylePromptingReferenceSampler", dict(blocks="custom", custom_blocks="output, " * 1000),
     "StyleKit Visual Style Prompting Reference Sampler: input 'custom_blocks': the block list is 8000 characters"),
    ("StyleKitClassImages", dict(class_noun="dog", count=2000, width=4096, height=4096),
     "StyleKit DreamBooth Class Images: input 'count': 2000 images of 4096x4096 are 33,554,432,000 pixels"),
    ("StyleKitDreamBoothTrain", dict(identifier="x" * MEGABYTE),
     "StyleKit DreamBooth LoRA Train: input 'identifier': 1048576 characters, beyond the limit of 200"),
    ("StyleKitDreamBoothTrain", dict(target_blocks="block list", block_list=" "),
     "StyleKit DreamBooth LoRA Train: input 'block_list': empty while target_blocks is 'block list'"),
    ("StyleKitDreamBoothTrain", dict(lora_name="x" * 300),
     "StyleKit DreamBooth LoRA Train: input 'lora_name': a part of the name is 300 bytes long, beyond the limit"),
    ("StyleKitDreamBoothTrain", dict(lora_name="StyleKit/a\0b"),
     "StyleKit DreamBooth LoRA Train: input 'lora_name': 'StyleKit/a\\x00b' holds a control character"),
    ("StyleKitBLoRATrain", dict(lora_name="con"),
     "StyleKit B-LoRA Train: input 'lora_name': 'con' cannot be a file or folder name on every system"),
]


@pytest.mark.parametrize("class_type, inputs, says", LITERAL_CASES,
                         ids=[f"{c[0]}: {next(iter(c[1]))}" for c in LITERAL_CASES])
def test_a_literal_input_the_node_would_refuse_is_refused_at_validation_within_a_tenth_of_a_second(
        registered, class_type, inputs, says):
    started = time.perf_counter()
    texts = ours(validate(one(class_type, **inputs)))
    elapsed = time.perf_counter() - started
    assert len(texts) == 1 and next(iter(texts)).startswith(says), texts
    assert len(next(iter(texts))) < 1000, "the error echoes its input unbounded"
    assert elapsed < 0.1, f"{elapsed:.3f} s"


@pytest.mark.parametrize("class_type, inputs, call", [
    ("StyleKitPromptBatch", dict(text="a\n" * 300), dict(clip=None)),
    ("StyleKitDreamBoothTrain", dict(identifier="x" * 300), dict(model=None, clip=None, vae=None, images=None,
                                                                class_noun="dog", prior_weight=0.0, steps=1,
                                                                learning_rate=1e-4, rank=1, target_blocks="all attention",
                                                                block_list="", seed=0, lora_name="x")),
    ("StyleKitClassImages", dict(class_noun="dog", count=2000, width=4096, height=4096),
     dict(model=None, clip=None, vae=None, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", seed=0,
          batch_size=1)),
])
def test_validation_refuses_with_the_text_execute_gives_for_the_same_input(registered, class_type, inputs, call):
    texts = ours(validate(one(class_type, **inputs)))
    with pytest.raises(ValueError) as err:
        registered[class_type].execute(**inputs, **call)
    assert texts == {str(err.value)}


def test_a_validate_inputs_the_node_defines_still_runs_after_ours(comfy_host):
    import execution
    import nodes
    from comfy_api.latest import io

    from stylekit.nodes._common import guard_inputs

    class OwnCheck(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="StyleKitTestOwnCheck", display_name="Own Check", category="StyleKit/test",
                             inputs=[io.String.Input("word"), io.Float.Input("strength", min=0.0, max=1.0)],
                             outputs=[io.String.Output()])

        @classmethod
        def validate_inputs(cls, word):
            return True if word != "bad" else "Own Check: input 'word': not this word; choose another"

        @classmethod
        def execute(cls, word, strength):
            return io.NodeOutput(word)

    guard_inputs(OwnCheck)
    nodes.NODE_CLASS_MAPPINGS["StyleKitTestOwnCheck"] = OwnCheck
    try:
        assert ours(validate(one("StyleKitTestOwnCheck", word="bad", strength=0.5))) == {
            "Own Check: input 'word': not this word; choose another"}
        assert ours(validate(one("StyleKitTestOwnCheck", word="bad", strength=float("nan")))) == {
            "Own Check: input 'strength': nan is not a number; give a number from 0.0 to 1.0"}
        assert validate(one("StyleKitTestOwnCheck", word="good", strength=0.5)) == []
    finally:
        del nodes.NODE_CLASS_MAPPINGS["StyleKitTestOwnCheck"]
    assert execution is not None
