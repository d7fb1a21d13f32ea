"""Where the bootstrapped pieces live (see scripts/bootstrap.py)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# STYLEKIT_WORK moves the state folder (tests use it to simulate a machine with nothing installed).
WORK = Path(os.environ.get("STYLEKIT_WORK", REPO / ".work"))
# STYLEKIT_VENV: the venv servers run in (`make test-host` points it at the compatibility host's).
VENV_PYTHON = Path(os.environ.get("STYLEKIT_VENV", REPO / ".venv")) / "bin" / "python"
# The base directory every server we start uses: models/ (fixtures), custom_nodes/ (the pack), output/.
BASE_DIR = WORK / "base"
FIXTURE_STORE = WORK / "fixtures"
PACK_LINK_NAME = "comfyui-stylekit"


# The core the pack is pinned to (DESIGN §0); `make test-host` runs the same layers on newer ones.
PINNED_CORE = "0.3.75"


def host_version() -> str:
    """The running host's ComfyUI version, read from its comfyui_version.py."""
    text = (host_path() / "comfyui_version.py").read_text()
    return text.split("__version__ =")[1].strip().splitlines()[0].strip("\"' ")


class HostMissing(RuntimeError):
    """The ComfyUI host is not installed; `make setup` (or any make target) installs it."""


def host_path() -> Path:
    """The ComfyUI tree in use: COMFYUI_PATH when set, else the bundled .comfyui/."""
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        path = Path(explicit)
        if not (path / "main.py").exists():
            raise HostMissing(f"COMFYUI_PATH={path} holds no main.py; point it at a ComfyUI checkout")
        return path.resolve()
    recorded = WORK / "host_path"
    if not recorded.exists():
        raise HostMissing("the ComfyUI host is not installed; run `make setup` (or any make target) first")
    path = Path(recorded.read_text())
    if not (path / "main.py").exists():
        raise HostMissing(f"the ComfyUI host at {path} is gone; run `make setup` to reinstall it")
    return path
