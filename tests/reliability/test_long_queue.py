"""100 queued prompts mixing plain sampling and every patching method: the server's resident
memory after them stays within 5 % of what it was after a warm-up round of the same mix."""
from __future__ import annotations

import psutil

from . import prompts as p

PROMPTS = 100
MIX = [
    lambda seed: p.txt2img(seed, batch=2),
    lambda seed: p.patched(p.txt2img(seed, batch=2), p.ip_adapter_nodes(), ["13", 0]),
    lambda seed: p.patched(p.txt2img(seed, batch=2), p.instantstyle_nodes(), ["15", 0]),
    lambda seed: p.with_style_aligned(seed),
    lambda seed: p.with_vsp(seed),
    lambda seed: p.patched(p.txt2img(seed, batch=2), p.style_adapter_nodes(), ["16", 0]),
]


def _rss_mb(server) -> float:
    return psutil.Process(server.process.pid).memory_info().rss / 2**20


def _run_all(server, seeds) -> None:
    ids = [server.queue(MIX[seed % len(MIX)](seed)) for seed in seeds]  # all queued at once
    for prompt_id in ids:
        server.wait(prompt_id, timeout=600)


def test_a_hundred_mixed_prompts_grow_resident_memory_by_less_than_5_percent(server):
    _run_all(server, range(1000, 1000 + 2 * len(MIX)))   # warm-up: every model, patch and kernel once
    before = _rss_mb(server)
    _run_all(server, range(2000, 2000 + PROMPTS))
    after = _rss_mb(server)
    growth = 100.0 * (after - before) / before
    print(f"\nreliability: {PROMPTS} queued mixed prompts: server RSS {before:.0f} -> {after:.0f} MB ({growth:+.2f} %)")
    assert growth < 5.0, f"RSS grew {growth:.2f} % ({before:.0f} -> {after:.0f} MB) over {PROMPTS} prompts"
    assert server.alive()
