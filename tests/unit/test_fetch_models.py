"""`make models` (scripts/fetch_models.py) against a hub on 127.0.0.1 serving fixture files:
resumable, verified, never overwriting a different file, clear about unreachable and gated files."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fetch_models.py"
WORKFLOW = "ip_adapter_sd15"
# The files of that workflow (as its API file names them) and fixture bytes standing in for them.
FILES = {
    "checkpoints/v1-5-pruned-emaonly.safetensors": os.urandom(3_000_000),
    "ipadapter/ip-adapter_sd15.safetensors": os.urandom(200_000),
    "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": os.urandom(500_000),
}


class Hub:
    """A minimal file host: Range requests, an optional cut-off, a redirect that states the sha256."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}      # path -> bytes sent before the connection drops (once)
        self.linked_sha: dict[str, str] = {}     # path -> X-Linked-Etag on a redirect to /cdn/path
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                path = self.path
                hub.requests.append((self.command, path, self.headers.get("Range")))
                if path in hub.gated:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in hub.linked_sha:
                    self.send_response(302)
                    self.send_header("Location", "/cdn" + path)
                    self.send_header("X-Linked-Etag", f'"{hub.linked_sha[path]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.blobs.get(path.removeprefix("/cdn"))
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                cut = hub.cut_after.pop(path, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, path: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[1] in (path, "/cdn" + path) and r[0] == "GET"]


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.server.shutdown()
    h.server.server_close()


def table(tmp_path: Path, hub: Hub, sha256: dict[str, str] | None = None) -> Path:
    """The real table with every url moved to the local hub (same names, folders and paths)."""
    data = json.loads((REPO / "workflows" / "models" / "models.json").read_text())
    for row in data["files"]:
        rel = f"{row['directory']}/{row['name']}"
        row["url"] = f"{hub.url}/{rel}"
        row["sha256"] = (sha256 or {}).get(rel)
        if rel in FILES:
            hub.blobs[f"/{rel}"] = FILES[rel]
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data))
    return path


def fetch(table_path: Path, models: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--workflow", WORKFLOW, "--table", str(table_path),
                           "--models-dir", str(models), *extra], capture_output=True, text=True, timeout=120)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_workflow_files_land_in_their_folders_verified(tmp_path, hub):
    hashes = {rel: sha(data) for rel, data in FILES.items()}
    result = fetch(table(tmp_path, hub, hashes), tmp_path / "models")
    assert result.returncode == 0, result.stdout + result.stderr
    for rel, data in FILES.items():
        assert (tmp_path / "models" / rel).read_bytes() == data
    assert not list((tmp_path / "models").rglob("*.part"))
    assert "[3/3]" in result.stdout


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, hub):
    rel = "checkpoints/v1-5-pruned-emaonly.safetensors"
    tpath = table(tmp_path, hub, {rel: sha(FILES[rel])})
    hub.cut_after[f"/{rel}"] = 1_000_000
    first = fetch(tpath, tmp_path / "models")
    assert first.returncode == 1 and "resume" in first.stderr
    part = tmp_path / "models" / (rel + ".part")
    assert part.stat().st_size == 1_000_000 and not (tmp_path / "models" / rel).exists()

    second = fetch(tpath, tmp_path / "models")
    assert second.returncode == 0, second.stdout + second.stderr
    assert (tmp_path / "models" / rel).read_bytes() == FILES[rel] and not part.exists()
    assert hub.gets(f"/{rel}")[-1][2] == "bytes=1000000-"   # only the rest was asked for
    assert "resumed" in second.stdout


def test_a_file_with_the_wrong_hash_is_refused_and_removed(tmp_path, hub):
    rel = "ipadapter/ip-adapter_sd15.safetensors"
    result = fetch(table(tmp_path, hub, {rel: sha(b"another file")}), tmp_path / "models")
    assert result.returncode == 1
    assert "sha256" in result.stderr and "removed" in result.stderr
    assert not (tmp_path / "models" / rel).exists() and not (tmp_path / "models" / (rel + ".part")).exists()


def test_the_hash_the_hub_states_on_its_redirect_is_checked_too(tmp_path, hub):
    rel = "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    tpath = table(tmp_path, hub)
    hub.linked_sha[f"/{rel}"] = sha(b"what the hub says it is")
    result = fetch(tpath, tmp_path / "models")
    assert result.returncode == 1 and "sha256" in result.stderr
    assert not (tmp_path / "models" / rel).exists()
    hub.linked_sha[f"/{rel}"] = sha(FILES[rel])
    assert fetch(tpath, tmp_path / "models").returncode == 0
    assert (tmp_path / "models" / rel).read_bytes() == FILES[rel]


def test_an_existing_correct_file_is_skipped_without_downloading(tmp_path, hub):
    hashes = {rel: sha(data) for rel, data in FILES.items()}
    tpath = table(tmp_path, hub, hashes)
    assert fetch(tpath, tmp_path / "models").returncode == 0
    hub.requests.clear()
    again = fetch(tpath, tmp_path / "models")
    assert again.returncode == 0 and again.stdout.count("already there") == 3
    assert not [r for r in hub.requests if r[0] == "GET"]


def test_an_existing_different_file_is_never_overwritten_silently(tmp_path, hub):
    rel = "ipadapter/ip-adapter_sd15.safetensors"
    mine = tmp_path / "models" / rel
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's own file")
    for hashes in ({rel: sha(FILES[rel])}, {}):       # known hash, and size compared with the hub's
        result = fetch(table(tmp_path, hub, hashes), tmp_path / "models")
        assert result.returncode == 1 and "--overwrite" in result.stderr
        assert mine.read_bytes() == b"the user's own file"
    assert fetch(table(tmp_path, hub, {}), tmp_path / "models", "--overwrite").returncode == 0
    assert mine.read_bytes() == FILES[rel]


def test_a_licence_gated_file_says_how_to_get_access(tmp_path, hub):
    rel = "checkpoints/v1-5-pruned-emaonly.safetensors"
    tpath = table(tmp_path, hub)
    hub.gated.add(f"/{rel}")
    result = fetch(tpath, tmp_path / "models")
    assert result.returncode == 1
    assert "401" in result.stderr and "licence" in result.stderr and "HF_TOKEN" in result.stderr


def test_an_unreachable_hub_is_named_with_what_to_do(tmp_path, hub):
    tpath = table(tmp_path, hub)
    hub.server.shutdown()
    hub.server.server_close()
    result = fetch(tpath, tmp_path / "models")
    assert result.returncode == 1
    assert "cannot reach 127.0.0.1" in result.stderr and "run again" in result.stderr


def test_an_unknown_workflow_is_refused_with_the_known_names(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--workflow", "nope", "--models-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "ip_adapter_sd15" in result.stderr
