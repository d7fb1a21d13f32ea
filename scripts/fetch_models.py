"""`make models`: download the model files a workflow needs into a ComfyUI's model folders.

Reads workflows/models/models.json (the table `make workflows` also writes into every UI workflow).
A download goes to NAME.part beside its target and continues from there when run again (HTTP
Range); the file is renamed into place only once complete and, where a sha256 is known (the
table, or the hub's own X-Linked-Etag header for large files), verified first: a wrong file is
removed, never installed. An existing file is kept: skipped when it is the right one, refused
with an error when it differs (nothing is overwritten unless --overwrite is given).

Usage: python3 scripts/fetch_models.py [--workflow NAME ...] [--comfyui PATH] [--list]
       make models [WORKFLOW=name] [COMFYUI_PATH=/path/to/ComfyUI]
Without COMFYUI_PATH the files go to the bundled ComfyUI (.comfyui/models), the one
`make demo COMFYUI_PATH=...` and `make serve COMFYUI_PATH=...` read. Licence-gated files need a
Hugging Face token in HF_TOKEN (after accepting the licence on the model's page).
Standard library only, so it runs before the pack's environment exists.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_table import REPO, TABLE, ModelFile, load_table, workflow_models, workflow_names  # noqa: E402

CHUNK = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(RuntimeError):
    """A file could not be fetched; the message says why and what to do."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class _Linked(urllib.request.HTTPRedirectHandler):
    """Follows redirects and keeps the hub's X-Linked-* headers of the redirect response
    (Hugging Face states an LFS file's size and sha256 there, before sending it to its CDN)."""

    def __init__(self):
        self.linked: dict[str, str] = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        for key in ("X-Linked-Etag", "X-Linked-Size"):
            if headers.get(key):
                self.linked[key] = headers[key].strip().strip('"')
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")  # never hand the token to the CDN
        return new


def _open(url: str, start: int = 0, method: str = "GET", timeout: float = 30.0):
    headers = {"User-Agent": "stylekit-fetch-models"}
    if start:
        headers["Range"] = f"bytes={start}-"
    token = os.environ.get("HF_TOKEN")
    if token and urllib.parse.urlsplit(url).hostname in ("huggingface.co", "hf.co"):
        headers["Authorization"] = f"Bearer {token}"
    linked = _Linked()
    opener = urllib.request.build_opener(linked)
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise FetchError(
                f"{url} answered {err.code}: the file needs a licence acceptance or a login. Open the model's "
                "page on the hub, accept its licence, then set HF_TOKEN to an access token and run again") from None
        if err.code == 404:
            raise FetchError(f"{url} answered 404: the file is not there (renamed or removed upstream); "
                             "fix its url in workflows/models/models.json") from None
        if err.code == 416:
            return None, linked.linked
        raise FetchError(f"{url} answered HTTP {err.code} {err.reason}; try again later") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        host = urllib.parse.urlsplit(url).netloc
        reason = getattr(err, "reason", err)
        raise FetchError(f"cannot reach {host} ({reason}); check the network connection or proxy "
                         "(HTTPS_PROXY), then run again: finished files are kept, partial ones resume") from None
    return response, linked.linked


def _progress(name: str, done: int, total: int | None, started: float, tty: bool, last: list) -> None:
    now = time.monotonic()
    if not tty and now - last[0] < 10 and (total is None or done < total):
        return
    last[0] = now
    rate = done / max(now - started, 1e-6)
    if total:
        filled = int(30 * done / total)
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done / total:5.1f}% {done / 1e6:,.1f}/{total / 1e6:,.1f} MB"
    else:
        bar = f"{done / 1e6:,.1f} MB"
    line = f"  {name}: {bar} {rate / 1e6:.1f} MB/s"
    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def fetch(f: ModelFile, models_dir: Path, overwrite: bool = False, log=print) -> str:
    """Put one file in place; returns 'present', 'downloaded' or 'resumed'. Raises FetchError."""
    target = models_dir / f.directory / f.name
    part = target.with_name(target.name + ".part")
    known = f.sha256.lower() if f.sha256 else None

    if target.exists() and not overwrite:
        if known:
            if sha256_of(target) == known:
                return "present"
            raise FetchError(f"{target} exists and is a different file (its sha256 is not {known}); "
                             "move it away, or run with --overwrite to replace it")
        response, linked = _open(f.url, method="HEAD")
        size = int(linked.get("X-Linked-Size") or response.headers.get("Content-Length") or -1)
        response.close()
        hub_hash = linked.get("X-Linked-Etag", "").lower()
        if SHA256.match(hub_hash):
            if sha256_of(target) == hub_hash:
                return "present"
        elif size < 0 or target.stat().st_size == size:
            return "present"
        raise FetchError(f"{target} exists but differs from {f.url}; move it away, or run with --overwrite "
                         "to replace it")

    target.parent.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.exists() else 0
    response, linked = _open(f.url, start=start)
    if response is None:  # 416: the partial file is already whole
        status = "resumed"
    else:
        with response:
            if start and response.status != 206:
                start = 0  # the server ignored the range: start over
            status = "resumed" if start else "downloaded"
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            if start:
                log(f"  {f.relative_path}: resuming at {start / 1e6:,.1f} MB")
            tty, last, started, done = sys.stderr.isatty(), [0.0], time.monotonic(), start
            with part.open("ab" if start else "wb") as out:
                try:
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        out.write(block)
                        done += len(block)
                        _progress(f.relative_path, done, total, started, tty, last)
                except (OSError, urllib.error.URLError, TimeoutError) as err:
                    raise FetchError(f"the download of {f.url} broke off at {done / 1e6:,.1f} MB ({err}); "
                                     f"run again to resume from {part.name}") from None
            if tty:
                print(file=sys.stderr)
            if total is not None and done < total:
                raise FetchError(f"the download of {f.url} stopped at {done:,} of {total:,} bytes; "
                                 f"run again to resume from {part.name}")
    expected = known or (linked.get("X-Linked-Etag", "").lower() if response is not None else "")
    if expected and SHA256.match(expected):
        actual = sha256_of(part)
        if actual != expected:
            part.unlink()
            raise FetchError(f"{f.url} downloaded, but its sha256 is {actual}, not {expected}; the file was "
                             "removed. The hub's copy changed or the transfer was corrupted: run again, and if "
                             "it repeats, check the url in workflows/models/models.json")
    if target.exists():  # --overwrite
        target.unlink()
    os.replace(part, target)
    return status


def default_models_dir() -> Path:
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        return Path(explicit) / "models"
    recorded = REPO / ".work" / "host_path"
    if recorded.exists():
        return Path(recorded.read_text().strip()) / "models"
    raise FetchError("no ComfyUI to put the files in: set COMFYUI_PATH=/path/to/ComfyUI "
                     "(or run `make setup` first to use the bundled one)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", nargs="*", default=None, help="workflow names (default: all)")
    parser.add_argument("--comfyui", type=Path, help="the ComfyUI folder (default: COMFYUI_PATH, else the bundled one)")
    parser.add_argument("--models-dir", type=Path, help="a models folder directly (overrides --comfyui)")
    parser.add_argument("--table", type=Path, default=TABLE, help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="replace existing files that differ")
    parser.add_argument("--list", action="store_true", help="only list the files and where they go")
    args = parser.parse_args(argv)

    known = workflow_names()
    names = [n for n in (args.workflow or []) if n] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"models: error: no workflow {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        table = load_table(args.table)
        files: list[ModelFile] = []
        for name in names:
            files += [f for f in workflow_models(table, name) if f not in files]
        models_dir = args.models_dir or (args.comfyui / "models" if args.comfyui else default_models_dir())
    except (FetchError, KeyError, ValueError) as err:
        print(f"models: error: {err}", file=sys.stderr)
        return 2
    print(f"models: {len(files)} file(s) for {', '.join(names) if args.workflow else 'every workflow'} "
          f"into {models_dir}", flush=True)
    if args.list:
        for f in files:
            print(f"  {f.relative_path:<60} {f.url}")
        return 0
    failed = []
    for i, f in enumerate(files, 1):
        try:
            status = fetch(f, models_dir, overwrite=args.overwrite)
        except FetchError as err:
            failed.append(f.relative_path)
            print(f"models: [{i}/{len(files)}] {f.relative_path}: error: {err}", file=sys.stderr, flush=True)
            continue
        words = {"present": "already there, kept", "downloaded": "downloaded", "resumed": "downloaded (resumed)"}
        print(f"models: [{i}/{len(files)}] {f.relative_path}: {words[status]}", flush=True)
    if failed:
        print(f"models: {len(failed)} file(s) missing: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"models: done; run them with `make demo COMFYUI_PATH={models_dir.parent}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
