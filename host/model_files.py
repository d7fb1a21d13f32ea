"""Objects read from a models/ folder, once per file version.

Two loader nodes naming one file share one object, and nothing is kept once no graph holds it
(a weak-value cache keyed by path and file version: size, times, inode)."""
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
        self._alive: "weakref.WeakValueDictionary[tuple, T]" = weakref.WeakValueDictionary()

    def load(self, filename: str) -> T:
        register_models_folder(self.folder)
        path = folder_paths.get_full_path(self.folder, filename)
        if path is None:
            raise FileNotFoundError(f"{filename} is not in models/{self.folder} "
                                    f"({', '.join(folder_paths.get_folder_paths(self.folder))})")
        # A file replaced in place may keep its mtime (cp -p, rsync -t, a restore): the size, the
        # nanosecond mtime, the inode and the change time (which no copy tool can set back; POSIX)
        # together tell versions apart without reading the file.
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns)
        found = self._alive.get(key)
        if found is None:
            found = self.read(path)
            self._alive[key] = found
        return found
