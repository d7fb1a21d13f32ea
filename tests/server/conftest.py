"""Server layer: one real ComfyUI server with the pack on 127.0.0.1 for the whole session."""
from __future__ import annotations

import pytest

from stylekit.tests.fixtures import ensure_all
from stylekit.tests.support.host import init_comfy, release_models
from stylekit.tests.support.server import ComfyServer


@pytest.fixture(scope="session")
def server():
    init_comfy()  # the fixture builders use comfy's own classes
    ensure_all()
    release_models()  # models the host layer loaded in this process
    with ComfyServer() as running:
        yield running
    assert not running.alive()


@pytest.fixture(scope="session")
def object_info(server) -> dict:
    return server.object_info()
