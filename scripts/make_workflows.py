"""Regenerate every UI-format workflow (workflows/NAME.json) from its API twin and note.

The API file workflows/api/NAME.json is the source; the note workflows/notes/NAME.md becomes a
Markdown note node. Needs the node definitions, so it starts a server (about 10 s).
Usage: .venv/bin/python scripts/make_workflows.py [NAME ...]
"""
from __future__ import annotations

import json
import sys

from stylekit.scripts.model_table import frontend_models, load_table
from stylekit.tests.support.server import ComfyServer
from stylekit.tests.support.ui_format import api_to_ui
from stylekit.tests.support.workflows import WORKFLOWS, api_workflow_names, load_api_workflow


def render(name: str, object_info: dict) -> str:
    note_path = WORKFLOWS / "notes" / f"{name}.md"
    note = note_path.read_text() if note_path.exists() else None
    api = load_api_workflow(name)
    # Model metadata for the frontend's missing-models dialog, from workflows/models/models.json.
    models, implicit = frontend_models(load_table(), name, api)
    return json.dumps(api_to_ui(api, object_info, note, models, implicit), indent=2) + "\n"


def main(names: list[str]) -> int:
    with ComfyServer() as server:
        object_info = server.object_info()
    for name in names or api_workflow_names():
        (WORKFLOWS / f"{name}.json").write_text(render(name, object_info))
        print(f"wrote workflows/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
