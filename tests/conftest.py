"""Marks every test with its layer (the folder it lives in) and checks the import set-up."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "host", "server")


def pytest_configure(config):
    try:
        import stylekit  # noqa: F401
    except ImportError:
        pytest.exit("`import stylekit` failed: run the tests through `make test` (it bootstraps .venv)", returncode=2)
    if any(Path(p or ".").resolve() == TESTS.parent for p in sys.path):
        pytest.exit("the repo root is on sys.path: its nodes/ would shadow ComfyUI's nodes.py; "
                    "run .venv/bin/pytest, not python -m pytest", returncode=2)


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
