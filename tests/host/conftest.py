"""Host layer: ComfyUI in this process (CPU), the tiny fixtures loaded once per session."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from stylekit.tests.fixtures import ensure_all
from stylekit.tests.fixtures.registry import FLUX_DEV, SD15_CHECKPOINT, SD35, SDXL_CHECKPOINT
from stylekit.tests.support.host import init_comfy, load_checkpoint, load_diffusion_model

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


@pytest.fixture
def flux_dev(comfy_host):
    """The Flux.1 dev fixture (hidden 3072, 1 double + 1 single block) as UNETLoader loads it."""
    return load_diffusion_model(FLUX_DEV.filename)


@pytest.fixture
def sd35(comfy_host):
    """The SD3.5 fixture (depth 2, RMS QK-norm) as UNETLoader loads it."""
    return load_diffusion_model(SD35.filename)


@pytest.fixture(params=["sd15", "sdxl"])
def checkpoint(request) -> Checkpoint:
    """Each test using it runs on both topologies."""
    return request.getfixturevalue(request.param)
