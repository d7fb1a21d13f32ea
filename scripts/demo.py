"""Run every workflows/api/*.json headless and collect the images under out/demo/NAME/.

Tiny mode (default): the bundled or given ComfyUI with the tiny random-weight fixtures, each
workflow shrunk by the tiny profile (tests/support/workflows.py); every workflow must run.
User mode (COMFYUI_PATH set, or DEMO_MODELS=user): the models of that ComfyUI, the workflows as
authored; a workflow whose model files are missing is reported and skipped.
Writes out/demo/contact_sheet.png: one row per workflow.
Usage: make demo, or .venv/bin/python scripts/demo.py [--only NAME ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import textwrap
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from stylekit.tests.fixtures import ensure_all
from stylekit.tests.fixtures.images import ensure_example_images
from stylekit.tests.support.host import init_comfy
from stylekit.tests.support.paths import BASE_DIR, PACK_LINK_NAME, REPO, WORK, HostMissing, host_path
from stylekit.tests.support.server import (ComfyServer, PromptFailed, PromptRejected, ServerError, extra_node_args,
                                          port_is_free)
from stylekit.tests.support.workflows import api_workflow_names, load_api_workflow, run_order, tiny

THUMB = 192


def user_base_dir(comfyui: Path) -> Path:
    """A base directory whose models/ is the user's, with the pack and the example images."""
    base = WORK / "demo-base"
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    pack = base / "custom_nodes" / PACK_LINK_NAME
    if not pack.is_symlink():
        pack.symlink_to(REPO, target_is_directory=True)
    models = base / "models"
    if models.is_symlink() and Path(os.readlink(models)) != comfyui / "models":
        models.unlink()
    if not models.exists():
        models.symlink_to(comfyui / "models", target_is_directory=True)
    ensure_example_images(base / "input")
    return base


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


LABEL_WIDTH = 300
TINY_NOTE = "random-weight fixtures: the pipeline ran, pixels mean nothing"


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """The image in a cell: small outputs (the tiny profile's 64 px) scaled up with nearest
    neighbour, so their pixels stay visible; large ones scaled down smoothly."""
    image = image.convert("RGB")
    scale = (cell - 4) / max(image.size)
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def contact_sheet(rows: list[tuple[str, list[Path]]], path: Path, note: str = "") -> None:
    """One row per workflow: its name and what the images are, then its images, each filling a cell."""
    width = LABEL_WIDTH + THUMB * max([len(images) for _, images in rows] + [1])
    sheet = Image.new("RGB", (width, THUMB * max(len(rows), 1)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, images) in enumerate(rows):
        top = row * THUMB
        draw.text((10, top + THUMB // 2 - 14), name, fill="black")
        for i, line in enumerate(textwrap.wrap(note, 44)):
            draw.text((10, top + THUMB // 2 + 2 + 12 * i), line, fill="gray")
        for col, image_path in enumerate(images):
            with Image.open(image_path) as im:
                cell = _fit(im, THUMB)
            sheet.paste(cell, (LABEL_WIDTH + col * THUMB + (THUMB - cell.width) // 2, top + (THUMB - cell.height) // 2))
    sheet.save(path)


def run_workflow(server: ComfyServer, name: str, shrink: bool, out: Path) -> tuple[str, list[Path]]:
    prompt = load_api_workflow(name)
    if shrink:
        prompt = tiny(prompt)
    outputs = server.run(prompt, timeout=3600)
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    saved = []
    for i, ref in enumerate(outputs.images()):
        path = target / f"{i:02d}_{ref['filename']}"
        Image.open(io.BytesIO(server.fetch(ref))).save(path)
        saved.append(path)
    return "ok", saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="run only these workflows")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    parser.add_argument("--port", type=int, default=None, help="the server's port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args()
    names = args.only or api_workflow_names()
    user_mode = os.environ.get("DEMO_MODELS", "user" if os.environ.get("COMFYUI_PATH") else "tiny") == "user"
    try:
        host = host_path()
    except HostMissing as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    print(f"demo: {len(names)} workflow(s) on {'your models' if user_mode else 'the tiny fixtures'}; "
          "preparing the host", flush=True)
    if user_mode:
        base_dir = user_base_dir(host)
        cpu = not cuda_available()
    else:
        init_comfy()
        ensure_all()
        base_dir, cpu = BASE_DIR, True
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "user models" if user_mode else "tiny fixtures"
    print(f"demo: ComfyUI at {host}, {mode}, {'CPU' if cpu else 'GPU'}", flush=True)

    rows, failures = [], []
    try:
        order = run_order(names)
        if args.port is not None and not port_is_free(args.port):
            print(f"demo: error: port {args.port} on 127.0.0.1 is in use; run `make demo PORT=<free port>`",
                  file=sys.stderr)
            return 2
        print(f"demo: starting ComfyUI (about a minute on a CPU), then {len(order)} workflow(s)", flush=True)
        # The tiny profile gives Flux / SD3 graphs tensor prompts through the test-only
        # TestDiTConditioning node (no tiny T5-XXL exists): the tiny demo's server loads it too.
        extra = () if user_mode else extra_node_args()
        with ComfyServer(port=args.port, base_dir=base_dir, cpu=cpu, extra_args=extra) as server:
            for n, name in enumerate(order, 1):
                print(f"  [{n}/{len(order)}] {name} ...", flush=True)
                started = time.monotonic()
                try:
                    status, images = run_workflow(server, name, shrink=not user_mode, out=args.out)
                except PromptRejected as err:
                    status, images = f"skipped: {err}", []
                    if not user_mode:
                        failures.append(name)
                except PromptFailed as err:
                    status, images = f"failed: {err}", []
                    failures.append(name)
                print(f"  [{n}/{len(order)}] {name:<40} {status} ({len(images)} images, "
                      f"{time.monotonic() - started:.1f} s)", flush=True)
                if images:
                    rows.append((name, images))
    except ServerError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    sheet = args.out / "contact_sheet.png"
    contact_sheet(rows, sheet, "" if user_mode else TINY_NOTE)
    print(f"demo: images under {args.out}/<workflow>/, contact sheet {sheet}")
    if not user_mode:
        print(f"demo: these ran on {TINY_NOTE}. On real models: "
              "make models COMFYUI_PATH=/path/to/ComfyUI && make demo COMFYUI_PATH=/path/to/ComfyUI")
    if failures:
        print(f"demo: {len(failures)} workflow(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
