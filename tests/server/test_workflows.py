"""Every example workflow runs headless on the tiny fixtures, and its UI twin has not drifted."""
from __future__ import annotations

import json

import pytest

from stylekit.scripts.model_table import frontend_models, load_table
from stylekit.tests.support.paths import PINNED_CORE, host_version
from stylekit.tests.support.ui_format import api_to_ui, ui_to_api
from stylekit.tests.support.workflows import WORKFLOWS, api_workflow_names, load_api_workflow, run_order, tiny

NAMES = api_workflow_names()


def test_every_api_workflow_has_a_ui_twin_and_a_note():
    ui_names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert ui_names == NAMES
    for name in NAMES:
        assert (WORKFLOWS / "notes" / f"{name}.md").read_text().strip(), f"workflows/notes/{name}.md is empty"


@pytest.mark.parametrize("name", run_order(NAMES))  # writers of files others load run first
def test_workflow_runs_on_the_tiny_fixtures_and_writes_images(server, name):
    outputs = server.run(tiny(load_api_workflow(name)), timeout=1200)
    images = outputs.images()
    assert images, f"{name} wrote no image"
    for ref in images:
        assert server.fetch(ref)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", NAMES)
def test_ui_twin_queues_exactly_the_api_workflow(object_info, name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert ui_to_api(ui, object_info) == load_api_workflow(name)


@pytest.mark.parametrize("name", NAMES)
def test_ui_twin_is_what_make_workflows_generates(object_info, name):
    # Twins are generated on the pinned core; a newer core lays out some widgets differently
    # (incidental). What every core must satisfy is the test above: the twin queues the API file.
    if host_version() != PINNED_CORE:
        pytest.skip(f"UI twins are generated on core {PINNED_CORE}; this is {host_version()}")
    note = (WORKFLOWS / "notes" / f"{name}.md").read_text()
    api = load_api_workflow(name)
    expected = api_to_ui(api, object_info, note, *frontend_models(load_table(), name, api))
    actual = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert actual == expected, f"workflows/{name}.json is stale: run `make workflows`"
