"""`make serve`: ComfyUI with the pack and its UI on 127.0.0.1, in the foreground.

Bundled host: base directory .work/base (the tiny fixtures under models/, add real files there
or point COMFYUI_PATH at your own ComfyUI). COMFYUI_PATH: that ComfyUI with its own models and
settings; the pack is added through an extra-paths file unless it is already in its custom_nodes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stylekit.tests.support.paths import BASE_DIR, REPO, WORK, HostMissing, host_path
from stylekit.tests.support.server import port_is_free, server_command


def pack_installed_in(comfyui: Path) -> bool:
    folder = comfyui / "custom_nodes"
    return folder.is_dir() and any(p.resolve() == REPO for p in folder.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8188)
    port = parser.parse_args().port
    try:
        host = host_path()
    except HostMissing as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return 2
    if not port_is_free(port):
        print(f"serve: error: port {port} on 127.0.0.1 is in use; run `make serve PORT=<free port>`", file=sys.stderr)
        return 2

    import torch  # only to choose the device; ComfyUI imports it anyway

    cpu = not torch.cuda.is_available()
    if os.environ.get("COMFYUI_PATH"):
        extra: tuple[str, ...] = ()
        if not pack_installed_in(host):
            paths = WORK / "serve_extra_paths.yaml"
            paths.write_text(f"stylekit:\n  base_path: {BASE_DIR}\n  custom_nodes: custom_nodes\n")
            extra = ("--extra-model-paths-config", str(paths))
        cmd = server_command(port, base_dir=None, cpu=cpu, extra=extra)
    else:
        from stylekit.tests.fixtures import ensure_all
        from stylekit.tests.support.host import init_comfy

        init_comfy()
        ensure_all()
        cmd = server_command(port, base_dir=BASE_DIR, cpu=cpu)
    print(f"serve: ComfyUI at {host} on http://127.0.0.1:{port} ({'CPU' if cpu else 'GPU'}); Ctrl-C stops it", flush=True)
    os.chdir(host)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
