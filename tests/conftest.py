"""Marks every test with its layer (the folder it lives in), checks the import set-up, and owns the
one ComfyUI server that the server and frontend layers share."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "host", "server", "reliability", "frontend")


def pytest_configure(config):
    try:
        import stylekit  # noqa: F401
    except ImportError:
        pytest.exit("`import stylekit` failed: run the tests through `make test` (it bootstraps .venv)", returncode=2)
    if any(Path(p or ".").resolve() == TESTS.parent for p in sys.path):
        pytest.exit("the repo root is on sys.path: its nodes/ would shadow ComfyUI's nodes.py; "
                    "run .venv/bin/pytest, not python -m pytest", returncode=2)


def _layer(item) -> str | None:
    parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
    return parts[0] if parts and parts[0] in LAYERS else None


def pytest_collection_modifyitems(config, items):
    """Mark each test with its layer and run the layers cheapest first: unit, host, server, reliability,
    frontend (Playwright's sync API keeps an event loop running once the browser is up)."""
    for item in items:
        if _layer(item):
            item.add_marker(getattr(pytest.mark, _layer(item)))
    items.sort(key=lambda item: LAYERS.index(_layer(item)) if _layer(item) else len(LAYERS))


# One real ComfyUI server for the whole session, shared by the server and frontend layers.
@pytest.fixture(scope="session")
def server():
    from stylekit.tests.fixtures import ensure_all
    from stylekit.tests.support.host import init_comfy, release_models
    from stylekit.tests.support.paths import BASE_DIR
    from stylekit.tests.support.server import ComfyServer, extra_node_args

    init_comfy()  # the fixture builders use comfy's own classes
    ensure_all()
    release_models()  # models the host layer loaded in this process
    # A test-only pack with the incumbent IP-Adapter pack's patch protocol (composition tests);
    # linked for this session only.
    incumbent = BASE_DIR / "custom_nodes" / "stylekit-test-incumbent-protocol"
    incumbent.unlink(missing_ok=True)
    incumbent.symlink_to(TESTS / "support" / "incumbent_protocol", target_is_directory=True)
    try:
        with ComfyServer(extra_args=extra_node_args()) as running:
            yield running
    finally:
        incumbent.unlink(missing_ok=True)
    assert not running.alive()


@pytest.fixture(scope="session")
def object_info(server) -> dict:
    return server.object_info()
