"""Read a DiT IP-Adapter file unchanged and tell its type from its keys and shapes, not its name."""
from __future__ import annotations

import os

import comfy.utils

from ..host.model_files import LoadedOnce

from .instantx_sd35 import InstantXSD35Adapter, instantx_sd35_from_state_dict, is_instantx_sd35
from .xlabs_flux import XLabsFluxAdapter, is_xlabs_flux, xlabs_flux_from_state_dict

DiTAdapter = XLabsFluxAdapter | InstantXSD35Adapter


def dit_adapter_kind(sd: dict) -> str | None:
    """"xlabs_flux", "instantx_sd35" or None for a state dict of anything else."""
    if is_xlabs_flux(sd):
        return XLabsFluxAdapter.kind
    if is_instantx_sd35(sd):
        return InstantXSD35Adapter.kind
    return None


def dit_adapter_from_state_dict(sd: dict, name: str) -> DiTAdapter:
    kind = dit_adapter_kind(sd)
    if kind == XLabsFluxAdapter.kind:
        return xlabs_flux_from_state_dict(sd, name)
    if kind == InstantXSD35Adapter.kind:
        return instantx_sd35_from_state_dict(sd, name)
    raise ValueError(f"{name}: neither an XLabs Flux IP-Adapter (double_blocks.*.processor.ip_adapter_double_stream_*) "
                     f"nor an InstantX SD3.5 IP-Adapter (image_proj.time_embedding.*)")


def read_dit_adapter(path: str) -> DiTAdapter:
    """Load a .safetensors or .bin DiT IP-Adapter (weights only; no pickled code runs)."""
    return dit_adapter_from_state_dict(comfy.utils.load_torch_file(path, safe_load=True), os.path.basename(path))


_loaded = LoadedOnce("ipadapter", read_dit_adapter)


def load_dit_adapter(filename: str) -> DiTAdapter:
    """The DiT adapter `filename` of models/ipadapter (the IP-Adapter folder), read once per file version."""
    return _loaded.load(filename)
