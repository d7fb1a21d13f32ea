"""Inputs sent by strangers: block names are matched in linear time, long texts are refused
before they are parsed, and errors quote them only in part."""
from __future__ import annotations

import time

import pytest

from stylekit.patching.block_map import block_map
from stylekit.patching.block_weights import CUSTOM, MAX_SPEC_CHARS, BlockWeightsError, block_weights_for, resolve_block_weights
from stylekit.patching.echo import ECHO_LIMIT
from stylekit.patching.layer_select import MAX_LIST_CHARS, parse_blocks

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
