"""Start a real ComfyUI server with the pack and drive its HTTP API (stdlib only).

Used by the server test layer, `make demo` and `make serve`. The server runs the venv's Python
on the host's main.py with a base directory whose custom_nodes/ links to this repo.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from .paths import BASE_DIR, REPO, VENV_PYTHON, WORK, host_path


class ServerError(RuntimeError):
    """The server could not be started or stopped answering."""


class PromptRejected(RuntimeError):
    """/prompt refused the workflow (validation); `details` holds the server's JSON answer."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


class PromptFailed(RuntimeError):
    """The prompt was accepted but a node raised while executing; `details` holds the error."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEST_NODES = REPO / "tests" / "support" / "comfy_nodes"


def extra_node_args() -> tuple[str, ...]:
    """Server arguments that add the test-only nodes (TEST_NODES) through an extra-paths file, so only
    the servers the tests and the tiny-fixture `make demo` start see them, never `make serve` or a
    demo on the user's models."""
    config = WORK / "test_nodes.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"stylekit_tests:\n  base_path: {TEST_NODES}\n  custom_nodes: .\n")
    return ("--extra-model-paths-config", str(config))


def server_command(port: int, base_dir: Path | None = BASE_DIR, cpu: bool = True,
                   extra: tuple[str, ...] = ()) -> list[str]:
    # Core keeps its database under <host>/user/ whatever the base directory; without that folder it
    # logs "Failed to initialize database" at every start.
    (host_path() / "user").mkdir(exist_ok=True)
    cmd = [str(VENV_PYTHON), str(host_path() / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
           "--disable-api-nodes", "--disable-auto-launch"]
    if cpu:
        cmd.append("--cpu")
    if base_dir is not None:
        cmd += ["--base-directory", str(base_dir)]
    return cmd + list(extra)


@dataclass
class Outputs:
    """What one finished prompt produced, per node id: the node's `ui` dict from /history."""
    prompt_id: str
    by_node: dict[str, dict]

    def images(self) -> list[dict]:
        return [img for out in self.by_node.values() for img in out.get("images", [])]

    def texts(self) -> list[str]:
        return [t for out in self.by_node.values() for t in out.get("text", [])]


_RUNNING: set["ComfyServer"] = set()
_HANDLED = (signal.SIGTERM, signal.SIGHUP)   # Ctrl-C is pytest's KeyboardInterrupt: fixtures tear down


def _stop_all_and_exit(signum, frame) -> None:
    """A CI or shell timeout sends SIGTERM: stop every server we started, then die of the signal."""
    for server in list(_RUNNING):
        server.stop(timeout=10)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _stop_all_at_exit() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=10)


def _guard_exit_paths() -> None:
    if getattr(_guard_exit_paths, "done", False):
        return
    _guard_exit_paths.done = True
    atexit.register(_stop_all_at_exit)
    if threading.current_thread() is threading.main_thread():
        for signum in _HANDLED:
            signal.signal(signum, _stop_all_and_exit)


def _die_with_parent() -> None:
    """In the child: the kernel sends it SIGTERM when the process that started it dies, even by
    SIGKILL (Linux prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
        except OSError:
            pass


class ComfyServer:
    def __init__(self, port: int | None = None, base_dir: Path | None = BASE_DIR, cpu: bool = True,
                 extra_args: tuple[str, ...] = (), log_path: Path | None = None):
        self.port = port or free_port()
        self.base_dir = base_dir
        self.cpu = cpu
        self.extra_args = extra_args
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or WORK / "logs" / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if not port_is_free(self.port):
            raise ServerError(f"port {self.port} on 127.0.0.1 is in use; choose another (PORT=...)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            server_command(self.port, self.base_dir, self.cpu, self.extra_args),
            cwd=str(host_path()), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: stop() reaches any children too
            preexec_fn=_die_with_parent)
        log.close()
        _RUNNING.add(self)
        _guard_exit_paths()  # stopped on every exit path: normal, exception, SIGTERM/SIGHUP, parent killed
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode} while starting; "
                                  f"log: {self.log_path}\n{self.log_tail()}")
            try:
                self.get("/object_info/CheckpointLoaderSimple", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s; log: {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        _RUNNING.discard(self)
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- HTTP ------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            body = resp.read()
            return json.loads(body) if resp.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict, timeout: float = 30.0) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            return json.loads(body) if body else {}

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    # -- prompts ---------------------------------------------------------------------------
    def queue(self, prompt: dict) -> str:
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            details = json.loads(err.read() or b"{}")
            raise PromptRejected(describe_rejection(details), details) from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> Outputs:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    details = execution_error(status)
                    raise PromptFailed(f"{details.get('node_type', '?')} (node {details.get('node_id', '?')}): "
                                       f"{details.get('exception_message', '').strip()}", details)
                return Outputs(prompt_id, entry.get("outputs", {}))
            if not self.alive():
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600.0) -> Outputs:
        return self.wait(self.queue(prompt), timeout)

    def fetch(self, file_ref: dict) -> bytes:
        """The bytes of an output file named by an entry of Outputs.images()."""
        query = urllib.parse.urlencode({k: file_ref.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{query}")


def execution_error(status: dict) -> dict:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return data
    return {"exception_message": "the prompt failed without an execution_error message"}


def describe_rejection(details: dict) -> str:
    parts = [details.get("error", {}).get("message", "prompt rejected")]
    for node_id, node in details.get("node_errors", {}).items():
        for err in node.get("errors", []):
            parts.append(f"{node.get('class_type', '?')} (node {node_id}): {err.get('message')}: {err.get('details')}")
    return "; ".join(parts)
