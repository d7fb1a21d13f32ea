"""Nothing in a workflow is hidden when it opens at the frontend's default zoom: every note's text
fits its box, and no node (image previews included) lies under another."""
from __future__ import annotations

import json

import pytest

from stylekit.tests.support.workflows import WORKFLOWS, api_workflow_names

NAMES = api_workflow_names()

MEASURE = """() => {
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = window.app.graph.nodes.map(n => ({id: n.id, type: n.type,
      box: [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]}));
  const notes = window.app.graph.nodes.filter(n => n.type === 'MarkdownNote').map(n => {
      const el = (n.widgets || []).map(w => w.element).find(e => e);
      const inner = el && (el.querySelector('.tiptap, .ProseMirror, .comfy-markdown') || el);
      return {id: n.id, scroll: inner ? inner.scrollHeight : null, client: el ? el.clientHeight : null};
  });
  return {nodes, notes};
}"""


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


@pytest.mark.parametrize("name", NAMES)
def test_notes_fit_and_no_node_covers_another(frontend, name):
    frontend.load(json.loads((WORKFLOWS / f"{name}.json").read_text()))
    frontend.close_dialogs()
    frontend.page.wait_for_timeout(1500)   # image previews load and resize their nodes
    frontend.page.evaluate("() => window.app.canvas.setDirty(true, true)")
    frontend.page.wait_for_timeout(200)
    measured = frontend.page.evaluate(MEASURE)
    for note in measured["notes"]:
        assert note["scroll"] is not None, f"{name}: note {note['id']} has no rendered text to measure"
        assert note["scroll"] <= note["client"] + 2, (
            f"{name}: note text is {note['scroll']} px in a {note['client']} px box")
    nodes = measured["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert _overlap(a["box"], b["box"]) == 0, f"{name}: {a['type']} {a['id']} overlaps {b['type']} {b['id']}"
