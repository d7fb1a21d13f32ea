"""Workflows that load a file another workflow writes run after it (tests/support/workflows.py)."""
from stylekit.tests.support.workflows import RUNS_AFTER, api_workflow_names, run_order


def test_the_generate_workflow_runs_right_after_the_training_that_writes_its_lora():
    names = ["txt2img_block_map", "dreambooth_generate", "blora_style_transfer", "dreambooth_train"]
    assert run_order(names) == ["blora_style_transfer", "dreambooth_train", "dreambooth_generate", "txt2img_block_map"]


def test_run_order_keeps_every_workflow_once_and_knows_only_existing_ones():
    names = api_workflow_names()
    assert sorted(run_order(names)) == names
    for reader, writer in RUNS_AFTER.items():
        assert reader in names and writer in names
