"""Training of the causal LM on a byte-level corpus, and the training step that `dla experiment`
shares.

One training step (`train_step`): the learning rate of the step (linear warmup, cosine decay),
forward and loss under the device's autocast (compiled as one `torch.compile(fullgraph=True)`
frame unless told otherwise; backward by AOT autograd), backward, gradient clipping, the
optimizer step. `train` feeds it the batch of `(seed, step)` and checks the loss and gradient
norm for finiteness. Everything a step depends on is a function of the step number and the
checkpoint, so a resumed run repeats an uninterrupted one. Metrics go to `RUN/metrics.jsonl`, the
loss curve to `RUN/loss.png`, the held-out evaluation at the end (`dla.run.eval.lm`). Under
torchrun each process trains its rows of the global batch on an FSDP2-sharded model and writes
sharded checkpoints; rank 0 alone logs and writes the record (`dla.run.distributed`).

`dla train --preset NAME` builds the model of `dla.model.PRESETS[NAME]` and trains it by
`RECIPES[NAME]` (steps, batch, peak learning rate, warmup).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dla.model import PRESETS, CausalLM, ModelConfig
from dla.run import checkpoint, distributed, optim
from dla.run.data import DataError, batch_at, prepare, source_files
from dla.run.device import autocast, resolve_device
from dla.run.eval.lm import LN2, evaluate_heldout


@dataclass(frozen=True)
class TrainConfig:
    """What determines a run's trajectory (a resumed run must repeat it exactly)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data: str | None = None  # a text file or folder (absolute), or None for the default corpus
    eval_tokens: int = 32768  # held-out targets scored at the end
    optim: str = "adamw"  # adamw | adamw8bit (torchao, dla.run.optim)
    float8: str | None = None  # None, or the float8 training recipe: tensorwise | rowwise (dla.run.optim)

    def __post_init__(self) -> None:
        if self.optim not in optim.OPTIMIZERS:
            raise ValueError(f"--optim must be one of {list(optim.OPTIMIZERS)}, got {self.optim!r}")
        if self.float8 is not None and self.float8 not in optim.FLOAT8_RECIPES:
            raise ValueError(f"--float8-recipe must be one of {list(optim.FLOAT8_RECIPES)}, got {self.float8!r}")
        for name in ("steps", "batch_size", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")


# How each model preset of `dla.model.PRESETS` is trained: `TrainConfig` fields by preset name.
RECIPES: dict[str, dict] = {
    "tiny": dict(steps=200, batch_size=16, lr=5e-3, warmup=20),
    "small": dict(steps=5000, batch_size=32, lr=1.5e-3, warmup=250),
    "base": dict(steps=20000, batch_size=32, lr=6e-4, warmup=1000),
    "paper": dict(steps=50000, batch_size=64, lr=3e-4, warmup=2000),
}


def recipe(preset: str, **fields) -> TrainConfig:
    """The `TrainConfig` of the model preset `preset`, with `fields` (those not None) replacing its
    recipe's."""
    if preset not in RECIPES or preset not in PRESETS:
        raise ValueError(f"--preset must be one of {[p for p in PRESETS if p in RECIPES]}, got {preset!r}")
    return TrainConfig(**{**RECIPES[preset], **{k: v for k, v in fields.items() if v is not None}})


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, what: str):
        super().__init__(f"{what} is not finite at step {step}")
        self.step = step


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then cosine to `min_lr_ratio·lr`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (`cfg.optim`: torch's, or torchao's 8-bit); weight decay on matrices only (not on
    norms, biases, gates' scalars or `L_h`)."""
    return optim.make_optimizer(model, name=cfg.optim, lr=cfg.lr, weight_decay=cfg.weight_decay)


def compiled_loss(model: CausalLM):
    """Forward and loss as one `fullgraph=True` frame; AOT autograd derives the backward."""
    return torch.compile(model.loss, fullgraph=True)


def train_step(model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
               x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimizer step `step` (0-based) on the batch `x, y`: the schedule's learning rate, forward
    and loss by `loss_fn` (`model.loss` or `compiled_loss(model)`) under autocast, backward,
    clipping to `cfg.grad_clip`, the update. Returns the loss and the gradient norm before
    clipping, detached and not read back, so that the caller chooses when to synchronise."""
    optim.set_lr(optimizer, lr_at(cfg, step))
    with autocast(x.device):
        loss = loss_fn(x, y)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


class Progress:
    """A one-line progress bar on a terminal; on a pipe, a line every `every` steps."""

    def __init__(self, total: int, *, stream=None, every: int = 0):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every or max(1, total // 20)
        self.last_draw = 0.0

    def update(self, step: int, loss: float, tokens_per_s: float, elapsed: float) -> None:
        done = step == self.total
        now = time.monotonic()
        if self.tty and not done and now - self.last_draw < 0.1:
            return
        if not self.tty and not done and step % self.every:
            return
        self.last_draw = now
        width = 24
        filled = int(width * step / self.total)
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
                f"loss {loss:.3f}  {_rate(tokens_per_s)} tok/s  {elapsed:.0f}s")
        self.stream.write(("\r" + line + ("\n" if done else "")) if self.tty else line + "\n")
        self.stream.flush()


def _rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics: list[dict], path: Path) -> Path:
    """Training loss (bits per byte) by step, held-out and unigram levels, to a PNG."""
    # matplotlib: heavy to import, and needed only once a run has finished
    from matplotlib.figure import Figure

    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "heldout_bpb" in m]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    steps = np.array([m["step"] for m in train])
    bpb = np.array([m["loss"] for m in train]) / LN2
    ax.plot(steps, bpb, color="tab:blue", alpha=0.35, lw=1, label="train (per step)")
    if len(bpb) >= 10:
        w = max(2, len(bpb) // 25)
        smooth = np.convolve(bpb, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color="tab:blue", lw=2, label=f"train ({w}-step mean)")
    if evals:
        ax.plot([m["step"] for m in evals], [m["heldout_bpb"] for m in evals], "o", color="tab:red",
                label="held-out")
        ax.axhline(evals[-1]["unigram_bpb"], color="gray", ls="--", lw=1, label="unigram byte model")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


@dataclass
class Run:
    """A training run, validated and ready: nothing has been written yet."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    out: Path
    device: torch.device
    compile: bool = True
    checkpoint_every: int = 100
    resume_from: Path | None = None
    world: distributed.World | None = None  # set under torchrun (dla.run.distributed)

    def config(self) -> dict:
        return {"model": self.model_cfg.to_dict(), "train": dataclasses.asdict(self.train_cfg)}


def plan(model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *, resume: bool = False,
         compile: bool = True, device: str | None = None, checkpoint_every: int = 100,
         world: distributed.World | None = None) -> Run:
    """Check everything a run needs before it writes anything; raise `ValueError` (or its
    subclasses `DataError`, `CheckpointError`) with a one-line message otherwise. `world`
    (from `distributed.from_env`) makes it one process of a torchrun run, on `world.device`."""
    out = Path(out)
    dev = resolve_device(device) if world is None else world.device
    if world is not None:
        distributed.check_batch(world, train_cfg.batch_size)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be a positive integer, got {checkpoint_every!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if train_cfg.float8 is not None:
        reason = optim.float8_unavailable(dev)
        if reason is not None:
            raise ValueError(reason)
    source_files(train_cfg.data)
    run = Run(model_cfg, train_cfg, out, dev, compile, checkpoint_every, world=world)
    if resume:
        if not checkpoint.has_checkpoint(out):
            raise checkpoint.CheckpointError(f"--resume: {out} holds no checkpoint to resume")
        ckpt = checkpoint.find(out)
        if world is not None and not checkpoint.is_sharded(ckpt):
            raise checkpoint.CheckpointError(f"--resume: {ckpt} was written by a single-process run; resume it "
                                             f"without torchrun (checkpoints written under torchrun resume on "
                                             f"any number of processes)")
        saved = checkpoint.read_json(ckpt, "config.json")
        requested = run.config()
        checkpoint.check_compatible(saved.get("model", {}), requested["model"], what=f"the checkpoint in {out}")
        # fields added since a checkpoint was written (optim, float8) held their defaults then
        saved_train = {**dataclasses.asdict(TrainConfig()), **saved.get("train", {})}
        checkpoint.check_compatible(saved_train, requested["train"], what=f"the checkpoint in {out}")
        run.resume_from = ckpt
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: folder is not empty; pass --resume to continue the run in it, "
                         f"or choose a new folder")
    return run


def train(run: Run, *, log=None) -> dict:
    """Train, checkpoint, evaluate; return the final metrics. Raises `NonFiniteLoss` when the
    loss or the gradient norm stops being finite (the last good checkpoint stays)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    mcfg, tcfg, out, device = run.model_cfg, run.train_cfg, run.out, run.device
    world = run.world  # under torchrun: the process group is up (distributed.process_group)
    main = world is None or world.is_main  # the process that logs and writes metrics and plots
    if not main:
        log = lambda msg: None  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    with distributed.main_first(world):  # rank 0 writes the token cache, the others map it
        split = prepare(tcfg.data, out / "data", seq_len=mcfg.seq_len)
    torch.manual_seed(tcfg.seed)
    model = CausalLM(mcfg).to(device)
    if tcfg.float8 is not None:  # before compiling (and sharding): Float8Linear replaces nn.Linear
        optim.convert_to_float8(model, tcfg.float8)
    if world is not None:  # the same initial weights on every rank (same seed), then sharded
        model = distributed.shard(model, world, compile=run.compile)
    optimizer = make_optimizer(model, tcfg)
    metrics_path = out / "metrics.jsonl"
    start = 0
    if run.resume_from is not None:
        state = checkpoint.restore(run.resume_from, model, optimizer, device=device)
        if state.get("data", {}).get("train_tokens") != len(split.train):
            raise DataError(f"--resume: the training split has changed since the checkpoint "
                            f"({state.get('data', {}).get('train_tokens')} tokens then, {len(split.train)} now)")
        start = int(state["step"])
        if main:
            kept = [m for m in _read_metrics(metrics_path) if m["step"] <= start and "loss" in m]
            metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        log(f"resuming {out} at step {start}")
    elif main:
        metrics_path.write_text("")
    log(f"model: {mcfg.backbone}/{mcfg.policy}, {model.num_params() / 1e6:.2f}M parameters, "
        f"{mcfg.levels} levels; data: {split.source} ({len(split.train):,} training bytes); device {device}")

    # under torchrun the blocks were compiled one by one before sharding
    loss_fn = compiled_loss(model) if run.compile and world is None else model.loss
    if run.compile and start < tcfg.steps:
        log("compiling the training step (the first step includes it)")
    progress = Progress(tcfg.steps)
    tokens_per_step = tcfg.batch_size * mcfg.seq_len
    t0 = time.monotonic()
    window_t, window_steps = t0, 0

    def save(step: int) -> Path:
        state = {"schedule": {"lr": tcfg.lr, "warmup": tcfg.warmup, "steps": tcfg.steps,
                              "next_lr": lr_at(tcfg, min(step, tcfg.steps - 1))},
                 "data": {"source": split.source, "seed": tcfg.seed, "next_step": step,
                          "train_tokens": len(split.train)}}
        write = checkpoint.save if world is None else distributed.save
        return write(out, step=step, model=model, optimizer=optimizer, config=run.config(), state=state)

    model.train()
    with open(metrics_path if main else os.devnull, "a") as metrics:
        for step in range(start, tcfg.steps):
            x, y = batch_at(split.train, step, batch_size=tcfg.batch_size, seq_len=mcfg.seq_len, seed=tcfg.seed,
                            device=device)
            if world is not None:
                x, y = x[world.rows(tcfg.batch_size)], y[world.rows(tcfg.batch_size)]
            loss, grad_norm = train_step(model, loss_fn, optimizer, tcfg, step, x, y)
            loss_value = float(loss if world is None else distributed.mean(loss))
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(step + 1, "the loss")
            grad_norm = float(distributed.full(grad_norm))
            if not math.isfinite(grad_norm):
                raise NonFiniteLoss(step + 1, "the gradient norm")
            now = time.monotonic()
            window_steps += 1
            tokens_per_s = window_steps * tokens_per_step / max(now - window_t, 1e-9)
            if now - window_t > 5.0:
                window_t, window_steps = now, 0
            record = {"step": step + 1, "loss": loss_value, "lr": lr_at(tcfg, step), "grad_norm": grad_norm,
                      "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(now - t0, 3)}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if main:
                progress.update(step + 1, loss_value, tokens_per_s, now - t0)
            if (step + 1) % run.checkpoint_every == 0 or step + 1 == tcfg.steps:
                save(step + 1)
    ckpt = checkpoint.find(out)
    # every rank evaluates the same held-out windows (the sharded forward is collective), a
    # rank's share of the global batch at a time
    eval_batch = tcfg.batch_size if world is None else tcfg.batch_size // world.size
    result = evaluate_heldout(model, split, batch_size=eval_batch, max_tokens=tcfg.eval_tokens, device=device)
    result.update(step=tcfg.steps, checkpoint=str(ckpt), train_s=round(time.monotonic() - t0, 1))
    if not main:
        return {**result, "plot": None}
    with open(metrics_path, "a") as metrics:
        metrics.write(json.dumps({"step": tcfg.steps, **{k: result[k] for k in
                                  ("heldout_loss", "heldout_bpb", "unigram_bpb", "heldout_tokens")}}) + "\n")
    result["plot"] = str(plot_loss(_read_metrics(metrics_path), out / "loss.png"))
    return result

