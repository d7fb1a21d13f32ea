"""DreamBooth training through the HTTP API: cancelling it, and a bad input, on a real server."""
from __future__ import annotations

import time

import pytest

from stylekit.tests.support.paths import BASE_DIR
from stylekit.tests.support.server import PromptFailed
from stylekit.tests.support.workflows import load_api_workflow, tiny

LORAS = BASE_DIR / "models" / "loras" / "StyleKit"


def _training_prompt(lora_name: str, steps: int, prior_weight: float = 0.0) -> dict:
    """dreambooth_train at the tiny size, without the class images (subject term only)."""
    prompt = tiny(load_api_workflow("dreambooth_train"))
    for node in ("8", "9", "18"):
        del prompt[node]
    train = prompt["10"]["inputs"]
    del train["prior_images"]
    train.update(steps=steps, prior_weight=prior_weight, lora_name=lora_name)
    return prompt


def _finished(server, prompt_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry["status"]
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def _running(server, prompt_id: str) -> bool:
    return any(item[1] == prompt_id for item in server.get("/queue")["queue_running"])


def test_interrupting_a_training_prompt_leaves_no_lora_file_and_the_server_keeps_serving(server):
    name = "server_cancelled_training"
    prompt_id = server.queue(_training_prompt(f"StyleKit/{name}", steps=100_000))
    deadline = time.monotonic() + 120
    while not _running(server, prompt_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # model load and encoding take ~2 s on the fixture; then it trains ~0.5 s a step
    server.post("/interrupt", {})
    status = _finished(server, prompt_id)
    interrupted = [data for kind, data in status["messages"] if kind == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "StyleKitDreamBoothTrain"
    assert not list(LORAS.glob(f"*{name}*")) and not list(LORAS.glob(f".*{name}*"))
    assert server.run(_training_prompt(f"StyleKit/{name}_after", steps=1)).images()
    assert (LORAS / f"{name}_after.safetensors").is_file()
    (LORAS / f"{name}_after.safetensors").unlink()


def test_prior_weight_without_class_images_fails_naming_the_node_and_input_and_the_server_keeps_serving(server):
    with pytest.raises(PromptFailed) as failed:
        server.run(_training_prompt("StyleKit/never_written", steps=2, prior_weight=1.0))
    message = str(failed.value)
    assert "StyleKit DreamBooth LoRA Train: input 'prior_images'" in message
    assert "StyleKit DreamBooth Class Images" in message
    assert server.alive() and not (LORAS / "never_written.safetensors").exists()
