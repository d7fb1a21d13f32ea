"""Which StyleKit batch-sharing methods a model already carries (the reference samplers install
their own and refuse a model that has one, which would share twice)."""
from __future__ import annotations

from .style_aligned import SharedAttentionPatch
from .visual_style import SwapKVPatch

_NAMES = {SharedAttentionPatch: "StyleAligned", SwapKVPatch: "Visual Style Prompting"}


def installed_sharing(model_patcher) -> list[str]:
    replaces = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})
    found = set()
    for patch in replaces.values():
        while patch is not None:
            found.update(name for cls, name in _NAMES.items() if isinstance(patch, cls))
            patch = getattr(patch, "previous", None)
    return sorted(found)
