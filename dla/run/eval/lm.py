"""Language-model evaluation: held-out loss and bits per byte of a model, or of a checkpoint, on
its corpus's held-out split, beside a unigram byte model fitted on the training split (the
baseline a model must beat), and how each DLA layer segmented the held-out windows
(`dla.run.eval.segmentation`). `dla train` reports it at its end, `dla eval` for a checkpoint."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from dla.model import CausalLM
from dla.run import checkpoint
from dla.run.data import Split, has_split, heldout_batches, heldout_windows, load_split, prepare, unigram_log_probs
from dla.run.device import autocast, resolve_device
from dla.run.eval.segmentation import recording, summaries

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate_heldout(model: CausalLM, split: Split, *, batch_size: int, max_tokens: int,
                     device: torch.device, progress: bool = False) -> dict:
    """Held-out loss and bits per byte of `model`, and of a unigram byte model fitted on the
    training split, over the same held-out targets (at most `max_tokens`), and `segmentation`:
    one entry per DLA layer (`dla.run.eval.segmentation.layer_summary`) over the same windows.
    `progress`: a bar on a terminal."""
    was_training = model.training
    model.eval()
    unigram = torch.from_numpy(-unigram_log_probs(split.train))
    total = unigram_total = 0.0
    count = 0
    batches = heldout_batches(split.heldout, batch_size=batch_size, seq_len=model.cfg.seq_len, max_tokens=max_tokens)
    windows = heldout_windows(split.heldout, seq_len=model.cfg.seq_len, max_tokens=max_tokens)
    with recording(model) as layers:
        for x, y in tqdm(batches, total=-(-windows // batch_size), desc="held-out evaluation", unit="batch",
                         leave=False, disable=None if progress else True, file=sys.stderr):
            with autocast(device):
                loss = model.loss(x.to(device), y.to(device))
            total += float(loss) * y.numel()
            unigram_total += float(unigram[y].sum())
            count += y.numel()
    model.train(was_training)
    loss = total / count
    return {"heldout_loss": loss, "heldout_bpb": loss / LN2, "unigram_bpb": unigram_total / count / LN2,
            "heldout_tokens": count, "segmentation": summaries(layers)}


def _train_fields(ckpt: Path, config: dict) -> tuple[str | None, int, int]:
    """The data source, batch size and held-out budget the checkpoint's run was trained with."""
    try:
        train = config["train"]
        data, batch_size, eval_tokens = train["data"], train["batch_size"], train["eval_tokens"]
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{ckpt / 'config.json'}: not a dla run config (no train {e})") from None
    for name, value in (("batch_size", batch_size), ("eval_tokens", eval_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise checkpoint.CheckpointError(f"{ckpt / 'config.json'}: not a dla run config "
                                             f"(train {name} = {value!r})")
    return data, batch_size, eval_tokens


def evaluate_checkpoint(path: str | Path, *, device: str | None = None, progress: bool = False) -> dict:
    """Held-out metrics of the checkpoint that `path` names (see `checkpoint.find`), on the
    split its run folder keeps (`RUN/data`, whether or not the run's `--data` still exists), or
    else on its corpus split afresh. Raises `ValueError` when the held-out loss is not finite."""
    ckpt = checkpoint.find(path)
    config = checkpoint.read_json(ckpt, "config.json")
    mcfg = checkpoint.model_config(ckpt, config)
    data, batch_size, eval_tokens = _train_fields(ckpt, config)
    dev = resolve_device(device)
    model = CausalLM(mcfg).to(dev)
    state = checkpoint.restore(ckpt, model, device=dev)
    run_split = ckpt.parent.parent / "data"
    kw = dict(batch_size=batch_size, max_tokens=eval_tokens, device=dev, progress=progress)
    if has_split(run_split):
        result = evaluate_heldout(model, load_split(run_split, data), **kw)
    else:
        with tempfile.TemporaryDirectory() as cache:
            result = evaluate_heldout(model, prepare(data, Path(cache), seq_len=mcfg.seq_len), **kw)
    if not math.isfinite(result["heldout_loss"]):
        raise ValueError(f"--checkpoint {ckpt}: the held-out loss is {result['heldout_loss']} (not finite); the "
                         f"checkpoint is unusable")
    return {"checkpoint": str(ckpt), "step": int(state["step"]), "backbone": mcfg.backbone,
            "policy": mcfg.policy, "score": mcfg.score, "tau": mcfg.tau, **result}
