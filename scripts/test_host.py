#!/usr/bin/env python3
"""`make test-host HOST=<tarball>`: prepare that core (scripts/host_venv.py), then run pytest on its
layers with its venv.

Runs on the system Python (stdlib only). The Makefile hands HOST, HOST_LAYERS and PYTEST_ARGS over
in the environment, never through a shell command line: the two lists are split into words as a
POSIX shell splits them (shlex: quotes group words) and nothing else in them is interpreted (no
`;`, `$(...)`, globs), so `PYTEST_ARGS='-k "not frontend and not twin"'` reaches pytest as two words.
Prints how long the venv step took; exits with pytest's status.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def main() -> int:
    host_tarball = os.environ.get("HOST", "")
    if not host_tarball:
        print("usage: make test-host HOST=../shared/hosts/comfyui-0.33.0.tar.gz", file=sys.stderr)
        return 2
    try:
        layers = shlex.split(os.environ.get("HOST_LAYERS", ""))
        extra = shlex.split(os.environ.get("PYTEST_ARGS", ""))
    except ValueError as err:   # an unclosed quote
        print(f"test-host: error: cannot split HOST_LAYERS / PYTEST_ARGS into words: {err}", file=sys.stderr)
        return 2
    started = time.monotonic()
    prepared = subprocess.run([sys.executable, str(SCRIPTS / "host_venv.py"), host_tarball],
                              stdout=subprocess.PIPE, text=True)
    if prepared.returncode != 0:
        return prepared.returncode
    host, venv = prepared.stdout.splitlines()[:2]
    print(f"[test-host] {Path(host_tarball).name}: host and venv ready in {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)
    pytest = str(Path(venv) / "bin" / "pytest")
    env = dict(os.environ, COMFYUI_PATH=host, STYLEKIT_VENV=venv)
    os.execve(pytest, [pytest, *layers, *extra], env)


if __name__ == "__main__":
    sys.exit(main())
