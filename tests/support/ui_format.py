"""Convert between the two workflow formats, driven by the server's /object_info.

The API files (workflows/api/NAME.json) are the source; the UI files (workflows/NAME.json,
litegraph's serialisation that the frontend drags in) are generated from them plus the note
workflows/notes/NAME.md, by scripts/make_workflows.py. `ui_to_api` mirrors what the frontend's
graphToPrompt does, so a test can prove the pair has not drifted; the real frontend checks the
same in the browser test layer.

Widget rules of the frontend that shape `widgets_values`:
  - an input is a widget when its type is INT, FLOAT, STRING, BOOLEAN or a combo (a list of
    options, or "COMBO"), in `input_order` (required, then optional);
  - an input with `control_after_generate`, and any INT input named seed or noise_seed, gets one
    extra value after its own ("fixed" keeps the seed as saved; the frontend would otherwise
    change it after each run);
  - an image_upload combo gets one extra value for its upload button.
A widget fed by a link is listed in the node's `inputs` with a "widget" entry and keeps its slot
in `widgets_values`. The frontend queues every widget, so API files list every widget input.
"""
from __future__ import annotations

from collections import defaultdict

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPE = "MarkdownNote"
# Nodes are placed 360 px wide; the frontend widens some to fit their widget labels (up to ~435 px
# measured), so columns leave room for that.
COLUMN_WIDTH = 460
ROW_GAP = 40
NOTE_WIDTH = 380
# The frontend's Markdown note fits about 72 characters on a 13 px line at this width; headings and
# paragraph gaps add to it. Fitted to the text heights tests/frontend/test_layout_at_default_zoom.py
# measured (300-431 px), with 10-40 % to spare, so every note's text ends inside its box.
NOTE_CHARS_PER_LINE = 72
NOTE_LINE_PX, NOTE_HEADING_PX, NOTE_PARAGRAPH_GAP_PX, NOTE_PADDING_PX = 13, 24, 8, 50
IMAGE_PREVIEW_PX = 300   # the picture a Load Image node shows under its widgets once loaded


def note_height(note: str) -> int:
    """The height a Markdown note needs to show all of its text at the note's width."""
    height = NOTE_PADDING_PX
    for line in note.splitlines():
        text = line.strip()
        if not text:
            height += NOTE_PARAGRAPH_GAP_PX
        elif text.startswith("#"):
            height += NOTE_HEADING_PX
        else:
            chars = len(text.replace("**", "").replace("`", ""))
            height += NOTE_LINE_PX * max(1, -(-chars // NOTE_CHARS_PER_LINE))
    return max(300, height)


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _input_specs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in the frontend's order."""
    specs = []
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        section_inputs = info["input"].get(section, {})
        for name in order.get(section, list(section_inputs)):
            spec = section_inputs[name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, options))
    return specs


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


# The frontend gives these INT inputs a control widget even when the node does not ask for one.
SEED_NAMES = ("seed", "noise_seed")


def _extra_widget_values(name: str, kind, options: dict) -> list:
    extra = []
    if options.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES):
        extra.append("fixed")
    if options.get("image_upload"):
        extra.append("image")
    return extra


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: tuple = ()) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in trail:
            raise ValueError(f"workflow has a cycle through node {node_id}")
        parents = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
        depth[node_id] = 1 + max((visit(p, trail + (node_id,)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: dict, object_info: dict, note: str | None = None,
              models: dict[str, list[dict]] | None = None, workflow_models: list[dict] | None = None) -> dict:
    """The UI twin of an API workflow. models: node id -> the frontend's model metadata of the files
    that node loads (`properties.models`); workflow_models: files loaded without a loader widget
    (the workflow's top-level `models`). The frontend's missing-models dialog lists both."""
    links, nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = defaultdict(list)
    incoming: dict[int, list[dict]] = {}

    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        inputs = []
        for name, kind, _ in _input_specs(info):
            value = node["inputs"].get(name)
            if not _is_link(value):
                continue
            link_id = len(links) + 1
            origin = int(value[0])
            origin_type = object_info[api[value[0]]["class_type"]]["output"][value[1]]
            links.append([link_id, origin, value[1], int(node_id), len(inputs), origin_type])
            outgoing[(origin, value[1])].append(link_id)
            entry = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": link_id}
            if _is_widget(kind):
                entry["widget"] = {"name": name}
            inputs.append(entry)
        incoming[int(node_id)] = inputs

    depth = _depths(api)
    column_y: dict[int, float] = defaultdict(lambda: 80.0)
    if note:
        note_h = note_height(note)
        nodes.append({"id": max(int(i) for i in api) + 1, "type": NOTE_TYPE, "pos": [40, 80], "size": [NOTE_WIDTH, note_h],
                      "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
        column_y[0] = 80.0 + note_h + 40
    order_of = {nid: i for i, nid in enumerate(sorted(api, key=lambda n: (depth[n], int(n))))}
    for node_id in sorted(api, key=int):
        node = api[node_id]
        info = object_info[node["class_type"]]
        widgets_values = []
        for name, kind, options in _input_specs(info):
            if not _is_widget(kind):
                continue
            value = node["inputs"].get(name, options.get("default"))
            # A linked widget keeps a value slot; the frontend ignores it while the link exists.
            widgets_values.append(options.get("default") if _is_link(value) else value)
            widgets_values.extend(_extra_widget_values(name, kind, options))
        outputs = [{"name": info["output_name"][i], "type": t, "links": outgoing.get((int(node_id), i), []),
                    "slot_index": i} for i, t in enumerate(info["output"])]
        # The frontend draws a slot for every socket input, connected or not (optional image slots
        # included), and one for each linked widget.
        sockets = sum(1 for _, kind, _ in _input_specs(info) if not _is_widget(kind))
        linked_widgets = sum(1 for i in incoming[int(node_id)] if "widget" in i)
        height = 60 + 26 * len(widgets_values) + 22 * max(sockets + linked_widgets, len(outputs))
        if any(options.get("image_upload") for _, _, options in _input_specs(info)):
            height += IMAGE_PREVIEW_PX
        column = depth[node_id]
        entry = {
            "id": int(node_id), "type": node["class_type"],
            "pos": [40 + column * COLUMN_WIDTH, column_y[column]],
            "size": [360, height], "flags": {}, "order": order_of[node_id], "mode": 0,
            "inputs": incoming[int(node_id)], "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets_values,
        }
        if models and models.get(node_id):
            entry["properties"]["models"] = models[node_id]
        # Always written: a node without a title shows the core's display name, which cores rename
        # (DualCLIPLoader is "Load CLIP (Dual)" on 0.33), and the frontend queues it as _meta.title.
        title = node.get("_meta", {}).get("title")
        if title:
            entry["title"] = title
        column_y[column] += height + ROW_GAP
        nodes.append(entry)

    ui = {
        "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [60, 100]}}, "version": 0.4,
    }
    if workflow_models:
        ui["models"] = workflow_models
    return ui


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend would queue for a UI workflow (its graphToPrompt, for plain nodes)."""
    link_origin = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] not in object_info:
            continue  # frontend-only nodes (notes) are not queued
        info = object_info[node["type"]]
        values = list(node.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, kind, options in _input_specs(info):
            if _is_widget(kind) and values:
                value = values.pop(0)
                del values[:len(_extra_widget_values(name, kind, options))]
                inputs[name] = value
            if name in linked:
                origin_id, slot = link_origin[linked[name]]
                inputs[name] = [origin_id, slot]
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title", info.get("display_name", node["type"]))}}
    return api
