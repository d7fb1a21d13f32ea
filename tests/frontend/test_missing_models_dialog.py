"""A workflow dragged onto a server that lacks its model files makes the frontend offer each file
for download with its folder and address (from properties.models): the missing-models dialog of
the pinned frontend, the errors panel's missing-model group of newer ones (core 0.33's)."""
from __future__ import annotations

import json
import re

import pytest

from stylekit.scripts.model_table import load_table, workflow_models
from stylekit.tests.support.workflows import WORKFLOWS

from .conftest import PINIA, SCREENSHOTS, errors_panel_group, has_errors_panel

# Files each workflow loads, counted by hand: SD1.5 checkpoint, adapter, ViT-H; Flux transformer,
# T5-XXL + CLIP-L (one DualCLIPLoader node, two widgets), VAE, XLabs adapter, CLIP ViT-L.
FILE_COUNTS = {"ip_adapter_sd15": 3, "ip_adapter_flux": 6}
# The extensions the newer frontend treats as model files (its isModelFileName).
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")


def _without_model_files(route) -> None:
    """/object_info as a server without model files answers it: every combo of file names empty."""
    info = route.fetch().json()
    for node in info.values():
        for group in ("required", "optional"):
            for spec in (node.get("input", {}).get(group) or {}).values():
                if isinstance(spec, list) and spec and isinstance(spec[0], list):   # [options, {...}]
                    spec[0] = _no_model_files(spec[0])
                elif isinstance(spec, list) and spec[:1] == ["COMBO"] and "options" in spec[1]:
                    spec[1]["options"] = _no_model_files(spec[1]["options"])   # ["COMBO", {options}]
    route.fulfill(json=info)


def _no_model_files(options: list) -> list:
    return [v for v in options if not str(v).lower().endswith(MODEL_EXTENSIONS)]


@pytest.mark.parametrize("name", sorted(FILE_COUNTS))
def test_a_workflow_on_a_server_without_its_models_offers_each_file_for_download(browser, server, name):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    outside: list[str] = []
    try:
        # "Without the models": the server's model listings answer empty (the pinned frontend asks
        # /experiment/models/<folder>; newer ones read the loaders' options in /object_info); the
        # folder list itself is real. Nothing leaves 127.0.0.1 (the dialog asks the hub for sizes).
        page.route(re.compile(r".*/experiment/models/[^/?]+(\?.*)?$"), lambda route: route.fulfill(json=[]))
        page.route(re.compile(r".*/object_info$"), _without_model_files)
        page.route(lambda url: not url.startswith(server.url),
                   lambda route: (outside.append(route.request.url), route.abort()))
        page.goto(server.url + "/")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        for _ in range(3):  # the template browser the app opens on a first visit
            page.wait_for_timeout(500)
            page.keyboard.press("Escape")
        workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        listed = _offered_in_panel(page) if has_errors_panel(page) else _offered_in_dialog(page)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"missing_models_{name}.png"))
    finally:
        page.close()
    expected = workflow_models(load_table(), name)
    assert len(listed) == len(expected) == FILE_COUNTS[name], listed
    for f in expected:
        row = next((r for r in listed if r["name"] == f.name and r["directory"] == f.directory), None)
        assert row is not None, f"{f.relative_path} not offered: {listed}"
        assert row["url"] == f.url
    assert all(u.startswith("https://huggingface.co/") for u in outside)


def _offered_in_dialog(page) -> list[dict]:
    """The pinned frontend's dialog: one <li> per file, "folder / name", the address as a title."""
    page.wait_for_selector(".comfy-missing-models", timeout=30_000)
    page.wait_for_timeout(500)
    rows = page.evaluate("""() => Array.from(document.querySelectorAll('.comfy-missing-models li')).map(li => ({
        text: li.innerText, urls: Array.from(li.querySelectorAll('[title]')).map(e => e.getAttribute('title'))}))""")
    offered = []
    for row in rows:
        match = re.search(r"([\w.-]+) / (\S+)", row["text"])
        urls = sorted({u for u in row["urls"] if u.startswith("https://")})   # link and button share it
        offered.append({"directory": match and match.group(1), "name": match and match.group(2),
                        "url": urls[0] if len(urls) == 1 else urls})
    return offered


def _offered_in_panel(page) -> list[dict]:
    """Newer frontends: the errors panel shows a row per file ("name", "folder", a Download button);
    the address each Download fetches is the row's entry in the app's missingModel store."""
    texts = errors_panel_group(page, "error-group-missing-model")
    assert len(texts) == 1, texts
    rows = page.evaluate(f"""() => JSON.parse(JSON.stringify(
        {PINIA}._s.get('missingModel').missingModelCandidates ?? []))""")
    shown = page.locator("[data-testid=missing-model-download]").count()
    assert shown == len(rows), f"{shown} Download buttons for {len(rows)} missing files"
    offered = []
    for row in rows:
        assert f"{row['name']}\n{row['directory']}" in texts[0], (row, texts[0])
        offered.append({"name": row["name"], "directory": row["directory"], "url": row.get("url")})
    return offered
