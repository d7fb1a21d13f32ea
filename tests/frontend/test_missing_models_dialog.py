"""A workflow dragged onto a server that lacks its model files opens the frontend's missing-models
dialog listing each file with its folder and download address (from properties.models)."""
from __future__ import annotations

import json
import re

import pytest

from stylekit.scripts.model_table import load_table, workflow_models
from stylekit.tests.support.workflows import WORKFLOWS

from .conftest import SCREENSHOTS, skip_unless_pinned_frontend

# Files each workflow loads, counted by hand: SD1.5 checkpoint, adapter, ViT-H; Flux transformer,
# T5-XXL + CLIP-L (one DualCLIPLoader node, two widgets), VAE, XLabs adapter, CLIP ViT-L.
FILE_COUNTS = {"ip_adapter_sd15": 3, "ip_adapter_flux": 6}


@pytest.mark.parametrize("name", sorted(FILE_COUNTS))
def test_a_workflow_on_a_server_without_its_models_offers_each_file_for_download(browser, server, name):
    skip_unless_pinned_frontend()
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    outside: list[str] = []
    try:
        # "Without the models": the server's listing of every model folder answers empty; the
        # folder list itself is real. Nothing leaves 127.0.0.1 (the dialog asks the hub for sizes).
        page.route(re.compile(r".*/experiment/models/[^/?]+(\?.*)?$"), lambda route: route.fulfill(json=[]))
        page.route(lambda url: not url.startswith(server.url),
                   lambda route: (outside.append(route.request.url), route.abort()))
        page.goto(server.url + "/")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        for _ in range(3):  # the template browser the app opens on a first visit
            page.wait_for_timeout(500)
            page.keyboard.press("Escape")
        workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        page.wait_for_selector(".comfy-missing-models", timeout=30_000)
        page.wait_for_timeout(500)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"missing_models_{name}.png"))
        listed = page.evaluate("""() => Array.from(document.querySelectorAll('.comfy-missing-models li')).map(li => ({
            text: li.innerText, urls: Array.from(li.querySelectorAll('[title]')).map(e => e.getAttribute('title'))}))""")
    finally:
        page.close()
    expected = workflow_models(load_table(), name)
    assert len(listed) == len(expected) == FILE_COUNTS[name]
    for f in expected:
        row = next((r for r in listed if f"{f.directory} / {f.name}" in r["text"]), None)
        assert row is not None, f"{f.relative_path} not in the dialog: {listed}"
        assert f.url in row["urls"]
    assert all(u.startswith("https://huggingface.co/") for u in outside)
