"""scripts/migrate_ipadapter_plus.py on workflows built here from the IP-Adapter Plus pack's node
definitions: each apply node and loader converts, UI and API alike, other nodes stay as they were,
what has no equivalent is reported, and the converted workflow runs headless on the fixtures."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from stylekit.scripts.migrate_ipadapter_plus import convert
from stylekit.tests.support.paths import REPO
from stylekit.tests.support.ui_format import api_to_ui, ui_to_api
from stylekit.tests.support.workflows import load_api_workflow, tiny

# The incumbent's nodes as its source declares them, cubiq/ComfyUI_IPAdapter_plus at this revision
# (IPAdapterPlus.py INPUT_TYPES): class -> (required inputs, optional inputs), widgets as (name, options).
REVISION = "9d076a3df0d2763cef5510ec5ab807f6632c39f5"
WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise"]
COMBINE = ["concat", "add", "subtract", "average", "norm average"]
SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]
F = "FLOAT"
OPTIONAL = {"image_negative": "IMAGE", "attn_mask": "MASK", "clip_vision": "CLIP_VISION"}
INCUMBENT = {
    "IPAdapterModelLoader": ({"ipadapter_file": [["ip-adapter_sd15.safetensors"]]}, {}, ["IPADAPTER"]),
    "IPAdapterUnifiedLoader": ({"model": "MODEL", "preset": [["LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)",
                                                              "VIT-G (medium strength)", "PLUS (high strength)"]]},
                               {"ipadapter": "IPADAPTER"}, ["MODEL", "IPADAPTER"]),
    "IPAdapter": ({"model": "MODEL", "ipadapter": "IPADAPTER", "image": "IMAGE", "weight": F, "start_at": F, "end_at": F,
                   "weight_type": [["standard", "prompt is more important", "style transfer"]]},
                  {"attn_mask": "MASK"}, ["MODEL"]),
    "IPAdapterAdvanced": ({"model": "MODEL", "ipadapter": "IPADAPTER", "image": "IMAGE", "weight": F,
                           "weight_type": [WEIGHT_TYPES], "combine_embeds": [COMBINE], "start_at": F, "end_at": F,
                           "embeds_scaling": [SCALING]}, OPTIONAL, ["MODEL"]),
    "IPAdapterBatch": ({"model": "MODEL", "ipadapter": "IPADAPTER", "image": "IMAGE", "weight": F,
                        "weight_type": [WEIGHT_TYPES], "start_at": F, "end_at": F, "embeds_scaling": [SCALING],
                        "encode_batch_size": "INT"}, OPTIONAL, ["MODEL"]),
    "IPAdapterStyleComposition": ({"model": "MODEL", "ipadapter": "IPADAPTER", "image_style": "IMAGE",
                                   "image_composition": "IMAGE", "weight_style": F, "weight_composition": F,
                                   "expand_style": "BOOLEAN", "combine_embeds": [COMBINE], "start_at": F, "end_at": F,
                                   "embeds_scaling": [SCALING]}, OPTIONAL, ["MODEL"]),
    "IPAdapterPreciseStyleTransfer": ({"model": "MODEL", "ipadapter": "IPADAPTER", "image": "IMAGE", "weight": F,
                                       "style_boost": F, "combine_embeds": [COMBINE], "start_at": F, "end_at": F,
                                       "embeds_scaling": [SCALING]}, OPTIONAL, ["MODEL"]),
    "IPAdapterTiled": ({"model": "MODEL", "ipadapter": "IPADAPTER", "image": "IMAGE", "weight": F,
                        "weight_type": [WEIGHT_TYPES], "combine_embeds": [COMBINE], "start_at": F, "end_at": F,
                        "sharpening": F, "embeds_scaling": [SCALING]}, OPTIONAL, ["MODEL", "IMAGE", "MASK"]),
    "IPAdapterEncoder": ({"ipadapter": "IPADAPTER", "image": "IMAGE", "weight": F}, {"mask": "MASK"},
                         ["EMBEDS", "EMBEDS"]),
}
SETTINGS = {  # the widget values each apply node gets in the test
    "IPAdapter": {"weight": 0.7, "start_at": 0.1, "end_at": 0.9, "weight_type": "prompt is more important"},
    "IPAdapterAdvanced": {"weight": 0.8, "weight_type": "ease in-out", "combine_embeds": "average", "start_at": 0.0,
                          "end_at": 0.8, "embeds_scaling": "K+V w/ C penalty"},
    "IPAdapterBatch": {"weight": 0.6, "weight_type": "linear", "start_at": 0.0, "end_at": 1.0,
                       "embeds_scaling": "K+mean(V) w/ C penalty", "encode_batch_size": 0},
    "IPAdapterStyleComposition": {"weight_style": 1.0, "weight_composition": 0.5, "expand_style": False,
                                  "combine_embeds": "average", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"},
    "IPAdapterPreciseStyleTransfer": {"weight": 0.9, "style_boost": 0.9, "combine_embeds": "concat", "start_at": 0.0,
                                      "end_at": 1.0, "embeds_scaling": "V only"},
    "IPAdapterTiled": {"weight": 0.75, "weight_type": "style transfer", "combine_embeds": "concat", "start_at": 0.0,
                       "end_at": 1.0, "sharpening": 0.2, "embeds_scaling": "K+V"},
}
EXPECTED_WEIGHT_TYPE = {"IPAdapter": "ease out", "IPAdapterAdvanced": "ease in-out", "IPAdapterBatch": "linear",
                        "IPAdapterPreciseStyleTransfer": "style transfer precise", "IPAdapterTiled": "style transfer"}


def incumbent_object_info() -> dict:
    info = {}
    for name, (required, optional, outputs) in INCUMBENT.items():
        info[name] = {"input": {"required": {k: (v if isinstance(v, list) else [v, {}]) for k, v in required.items()},
                                "optional": {k: [v, {}] for k, v in optional.items()}},
                      "input_order": {"required": list(required), "optional": list(optional)},
                      "output": outputs, "output_name": outputs, "display_name": name}
    return info


def incumbent_workflow(apply_class: str, loader: str) -> dict:
    """The SD1.5 IP-Adapter example rebuilt on the incumbent's nodes."""
    api = copy.deepcopy(load_api_workflow("ip_adapter_sd15"))
    if loader == "IPAdapterUnifiedLoader":
        api["2"] = {"class_type": loader, "inputs": {"model": ["1", 0], "preset": "STANDARD (medium strength)"},
                    "_meta": {"title": loader}}
        model, clip, ipadapter = ["2", 0], {}, ["2", 1]
        del api["3"]
    else:
        api["2"] = {"class_type": loader, "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"},
                    "_meta": {"title": loader}}
        model, ipadapter = ["1", 0], ["2", 0]
        clip = {"clip_vision": ["3", 0]} if "clip_vision" in INCUMBENT[apply_class][1] else {}
    images = ({"image_style": ["4", 0], "image_composition": ["4", 0]} if apply_class == "IPAdapterStyleComposition"
              else {"image": ["4", 0]})
    api["5"] = {"class_type": apply_class, "inputs": {"model": model, "ipadapter": ipadapter, **images, **clip,
                                                      **SETTINGS[apply_class]}, "_meta": {"title": apply_class}}
    return api


# The simple IPAdapter node takes its CLIP vision model from the unified loader's pipeline only.
CASES = [(c, "IPAdapterModelLoader") for c in SETTINGS if c != "IPAdapter"] + [("IPAdapter", "IPAdapterUnifiedLoader"),
                                                           ("IPAdapterAdvanced", "IPAdapterUnifiedLoader")]


@pytest.mark.parametrize("apply_class,loader", CASES)
def test_each_incumbent_apply_node_converts_with_its_settings_and_runs(server, object_info, apply_class, loader):
    before = incumbent_workflow(apply_class, loader)
    after, report = convert(before)
    assert not any(n["class_type"].startswith("IPAdapter") for n in after.values()), report
    for node_id in ("1", "4", "6", "7", "8", "9", "10", "11"):   # not the incumbent's: untouched
        assert after[node_id] == before[node_id]
    assert after["2"]["class_type"] == "StyleKitIPAdapterLoader"
    assert after["2"]["inputs"]["ipadapter_file"] == "ip-adapter_sd15.safetensors"
    applied = after["5"]["inputs"]
    s = SETTINGS[apply_class]
    assert applied["model"] == (["1", 0] if apply_class != "IPAdapterStyleComposition" else applied["model"])
    if apply_class in EXPECTED_WEIGHT_TYPE:
        assert applied["weight"] == s["weight"] and applied["weight_type"] == EXPECTED_WEIGHT_TYPE[apply_class]
        assert (applied["start_percent"], applied["end_percent"]) == (s["start_at"], s["end_at"])
        assert applied["embeds_scaling"] == s.get("embeds_scaling", "V only")
    assert applied["skip_middle_block"] is True   # the incumbent never reaches the middle block
    if apply_class == "IPAdapterBatch":
        assert applied["unfold_batch"] is True
    if apply_class == "IPAdapterTiled":
        assert after["5"]["class_type"] == "StyleKitIPAdapterTiled" and applied["sharpening"] == 0.2
    if apply_class == "IPAdapterStyleComposition":
        comp = after[applied["model"][0]]["inputs"]
        assert (applied["weight_type"], applied["weight"]) == ("style transfer", 1.0)
        assert (comp["weight_type"], comp["weight"], comp["model"]) == ("composition", 0.5, ["1", 0])

    # The UI form of the same workflow converts to the same graph.
    info = {**object_info, **incumbent_object_info()}
    ui_after, ui_report = convert(api_to_ui(before, info))
    assert ui_report == report
    queued = ui_to_api(ui_after, object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in queued.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in after.items()}

    outputs = server.run(tiny(after), timeout=900)
    assert outputs.images()


def test_nodes_without_an_equivalent_are_reported_and_left_alone(tmp_path):
    api = incumbent_workflow("IPAdapterAdvanced", "IPAdapterModelLoader")
    api["20"] = {"class_type": "IPAdapterEncoder", "inputs": {"ipadapter": ["2", 0], "image": ["4", 0], "weight": 1.0},
                 "_meta": {"title": "IPAdapter Encoder"}}
    api["5"]["inputs"]["combine_embeds"] = "norm average"
    src, dst = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(api))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "migrate_ipadapter_plus.py"), str(src), str(dst)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "node 20 (IPAdapterEncoder): no StyleKit equivalent" in result.stdout
    assert "combine_embeds 'norm average' has no equivalent" in result.stdout
    out = json.loads(dst.read_text())
    assert out["20"] == api["20"] and out["5"]["class_type"] == "StyleKitIPAdapterAdvanced"


def test_the_scripts_table_of_stylekit_nodes_matches_what_the_server_declares(object_info):
    from stylekit.scripts.migrate_ipadapter_plus import OURS
    from stylekit.tests.support.ui_format import _input_specs, _is_widget

    for class_type, spec in OURS.items():
        specs = _input_specs(object_info[class_type])
        assert spec["widgets"] == [n for n, kind, _ in specs if _is_widget(kind)], class_type
        assert spec["links"] == [n for n, kind, _ in specs if not _is_widget(kind)], class_type
        assert spec["outputs"] == object_info[class_type]["output"], class_type


def test_the_model_family_is_read_from_file_names_not_prompts():
    from stylekit.scripts.migrate_ipadapter_plus import guess_base

    assert guess_base({"1": ("CheckpointLoaderSimple", {"ckpt_name": "juggernautXL_v9.safetensors"})}) == "sdxl"
    assert guess_base({"1": ("CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"})}) == "sdxl"
    assert guess_base({"1": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
                       "2": ("CLIPTextEncode", {"text": "pixel art, excel sheet"})}) == "sd15"


def test_converted_ui_loaders_carry_their_download_metadata(object_info):
    ui, _ = convert(api_to_ui(incumbent_workflow("IPAdapter", "IPAdapterUnifiedLoader"),
                              {**object_info, **incumbent_object_info()}))
    loaders = {n["type"]: n["properties"].get("models") for n in ui["nodes"]
               if n["type"] in ("StyleKitIPAdapterLoader", "CLIPVisionLoader")}
    assert loaders["StyleKitIPAdapterLoader"][0]["name"] == "ip-adapter_sd15.safetensors"
    assert loaders["CLIPVisionLoader"][0]["directory"] == "clip_vision"
