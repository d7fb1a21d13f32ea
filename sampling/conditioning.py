"""Per-row conditioning: one CONDITIONING whose batch axis gives every latent row its own prompt.

ComfyUI repeats a conditioning to the latent batch, and uses it unchanged when its batch already
equals the latent batch, so stacking the prompts' tensors along the batch axis gives row i the
i-th prompt. Only the cross-attention tensor and SDXL's `pooled_output` are stacked; every other
entry (areas, masks, ControlNets, hooks) comes from the first prompt.
"""
from __future__ import annotations

import math

import torch


class InputError(ValueError):
    """A refusal of one node input: str() is "input '<name>': <problem>"; a node re-raises it as
    node_error(node, input_name, problem)."""

    def __init__(self, input_name: str, problem: str):
        super().__init__(f"input '{input_name}': {problem}")
        self.input_name = input_name
        self.problem = problem


def _single_entry(conditioning: list, what: str):
    if len(conditioning) != 1:
        raise InputError(what, f"it holds {len(conditioning)} conditionings (from Conditioning Combine or "
                         "scheduled prompts); connect a single text encoding")
    return conditioning[0]


def _repeat_rows(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.repeat(rows, *([1] * (t.ndim - 1)))
    raise InputError(what, f"it has a batch of {t.shape[0]} prompts for {rows} latent rows; give one prompt, "
                     "or one per row")


# Core batches conditionings of different lengths only while the padded length stays within 4x
# the shortest (comfy/conds.py); beyond it the padding, not the prompts, would fill memory.
MAX_PAD_FACTOR = 4
MAX_TOKENS = 77 * 32          # a row of 32 CLIP chunks: far beyond any real prompt
MAX_LINES = 256               # prompts in one Prompt Batch
MAX_TEXT_CHARS = 100_000


def padded_length(lengths: list[int]) -> int:
    """The token length rows of these lengths are padded to (their least common multiple), or
    ValueError naming the bound it would exceed."""
    length = math.lcm(*lengths)
    if length > MAX_PAD_FACTOR * min(lengths) or length > MAX_TOKENS:
        raise ValueError(f"prompts of {min(lengths)} to {max(lengths)} tokens would be padded to {length} tokens "
                         f"each, beyond {MAX_PAD_FACTOR}x the shortest (core's limit for batching conditionings) "
                         f"or {MAX_TOKENS} tokens; make the prompts about as long as each other (each 75-token "
                         "chunk counts), or shorten the longest")
    return length


def _cat_tokens(tensors: list[torch.Tensor]) -> torch.Tensor:
    # Different token lengths (long prompts) are padded by repetition to their least common
    # multiple, as core does when it batches conditionings (repetition leaves attention unchanged).
    length = padded_length([t.shape[1] for t in tensors])
    return torch.cat([t.repeat(1, length // t.shape[1], 1) for t in tensors])


def stack_rows(parts: list[tuple[list, int, str]]) -> list:
    """Concatenate conditionings along the batch: each (conditioning, rows, name) fills `rows`
    rows; errors name the part (a node input name)."""
    entries = [(_single_entry(c, name), rows, name) for c, rows, name in parts]
    cond = _cat_tokens([_repeat_rows(e[0], rows, name) for e, rows, name in entries])
    options = dict(entries[0][0][1])
    pooled = [e[1].get("pooled_output") for e, _, _ in entries]
    if all(p is not None for p in pooled):
        options["pooled_output"] = torch.cat([_repeat_rows(p, rows, name)
                                              for p, (_, rows, name) in zip(pooled, entries)])
    else:
        options.pop("pooled_output", None)
    return [[cond, options]]


def with_reference_row(reference: list, rows: list, batch: int,
                       names: tuple[str, str] = ("reference_positive", "positive")) -> list:
    """Conditioning for the batch [reference row, `batch` generated rows]."""
    try:
        return stack_rows([(reference, 1, names[0]), (rows, batch, names[1])])
    except InputError:
        raise
    except ValueError as err:  # the padded length of both together
        raise InputError(names[1], f"with {names[0]}: {err}") from None


def _chunks(tokens: dict) -> int:
    """CLIP chunks (of 77 tokens) of a tokenized prompt: the longest of its encoders' lists."""
    return max(len(v) for v in tokens.values()) if isinstance(tokens, dict) and tokens else 1


def prompt_lines(text: str) -> list[str]:
    """The non-empty lines of `text`, stripped; the bounds that need no tokenizer (text length,
    line count) are checked first."""
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"input 'text' is {len(text)} characters long, beyond the limit of {MAX_TEXT_CHARS}; "
                         "shorten it")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("input 'text' holds no prompt; write one prompt per line")
    if len(prompts) > MAX_LINES:
        raise ValueError(f"input 'text' holds {len(prompts)} prompt lines, beyond the limit of {MAX_LINES}; "
                         "split them over several prompts")
    return prompts


def encode_lines(clip, text: str) -> list:
    """One prompt per non-empty line of `text`, encoded with `clip`, stacked into per-row conditioning.
    Bounds (text length, lines, padded length) are checked on the tokens, before any encoding."""
    prompts = prompt_lines(text)
    tokenized = [clip.tokenize(prompt) for prompt in prompts]
    try:
        padded_length([77 * _chunks(tokens) for tokens in tokenized])
    except ValueError as err:
        raise ValueError(f"input 'text': {err}") from None
    return stack_rows([(clip.encode_from_tokens_scheduled(tokens), 1, f"text (line {i + 1})")
                       for i, tokens in enumerate(tokenized)])
