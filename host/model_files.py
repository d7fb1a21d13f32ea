"""Objects read from a models/ folder, once per file version.

Two loader nodes naming one file share one object, and nothing is kept once no graph holds it
(a weak-value cache keyed by path and modification time)."""
from __future__ import annotations

import os
import weakref
from typing import Callable, Generic, TypeVar

import folder_paths

T = TypeVar("T")


def register_models_folder(folder: str) -> None:
    """Make models/<folder> known to folder_paths (idempotent; keeps paths others added)."""
    default = os.path.join(folder_paths.models_dir, folder)
    if folder not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[folder] = ([default], set(folder_paths.supported_pt_extensions))
    elif default not in folder_paths.folder_names_and_paths[folder][0]:
        folder_paths.add_model_folder_path(folder, default)


class LoadedOnce(Generic[T]):
    def __init__(self, folder: str, read: Callable[[str], T]):
        self.folder, self.read = folder, read
        self._alive: "weakref.WeakValueDictionary[tuple[str, float], T]" = weakref.WeakValueDictionary()

    def load(self, filename: str) -> T:
        register_models_folder(self.folder)
        path = folder_paths.get_full_path(self.folder, filename)
        if path is None:
            raise FileNotFoundError(f"{filename} is not in models/{self.folder} "
                                    f"({', '.join(folder_paths.get_folder_paths(self.folder))})")
        key = (path, os.path.getmtime(path))
        found = self._alive.get(key)
        if found is None:
            found = self.read(path)
            self._alive[key] = found
        return found
