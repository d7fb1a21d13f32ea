"""The DiT adapter package follows the glue's rules (a separate file so the foundation's edits of
test_layering.py's GLUE list do not conflict; fold it in there when merging)."""
from __future__ import annotations

from stylekit.tests.unit.test_layering import REPO, _imports, _pack_modules


def test_dit_adapters_never_import_comfy_api_and_import_the_pack_relatively():
    modules = _pack_modules("dit_adapters")
    assert modules, "dit_adapters/ has no modules"
    for path in modules:
        bad = {n for n in _imports(path) if n.split(".")[0] in ("comfy_api", "stylekit")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_flow_inversion_imports_the_pack_relatively():
    bad = {n for n in _imports(REPO / "sampling" / "flow_inversion.py") if n.split(".")[0] in ("comfy_api", "stylekit")}
    assert not bad
