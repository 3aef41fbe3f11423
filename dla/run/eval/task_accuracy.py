"""A model, or a checkpoint, scored on a synthetic task: greedy predictions (argmax over the
whole vocabulary) at the query positions of `examples` held-out sequences.

Length generalisation: a model built for `seq_len` reads at most that many tokens, and the
`fenwick` policy's level count (the shape of `W_λ`) grows with it. `single`, `dla` and
attention weights do not depend on `seq_len` (attention's rotary table is a buffer computed at
build time), so a checkpoint of theirs is rebuilt for a longer task; a `fenwick` model must
be built for the longest length it will be tested at (`dla.run.experiment` does so).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from tqdm import tqdm

from dla.model import CausalLM, ModelConfig
from dla.run import checkpoint
from dla.run.device import autocast, resolve_device
from dla.run.eval.metrics import merge, query_accuracy
from dla.run.eval.tasks import Task, make_task


def model_for_length(cfg: ModelConfig, seq_len: int) -> ModelConfig:
    """`cfg` able to read `seq_len` tokens with the same weight shapes, or `ValueError`."""
    if seq_len <= cfg.seq_len:
        return cfg
    longer = dataclasses.replace(cfg, seq_len=seq_len)
    if longer.levels != cfg.levels:
        raise ValueError(f"--seq-len {seq_len} is longer than the checkpoint's seq_len = {cfg.seq_len}, and the "
                         f"{cfg.policy} policy's level count grows with it ({cfg.levels} → {longer.levels} levels); "
                         f"build the model with seq_len >= {seq_len} when training")
    return longer


def check_vocab(cfg: ModelConfig, task: Task) -> None:
    if task.vocab_needed > cfg.vocab_size:
        raise ValueError(f"{task.name} uses token ids up to {task.vocab_needed - 1}, beyond the model's "
                         f"vocab_size = {cfg.vocab_size}")


@torch.no_grad()
def evaluate_task(model: CausalLM, task: Task, *, examples: int, seed: int = 0, batch_size: int | None = None,
                  batch_tokens: int = 1 << 16, progress: bool = False) -> dict:
    """Accuracy of `model` on `examples` sequences of the task's evaluation stream of `seed`.
    Batches hold `batch_size` sequences (default: about `batch_tokens` tokens). `progress`: a
    bar on a terminal."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"--examples must be a positive integer, got {examples!r}")
    if task.seq_len > model.cfg.seq_len:
        raise ValueError(f"{task.name} seq_len = {task.seq_len} exceeds the model's seq_len = {model.cfg.seq_len}")
    check_vocab(model.cfg, task)
    device = next(model.parameters()).device
    bs = batch_size or max(1, batch_tokens // task.seq_len)
    was_training = model.training
    model.eval()
    counts = []
    starts = range(0, examples, bs)
    for step, start in enumerate(tqdm(starts, desc=f"{task.name} evaluation", unit="batch", leave=False,
                                      disable=None if progress else True, file=sys.stderr)):
        x, y = task.batch(min(bs, examples - start), seed=seed, step=step, split="eval", device=device)
        with autocast(device):
            logits = model(x)
        counts.append(query_accuracy(logits.argmax(-1), y))
    model.train(was_training)
    return {**merge(counts), "chance": task.chance, "examples": examples}


def evaluate_checkpoint_on_task(path, task_name: str, params: dict, *, examples: int, seed: int = 0,
                                batch_size: int | None = None, device: str | None = None,
                                progress: bool = False) -> dict:
    """Load the checkpoint that `path` names and score it on `task_name`. When the checkpoint
    was trained on that task (by `dla experiment`), its task parameters are the defaults that
    `params` override."""
    ckpt = checkpoint.find(path)
    config = checkpoint.read_json(ckpt, "config.json")
    cfg = checkpoint.model_config(ckpt, config)
    trained = config.get("task") or {}
    base = dict(trained.get("params", {})) if trained.get("name") == task_name else {}
    task = make_task(task_name, **{**base, **params})
    check_vocab(cfg, task)
    cfg = model_for_length(cfg, task.seq_len)
    dev = resolve_device(device)
    model = CausalLM(cfg).to(dev)
    state = checkpoint.restore(ckpt, model, device=dev)
    result = evaluate_task(model, task, examples=examples, seed=seed, batch_size=batch_size, progress=progress)
    return {"checkpoint": str(ckpt), "step": int(state["step"]), "backbone": cfg.backbone, "policy": cfg.policy,
            "task": task.name, "params": task.params(), **result}
