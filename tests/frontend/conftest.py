"""Frontend layer: the real ComfyUI frontend (the pinned comfyui-frontend-package) in Debian's
headless Chromium, driven by Playwright against the session's server. Skipped, with the reason,
where Chromium is not installed (scripts/bootstrap.py installs it on root Debian machines)."""
from __future__ import annotations

import shutil

import pytest

from stylekit.tests.support.paths import WORK

CHROMIUM = shutil.which("chromium")
# Chromium on a closed network: no background traffic, no sandbox as root (DESIGN of the machine).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = WORK / "frontend"


def skip_unless_pinned_frontend() -> None:
    """For tests that read the pinned core's frontend dialogs. Core 0.33 ships frontend 1.49.6,
    which reports missing nodes and models in a new panel (missing-model-resolution), not in
    these dialogs; those tests are not written for it yet (measured: the rest of this layer passes)."""
    from stylekit.tests.support.paths import PINNED_CORE, host_version

    if host_version() != PINNED_CORE:
        pytest.skip(f"reads the missing-nodes/models dialogs of core {PINNED_CORE}'s frontend; "
                    f"core {host_version()}'s frontend shows them in another panel")


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver, or make setup as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Frontend:
    """One page of the ComfyUI app, with the page errors it raised."""

    def __init__(self, page, url: str):
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda err: self.errors.append(str(err)))
        page.goto(url + "/")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        self.close_dialogs()

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialog_texts():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)

    def dialog_texts(self) -> list[str]:
        return self.page.evaluate(
            "() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")

    def load(self, workflow: dict) -> None:
        self.errors.clear()
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        self.page.wait_for_timeout(500)

    def queued_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def unregistered_node_types(self) -> list[str]:
        return self.page.evaluate(
            "() => window.app.graph.nodes.map(n => n.type)"
            ".filter(t => !(t in window.LiteGraph.registered_node_types))")

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


@pytest.fixture(scope="session")
def frontend(browser, server) -> Frontend:
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    yield Frontend(page, server.url)
    page.close()
