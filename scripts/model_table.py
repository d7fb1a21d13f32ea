"""The model files each workflow loads, read from the one table workflows/models/models.json.

Standard library only: `make models` (scripts/fetch_models.py) runs it with any Python 3, before
the pack's own environment exists. `make workflows` turns the same entries into the frontend's
template metadata (`properties.models` of each loader node: name, url, directory, and hash with
hash_type sha256 where the publisher states one), which its missing-models dialog lists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "workflows" / "models" / "models.json"
API_DIR = REPO / "workflows" / "api"


@dataclass(frozen=True)
class ModelFile:
    name: str          # the file name under models/<directory>/ (a widget value)
    directory: str     # ComfyUI's model folder name
    url: str
    sha256: str | None = None
    note: str = ""

    @property
    def relative_path(self) -> str:
        return f"{self.directory}/{self.name}"

    def frontend_entry(self) -> dict:
        entry = {"name": self.name, "url": self.url, "directory": self.directory}
        if self.sha256:
            entry.update(hash=self.sha256, hash_type="sha256")
        return entry


@dataclass(frozen=True)
class Table:
    loaders: dict[str, dict[str, str]]     # class_type -> {widget input: model folder}
    files: dict[tuple[str, str], ModelFile]  # (directory, name) -> file
    implicit: dict[str, list[tuple[str, str]]]
    written: dict[str, str]                 # "directory/name" -> the workflow that writes it

    def file(self, directory: str, name: str) -> ModelFile:
        try:
            return self.files[(directory, name)]
        except KeyError:
            raise KeyError(f"workflows/models/models.json has no entry for models/{directory}/{name}; add its "
                           "official download address there") from None


def load_table(path: Path = TABLE) -> Table:
    data = json.loads(path.read_text())
    files = {}
    for row in data["files"]:
        f = ModelFile(row["name"], row["directory"], row["url"], row.get("sha256"), row.get("note", ""))
        if (f.directory, f.name) in files:
            raise ValueError(f"{path.name}: models/{f.directory}/{f.name} is listed twice")
        files[(f.directory, f.name)] = f
    implicit = {k: [tuple(x) for x in v] for k, v in data.get("implicit", {}).items() if not k.startswith("_")}
    written = {k: v for k, v in data.get("written_by_workflows", {}).items() if not k.startswith("_")}
    return Table(data["loaders"], files, implicit, written)


def loader_inputs(table: Table, node: dict) -> list[tuple[str, str, str]]:
    """(input name, model folder, file name) of each file widget of an API node."""
    out = []
    for input_name, directory in table.loaders.get(node["class_type"], {}).items():
        value = node["inputs"].get(input_name)
        if isinstance(value, str):
            out.append((input_name, directory, value))
    return out


def node_models(table: Table, node: dict) -> list[ModelFile]:
    """The hub files an API node loads (files another workflow writes have no entry)."""
    return [table.file(d, n) for _, d, n in loader_inputs(table, node) if f"{d}/{n}" not in table.written]


def workflow_models(table: Table, name: str, api: dict | None = None) -> list[ModelFile]:
    """Every hub file a workflow needs, loader widgets first, in node order, each once."""
    if api is None:
        api = json.loads((API_DIR / f"{name}.json").read_text())
    found: list[ModelFile] = []
    for node_id in sorted(api, key=int):
        found += node_models(table, api[node_id])
    found += [table.file(d, n) for d, n in table.implicit.get(name, [])]
    unique = []
    for f in found:
        if f not in unique:
            unique.append(f)
    return unique


def workflow_names() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def frontend_models(table: Table, name: str, api: dict) -> tuple[dict[str, list[dict]], list[dict]]:
    """The frontend's model metadata of a workflow: per node id (`properties.models` of its
    loader nodes) and the workflow's top-level list (files loaded with no loader widget)."""
    per_node = {node_id: [f.frontend_entry() for f in node_models(table, node)] for node_id, node in api.items()}
    implicit = [table.file(d, n).frontend_entry() for d, n in table.implicit.get(name, [])]
    return per_node, implicit
