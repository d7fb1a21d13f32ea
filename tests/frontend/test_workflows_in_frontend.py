"""Every UI workflow loads in the real frontend with no missing node or error, the frontend's own
UI->API conversion of it equals its API twin, and the template browser lists the pack's workflows."""
from __future__ import annotations

import json

import pytest

from stylekit.tests.support.workflows import WORKFLOWS, api_workflow_names, load_api_workflow

NAMES = api_workflow_names()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_without_missing_nodes_or_errors(frontend, name):
    frontend.load(json.loads((WORKFLOWS / f"{name}.json").read_text()))
    frontend.screenshot(name)
    missing = frontend.missing_node_reports()
    frontend.close_dialogs()
    assert not missing, missing
    assert frontend.unregistered_node_types() == []
    assert frontend.errors == []


@pytest.mark.parametrize("name", NAMES)
def test_frontend_converts_the_ui_workflow_to_its_api_twin(frontend, name):
    frontend.load(json.loads((WORKFLOWS / f"{name}.json").read_text()))
    frontend.close_dialogs()
    queued, twin = frontend.queued_prompt(), load_api_workflow(name)
    assert queued == twin, _differences(queued, twin)


def _differences(queued: dict, twin: dict) -> str:
    """Which node inputs differ, frontend's conversion first: a readable failure."""
    lines = [f"node {n}: only in {'the UI' if n in queued else 'the API twin'}" for n in set(queued) ^ set(twin)]
    for n in sorted(set(queued) & set(twin)):
        a, b = queued[n].get("inputs", {}), twin[n].get("inputs", {})
        lines += [f"node {n} ({twin[n]['class_type']}) input {k!r}: UI {a.get(k, '<missing>')!r} "
                  f"!= API {b.get(k, '<missing>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "\n".join(lines)


def test_a_workflow_with_an_unknown_node_is_reported_missing(frontend):
    """The check above can fail: the frontend flags a node type nobody registered."""
    workflow = json.loads((WORKFLOWS / f"{NAMES[0]}.json").read_text())
    broken = next(n for n in workflow["nodes"] if n["type"] != "MarkdownNote")
    broken["type"] = "StyleKitNoSuchNode"
    frontend.load(workflow)
    reports = frontend.missing_node_reports()
    frontend.close_dialogs()
    assert any("StyleKitNoSuchNode" in t for t in reports), reports
    assert frontend.unregistered_node_types() == ["StyleKitNoSuchNode"]


def test_template_browser_lists_every_workflow_under_the_pack(server, frontend):
    templates = frontend.page.evaluate("async () => (await fetch('/workflow_templates')).json()")
    assert sorted(templates["comfyui-stylekit"]) == NAMES
    for name in NAMES:
        served = server.get(f"/api/workflow_templates/comfyui-stylekit/{name}.json")
        assert served == json.loads((WORKFLOWS / f"{name}.json").read_text())
