"""`make demo` in both modes: tiny fixtures (images + contact sheet) and a user's ComfyUI."""
from __future__ import annotations

import os
import subprocess

from PIL import Image

from stylekit.tests.support.paths import REPO, VENV_PYTHON, host_path

SMOKE = "txt2img_block_map"


def demo(args: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "DEMO_MODELS")}
    full_env.update(env)
    return subprocess.run([str(VENV_PYTHON), "scripts/demo.py", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=900)


def test_tiny_demo_writes_the_workflow_images_and_a_contact_sheet(server, tmp_path):
    result = demo(["--only", SMOKE, "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    images = sorted((tmp_path / SMOKE).glob("*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size[0] > 64 and f"{SMOKE}" in result.stdout


def test_user_mode_skips_a_workflow_whose_models_are_missing_with_the_reason(server, tmp_path):
    # The bundled ComfyUI as "the user's": its own models/ folder holds no checkpoint.
    result = demo(["--only", SMOKE, "--out", str(tmp_path)], COMFYUI_PATH=str(host_path()))
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if SMOKE in line and "skipped" in line)
    assert "v1-5-pruned-emaonly.safetensors" in line and "user models" in result.stdout
