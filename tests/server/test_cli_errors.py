"""Setup and server scripts fail in one clear line: bad COMFYUI_PATH, missing host, port in use."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from stylekit.tests.support.paths import REPO, VENV_PYTHON


def run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "STYLEKIT_WORK")}
    full_env.update(env)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=full_env, timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bootstrap_rejects_a_comfyui_path_that_does_not_exist(tmp_path):
    line = one_line_error(run([sys.executable, "scripts/bootstrap.py"], COMFYUI_PATH=str(tmp_path / "nope")))
    assert "COMFYUI_PATH" in line and "is not a directory" in line


def test_bootstrap_rejects_a_comfyui_path_that_is_not_comfyui(tmp_path):
    line = one_line_error(run([sys.executable, "scripts/bootstrap.py"], COMFYUI_PATH=str(tmp_path)))
    assert "is not a ComfyUI checkout" in line and "main.py" in line


def test_serve_without_an_installed_host_says_to_run_setup(tmp_path):
    line = one_line_error(run([str(VENV_PYTHON), "scripts/serve.py"], STYLEKIT_WORK=str(tmp_path)))
    assert "not installed" in line and "make setup" in line


def test_demo_without_an_installed_host_says_to_run_setup(tmp_path):
    line = one_line_error(run([str(VENV_PYTHON), "scripts/demo.py"], STYLEKIT_WORK=str(tmp_path)))
    assert "not installed" in line and "make setup" in line


def test_serve_on_a_port_in_use_names_the_port_and_the_fix():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(run([str(VENV_PYTHON), "scripts/serve.py", "--port", str(port)]))
    assert f"port {port}" in line and "PORT=" in line
