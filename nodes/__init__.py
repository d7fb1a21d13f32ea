"""The V3 node classes, one module per method family; the only package that imports comfy_api.

Each module lists its nodes in `NODES`; the extension collects them in module order, so adding a
method family is adding a module.
"""
from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from ._common import guard_inputs


def all_nodes() -> list[type[io.ComfyNode]]:
    found: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(guard_inputs(node) for node in getattr(module, "NODES", []))
    return found


class StyleKitExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
