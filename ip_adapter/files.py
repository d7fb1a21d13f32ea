"""Where IP-Adapter files live and how they are read: the official files, unchanged.

`models/ipadapter` is registered with folder_paths under the name "ipadapter", exactly as the
incumbent IP-Adapter pack does, so users' existing folders (and extra_model_paths.yaml entries)
keep working; both packs can be installed side by side. `.safetensors` files hold flat
`image_proj.*` / `ip_adapter.*` keys, `.bin` files a torch dict {"image_proj": ..., "ip_adapter": ...}.
StyleAdapter checkpoints in the layout ip_adapter/style_projection.py documents (one more projection kind of the engine) (`style_emb.*` keys) live
in the same folder and load through the same loader.
"""
from __future__ import annotations

import os

import comfy.utils
import folder_paths

from ..host.model_files import LoadedOnce, register_models_folder
from .style_projection import is_style_adapter, style_adapter_from_state_dict
from .model import IPAdapter, IPAdapterFileError, ip_adapter_from_state_dict, split_state_dict

FOLDER = "ipadapter"


def register_folder() -> None:
    register_models_folder(FOLDER)


register_folder()  # at import, as the pack loads: the folder is known before any node asks


def ip_adapter_files() -> list[str]:
    register_folder()
    return folder_paths.get_filename_list(FOLDER)


def read_ip_adapter(path: str) -> IPAdapter:
    """Load an IP-Adapter (or StyleAdapter) file, .safetensors or .bin; IPAdapterFileError says why a
    file is not one."""
    try:
        flat = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as err:  # safetensors and torch.load raise many types for a damaged file
        raise IPAdapterFileError(f"it could not be read as .safetensors or torch weights ({err})") from None
    if is_style_adapter(flat):
        return style_adapter_from_state_dict(flat, name=os.path.basename(path))
    return ip_adapter_from_state_dict(split_state_dict(flat), name=os.path.basename(path))


_loaded = LoadedOnce(FOLDER, read_ip_adapter)


def load_ip_adapter(filename: str) -> IPAdapter:
    """The adapter `filename` of models/ipadapter, read once per file version: two loader nodes
    naming one file share one set of weights."""
    return _loaded.load(filename)
