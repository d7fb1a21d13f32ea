"""Rewrite a workflow built on the IP-Adapter Plus pack (cubiq/ComfyUI_IPAdapter_plus) into StyleKit's
nodes with the same settings. UI (the frontend's .json) and API (prompt) formats are both read.

    python3 scripts/migrate_ipadapter_plus.py IN.json OUT.json [--base sd15|sdxl]

Loaders become StyleKit IP-Adapter Loader (+ Load CLIP Vision), apply nodes become StyleKit
IP-Adapter Advanced / Tiled; every other node is left exactly as it was. What has no equivalent
(FaceID, embeds nodes, combine modes add / subtract / norm average, ...) is listed in the report
and left in place, so the frontend shows it as missing rather than the graph silently changing.
The node classes and inputs converted are written below from the incumbent's source at
INCUMBENT_REVISION (IPAdapterPlus.py); no /object_info of it is needed. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

INCUMBENT_REVISION = "9d076a3df0d2763cef5510ec5ab807f6632c39f5"
WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise"]
EMBEDS_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]

# The incumbent's nodes this script converts: widget inputs in the frontend's order, then link inputs
# (required, then optional), then outputs, as their INPUT_TYPES / RETURN_TYPES declare them.
_APPLY_LINKS = ["model", "ipadapter", "image"]
_APPLY_OPTIONAL = ["image_negative", "attn_mask", "clip_vision"]
INCUMBENT: dict[str, dict] = {
    "IPAdapterModelLoader": {"widgets": ["ipadapter_file"], "links": [], "outputs": ["IPADAPTER"]},
    "IPAdapterUnifiedLoader": {"widgets": ["preset"], "links": ["model", "ipadapter"], "outputs": ["MODEL", "IPADAPTER"]},
    "IPAdapter": {"widgets": ["weight", "start_at", "end_at", "weight_type"], "links": _APPLY_LINKS + ["attn_mask"],
                  "outputs": ["MODEL"]},
    "IPAdapterAdvanced": {"widgets": ["weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"],
                          "links": _APPLY_LINKS + _APPLY_OPTIONAL, "outputs": ["MODEL"]},
    "IPAdapterBatch": {"widgets": ["weight", "weight_type", "start_at", "end_at", "embeds_scaling", "encode_batch_size"],
                       "links": _APPLY_LINKS + _APPLY_OPTIONAL, "outputs": ["MODEL"]},
    "IPAdapterStyleComposition": {"widgets": ["weight_style", "weight_composition", "expand_style", "combine_embeds",
                                              "start_at", "end_at", "embeds_scaling"],
                                  "links": ["model", "ipadapter", "image_style", "image_composition"] + _APPLY_OPTIONAL,
                                  "outputs": ["MODEL"]},
    "IPAdapterPreciseStyleTransfer": {"widgets": ["weight", "style_boost", "combine_embeds", "start_at", "end_at",
                                                  "embeds_scaling"],
                                      "links": _APPLY_LINKS + _APPLY_OPTIONAL, "outputs": ["MODEL"]},
    "IPAdapterTiled": {"widgets": ["weight", "weight_type", "combine_embeds", "start_at", "end_at", "sharpening",
                                   "embeds_scaling"],
                       "links": _APPLY_LINKS + _APPLY_OPTIONAL, "outputs": ["MODEL", "IMAGE", "MASK"]},
}
# IPAdapterUnifiedLoader presets -> (SD1.5 file, SDXL file, CLIP vision file), as its get_ipadapter_file /
# get_clipvision_file patterns pick them among the official file names.
VIT_H, VIT_G = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
PRESETS = {
    "LIGHT - SD1.5 only (low strength)": ("ip-adapter_sd15_light_v11.bin", None, VIT_H),
    "STANDARD (medium strength)": ("ip-adapter_sd15.safetensors", "ip-adapter_sdxl_vit-h.safetensors", VIT_H),
    "VIT-G (medium strength)": ("ip-adapter_sd15_vit-G.safetensors", "ip-adapter_sdxl.safetensors", VIT_G),
    "PLUS (high strength)": ("ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors", VIT_H),
    "PLUS FACE (portraits)": ("ip-adapter-plus-face_sd15.safetensors", "ip-adapter-plus-face_sdxl_vit-h.safetensors", VIT_H),
    "FULL FACE - SD1.5 only (portraits stronger)": ("ip-adapter-full-face_sd15.safetensors", None, VIT_H),
}
SIMPLE_WEIGHT_TYPES = {"standard": "linear", "prompt is more important": "ease out", "style transfer": "style transfer"}
COMBINE = {"concat": "concat", "average": "average"}

# StyleKit's nodes as their schemas declare them (tests/host/test_migrate_ipadapter_plus.py checks it).
_OUR_INJECTION = ["weight", "start_percent", "end_percent", "blocks", "block_weights", "combine"]
_OUR_CONTROLS = ["weight_type", "weight_composition", "embeds_scaling", "skip_middle_block"]
OURS: dict[str, dict] = {
    "StyleKitIPAdapterLoader": {"widgets": ["ipadapter_file"], "links": [], "outputs": ["STYLEKIT_IPADAPTER"]},
    "CLIPVisionLoader": {"widgets": ["clip_name"], "links": [], "outputs": ["CLIP_VISION"]},
    "StyleKitIPAdapterAdvanced": {
        "widgets": _OUR_INJECTION + _OUR_CONTROLS + ["unfold_batch", "frame_weights"],
        "links": ["model", "ipadapter", "clip_vision", "image", "negative_image", "attn_mask"], "outputs": ["MODEL"]},
    "StyleKitIPAdapterTiled": {
        "widgets": _OUR_INJECTION + _OUR_CONTROLS + ["sharpening"],
        "links": ["model", "ipadapter", "clip_vision", "image", "negative_image", "attn_mask"],
        "outputs": ["MODEL", "IMAGE", "MASK"]},
}
OUR_DEFAULTS = {"weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "blocks": "all blocks", "block_weights": "",
                "combine": "concat", "weight_type": "linear", "weight_composition": 1.0, "embeds_scaling": "V only",
                "skip_middle_block": True, "unfold_batch": False, "frame_weights": "", "sharpening": 0.0}
TITLES = {"StyleKitIPAdapterLoader": "StyleKit IP-Adapter Loader", "CLIPVisionLoader": "Load CLIP Vision",
          "StyleKitIPAdapterAdvanced": "StyleKit IP-Adapter Advanced", "StyleKitIPAdapterTiled": "StyleKit IP-Adapter Tiled"}

Link = tuple  # (source node id as str, output slot)


@dataclass
class NewNode:
    id: str
    class_type: str
    widgets: dict
    links: dict = field(default_factory=dict)   # input name -> Link
    title: str | None = None


@dataclass
class Plan:
    nodes: dict[str, NewNode] = field(default_factory=dict)      # replaced or added, by id
    # old output -> (where its readers now read, whether that is already a new node's output); an old
    # output can pass through to another old one (a unified loader's model), which may be remapped too.
    remap: dict[Link, tuple[Link, bool]] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)


class Converter:
    """Converts the incumbent's nodes of a graph given as {id: (class_type, {input: value or Link})}."""

    def __init__(self, graph: dict[str, tuple[str, dict]], base: str | None):
        self.graph, self.base = graph, base or guess_base(graph)
        self.plan = Plan()
        self.next_id = max(int(i) for i in graph) + 1
        self.clip_for: dict[str, Link] = {}   # converted loader id -> its CLIP vision output

    def new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id - 1)

    def run(self) -> Plan:
        for node_id in sorted(self.graph, key=int):
            class_type, inputs = self.graph[node_id]
            if class_type in ("IPAdapterModelLoader", "IPAdapterUnifiedLoader"):
                getattr(self, class_type)(node_id, inputs)
        for node_id in sorted(self.graph, key=int):
            class_type, inputs = self.graph[node_id]
            if class_type in INCUMBENT and class_type not in ("IPAdapterModelLoader", "IPAdapterUnifiedLoader"):
                self.apply(node_id, class_type, inputs)
            elif class_type.startswith("IPAdapter") and class_type not in INCUMBENT:
                self.plan.report.append(f"node {node_id} ({class_type}): no StyleKit equivalent; left as it is")
        return self.plan

    # --- loaders -----------------------------------------------------------------------------
    def IPAdapterModelLoader(self, node_id, inputs):
        self.plan.nodes[node_id] = NewNode(node_id, "StyleKitIPAdapterLoader", {"ipadapter_file": inputs["ipadapter_file"]})
        self.plan.report.append(f"node {node_id}: IPAdapterModelLoader -> StyleKitIPAdapterLoader ({inputs['ipadapter_file']})")

    def IPAdapterUnifiedLoader(self, node_id, inputs):
        preset = inputs.get("preset")
        if preset not in PRESETS:
            self.plan.report.append(f"node {node_id} (IPAdapterUnifiedLoader): preset {preset!r} has no StyleKit "
                                    "equivalent; left as it is")
            return
        sd15, sdxl, clip = PRESETS[preset]
        name = sdxl if self.base == "sdxl" else sd15
        if name is None:
            self.plan.report.append(f"node {node_id}: preset {preset!r} has no {self.base} file; left as it is")
            return
        self.plan.nodes[node_id] = NewNode(node_id, "StyleKitIPAdapterLoader", {"ipadapter_file": name})
        clip_id = self.new_id()
        self.plan.nodes[clip_id] = NewNode(clip_id, "CLIPVisionLoader", {"clip_name": clip})
        self.clip_for[node_id] = (clip_id, 0)
        # Its MODEL output passed the model through: consumers now read the model it was given.
        if isinstance(inputs.get("model"), tuple):
            self.plan.remap[(node_id, 0)] = (inputs["model"], False)
        self.plan.remap[(node_id, 1)] = ((node_id, 0), True)
        if isinstance(inputs.get("ipadapter"), tuple):
            self.plan.report.append(f"node {node_id}: its 'ipadapter' pipeline input is not needed and was dropped")
        self.plan.report.append(f"node {node_id}: IPAdapterUnifiedLoader preset {preset!r} -> StyleKitIPAdapterLoader "
                                f"({name}, for {self.base}; pass --base to change) + CLIPVisionLoader node "
                                f"{clip_id} ({clip})")

    # --- apply nodes -------------------------------------------------------------------------
    def clip_vision(self, node_id, inputs) -> Link:
        if isinstance(inputs.get("clip_vision"), tuple):
            return inputs["clip_vision"]
        source = inputs.get("ipadapter")
        if isinstance(source, tuple) and source[0] in self.clip_for:
            return self.clip_for[source[0]]
        clip_id = self.new_id()
        self.plan.nodes[clip_id] = NewNode(clip_id, "CLIPVisionLoader", {"clip_name": VIT_H})
        self.plan.report.append(f"node {node_id}: no CLIP vision input; added CLIPVisionLoader node {clip_id} ({VIT_H}; "
                                "choose ViT-bigG for ip-adapter_sdxl)")
        if isinstance(source, tuple):
            self.clip_for[source[0]] = (clip_id, 0)
        return (clip_id, 0)

    def apply(self, node_id, class_type, inputs):
        w = dict(OUR_DEFAULTS)
        w.update(weight=inputs.get("weight", 1.0), start_percent=inputs.get("start_at", 0.0),
                 end_percent=inputs.get("end_at", 1.0), embeds_scaling=inputs.get("embeds_scaling", "V only"))
        combine = inputs.get("combine_embeds", "concat")
        if combine not in COMBINE:
            self.plan.report.append(f"node {node_id}: combine_embeds {combine!r} has no equivalent; uses 'concat'")
        w["combine"] = COMBINE.get(combine, "concat")
        links = {"model": inputs.get("model"), "ipadapter": inputs.get("ipadapter"),
                 "clip_vision": self.clip_vision(node_id, inputs), "image": inputs.get("image"),
                 "negative_image": inputs.get("image_negative"), "attn_mask": inputs.get("attn_mask")}
        target = "StyleKitIPAdapterAdvanced"
        if class_type == "IPAdapter":
            w["weight_type"] = SIMPLE_WEIGHT_TYPES.get(inputs.get("weight_type"), "linear")
        elif class_type in ("IPAdapterAdvanced", "IPAdapterBatch"):
            w["weight_type"] = inputs.get("weight_type", "linear")
            w["unfold_batch"] = class_type == "IPAdapterBatch"
        elif class_type == "IPAdapterPreciseStyleTransfer":
            w["weight_type"] = "style transfer precise"
            if inputs.get("style_boost", w["weight"]) != w["weight"]:
                self.plan.report.append(f"node {node_id}: style_boost {inputs['style_boost']} is not carried over "
                                        "(the composition layers get the weight)")
        elif class_type == "IPAdapterTiled":
            target = "StyleKitIPAdapterTiled"
            w["weight_type"] = inputs.get("weight_type", "linear")
            w["sharpening"] = inputs.get("sharpening", 0.0)
        elif class_type == "IPAdapterStyleComposition":
            return self.style_composition(node_id, inputs, w, links)
        if w["weight_type"] not in WEIGHT_TYPES:
            self.plan.report.append(f"node {node_id}: weight_type {w['weight_type']!r} unknown; uses 'linear'")
            w["weight_type"] = "linear"
        keep = OURS[target]["widgets"]
        self.plan.nodes[node_id] = NewNode(node_id, target, {k: w[k] for k in keep},
                                           {k: v for k, v in links.items() if isinstance(v, tuple)})
        self.plan.report.append(f"node {node_id}: {class_type} -> {target} (weight_type {w['weight_type']!r}, "
                                "middle block skipped as the incumbent)")

    def style_composition(self, node_id, inputs, w, links):
        """Style image on the style layers, composition image on the composition layers: two chained
        Advanced nodes (each layer still gets exactly one image term, as in the incumbent)."""
        style = {**{k: w[k] for k in OURS["StyleKitIPAdapterAdvanced"]["widgets"]},
                 "weight": inputs.get("weight_style", 1.0),
                 "weight_type": "strong style transfer" if inputs.get("expand_style") else "style transfer"}
        comp = {**style, "weight": inputs.get("weight_composition", 1.0), "weight_type": "composition"}
        comp_id = self.new_id()
        self.plan.nodes[comp_id] = NewNode(comp_id, "StyleKitIPAdapterAdvanced", comp,
                                           {**{k: v for k, v in links.items() if isinstance(v, tuple)},
                                            "image": inputs.get("image_composition")},
                                           title="StyleKit IP-Adapter Advanced (composition)")
        self.plan.nodes[node_id] = NewNode(node_id, "StyleKitIPAdapterAdvanced", style,
                                           {**{k: v for k, v in links.items() if isinstance(v, tuple)},
                                            "model": (comp_id, 0), "image": inputs.get("image_style")},
                                           title="StyleKit IP-Adapter Advanced (style)")
        self.plan.report.append(f"node {node_id}: IPAdapterStyleComposition -> StyleKitIPAdapterAdvanced node "
                                f"{comp_id} (composition) then node {node_id} (style)")


def guess_base(graph) -> str:
    """sdxl when a checkpoint or adapter file name says so (sd_xl_base_1.0, ...sdxl...), else sd15."""
    files = [v for _, inputs in graph.values() for k, v in inputs.items()
             if isinstance(v, str) and k in ("ckpt_name", "unet_name", "ipadapter_file")]
    return "sdxl" if any(re.search(r"xl(?![a-z])", f, re.IGNORECASE) for f in files) else "sd15"


# --- API format --------------------------------------------------------------------------------

def convert_api(api: dict, base: str | None = None) -> tuple[dict, list[str]]:
    graph = {nid: (n["class_type"], {k: (tuple(v) if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)
                                         and isinstance(v[0], str) else v) for k, v in n["inputs"].items()})
             for nid, n in api.items()}
    plan = Converter(graph, base).run()
    out = {}
    for nid, node in api.items():
        if nid in plan.nodes:
            continue
        out[nid] = json.loads(json.dumps(node))
        for k, v in out[nid]["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and tuple(v) in plan.remap:
                out[nid]["inputs"][k] = list(_follow(plan, tuple(v)))
    for nid, new in plan.nodes.items():
        inputs = dict(new.widgets)
        inputs.update({k: list(_follow(plan, v)) for k, v in new.links.items() if v is not None})
        out[nid] = {"inputs": inputs, "class_type": new.class_type,
                    "_meta": {"title": new.title or TITLES[new.class_type]}}
    return dict(sorted(out.items(), key=lambda kv: int(kv[0]))), plan.report


def _follow(plan: Plan, link: Link) -> Link:
    """Where a reader of an old output reads now."""
    for _ in range(64):
        if link not in plan.remap:
            return link
        link, final = plan.remap[link]
        if final:
            return link
    return link


# --- UI format ---------------------------------------------------------------------------------

def convert_ui(ui: dict, base: str | None = None) -> tuple[dict, list[str]]:
    ui = json.loads(json.dumps(ui))
    links = {link[0]: link for link in ui["links"]}
    by_id = {str(n["id"]): n for n in ui["nodes"]}
    graph = {}
    for nid, n in by_id.items():
        spec = INCUMBENT.get(n["type"])
        inputs = {}
        if spec:
            values = list(n.get("widgets_values") or [])
            if isinstance(n.get("widgets_values"), dict):
                values = [n["widgets_values"].get(k) for k in spec["widgets"]]
            inputs.update(zip(spec["widgets"], values))
        for inp in n.get("inputs", []):
            if inp.get("link") is not None and inp["link"] in links:
                link = links[inp["link"]]
                inputs[inp["name"]] = (str(link[1]), link[2])
        graph[nid] = (n["type"], inputs)
    plan = Converter(graph, base).run()

    # Re-point links whose origin was remapped (the unified loader's passthrough and outputs).
    for link in ui["links"]:
        origin = _follow(plan, (str(link[1]), link[2]))
        link[1], link[2] = int(origin[0]), origin[1]
    next_link = max([l[0] for l in ui["links"]] + [0]) + 1
    for nid, new in plan.nodes.items():
        spec = OURS[new.class_type]
        old = by_id.get(nid)
        node = {"id": int(nid), "type": new.class_type, "pos": (old or {}).get("pos", [0, 0]),
                "size": (old or {}).get("size", [360, 120]), "flags": {}, "order": (old or {}).get("order", 0),
                "mode": (old or {}).get("mode", 0), "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": new.class_type},
                "widgets_values": [new.widgets[k] for k in spec["widgets"]]}
        if new.title or old is None:
            node["title"] = new.title or TITLES[new.class_type]
        models = _model_metadata(new)
        if models:
            node["properties"]["models"] = models
        if old is None:  # an added loader: beside the first converted node
            node["pos"] = [-400, 200 + 120 * (int(nid) % 10)]
        # inputs: reuse the link ids that already fed this input; new ones for new wiring
        old_links = {i["name"]: i.get("link") for i in (old or {}).get("inputs", [])}
        renamed = {"image_negative": "negative_image"}
        for slot, name in enumerate(n for n in spec["links"] if new.links.get(n) is not None):
            origin = _follow(plan, new.links[name])
            link_id = next((old_links.get(k) for k, v in renamed.items() if v == name and old_links.get(k)), None) \
                or old_links.get(name)
            if name == "image" and link_id is None:
                link_id = old_links.get("image_style")
            if link_id is None or link_id not in links or (str(links[link_id][1]), links[link_id][2]) != origin \
                    or links[link_id][3] != int(nid):
                link_id = next_link
                next_link += 1
                kind = _output_type(by_id, plan, origin)
                entry = [link_id, int(origin[0]), origin[1], int(nid), slot, kind]
                ui["links"].append(entry)
                links[link_id] = entry
            else:
                links[link_id][4] = slot
            node["inputs"].append({"name": name, "type": _input_type(name), "link": link_id})
        for slot, kind in enumerate(spec["outputs"]):
            targets = [l[0] for l in ui["links"] if str(l[1]) == nid and l[2] == slot]
            for l in ui["links"]:
                if str(l[1]) == nid and l[2] == slot:
                    l[5] = kind
            node["outputs"].append({"name": kind, "type": kind, "links": targets, "slot_index": slot})
        if old is not None:
            ui["nodes"][ui["nodes"].index(old)] = node
        else:
            ui["nodes"].append(node)
            by_id[nid] = node
    # Drop links nothing reads any more (the unified loader's model input, a style image's old slot),
    # then list on every output the links that now leave it.
    used = {i["link"] for n in ui["nodes"] for i in n.get("inputs", []) if i.get("link") is not None}
    ui["links"] = [l for l in ui["links"] if l[0] in used]
    for n in ui["nodes"]:
        for slot, out in enumerate(n.get("outputs", [])):
            out["links"] = [l[0] for l in ui["links"] if l[1] == n["id"] and l[2] == slot]
    ui["last_node_id"] = max(n["id"] for n in ui["nodes"])
    ui["last_link_id"] = max([l[0] for l in ui["links"]] + [0])
    return ui, plan.report


def _model_metadata(new: NewNode) -> list[dict]:
    """The frontend's download metadata of a converted loader, from workflows/models/models.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_table import load_table, node_models

    try:
        return [f.frontend_entry() for f in node_models(load_table(), {"class_type": new.class_type,
                                                                         "inputs": new.widgets})]
    except KeyError:  # a file the table does not list (e.g. a light or face adapter): no download offer
        return []


def _output_type(by_id, plan, origin) -> str:
    if origin[0] in plan.nodes:
        return OURS[plan.nodes[origin[0]].class_type]["outputs"][origin[1]]
    node = by_id[origin[0]]
    return node["outputs"][origin[1]]["type"]


def _input_type(name: str) -> str:
    return {"model": "MODEL", "ipadapter": "STYLEKIT_IPADAPTER", "clip_vision": "CLIP_VISION", "image": "IMAGE",
            "negative_image": "IMAGE", "attn_mask": "MASK"}[name]


def convert(workflow: dict, base: str | None = None) -> tuple[dict, list[str]]:
    """Either format in, the same format out, with the report."""
    if "nodes" in workflow and "links" in workflow:
        return convert_ui(workflow, base)
    return convert_api(workflow, base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--base", choices=["sd15", "sdxl"], help="the model family, for IPAdapterUnifiedLoader presets "
                                                                  "(default: guessed from file names)")
    args = parser.parse_args(argv)
    try:
        workflow = json.loads(args.input.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"migrate: error: cannot read {args.input}: {err}", file=sys.stderr)
        return 2
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        print("migrate: error: write the result to another file than the input", file=sys.stderr)
        return 2
    converted, report = convert(workflow, args.base)
    args.output.write_text(json.dumps(converted, indent=2) + "\n")
    print(f"migrate: {args.input} -> {args.output} (IP-Adapter Plus at {INCUMBENT_REVISION[:7]})")
    for line in report or ["nothing to convert: no IP-Adapter Plus node found"]:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
