"""Where IP-Adapter files live and how they are read: the official files, unchanged.

`models/ipadapter` is registered with folder_paths under the name "ipadapter", exactly as the
incumbent IP-Adapter pack does, so users' existing folders (and extra_model_paths.yaml entries)
keep working; both packs can be installed side by side. `.safetensors` files hold flat
`image_proj.*` / `ip_adapter.*` keys, `.bin` files a torch dict {"image_proj": ..., "ip_adapter": ...}.
StyleAdapter checkpoints in the layout styleadapter/model.py documents (`style_emb.*` keys) live
in the same folder and load through the same loader.
"""
from __future__ import annotations

import os
import weakref

import comfy.utils
import folder_paths

from ..styleadapter.model import is_style_adapter, style_adapter_from_state_dict
from .model import IPAdapter, IPAdapterFileError, ip_adapter_from_state_dict, split_state_dict

FOLDER = "ipadapter"


def register_folder() -> None:
    """Make models/ipadapter known to folder_paths (idempotent; keeps paths others added)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(folder_paths.supported_pt_extensions))
    elif default not in folder_paths.folder_names_and_paths[FOLDER][0]:
        folder_paths.add_model_folder_path(FOLDER, default)


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


# Adapters alive somewhere (a node's cached output, a patched model), by file version: a second
# loader naming the same file gets the same object, and nothing is kept once no graph holds it.
_alive: "weakref.WeakValueDictionary[tuple[str, float], IPAdapter]" = weakref.WeakValueDictionary()


def load_ip_adapter(filename: str) -> IPAdapter:
    """The adapter `filename` of models/ipadapter, read once per file version: two loader nodes
    naming one file share one set of weights."""
    register_folder()
    path = folder_paths.get_full_path(FOLDER, filename)
    if path is None:
        raise FileNotFoundError(f"{filename} is not in models/{FOLDER} ({', '.join(folder_paths.get_folder_paths(FOLDER))})")
    key = (path, os.path.getmtime(path))
    adapter = _alive.get(key)
    if adapter is None:
        adapter = read_ip_adapter(path)
        _alive[key] = adapter
    return adapter
