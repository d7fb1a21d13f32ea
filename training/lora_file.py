"""LoRA files in the kohya format core's LoraLoader reads, saved under models/loras atomically.

Keys follow kohya-ss sd-scripts, the de-facto standard every UI loads: per adapted weight
`lora_unet_<module path with dots as underscores>` + `.lora_down.weight` [rank, in],
`.lora_up.weight` [out, rank] and `.alpha` (scale alpha / rank). The module path is the one
sd-scripts trains on: diffusers names for SD1.x/2.x ("lora_unet_up_blocks_1_attentions_0_…"),
the original (LDM) names for SDXL ("lora_unet_output_blocks_0_1_…"). Core's key map accepts both.

A file is written to a hidden, uniquely named temporary file in the target folder (created before
training, so a bad name fails at once), fsynced and renamed at the end, so an interrupted prompt
or a crash mid-write never leaves a half-written `.safetensors` where loaders look; an existing
file is never replaced unless asked, and then only one StyleKit wrote (LoraOutput).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import comfy.model_base
import comfy.utils
import safetensors.torch
import torch

from ..host.echo import echo

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LORA_SUFFIX = ".safetensors"
DIFFUSION_PREFIX = "diffusion_model."


def _ldm_to_diffusers(unet_config: dict) -> dict[str, str]:
    """LDM weight path ("input_blocks.1.1.….weight") -> diffusers path, from core's own table."""
    return {ldm: diffusers for diffusers, ldm in comfy.utils.unet_to_diffusers(unet_config).items()}


def kohya_names(model, weight_keys: list[str]) -> dict[str, str]:
    """The kohya LoRA name (without suffix) of each BaseModel weight key of a UNet model."""
    base = getattr(model, "model", model)
    sgm_names = isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))
    to_diffusers = {} if sgm_names else _ldm_to_diffusers(base.model_config.unet_config)
    names = {}
    for key in weight_keys:
        if not key.startswith(DIFFUSION_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"{key} is not a UNet weight")
        path = key[len(DIFFUSION_PREFIX):]
        path = to_diffusers.get(path, path)
        names[key] = "lora_unet_" + path[:-len(".weight")].replace(".", "_")
    return names


def lora_state_dict(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """kohya state dict of `factors`: weight key -> (up [out, rank], down [rank, in])."""
    names = kohya_names(model, list(factors))
    sd: dict[str, torch.Tensor] = {}
    for key, (up, down) in factors.items():
        name = names[key]
        sd[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        sd[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


# Names that cannot be files on Windows (any extension), refused everywhere so that a model folder
# stays portable and shareable.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
MAX_PART_BYTES = 200     # per folder or file name; leaves room for the temporary name's affixes (255)
MAX_NAME_CHARS = 400


def normalized_lora_name(name: str) -> str:
    """`name` as a path relative to models/loras ending in .safetensors; ValueError if it would
    leave that folder, is empty, or cannot be a portable file name (control characters such as
    NUL or a newline, a part over 200 bytes, a reserved name such as 'con')."""
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"the name is {len(name)} characters long, beyond the limit of {MAX_NAME_CHARS}; use a "
                         "short name such as 'StyleKit/dreambooth_sks_dog'")
    cleaned = name.strip().replace("\\", "/")
    if cleaned.lower().endswith(LORA_SUFFIX):
        cleaned = cleaned[:-len(LORA_SUFFIX)]
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if not parts or cleaned.startswith("/") or ".." in parts or ":" in cleaned:
        raise ValueError(f"{echo(name)} is not a file name inside models/loras; use a relative name such as "
                         "'StyleKit/dreambooth_sks_dog'")
    for part in parts:
        if any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise ValueError(f"{echo(name)} holds a control character (a NUL, a newline, a tab); use letters, "
                             "digits, '_', '-' and '/' for folders")
        if len(part.encode("utf-8")) > MAX_PART_BYTES:
            raise ValueError(f"a part of the name is {len(part.encode('utf-8'))} bytes long, beyond the limit of "
                             f"{MAX_PART_BYTES}; use a shorter name")
        if part.split(".")[0].strip().lower() in _RESERVED or part != part.rstrip(". "):
            raise ValueError(f"{echo(part)} cannot be a file or folder name on every system (a reserved device "
                             "name, or a trailing dot or space); choose another name")
    return "/".join(parts) + LORA_SUFFIX


def lora_path(name: str) -> Path:
    """Where the LoRA `name` goes: the first models/loras folder ComfyUI knows."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / normalized_lora_name(name)


TEMPORARY_SUFFIX = ".partial"
STYLEKIT_KEY = "stylekit_method"      # the metadata key every LoRA StyleKit trains carries


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a folder; its rename is durable enough for us
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(state_dict: dict[str, torch.Tensor], temporary: Path, metadata: dict[str, str]) -> None:
    safetensors.torch.save_file(state_dict, str(temporary), metadata=metadata)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())


def _lock(fd: int) -> bool:
    """An exclusive, non-blocking lock on an open temporary file: held while its run lives, so a
    cleanup in another process (or container sharing the folder) never takes a live file."""
    if fcntl is None:
        return True  # Windows: an open file cannot be deleted, which protects it the same way
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files left by runs that were killed (no process holds their lock)."""
    removed = 0
    for candidate in folder.glob(f".*{LORA_SUFFIX}.*{TEMPORARY_SUFFIX}"):
        try:
            fd = os.open(candidate, os.O_RDWR)
        except OSError:
            continue
        try:
            if _lock(fd):
                candidate.unlink()
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def written_by_stylekit(path: Path) -> bool:
    """Whether `path` is a LoRA StyleKit trained (its metadata says so)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return STYLEKIT_KEY in (f.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def non_finite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]


class OutputError(ValueError):
    """The LoRA file cannot be written under this name; the message says why and what to do."""


class NonFiniteWeights(OutputError):
    """Training diverged: the weights hold NaN or inf, and are not saved."""


class LoraOutput:
    """One LoRA file to be written, reserved before training starts.

    Opening it creates the folder and a locked temporary file named after the final file in that
    folder, so a name the file system refuses (too long, a path through a file, no permission)
    fails at once, not after training. `commit` checks the weights are finite, writes and fsyncs
    the temporary file, then moves it to its name: never over an existing file unless
    `overwrite`, and then only over a LoRA StyleKit wrote (recognised by its metadata); otherwise
    the next free name with a counter, as core's savers do (`name_00001_.safetensors`).
    `discard` (or leaving the `with` block without commit) removes the temporary file.
    """

    def __init__(self, path: Path, overwrite: bool = False):
        self.path, self.overwrite = path, overwrite
        self.temporary: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> "LoraOutput":
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
            self._check_overwrite()
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMPORARY_SUFFIX, dir=folder)
        except OSError as err:
            # The server's own paths stay out of the message: it goes back to whoever sent the prompt.
            raise OutputError(f"cannot write {echo(self.path.name)} there ({err.strerror or type(err).__name__}); "
                              "choose another name (a folder in it may be an existing file)") from None
        self._fd, self.temporary = fd, Path(name)
        _lock(fd)
        return self

    def _check_overwrite(self) -> None:
        if self.overwrite and self.path.exists() and not written_by_stylekit(self.path):
            raise OutputError(f"{self.path.name} exists and was not trained by StyleKit; overwrite replaces only "
                              "LoRAs StyleKit wrote: choose another name")

    def commit(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """Write the file; returns the path it got."""
        bad = non_finite_tensors(state_dict)
        if bad:
            raise NonFiniteWeights(f"the trained weights hold NaN or inf in {len(bad)} of {len(state_dict)} tensors "
                              "(training diverged); nothing was saved: lower learning_rate or prior_weight")
        assert self.temporary is not None, "commit outside the with block"
        _write_synced(state_dict, self.temporary, metadata)
        if self.overwrite:
            self._check_overwrite()  # the file may have appeared while training
            os.replace(self.temporary, self.path)
            final = self.path
        else:
            final = self._link_to_free_name()
        _fsync_folder(final.parent)
        self.temporary = None
        self.discard()
        return final

    def _link_to_free_name(self) -> Path:
        stem = self.path.name[:-len(LORA_SUFFIX)]
        for counter in range(0, 100_000):
            candidate = self.path if counter == 0 else self.path.with_name(f"{stem}_{counter:05}_{LORA_SUFFIX}")
            try:
                # A hard link fails if the name exists: no check-then-write race with another run.
                os.link(self.temporary, candidate)
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: claim the name, then replace it
                try:
                    os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os.replace(self.temporary, candidate)
                return candidate
            self.temporary.unlink()
            return candidate
        raise OutputError(f"no free name for {self.path.name}: 100,000 numbered copies exist")

    def discard(self) -> None:
        if self.temporary is not None:
            self.temporary.unlink(missing_ok=True)
            self.temporary = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc) -> None:
        self.discard()


def save_atomically(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write to a uniquely named hidden temporary file beside `path`, fsync it, then rename over
    `path`: nothing half-written ever carries the final name (the temporary name has no
    .safetensors suffix, so no loader lists it, and it is removed if writing fails). Replaces an
    existing file: callers that must not overwrite use LoraOutput."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        _write_synced(state_dict, temporary, metadata)
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_lora_file(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a file in models/loras."""
    import folder_paths

    path = folder_paths.get_full_path_or_raise("loras", name)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return comfy.utils.load_torch_file(path, safe_load=True), metadata
