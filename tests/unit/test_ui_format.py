"""The UI<->API conversion on a synthetic node set that exercises every frontend widget rule."""
from stylekit.tests.support.ui_format import api_to_ui, ui_to_api

OBJECT_INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["name"]}, "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"],
               "display_name": "Loader"},
    "Image": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}},
              "input_order": {"required": ["image"]}, "output": ["IMAGE"], "output_name": ["IMAGE"],
              "display_name": "Load Image"},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                       "cfg": ["FLOAT", {"default": 8.0}], "text": ["STRING", {"default": ""}]},
                          "optional": {"image": ["IMAGE", {}], "flag": ["BOOLEAN", {"default": False}]}},
                "input_order": {"required": ["model", "seed", "cfg", "text"], "optional": ["image", "flag"]},
                "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Sampler"},
    "Seed": {"input": {"required": {"value": ["INT", {"default": 0}]}}, "input_order": {"required": ["value"]},
             "output": ["INT"], "output_name": ["INT"], "display_name": "Seed"},
}

API = {
    "1": {"class_type": "Loader", "inputs": {"name": "b.safetensors"}, "_meta": {"title": "Loader"}},
    "2": {"class_type": "Image", "inputs": {"image": "x.png"}, "_meta": {"title": "Style image"}},
    "3": {"class_type": "Seed", "inputs": {"value": 7}, "_meta": {"title": "Seed"}},
    "4": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": ["3", 0], "cfg": 5.5, "text": "hi",
                                              "image": ["2", 0], "flag": True}, "_meta": {"title": "Sampler"}},
}


def test_round_trip_through_the_ui_format_gives_the_same_prompt():
    assert ui_to_api(api_to_ui(API, OBJECT_INFO, note="# note"), OBJECT_INFO) == API


def test_widget_values_follow_frontend_rules():
    ui = api_to_ui(API, OBJECT_INFO)
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert by_id[2]["widgets_values"] == ["x.png", "image"]          # upload button slot
    assert by_id[4]["widgets_values"] == [0, "fixed", 5.5, "hi", True]  # linked seed keeps a slot + control
    seed_input = [i for i in by_id[4]["inputs"] if i["name"] == "seed"][0]
    assert seed_input["widget"] == {"name": "seed"}
    # every node carries its title: a core may rename the display name the frontend would show instead
    assert by_id[2]["title"] == "Style image" and by_id[1]["title"] == "Loader"


def test_links_carry_the_origin_output_type_and_outputs_list_them():
    ui = api_to_ui(API, OBJECT_INFO)
    types = {(link[1], link[3]): link[5] for link in ui["links"]}
    assert types[(1, 4)] == "MODEL" and types[(3, 4)] == "INT" and types[(2, 4)] == "IMAGE"
    loader = [n for n in ui["nodes"] if n["id"] == 1][0]
    assert len(loader["outputs"][0]["links"]) == 1 and loader["outputs"][1]["links"] == []


def test_note_becomes_a_frontend_only_node_that_is_not_queued():
    ui = api_to_ui(API, OBJECT_INFO, note="# Model files")
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert notes and notes[0]["widgets_values"] == ["# Model files"]
    assert set(ui_to_api(ui, OBJECT_INFO)) == set(API)
