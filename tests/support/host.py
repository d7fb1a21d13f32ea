"""In-process use of the ComfyUI host (library mode), shared by the host test layer and scripts."""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from .paths import BASE_DIR, host_path

_state = {"comfy": None, "nodes": False}


def init_comfy(base_dir: Path = BASE_DIR, load_nodes: bool = False) -> None:
    """Import comfy on the CPU with base_dir as its base directory; idempotent.

    comfy reads its CLI arguments at import time: `cpu` must be set before comfy.model_management
    and `base_directory` before folder_paths are first imported (DESIGN §0). load_nodes also
    imports core's nodes.py and comfy_extras (~5 s) for tests that call core nodes.
    """
    if _state["comfy"] is None:
        root = str(host_path())
        if root not in sys.path:
            sys.path.insert(0, root)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.disable_api_nodes = True
        comfy.cli_args.args.base_directory = str(base_dir)
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401

        _state["comfy"] = Path(base_dir)
    elif _state["comfy"] != Path(base_dir):
        raise RuntimeError(f"comfy already initialised with base directory {_state['comfy']}, not {base_dir}")
    if load_nodes and not _state["nodes"]:
        # As main.py does: load ComfyUI's utils package before nodes.py puts comfy/ (with its
        # utils.py) first on sys.path, or comfy_extras that import utils.* fail.
        import utils.extra_config  # noqa: F401
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        logging.getLogger().setLevel(logging.WARNING)
        _state["nodes"] = True


_checkpoints: dict[str, tuple] = {}


def load_checkpoint(filename: str) -> tuple:
    """(model, clip, vae) of a checkpoint through core's CheckpointLoaderSimple, cached per process."""
    if filename not in _checkpoints:
        init_comfy(load_nodes=True)
        import nodes

        _checkpoints[filename] = tuple(nodes.CheckpointLoaderSimple().load_checkpoint(filename)[:3])
    return _checkpoints[filename]


_diffusion_models: dict[str, object] = {}


def load_diffusion_model(filename: str):
    """A MODEL of models/diffusion_models through core's UNETLoader (its own detection), cached per process."""
    if filename not in _diffusion_models:
        init_comfy(load_nodes=True)
        import nodes

        _diffusion_models[filename] = nodes.UNETLoader().load_unet(filename, "default")[0]
    return _diffusion_models[filename]


_clip_visions: dict[str, object] = {}


def load_clip_vision(filename: str):
    """A CLIP_VISION model of models/clip_vision through core's CLIPVisionLoader, cached per process."""
    if filename not in _clip_visions:
        init_comfy(load_nodes=True)
        import nodes

        _clip_visions[filename] = nodes.CLIPVisionLoader().load_clip(filename)[0]
    return _clip_visions[filename]


def release_models() -> None:
    """Drop every model this process loaded, so a server started next has the memory to itself."""
    _checkpoints.clear()
    _diffusion_models.clear()
    _clip_visions.clear()
    if _state["comfy"] is None:
        return
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()
