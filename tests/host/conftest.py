"""Host layer: ComfyUI in this process (CPU), the tiny fixtures loaded once per session."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from stylekit.tests.fixtures import ensure_all
from stylekit.tests.fixtures.registry import SD15_CHECKPOINT, SDXL_CHECKPOINT
from stylekit.tests.support.host import init_comfy, load_checkpoint

# Before pytest imports any test module: the glue imports comfy at module level, and comfy reads
# its CPU flag and base directory when first imported.
init_comfy()


@dataclass
class Checkpoint:
    model: object   # comfy.model_patcher.ModelPatcher
    clip: object
    vae: object


@pytest.fixture(scope="session")
def comfy_host():
    init_comfy(load_nodes=True)
    ensure_all()


# Function-scoped over a per-process cache (tests/support/host.py): loaded once, yet the server
# layer can release them, so a full run never holds the host's models and the server's at once.
@pytest.fixture
def sd15(comfy_host) -> Checkpoint:
    return Checkpoint(*load_checkpoint(SD15_CHECKPOINT.filename))


@pytest.fixture
def sdxl(comfy_host) -> Checkpoint:
    return Checkpoint(*load_checkpoint(SDXL_CHECKPOINT.filename))


@pytest.fixture(params=["sd15", "sdxl"])
def checkpoint(request) -> Checkpoint:
    """Each test using it runs on both topologies."""
    return request.getfixturevalue(request.param)
