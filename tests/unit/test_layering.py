"""The import direction of the design: every folder imports only folders below it in LAYERS (no cycle),
attention/ is pure torch, only nodes/ imports comfy_api, and the pack imports itself relatively."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _pack_modules(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def test_attention_package_imports_without_comfy_in_a_fresh_interpreter():
    code = (
        "import importlib, pkgutil, sys\n"
        "import stylekit.attention as pkg\n"
        "for m in pkgutil.walk_packages(pkg.__path__, 'stylekit.attention.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'comfy' or n.startswith(('comfy.', 'comfy_api')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_training_math_and_gradient_glue_import_without_comfy_in_a_fresh_interpreter():
    # The objective, the loss curve and host/gradients.py are pure torch; issue 5 reuses the latter.
    code = (
        "import sys\n"
        "import stylekit.training.objectives, stylekit.training.loss_curve, stylekit.host.gradients\n"
        "bad = sorted(n for n in sys.modules if n == 'comfy' or n.startswith(('comfy.', 'comfy_api')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_math_modules_never_import_comfy():
    for path in _pack_modules("attention"):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "nodes")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


# Packages beside the glue (learned parts and loaders) follow the glue's rules.
GLUE = ("host", "patching", "ip_adapter", "dit_adapters", "sampling", "training", "styleadapter", "style_discriminator")


def test_only_nodes_package_imports_comfy_api():
    others = [p for p in REPO.glob("*.py")] + _pack_modules("attention", *GLUE)
    for path in others:
        bad = {n for n in _imports(path) if n.split(".")[0] == "comfy_api"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; only nodes/ may"


def test_pack_code_uses_relative_imports_of_itself():
    # ComfyUI imports the pack under its folder name, so `import stylekit` would fail there.
    for path in [REPO / "__init__.py"] + _pack_modules("attention", *GLUE, "nodes"):
        bad = {n for n in _imports(path) if n.split(".")[0] == "stylekit"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad} by name"


def test_trajectory_math_imports_without_comfy():
    # host/trajectory.py is pure torch: the reference-row lookup is unit-tested on its own.
    bad = {n for n in _imports(REPO / "host" / "trajectory.py") if n.split(".")[0] in ("comfy", "comfy_api")}
    assert not bad


# Bottom to top: a folder may import the folders before it, never one after it (nor itself through
# another folder), so there is no folder cycle. DEVELOPING.md shows the same order.
LAYERS = ("attention", "host", "style_discriminator", "ip_adapter", "dit_adapters", "patching", "sampling", "styleadapter",
          "training", "nodes")


def _pack_imports(path: Path) -> set[str]:
    """Top-level pack folders a module imports through relative imports (`from ..host.x import y`)."""
    folder = path.relative_to(REPO).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        if node.level == 1:
            found.add(folder)
        elif node.module:
            found.add(node.module.split(".")[0])
        else:
            found.update(alias.name for alias in node.names)
    return found


def test_every_folder_imports_only_the_folders_below_it():
    pack_folders = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists() and p.name != "tests"}
    assert pack_folders <= set(LAYERS) | {"bench", "scripts"}, f"add {pack_folders - set(LAYERS)} to LAYERS"
    for folder in LAYERS:
        allowed = set(LAYERS[:LAYERS.index(folder) + 1])
        for path in _pack_modules(folder):
            bad = _pack_imports(path) - allowed
            assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}, above {folder}/ in {LAYERS}"
