"""The bootstrap installs only the pinned host wheel and only inside its own folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap.py"


@pytest.fixture(scope="module")
def bootstrap():
    spec = importlib.util.spec_from_file_location("stylekit_bootstrap", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("entry", ["../escape.py", "comfy/../../escape.py", "/etc/passwd", "C:/x.py", "a\\..\\..\\b"])
def test_archive_entries_outside_the_host_folder_are_refused(bootstrap, tmp_path, entry):
    with pytest.raises(bootstrap.SetupError, match="outside its folder"):
        bootstrap.extraction_target(tmp_path / "comfyui", entry)


def test_ordinary_entries_land_inside_the_host_folder(bootstrap, tmp_path):
    root = tmp_path / "comfyui"
    assert bootstrap.extraction_target(root, "comfy/model_patcher.py") == (root / "comfy" / "model_patcher.py").resolve()


def test_the_host_wheel_is_pinned_by_a_sha256(bootstrap):
    assert len(bootstrap.HOST_WHEEL_SHA256) == 64 and int(bootstrap.HOST_WHEEL_SHA256, 16) >= 0
    assert "--require-hashes" in SCRIPT.read_text()
