#!/usr/bin/env python3
"""Prepare a second ComfyUI core for the compatibility run: `make test-host HOST=<tarball>`.

Runs on the system Python (stdlib only). For HOST = .../comfyui-0.33.0.tar.gz:
  1. host   .work/hosts/comfyui-0.33.0/comfyui/ <- the tarball's single top folder (entries outside
            it are refused);
  2. venv   .work/hosts/comfyui-0.33.0/venv/ <- requirements/hosts/comfyui-0.33.0.txt (the torch
            triple: torch alone first, then torchvision and torchaudio with --no-deps), then the
            host's own requirements.txt and our requirements/test.txt with the triple as constraint;
  3. links  a .pth that puts .work/pkg on sys.path (the host comes from COMFYUI_PATH).
Prints the host folder and the venv folder (one line each); each step is skipped when its stamp
matches. Every failure is one line on stderr and exit status 2.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("STYLEKIT_WORK", REPO / ".work"))


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[host-venv] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        print("\n".join(result.stdout.strip().splitlines()[-15:]), file=sys.stderr)
        raise SetupError(f"{what} failed (exit {result.returncode}); command: {' '.join(cmd)}")


def host_name(tarball: Path) -> str:
    name = tarball.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    raise SetupError(f"{tarball} is not a .tar.gz of a ComfyUI tree")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stamp_ok(folder: Path, name: str, value: str) -> bool:
    return (folder / f".stamp-{name}").exists() and (folder / f".stamp-{name}").read_text() == value


def unpack(tarball: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp).resolve()
        with tarfile.open(tarball) as tf:
            members = tf.getmembers()
            tops = {m.name.split("/")[0] for m in members}
            if len(tops) != 1:
                raise SetupError(f"{tarball.name} must hold one top folder, found {sorted(tops)[:5]}")
            for m in members:
                dest = (staging / m.name).resolve()
                if m.name.startswith("/") or ".." in m.name.split("/") or not dest.is_relative_to(staging):
                    raise SetupError(f"{tarball.name} holds an entry outside its folder ({m.name[:120]!r})")
                if m.issym() or m.islnk():
                    link = (dest.parent / m.linkname).resolve()
                    if not link.is_relative_to(staging):
                        raise SetupError(f"{tarball.name} holds a link out of its folder ({m.name[:120]!r})")
            tf.extractall(staging, members=members)
        top = staging / tops.pop()
        if not (top / "main.py").exists():
            raise SetupError(f"{tarball.name} holds no ComfyUI tree (no main.py)")
        if target.exists():
            shutil.rmtree(target)
        top.rename(target)


def build_venv(venv: Path, host: Path, pins: Path) -> None:
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    lines = [l.split("#")[0].strip() for l in pins.read_text().splitlines()]
    torch_pins = [l for l in lines if l]
    log(f"installing {torch_pins[0]} first and alone")
    run(pip + [torch_pins[0]], "installing torch")
    log(f"installing {' '.join(torch_pins[1:])} with --no-deps")
    run(pip + ["--no-deps", *torch_pins[1:]], "installing torchvision/torchaudio")
    log("installing the host's requirements.txt and requirements/test.txt (torch held by constraint)")
    run(pip + ["-r", str(host / "requirements.txt"), "-r", str(REPO / "requirements" / "test.txt"),
               "-c", str(pins)], "installing the host requirements")


def main(argv: list[str]) -> int:
    try:
        if len(argv) != 1:
            raise SetupError("usage: host_venv.py HOST_TARBALL (e.g. ../shared/hosts/comfyui-0.33.0.tar.gz)")
        tarball = Path(argv[0]).resolve()
        if not tarball.is_file():
            raise SetupError(f"{argv[0]} does not exist; the compatibility hosts live in ../shared/hosts/")
        name = host_name(tarball)
        pins = REPO / "requirements" / "hosts" / f"{name}.txt"
        if not pins.exists():
            raise SetupError(f"no requirements/hosts/{name}.txt: write the torch triple that pairs with this core")
        folder = WORK / "hosts" / name
        folder.mkdir(parents=True, exist_ok=True)
        host, venv = folder / "comfyui", folder / "venv"
        tar_digest = digest(tarball)
        if not (stamp_ok(folder, "host", tar_digest) and (host / "main.py").exists()):
            log(f"unpacking {tarball.name} into {host}")
            unpack(tarball, host)
            (host / "extra_model_paths.yaml").unlink(missing_ok=True)
            (folder / ".stamp-host").write_text(tar_digest)
        wanted = hashlib.sha256(pins.read_bytes() + (host / "requirements.txt").read_bytes()
                                + (REPO / "requirements" / "test.txt").read_bytes()
                                + sys.version.encode()).hexdigest()
        if not (stamp_ok(folder, "venv", wanted) and (venv / "bin" / "python").exists()):
            build_venv(venv, host, pins)
            (folder / ".stamp-venv").write_text(wanted)
        site = sorted((venv / "lib").glob("python3*/site-packages"))[0]
        (site / "stylekit_dev.pth").write_text(f"{WORK / 'pkg'}\n")
        print(host)
        print(venv)
    except SetupError as err:
        print(f"host_venv: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
