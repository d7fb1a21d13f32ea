"""Test-only ComfyUI nodes, loaded by the test server and the tiny-fixture demo alone
(tests/support/server.extra_node_args).

TestDiTConditioning makes a DiT's CONDITIONING from seeded tensors in the model's own widths: core's
Flux text encoder always builds T5-XXL (~4.7 B params, no tiny one possible, DESIGN §6), so the
tiny profile (tests/support/workflows.py) puts this node where a Flux workflow encodes its prompt.
"""
from stylekit.tests.support.tiny_dits import dit_conditioning


class TestDiTConditioning:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    DESCRIPTION = "A DiT prompt made of seeded random tensors (tests only: no text encoder)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}),
        }}

    def make(self, model, seed, tokens, guidance):
        return (dit_conditioning(model, tokens=tokens, seed=seed, guidance=guidance),)


class TestDiTPromptBatch:
    """StyleKit Prompt Batch's outputs for a DiT without a text encoder: one seeded tensor prompt per
    non-empty line of `text` (rows of one CONDITIONING) and their count."""
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("CONDITIONING", "INT")
    RETURN_NAMES = ("conditioning", "count")
    FUNCTION = "make"
    DESCRIPTION = "A batch of DiT prompts made of seeded random tensors, one per line (tests only)."

    @classmethod
    def INPUT_TYPES(cls):
        required = dict(TestDiTConditioning.INPUT_TYPES()["required"])
        required["text"] = ("STRING", {"multiline": True, "default": ""})
        return {"required": required}

    def make(self, model, seed, tokens, guidance, text):
        rows = max(1, sum(1 for line in text.splitlines() if line.strip()))
        return (dit_conditioning(model, batch=rows, tokens=tokens, seed=seed, guidance=guidance), rows)


NODE_CLASS_MAPPINGS = {"TestDiTConditioning": TestDiTConditioning, "TestDiTPromptBatch": TestDiTPromptBatch}
NODE_DISPLAY_NAME_MAPPINGS = {"TestDiTConditioning": "Test DiT Conditioning (tensors)",
                              "TestDiTPromptBatch": "Test DiT Prompt Batch (tensors)"}
