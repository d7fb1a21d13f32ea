"""Training output: a LoRA never replaces a file silently, a bad name fails before training, and
nothing but a complete, finite file ever carries a .safetensors name."""
from __future__ import annotations

import fcntl
import os
import time

import pytest
import safetensors.torch
import torch

from stylekit.training.lora_file import (LoraOutput, NonFiniteWeights, OutputError, normalized_lora_name,
                                         written_by_stylekit)

OURS = {"stylekit_method": "DreamBooth"}
WEIGHTS = {"lora_unet_x.lora_up.weight": torch.ones(4, 2), "lora_unet_x.lora_down.weight": torch.ones(2, 4)}


def _visible(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_an_existing_file_is_never_replaced_by_default_the_new_one_takes_the_next_number(tmp_path):
    target = tmp_path / "dog.safetensors"
    target.write_bytes(b"the operator's file")
    for _ in range(2):
        with LoraOutput(target) as out:
            saved = out.commit(WEIGHTS, OURS)
    assert target.read_bytes() == b"the operator's file"
    assert _visible(tmp_path) == ["dog.safetensors", "dog_00001_.safetensors", "dog_00002_.safetensors"]
    assert saved.name == "dog_00002_.safetensors" and written_by_stylekit(saved)


def test_overwrite_replaces_only_a_lora_stylekit_wrote(tmp_path):
    target = tmp_path / "dog.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(1)}, str(target), metadata=OURS)
    with LoraOutput(target, overwrite=True) as out:
        assert out.commit(WEIGHTS, OURS) == target
    assert safetensors.torch.load_file(str(target)).keys() == WEIGHTS.keys()

    foreign = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(1)}, str(foreign), metadata={"ss_network_dim": "4"})
    before = foreign.read_bytes()
    with pytest.raises(OutputError, match="not trained by StyleKit"):
        with LoraOutput(foreign, overwrite=True):
            pass
    assert foreign.read_bytes() == before


@pytest.mark.parametrize("name, says", [
    ("x" * 300, "bytes long"), ("dog\0cat", "control character"), ("dog\ncat", "control character"),
    ("con", "reserved"), ("StyleKit/CON.lora", "reserved"), ("lpt1", "reserved"), ("dog.", "trailing dot"),
    ("y" * 5000, "limit of"),
])
def test_names_that_cannot_be_portable_files_are_refused_before_any_work(name, says):
    started = time.perf_counter()
    with pytest.raises(ValueError, match=says) as err:
        normalized_lora_name(name)
    assert time.perf_counter() - started < 0.1
    assert len(str(err.value)) < 400   # the name is quoted only in part


def test_a_path_through_an_existing_file_fails_when_reserved_not_after_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        with LoraOutput(tmp_path / "afile" / "dog.safetensors"):
            pytest.fail("the reservation must fail")


def test_the_folder_and_a_unique_temporary_file_exist_from_the_start(tmp_path):
    target = tmp_path / "new" / "dog.safetensors"
    with LoraOutput(target) as first, LoraOutput(target) as second:
        assert first.temporary.exists() and second.temporary.exists()
        assert first.temporary != second.temporary
        assert not first.temporary.name.endswith(".safetensors")
    assert _visible(target.parent) == []   # discarded: nothing left


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path):
    target = tmp_path / "dog.safetensors"
    with pytest.raises(NonFiniteWeights, match="1 of 2 tensors"):
        with LoraOutput(target) as out:
            out.commit({**WEIGHTS, "lora_unet_x.lora_up.weight": torch.full((4, 2), float("nan"))}, OURS)
    assert _visible(tmp_path) == []


def test_stale_temporaries_are_removed_but_a_live_one_is_kept(tmp_path):
    stale = tmp_path / ".dog.safetensors.1234.partial"          # the old PID-named kind, left by a kill
    stale.write_bytes(b"half")
    live = tmp_path / ".cat.safetensors.abcd.partial"
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)              # another run holds it
    try:
        with LoraOutput(tmp_path / "dog.safetensors") as out:
            out.commit(WEIGHTS, OURS)
        assert not stale.exists() and live.exists()
    finally:
        os.close(fd)
