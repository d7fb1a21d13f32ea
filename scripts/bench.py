"""`make bench`: every case of every bench/ module; a markdown table and a PNG bar chart.

Usage: .venv/bin/python scripts/bench.py [--only SUBSTRING] [--repeats N]
Writes out/bench/bench.md and out/bench/bench.png and prints the table.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import sys

import comfy.cli_args
import torch
from PIL import Image, ImageDraw

import stylekit.bench as bench_pkg
from stylekit.bench.harness import Result, measure
from stylekit.tests.fixtures import ensure_all
from stylekit.tests.support.host import init_comfy
from stylekit.tests.support.paths import REPO

OUT = REPO / "out" / "bench"


def all_cases():
    for info in sorted(pkgutil.iter_modules(bench_pkg.__path__), key=lambda m: m.name):
        if info.name == "harness":
            continue
        module = importlib.import_module(f"stylekit.bench.{info.name}")
        yield from getattr(module, "CASES", [])


def table(results: list[Result]) -> str:
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    rows = [f"StyleKit bench on {device}, {platform.machine()}, torch {torch.__version__}, PyTorch SDPA attention; "
            "ratio = median of paired per-step times, patched / plain, in the same run",
            "",
            "| case | model | batch | px | plain s/step | patched s/step | ratio | goal | memory added by patched clones |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.case
        goal = f"≤ {c.goal:.2f} {'met' if r.ratio <= c.goal else 'MISSED'}" if c.goal else ""
        memory = (f"{r.memory_per_clone_mb:.2f} MB per clone ({r.memory_added_pct:.3f} % of weights for "
                  f"{c.memory_clones})" if r.memory_added_pct is not None else "")
        rows.append(f"| {c.name} | {c.model} | {c.batch} | {c.side} | {r.plain_step_s:.3f} | {r.patched_step_s:.3f} "
                    f"| {r.ratio:.3f} | {goal} | {memory} |")
    peaks = [r for r in results if "peak_rss_added_mb" in r.extra]
    if peaks:
        rows += ["", "| case | peak memory added, plain run (MB) | patched run (MB) |", "|---|---|---|"]
        for r in peaks:
            p = r.extra["peak_rss_added_mb"]
            rows.append(f"| {r.case.name} | {p['plain']:.0f} | {p['patched']:.0f} |")
    return "\n".join(rows)


def chart(results: list[Result], path) -> None:
    bar_h, label_w, width = 26, 360, 900
    image = Image.new("RGB", (width, 40 + bar_h * len(results)), "white")
    draw = ImageDraw.Draw(image)
    top = max([r.ratio for r in results] + [2.0])
    scale = (width - label_w - 60) / top
    x1 = label_w + scale * 1.0
    draw.text((10, 10), "time per step, patched / plain (line = 1.0)", fill="black")
    for i, r in enumerate(results):
        y = 36 + i * bar_h
        draw.text((10, y + 6), f"{r.case.name} ({r.case.model}, b{r.case.batch})"[:56], fill="black")
        colour = (60, 140, 90) if not r.case.goal or r.ratio <= r.case.goal else (200, 70, 60)
        draw.rectangle([label_w, y + 4, label_w + scale * r.ratio, y + bar_h - 4], fill=colour)
        draw.text((label_w + scale * r.ratio + 6, y + 6), f"{r.ratio:.2f}", fill="black")
    draw.line([x1, 30, x1, image.height], fill="black")
    image.save(path)


def write(results: list[Result]) -> str:
    OUT.mkdir(parents=True, exist_ok=True)
    text = table(results)
    (OUT / "bench.md").write_text(text + "\n")
    chart(results, OUT / "bench.png")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="run the cases whose \"name (model)\" contains this, e.g. sdxl")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # PyTorch SDPA, the default attention on GPUs; core's CPU default (sub-quadratic) is 2x slower
    # at 512 px here and would dilute every ratio.
    comfy.cli_args.args.use_pytorch_cross_attention = True
    init_comfy(load_nodes=True)
    ensure_all()
    results = []
    # SD1.5 cases first: the SDXL ones at 1024 px are the slowest on a CPU.
    for case in sorted(all_cases(), key=lambda c: c.model != "sd15"):
        if args.only.lower() in f"{case.name} ({case.model})".lower():
            results.append(measure(case, args.repeats))
            print(f"  {case.name} ({case.model}): ratio {results[-1].ratio:.3f}", flush=True)
            write(results)  # after every case: an interrupted run keeps what it measured
    text = write(results)
    print(text)
    print(f"\nwrote {OUT / 'bench.md'} and {OUT / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
