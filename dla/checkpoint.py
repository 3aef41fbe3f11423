"""Checkpoints that a crash cannot corrupt and that load without executing pickled code.

Layout of a run folder:

    RUN/checkpoints/step-00000300/
        model.safetensors   weights
        config.json         {"model": ModelConfig fields, "train": TrainConfig fields}
        optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
        state.json          step, learning-rate schedule and data position
    RUN/checkpoints/latest  the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed to disk, renamed into place,
and only then named by `latest` (itself replaced atomically); older checkpoints are removed
after that. A crash at any point leaves `latest` naming a complete checkpoint. Runs under
torchrun write sharded checkpoints by the same protocol (`dla.distributed`); `find` and
`load` take either kind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "latest"
FILES = ("model.safetensors", "config.json", "optimizer.pt", "state.json")
REQUIRED = ("model.safetensors", "config.json", "state.json")  # an inference checkpoint has no optimizer.pt
# A sharded checkpoint (written under torchrun, see dla.distributed): DCP's index, its shards
# `__R_0.distcp`, and the same JSON files.
SHARDED_FILES = (".metadata", "config.json", "state.json")


class CheckpointError(ValueError):
    """A path that holds no usable checkpoint, or one from an incompatible config."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save(run_dir: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         config: dict, state: dict, weights: tuple[dict, dict] | None = None) -> Path:
    """Write the checkpoint of `step` under `run_dir/checkpoints` and return its folder.
    Without an optimizer the checkpoint is for inference only (no optimizer.pt). `weights`:
    (tensors, safetensors metadata) to write instead of the model's state dict (`dla.quantize`)."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    if _read_latest(root) == name:  # already saved: the state at a step is a function of the step
        return final
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, metadata = weights or ({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, {})
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", **metadata})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "state.json", {**state, "step": step})
    return publish(root, tmp, name)


def publish(root: Path, tmp: Path, name: str) -> Path:
    """The last half of the protocol (module doc), for a complete checkpoint written into the
    hidden folder `tmp`: flush its files, rename it to `root/name`, point `latest` at it, then
    remove the older checkpoints. Returns the checkpoint's folder. (`dla.distributed.save`
    writes sharded checkpoints into `tmp` and publishes them here too.)"""
    final = root / name
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a stale folder of this name that `latest` never named
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    _fsync(root)
    for old in root.iterdir():
        if old.name not in (name, LATEST):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


def _read_latest(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def has_checkpoint(run_dir: Path) -> bool:
    return _read_latest(Path(run_dir) / "checkpoints") is not None


def find(path: str | Path) -> Path:
    """The checkpoint folder that `path` names: a run folder, its `checkpoints` folder, or a
    checkpoint folder itself. Raises `CheckpointError` when it is none of these."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    for root in (path / "checkpoints", path):
        name = _read_latest(root)
        if name is not None:
            path = root / name
            break
    missing = [f for f in (SHARDED_FILES if is_sharded(path) else REQUIRED) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a dla checkpoint (no {missing[0]}); pass a run folder "
                              f"(the --out of `dla train`) or one of its checkpoints")
    return path


def is_sharded(checkpoint: Path) -> bool:
    return (Path(checkpoint) / ".metadata").is_file()


def read_json(checkpoint: Path, name: str) -> dict:
    try:
        return json.loads((checkpoint / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint / name}: unreadable ({e})") from None


def model_config(checkpoint: Path, config: dict | None = None):
    """The `ModelConfig` a checkpoint was saved with, or one clear error; `config` is its
    config.json when the caller has read it already."""
    from dla.model.config import ModelConfig

    config = read_json(checkpoint, "config.json") if config is None else config
    try:
        return ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / 'config.json'}: not a dla run config ({e})") from None


def check_compatible(saved: dict, requested: dict, *, what: str) -> None:
    """Refuse a checkpoint whose config differs from the requested one, naming the field."""
    for field in sorted(set(saved) | set(requested)):
        if saved.get(field) != requested.get(field):
            raise CheckpointError(f"{what} was made with {field} = {saved.get(field)!r}, but this run asks for "
                                  f"{field} = {requested.get(field)!r}")


def load(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         *, device: torch.device | str = "cpu") -> dict:
    """Load weights (and optimizer state) into `model` (and `optimizer`); return state.json."""
    if is_sharded(checkpoint):
        from dla import distributed

        return distributed.load(checkpoint, model, optimizer)
    if optimizer is not None and not (checkpoint / "optimizer.pt").is_file():
        raise CheckpointError(f"{checkpoint} holds no optimizer state (an inference checkpoint, e.g. from "
                              f"dla quantize): it cannot be resumed")
    from dla import quantize

    if quantize.is_quantized(checkpoint):
        quantize.load_quantized(checkpoint, model, device=device)
        return read_json(checkpoint, "state.json")
    from safetensors.torch import load_file

    try:
        weights = load_file(checkpoint / "model.safetensors", device=str(device))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{checkpoint / 'model.safetensors'}: unreadable ({e})") from None
    expected = model.state_dict()
    for key in sorted(set(expected) | set(weights)):
        if key not in weights or key not in expected or weights[key].shape != expected[key].shape:
            raise CheckpointError(f"{checkpoint}: weight {key!r} does not fit this model")
    model.load_state_dict(weights)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    return read_json(checkpoint, "state.json")
