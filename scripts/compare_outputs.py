"""Do two versions of the pack give byte-identical outputs? Runs the shipped API workflows (tiny
profile, fixtures) on one server per pack version and compares the sha256 of every image and text.

Use it around a change that must not change results (a refactor, a move, a merge):
  .venv/bin/python scripts/compare_outputs.py --before /path/to/old/checkout [--after .] [--only NAME ...]
The old checkout can be `git worktree add /tmp/old main` or `git archive main | tar -x -C /tmp/old`.
Exit status 1 when any workflow differs.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from stylekit.tests.fixtures import ensure_all
from stylekit.tests.support.host import init_comfy
from stylekit.tests.support.paths import BASE_DIR, PACK_LINK_NAME, REPO, WORK
from stylekit.tests.support.server import ComfyServer, extra_node_args
from stylekit.tests.support.workflows import api_workflow_names, load_api_workflow, run_order, tiny


def _base(name: str, pack: Path) -> Path:
    """A base directory sharing the fixtures' models and inputs, with `pack` as the custom node."""
    base = WORK / "compare" / name
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for link, target in ((base / "models", BASE_DIR / "models"), (base / "input", BASE_DIR / "input"),
                         (base / "custom_nodes" / PACK_LINK_NAME, pack.resolve())):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return base


def outputs(name: str, pack: Path, workflows: list[str]) -> dict[str, list[str]]:
    base = _base(name, pack)
    found = {}
    # extra_node_args: the tiny profile's TestDiTConditioning (the prompt of Flux / SD3 graphs).
    with ComfyServer(base_dir=base, log_path=base / "server.log", extra_args=extra_node_args()) as server:
        for workflow in workflows:
            out = server.run(tiny(load_api_workflow(workflow)))
            # Sorted: /history lists output nodes in no fixed order.
            found[workflow] = sorted([hashlib.sha256(server.fetch(i)).hexdigest() for i in out.images()] +
                                     [hashlib.sha256(t.encode()).hexdigest() for t in out.texts()])
            print(f"{name:>6} {workflow}: {len(found[workflow])} outputs", flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the pack before the change")
    parser.add_argument("--after", type=Path, default=REPO, help="the pack after it (default: this repo)")
    parser.add_argument("--only", nargs="*", default=None, help="workflow names (default: all)")
    args = parser.parse_args()
    init_comfy()
    ensure_all()
    workflows = run_order(args.only or api_workflow_names())
    before, after = outputs("before", args.before, workflows), outputs("after", args.after, workflows)
    differ = [w for w in workflows if before[w] != after[w]]
    for w in workflows:
        print(f"{'DIFFERS' if w in differ else 'same':>7}  {w} ({len(after[w])} outputs)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
