"""Frontend layer: the real ComfyUI frontend (the pinned comfyui-frontend-package) in Debian's
headless Chromium, driven by Playwright against the session's server. Skipped, with the reason,
where Chromium is not installed (scripts/bootstrap.py installs it on root Debian machines)."""
from __future__ import annotations

import re
import shutil

import pytest

from stylekit.tests.support.paths import WORK

CHROMIUM = shutil.which("chromium")
# Chromium on a closed network: no background traffic, no sandbox as root (DESIGN of the machine).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = WORK / "frontend"


# Where a frontend reports a loaded workflow's problems. The pinned frontend (1.32) opens dialogs
# (.comfy-missing-models, a "missing nodes" dialog); newer ones (1.49, core 0.33) raise an error
# overlay whose "see errors" button opens a side panel with one group per kind of problem. Which
# one a page has is read from the app's own Pinia stores, not from the core's version number.
MISSING_NODES = re.compile(r"missing nodes", re.IGNORECASE)
PINIA = "document.getElementById('vue-app').__vue_app__.config.globalProperties.$pinia"


def has_errors_panel(page) -> bool:
    return page.evaluate(f"() => {PINIA}._s.has('missingNodesError')")


def errors_panel_group(page, group: str) -> list[str]:
    """Texts of the errors panel's `group` (e.g. error-group-missing-node): opens the panel from the
    error overlay; [] when the frontend raised no overlay."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    see_errors = page.locator("[data-testid=error-overlay-see-errors]")
    try:
        see_errors.wait_for(state="visible", timeout=3_000)
    except PlaywrightTimeout:
        return []
    see_errors.click()
    page.wait_for_selector("[data-testid=errors-summary-hero]", timeout=10_000)
    return [e.inner_text() for e in page.query_selector_all(f"[data-testid={group}]")]


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

    def missing_node_reports(self) -> list[str]:
        """What the frontend shows the user about node types nobody registered, in either UI."""
        if has_errors_panel(self.page):
            if not self.page.evaluate(f"() => {PINIA}._s.get('missingNodesError').hasMissingNodes"):
                return []
            return errors_panel_group(self.page, "error-group-missing-node")
        return [t for t in self.dialog_texts() if MISSING_NODES.search(t)]

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
