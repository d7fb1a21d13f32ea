"""The reliability layer: bad inputs, leaks and a long queue, all through the session's real server.

Bad files are written into the test server's models and input folders for the session and removed
after it; every case's outcome is collected and summarised at the end of the run."""
from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from stylekit.tests.fixtures.registry import CLIP_VISION_VIT_H, CSD_CHECKPOINT, IP_ADAPTER_SD15
from stylekit.tests.support.paths import BASE_DIR

OUTCOMES: list[tuple[str, str, str]] = []   # (case, outcome, message) for the summary
REFUSAL_SECONDS: list[tuple[str, float]] = []   # (case, whole-prompt seconds) of each refused hostile case


def _truncated(source, target) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def _latent(path, tensor: torch.Tensor) -> None:
    # LoadLatent's format; the version key stops it from rescaling by 1/0.18215.
    safetensors.torch.save_file({"latent_tensor": tensor, "latent_format_version_0": torch.tensor([])}, str(path))


def _image(path, width: int, height: int) -> None:
    rng = np.random.default_rng(width * 7919 + height)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


BAD_FILES = {
    ("ipadapter", "stylekit_bad_truncated.safetensors"):
        lambda p: _truncated(IP_ADAPTER_SD15.linked_path(), p),
    ("ipadapter", "stylekit_bad_text.safetensors"): lambda p: p.write_text("not a model\n" * 40),
    ("ipadapter", "stylekit_bad_random.bin"):
        lambda p: p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
    ("ipadapter", "stylekit_bad_lora.safetensors"): lambda p: safetensors.torch.save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(p)),
    ("style_discriminators", "stylekit_bad_truncated.pth"): lambda p: _truncated(CSD_CHECKPOINT.linked_path(), p),
    ("style_discriminators", "stylekit_bad_clip_vision.safetensors"):
        lambda p: p.write_bytes(CLIP_VISION_VIT_H.linked_path().read_bytes()),
    ("clip_vision", "stylekit_bad_truncated.safetensors"):
        lambda p: _truncated(CLIP_VISION_VIT_H.linked_path(), p),
    ("checkpoints", "stylekit_bad_ip_adapter_as_checkpoint.safetensors"):
        lambda p: p.write_bytes(IP_ADAPTER_SD15.linked_path().read_bytes()),
    ("loras", "stylekit_bad_text.safetensors"): lambda p: p.write_text("not a LoRA\n" * 40),
    ("input", "stylekit_1x1.png"): lambda p: _image(p, 1, 1),
    ("input", "stylekit_4096x64.png"): lambda p: _image(p, 4096, 64),
    ("input", "stylekit_empty.latent"): lambda p: _latent(p, torch.zeros(0, 4, 8, 8)),
    ("input", "stylekit_nan.latent"): lambda p: _latent(p, torch.full((1, 4, 8, 8), float("nan"))),
    ("input", "stylekit_inf.latent"): lambda p: _latent(p, torch.full((1, 4, 8, 8), float("inf"))),
    ("input", "stylekit_ok.latent"): lambda p: _latent(p, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))),
}


@pytest.fixture(scope="session")
def bad_files(server):
    written = []
    for (folder, name), write in BAD_FILES.items():
        path = (BASE_DIR / folder if folder == "input" else BASE_DIR / "models" / folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        written.append(path)
    yield {name: path for (_, name), path in zip(BAD_FILES, written)}
    for path in written:
        path.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    crashes = sum(outcome == "crash" for _, outcome, _ in OUTCOMES)
    errors = sum(outcome == "node error" for _, outcome, _ in OUTCOMES)
    ran = sum(outcome == "ran" for _, outcome, _ in OUTCOMES)
    terminalreporter.write_sep("-", f"reliability: {len(OUTCOMES)} bad inputs tried: {errors} clear node errors, "
                                    f"{ran} ran fine, {crashes} crashes")
    for case, seconds in REFUSAL_SECONDS:
        terminalreporter.write_line(f"refused in {seconds:6.2f} s: {case}")
