"""Checkpoints that a crash cannot corrupt and that load without executing pickled code: every
kind of checkpoint this package writes is read here.

Layout of a run folder:

    RUN/checkpoints/step-00000300/
        model.safetensors   weights
        config.json         {"model": ModelConfig fields, "train": TrainConfig fields}
        optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
        state.json          step, learning-rate schedule and data position
    RUN/checkpoints/latest  the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed to disk, renamed into place,
and only then named by `latest` (itself replaced atomically); older checkpoints are removed
after that. A crash at any point leaves `latest` naming a complete checkpoint.

Two other kinds share the layout and the protocol: sharded checkpoints, written under torchrun
(`dla.run.distributed`): DCP's `.metadata` and one `__R_0.distcp` per rank instead of the weights
and optimizer files; and int8 checkpoints (`dla.run.quantize`): no optimizer state, int8 weights
flattened into `model.safetensors` by torchao, the method named in `config.json`. `find`,
`restore` and `load` take every kind.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from dla.model import CausalLM, ModelConfig
from dla.run.device import resolve_device
from dla.run.optim import require_torchao

LATEST = "latest"
FILES = ("model.safetensors", "config.json", "optimizer.pt", "state.json")
REQUIRED = ("model.safetensors", "config.json", "state.json")  # an inference checkpoint has no optimizer.pt
# A sharded checkpoint (written under torchrun, see dla.run.distributed): DCP's index, its shards
# `__R_0.distcp`, and the same JSON files.
SHARDED_FILES = (".metadata", "config.json", "state.json")
INT8 = "int8_weight_only"  # the one quantization method (dla.run.quantize), as config.json names it


class CheckpointError(ValueError):
    """A path that holds no usable checkpoint, or one from an incompatible config."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save(run_dir: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         config: dict, state: dict, weights: tuple[dict, dict] | None = None) -> Path:
    """Write the checkpoint of `step` under `run_dir/checkpoints` and return its folder.
    Without an optimizer the checkpoint is for inference only (no optimizer.pt). `weights`:
    (tensors, safetensors metadata) to write instead of the model's state dict (`dla.run.quantize`)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    if read_latest(root) == name:  # already saved: the state at a step is a function of the step
        return final
    tmp = root / f".{name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, metadata = weights or ({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, {})
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", **metadata})
        os.chmod(tmp / "model.safetensors", 0o666 & ~_umask())  # safetensors creates it private
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "config.json", config)
        write_json(tmp / "state.json", {**state, "step": step})
        return publish(root, tmp, name)
    except BaseException:
        discard_unpublished(root, name)
        raise


def _umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def discard_unpublished(root: Path, name: str) -> None:
    """Remove what an interrupted or failed write of checkpoint `name` left under `root` (its
    hidden folder, the pointer's temporary file, the folder itself unless `latest` names it), so
    that a full disk is not left filled by it. A process killed outright leaves them to the next
    save, which removes everything `latest` does not name."""
    shutil.rmtree(root / f".{name}.tmp", ignore_errors=True)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)
    if read_latest(root) != name:
        shutil.rmtree(root / name, ignore_errors=True)


def publish(root: Path, tmp: Path, name: str) -> Path:
    """The last half of the protocol (module doc), for a complete checkpoint written into the
    hidden folder `tmp`: flush its files, rename it to `root/name`, point `latest` at it, then
    remove the older checkpoints. Returns the checkpoint's folder. (`dla.run.distributed.save`
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


def read_latest(root: Path) -> str | None:
    """The name of the newest complete checkpoint under `root` (a `checkpoints` folder), or None."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def has_checkpoint(run_dir: Path) -> bool:
    return read_latest(Path(run_dir) / "checkpoints") is not None


def find(path: str | Path) -> Path:
    """The checkpoint folder that `path` names: a run folder, its `checkpoints` folder, or a
    checkpoint folder itself. Raises `CheckpointError` when it is none of these."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    for root in (path / "checkpoints", path):
        name = read_latest(root)
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


def is_quantized(checkpoint: Path) -> bool:
    return "quantization" in read_json(checkpoint, "config.json")


def model_config(checkpoint: Path, config: dict | None = None) -> ModelConfig:
    """The `ModelConfig` a checkpoint was saved with, or one clear error; `config` is its
    config.json when the caller has read it already."""
    config = read_json(checkpoint, "config.json") if config is None else config
    try:
        return ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / 'config.json'}: not a dla run config ({e})") from None


def check_compatible(saved: dict, requested: dict, *, what: str, note: str = "") -> None:
    """Refuse a checkpoint whose config differs from the requested one, naming the field (and
    adding `note`, why that matters, when given)."""
    for field in sorted(set(saved) | set(requested)):
        if saved.get(field) != requested.get(field):
            raise CheckpointError(f"{what} was made with {field} = {saved.get(field)!r}, but this run asks for "
                                  f"{field} = {requested.get(field)!r}" + (f" ({note})" if note else ""))


def restore(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            *, device: torch.device | str = "cpu") -> dict:
    """Load the weights (and optimizer state) of a checkpoint of any kind into `model` (and
    `optimizer`); return its state.json. A sharded checkpoint loads into a sharded model (every
    rank calls this under torchrun) or a plain one (a plain process reads every shard)."""
    if is_sharded(checkpoint):
        return _restore_sharded(checkpoint, model, optimizer)
    if optimizer is not None and not (checkpoint / "optimizer.pt").is_file():
        raise CheckpointError(f"{checkpoint} holds no optimizer state (an inference checkpoint, e.g. from "
                              f"dla quantize): it cannot be resumed")
    if is_quantized(checkpoint):
        _restore_int8(checkpoint, model, device=device)
        return read_json(checkpoint, "state.json")
    try:
        weights = load_file(checkpoint / "model.safetensors", device=str(device))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{checkpoint / 'model.safetensors'}: unreadable ({e})") from None
    _check_weights(checkpoint, model.state_dict(), weights)
    model.load_state_dict(weights)
    if optimizer is not None:
        path = checkpoint / "optimizer.pt"
        try:
            optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        except pickle.UnpicklingError:
            raise CheckpointError(f"{path}: refused to load: it holds pickled objects other than tensors and plain "
                                  f"values (a checkpoint never needs them)") from None
        except (RuntimeError, EOFError, ValueError, KeyError) as e:  # a truncated or damaged file
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: unreadable ({detail})") from None
    return read_json(checkpoint, "state.json")


def load(path: str | Path, *, device: str | torch.device | None = None) -> CausalLM:
    """The model of the checkpoint that `path` names (a run folder or a checkpoint folder, of any
    kind), in eval mode on `device` (default: CUDA when available), ready to use."""
    model, _, _ = load_model(path, device=device)
    return model


def load_model(path: str | Path, *, device: str | torch.device | None = None) -> tuple[CausalLM, Path, dict]:
    """`load`, with the checkpoint folder and its state.json."""
    ckpt = find(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = CausalLM(model_config(ckpt)).to(dev)
    state = restore(ckpt, model, device=dev)
    return model.eval(), ckpt, state


def _check_weights(checkpoint: Path, expected: dict, weights: dict) -> None:
    for key in sorted(set(expected) | set(weights)):
        if key not in weights or key not in expected or weights[key].shape != expected[key].shape:
            raise CheckpointError(f"{checkpoint}: weight {key!r} does not fit this model")
    for key in sorted(weights):
        tensor = weights[key]
        if type(tensor) is torch.Tensor and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{checkpoint}: weight {key!r} holds non-finite values (NaN or inf); the "
                                  f"checkpoint is damaged")


# DCP's `.metadata` is a pickle. These are the globals that describe a checkpoint (and torch's
# dtypes); any other global, such as a function a crafted file would call, is refused.
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class _MetadataReader(dcp.FileSystemReader):
    """DCP's reader, with the metadata read by the allow-listed unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, with the non-tensor values (the optimizer's hyperparameters) accepted only
    when `torch.load(weights_only=True)` accepts them."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises pickle.UnpicklingError on anything but plain data
        value.seek(0)
        super().load_bytes(read_item, value)


def _restore_sharded(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    reader = _MetadataReader(checkpoint)
    try:
        reader.read_metadata()  # refused here, before DCP reads it (and logs its own tracebacks)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as e:
        raise CheckpointError(f"{checkpoint / '.metadata'}: refused to load: {e} (a checkpoint's metadata "
                              f"never needs other code)") from None
    safe = {"storage_reader": reader, "planner": _WeightsOnlyPlanner()}
    with warnings.catch_warnings():
        # a plain process is the intended single-process load, which DCP warns about
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            if optimizer is None:
                model_state = get_model_state_dict(model)
                dcp.load({"model": model_state}, checkpoint_id=checkpoint, **safe)
                set_model_state_dict(model, model_state)
            else:
                model_state, optim_state = get_state_dict(model, optimizer)
                dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint, **safe)
                set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        except (dcp.CheckpointException, RuntimeError, ValueError, KeyError) as e:
            if isinstance(e, dcp.CheckpointException) and e.failures:  # the first rank's own exception
                e = next(iter(e.failures.values()))[0]
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{checkpoint}: the sharded checkpoint does not fit this model "
                                  f"({detail})") from None
    return read_json(checkpoint, "state.json")


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Give every `nn.Linear` int8 weights with one float scale per output row (torchao's
    `Int8WeightOnlyConfig`: symmetric, per-row absmax), in place; return the model."""
    require_torchao("an int8 checkpoint")
    # torchao: an optional dependency, needed only by int8 checkpoints
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # set_inductor_config=False: leave the process-wide Inductor settings alone
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))
    return model


def _restore_int8(checkpoint: Path, model: torch.nn.Module, *, device) -> None:
    """Load an int8 checkpoint into a freshly built float `model` (quantized here first, so its
    layers take the int8 tensors)."""
    require_torchao(f"{checkpoint} (an int8 checkpoint)")
    # torchao: an optional dependency, needed only by int8 checkpoints
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    method = read_json(checkpoint, "config.json")["quantization"].get("method")
    if method != INT8:
        raise CheckpointError(f"{checkpoint}: unknown quantization {method!r} (this version reads {INT8!r})")
    path = checkpoint / "model.safetensors"
    try:
        tensors = load_file(path, device=str(device))
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        weights, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except Exception as e:  # safetensors and torchao raise their own error types
        raise CheckpointError(f"{path}: unreadable as an int8 checkpoint ({e})") from None
    quantize_int8(model)
    _check_weights(checkpoint, model.state_dict(), weights)
    if leftover:
        raise CheckpointError(f"{checkpoint}: weight {sorted(leftover)[0]!r} does not fit this model")
    model.load_state_dict(weights, assign=True)
    model.to(device)
