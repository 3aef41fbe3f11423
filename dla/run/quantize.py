"""Int8 weight-only quantization of a checkpoint (torchao), for inference.

Every `nn.Linear` of the blocks gets int8 weights with one float scale per output row
(`checkpoint.quantize_int8`); activations, the embedding (and so the tied head), norms,
convolutions and gates stay in floating point. The quantized checkpoint is an ordinary
checkpoint folder without optimizer state: `model.safetensors` holds the int8 data and scales
flattened by torchao's safetensors support (tensor types from its allow-list, attributes as JSON
in the file's metadata — no pickled code), and `config.json` names the quantization, so
`dla eval` and `dla generate` load it like any other (`checkpoint.restore`). The int8 run folder
shares the source run's corpus split (`RUN/data`), so it evaluates without the source.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dla.model import CausalLM
from dla.run import checkpoint
from dla.run.data import has_split
from dla.run.optim import require_torchao


def quantize_checkpoint(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the int8 weight-only version of the checkpoint that `source` names to the run
    folder `out` (`out/checkpoints/step-N`, atomically, as `dla train` writes). Refuses an `out`
    that already holds a checkpoint unless `overwrite`."""
    require_torchao("dla quantize")
    # torchao: an optional dependency, needed only to quantize
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

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
    state = checkpoint.restore(ckpt, model)
    checkpoint.quantize_int8(model.eval())
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config = {**config, "quantization": {"method": checkpoint.INT8, "source": str(ckpt.resolve())}}
    state = {**state, "quantized_from": str(ckpt.resolve())}
    if overwrite:  # asked for: the old checkpoints go before the new one is written
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    _share_split(ckpt.parent.parent / "data", out / "data")
    return checkpoint.save(out, step=int(state["step"]), model=model, optimizer=None, config=config, state=state,
                           weights=(tensors, metadata))


def _share_split(source: Path, target: Path) -> None:
    """Give the int8 run folder the corpus split of the source run (hard links where the file
    system allows, else copies), so that it evaluates on its own, as the source does."""
    if not has_split(source) or target.resolve() == source.resolve():
        return
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("train.bin", "heldout.bin", "meta.json"):  # meta.json last: it marks the split complete
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copy2(source / name, target / name)
