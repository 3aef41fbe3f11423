"""Int8 weight-only quantization of a checkpoint (torchao), for inference.

Every `nn.Linear` of the blocks gets int8 weights with one float scale per output row
(`Int8WeightOnlyConfig`, symmetric, per-row absmax); activations, the embedding (and so the
tied head), norms, convolutions and gates stay in floating point. The quantized checkpoint is an
ordinary checkpoint folder without optimizer state: `model.safetensors` holds the int8 data and
scales flattened by torchao's safetensors support (tensor types from its allow-list, attributes
as JSON in the file's metadata — no pickled code), and `config.json` names the quantization, so
`dla eval` and `dla generate` load it like any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from dla import checkpoint

METHOD = "int8_weight_only"


def _config():
    from torchao.quantization import Int8WeightOnlyConfig

    # set_inductor_config=False: leave the process-wide Inductor settings alone
    return Int8WeightOnlyConfig(set_inductor_config=False)


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace the linear layers' weights by int8 weights in place; return the model."""
    from torchao.quantization import quantize_

    quantize_(model, _config())
    return model


def is_quantized(ckpt: Path) -> bool:
    return "quantization" in checkpoint.read_json(ckpt, "config.json")


def load_quantized(ckpt: Path, model: nn.Module, *, device) -> None:
    """Load an int8 checkpoint into a freshly built float `model` (quantized here first, so its
    layers take the int8 tensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    method = checkpoint.read_json(ckpt, "config.json")["quantization"].get("method")
    if method != METHOD:
        raise checkpoint.CheckpointError(f"{ckpt}: unknown quantization {method!r} (this version reads {METHOD!r})")
    path = ckpt / "model.safetensors"
    try:
        tensors = load_file(path, device=str(device))
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        weights, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except Exception as e:  # safetensors and torchao raise their own error types
        raise checkpoint.CheckpointError(f"{path}: unreadable as an int8 checkpoint ({e})") from None
    quantize_model(model)
    expected = model.state_dict()
    for key in sorted(set(expected) | set(weights) | set(leftover)):
        if key not in weights or key not in expected or weights[key].shape != expected[key].shape:
            raise checkpoint.CheckpointError(f"{ckpt}: weight {key!r} does not fit this model")
    model.load_state_dict(weights, assign=True)
    model.to(device)


def quantize_checkpoint(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the int8 weight-only version of the checkpoint that `source` names to the run
    folder `out` (`out/checkpoints/step-N`, atomically, as `dla train` writes). Refuses an `out`
    that already holds a checkpoint unless `overwrite`."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from dla.model import CausalLM

    ckpt = checkpoint.find(source)
    config = checkpoint.read_json(ckpt, "config.json")
    if "quantization" in config:
        raise checkpoint.CheckpointError(f"--checkpoint {ckpt}: already quantized ({config['quantization']['method']})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if checkpoint.has_checkpoint(out) and not overwrite:
        raise ValueError(f"--out {out}: already holds a checkpoint; pass --overwrite to replace it")
    if out.resolve() == ckpt.parent.parent.resolve():
        raise ValueError(f"--out {out}: is the source run folder; choose another folder")
    model = CausalLM(checkpoint.model_config(ckpt, config))
    state = checkpoint.load(ckpt, model)
    quantize_model(model.eval())
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config = {**config, "quantization": {"method": METHOD, "source": str(ckpt.resolve())}}
    state = {**state, "quantized_from": str(ckpt.resolve())}
    if overwrite:  # asked for: the old checkpoints go before the new one is written
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return checkpoint.save(out, step=int(state["step"]), model=model, optimizer=None, config=config, state=state,
                           weights=(tensors, metadata))

