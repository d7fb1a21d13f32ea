"""Every loader node of every UI workflow carries the frontend's model metadata (properties.models),
generated from the one table workflows/models/models.json."""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from stylekit.scripts.model_table import load_table, workflow_models

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"

# Written out from ComfyUI's nodes.py and our loaders, independently of workflows/models/models.json:
# the file widget of each loader and the models folder its file list comes from.
LOADER_FOLDERS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("StyleKitIPAdapterLoader", "ipadapter_file"): "ipadapter",
    ("StyleKitStyleDiscriminatorLoader", "discriminator_file"): "style_discriminators",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders",
    ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
}
# A hub file's address: https://huggingface.co/<owner>/<repo>/resolve/<revision>/<path in the repo>.
HUB_FILE = re.compile(r"^https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/[\w.-]+/[\w./-]+\.(safetensors|bin|pth)$")
# Files one workflow writes for another (no hub address): (folder, name) -> writer.
WRITTEN = {("loras", "StyleKit/dreambooth_sks_lighthouse.safetensors"): "dreambooth_train"}


def _pairs():
    for api_path in sorted((WORKFLOWS / "api").glob("*.json")):
        ui = json.loads((WORKFLOWS / api_path.name).read_text())
        yield api_path.stem, json.loads(api_path.read_text()), {str(n["id"]): n for n in ui["nodes"]}


def test_every_loader_node_of_every_workflow_names_its_file_its_folder_and_a_hub_address():
    checked = 0
    for name, api, ui_nodes in _pairs():
        for node_id, node in api.items():
            for (class_type, widget), folder in LOADER_FOLDERS.items():
                if node["class_type"] != class_type:
                    continue
                value = node["inputs"][widget]
                ui = ui_nodes[node_id]
                entries = ui["properties"].get("models", [])
                if (folder, value) in WRITTEN:
                    assert entries == [], f"{name} node {node_id}: {value} is written by {WRITTEN[(folder, value)]}"
                    continue
                mine = [e for e in entries if e["name"] == value]
                assert len(mine) == 1, f"{name} node {node_id} ({class_type}): no properties.models entry for {value}"
                entry = mine[0]
                assert entry["directory"] == folder, f"{name} node {node_id}: {entry['directory']} is not {folder}"
                assert HUB_FILE.match(entry["url"]), f"{name} node {node_id}: {entry['url']} is not a hub file address"
                assert value in ui["widgets_values"]  # the frontend only lists entries whose name is a widget value
                if "hash" in entry:
                    assert entry["hash_type"] == "sha256" and re.fullmatch(r"[0-9a-f]{64}", entry["hash"])
                checked += 1
    assert checked >= 35  # 16 workflows, 37 loader widgets today


def test_nodes_that_load_no_file_carry_no_model_metadata():
    loaders = {c for c, _ in LOADER_FOLDERS}
    for name, api, ui_nodes in _pairs():
        for node_id, node in api.items():
            if node["class_type"] not in loaders:
                assert "models" not in ui_nodes[node_id]["properties"], f"{name} node {node_id}"


def test_files_loaded_without_a_loader_widget_are_listed_at_the_workflow_level():
    for name in ("style_guidance_txt2img", "instantstyle_plus"):
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        decoders = [m for m in ui.get("models", []) if m["directory"] == "vae_approx"]
        assert len(decoders) == 1 and HUB_FILE.match(decoders[0]["url"])
        assert decoders[0]["name"].startswith("taesd")


def test_the_table_maps_each_loader_to_the_folder_comfyui_reads():
    expected: dict[str, dict[str, str]] = {}
    for (class_type, widget), folder in LOADER_FOLDERS.items():
        expected.setdefault(class_type, {})[widget] = folder
    assert load_table().loaders == expected


def test_make_models_fetches_exactly_the_files_the_sd15_ip_adapter_workflow_loads():
    files = {f.relative_path for f in workflow_models(load_table(), "ip_adapter_sd15")}
    assert files == {"checkpoints/v1-5-pruned-emaonly.safetensors", "ipadapter/ip-adapter_sd15.safetensors",
                     "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}


def test_every_url_is_written_once():
    urls = [(f.url, f.name) for f in load_table().files.values()]
    assert len({u for u, _ in urls}) == len(urls)
    for url, _ in urls:
        assert urlsplit(url).scheme == "https"
