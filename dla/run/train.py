"""Training of the causal LM on a byte-level corpus, and the training step that `dla experiment`
shares.

One training step (`train_step`): the learning rate of the step (linear warmup, cosine decay),
forward and loss under the device's autocast (compiled as one `torch.compile(fullgraph=True)`
frame unless told otherwise; backward by AOT autograd), backward, gradient clipping, the
optimizer step. `train` feeds it the batch of `(seed, step)` and checks the loss and gradient
norm for finiteness. Everything a step depends on is a function of the step number and the
checkpoint, so a resumed run repeats an uninterrupted one. With `pack` (`dla train --pack`) the
batch's windows are cut at document starts (`dla.run.data.packed_batch`) and the model runs each
piece as its own sequence (`CausalLM.forward`'s `cu_seqlens`), so no token reads another
document's, and no target predicts a document's first token from the one before. Metrics go to
`RUN/metrics.jsonl`, the loss curve to `RUN/loss.png`, the held-out evaluation at the end
(`dla.run.eval.lm`: bits per byte, and each DLA layer's segmentation statistics,
`dla.run.eval.segmentation`); the run
keeps its corpus split in `RUN/data`, so its checkpoints evaluate and resume without `--data`.
One process writes a run folder at a time (a lock on `RUN/.lock`); an error found while training
removes what the run wrote unless a checkpoint was kept, and Ctrl-C stops at once with the last
checkpoint named. Under
torchrun each process trains its rows of the global batch on an FSDP2-sharded model and writes
sharded checkpoints; rank 0 alone logs and writes the record (`dla.run.distributed`).

`dla train --preset NAME` builds the model of `dla.model.PRESETS[NAME]` and trains it by
`RECIPES[NAME]` (steps, batch, peak learning rate, warmup).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dla.model import PRESETS, CausalLM, ModelConfig, preset
from dla.run import checkpoint, distributed, optim
from dla.run.data import (DataError, batch_at, check_source, has_split, load_split, packed_batch, pieces_per_row,
                          prepare, window_starts)
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
    pack: bool = False  # keep documents apart: each window cut at document starts (dla.run.data.packed_batch)

    def __post_init__(self) -> None:
        if self.optim not in optim.OPTIMIZERS:
            raise ValueError(f"--optim must be one of {list(optim.OPTIMIZERS)}, got {self.optim!r}")
        if self.float8 is not None and self.float8 not in optim.FLOAT8_RECIPES:
            raise ValueError(f"--float8-recipe must be one of {list(optim.FLOAT8_RECIPES)}, got {self.float8!r}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack must be True or False, got {self.pack!r}")
        for name in ("steps", "batch_size", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("warmup", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


# How each model preset of `dla.model.PRESETS` is trained: `TrainConfig` fields by preset name.
RECIPES: dict[str, dict] = {
    "tiny": dict(steps=200, batch_size=16, lr=5e-3, warmup=20),
    "small": dict(steps=5000, batch_size=32, lr=1.5e-3, warmup=250),
    "base": dict(steps=20000, batch_size=32, lr=6e-4, warmup=1000),
    "paper": dict(steps=50000, batch_size=64, lr=3e-4, warmup=2000),
}


def recipe(name: str, **fields) -> TrainConfig:
    """The `TrainConfig` of the model preset `name`, with `fields` (those not None) replacing its
    recipe's."""
    if name not in RECIPES or name not in PRESETS:
        raise ValueError(f"--preset must be one of {[p for p in PRESETS if p in RECIPES]}, got {name!r}")
    return TrainConfig(**{**RECIPES[name], **{k: v for k, v in fields.items() if v is not None}})


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, what: str):
        super().__init__(f"{what} is not finite at step {step}")
        self.step = step


class RunError(ValueError):
    """A run that stopped on something found while training (a write that failed); one line."""


class Interrupted(KeyboardInterrupt):
    """Training interrupted (Ctrl-C): how many steps had finished and the checkpoint that is kept."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


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
               x: torch.Tensor, y: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
               max_seqlen: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimizer step `step` (0-based) on the batch `x, y` (packed when `cu_seqlens` is given,
    see `CausalLM.forward`): the schedule's learning rate, forward and loss by `loss_fn`
    (`model.loss` or `compiled_loss(model)`) under autocast, backward, clipping to
    `cfg.grad_clip`, the update. Returns the loss and the gradient norm before clipping,
    detached and not read back, so that the caller chooses when to synchronise."""
    optim.set_lr(optimizer, lr_at(cfg, step))
    with autocast(x.device):
        loss = loss_fn(x, y) if cu_seqlens is None else loss_fn(x, y, cu_seqlens, max_seqlen)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


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


# What a run writes into its folder. A folder that holds only these and no checkpoint is what a
# run killed before its first checkpoint left: a new run, or --resume, starts over in it.
LOCK = ".lock"
LOCK_WAIT_POLLS = 500  # 10 ms apart: how long a refused run waits for the holder's pid
RUN_FILES = ("checkpoints", "data", "metrics.jsonl", "loss.png", LOCK)
# Fields of TrainConfig that a resumed run may change: they do not enter the steps already taken.
RESUMABLE = ("steps", "eval_tokens")


def is_leftover(out: Path) -> bool:
    """`out` holds what a run wrote before its first checkpoint, and nothing else."""
    return (out.is_dir() and not checkpoint.has_checkpoint(out) and any(out.iterdir())
            and all(p.name in RUN_FILES for p in out.iterdir()))


def resumed_config(out: str | Path, *, preset_name: str | None = None, model: dict | None = None,
                   train: dict | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The configuration that the latest checkpoint in `out` was saved with, with the fields
    given in `model` and `train` (the flags given on the command line) in place of the saved
    ones; `preset_name` builds the model from that preset instead. `plan(..., resume=True)` then
    refuses, by name, every field that differs from the checkpoint's, except `RESUMABLE` ones."""
    ckpt = checkpoint.find(out)
    saved = checkpoint.read_json(ckpt, "config.json")
    try:
        model_fields = {**saved["model"], **(model or {})}
        mcfg = preset(preset_name, **(model or {})) if preset_name else ModelConfig.from_dict(model_fields)
        # fields added since a checkpoint was written (optim, float8) held their defaults then
        tcfg = TrainConfig(**{**dataclasses.asdict(TrainConfig()), **saved["train"], **(train or {})})
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{ckpt / 'config.json'}: not a dla run config ({e})") from None
    return mcfg, tcfg


def _writable_ancestor(out: Path) -> Path:
    folder = out
    while not folder.exists():
        folder = folder.parent
    return folder


def plan(model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *, resume: bool = False,
         compile: bool = True, device: str | None = None, checkpoint_every: int = 100,
         world: distributed.World | None = None) -> Run:
    """Check everything a run needs before it writes anything; raise `ValueError` (or its
    subclasses `DataError`, `CheckpointError`) with a one-line message otherwise. `world`
    (from `distributed.from_env`) makes it one process of a torchrun run, on `world.device`.
    With `resume`, the run continues from the latest checkpoint in `out` (or starts over in a
    folder that a run left before its first checkpoint); its configuration must be the
    checkpoint's but for `RESUMABLE` fields, and `steps` may only grow."""
    out = Path(out)
    dev = resolve_device(device) if world is None else world.device
    if world is not None:
        distributed.check_batch(world, train_cfg.batch_size)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be a positive integer, got {checkpoint_every!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    writable = _writable_ancestor(out)
    if not (writable.is_dir() and os.access(writable, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {out}: cannot write there ({writable} is not a writable folder)")
    if train_cfg.optim == "adamw8bit":
        optim.require_torchao("--optim adamw8bit")
    if train_cfg.float8 is not None:
        optim.require_torchao("--float8")
        reason = optim.float8_unavailable(dev)
        if reason is not None:
            raise ValueError(reason)
    run = Run(model_cfg, train_cfg, out, dev, compile, checkpoint_every, world=world)
    if resume and checkpoint.has_checkpoint(out):
        run.resume_from = _check_resume(run)
    elif resume and not is_leftover(out):
        raise checkpoint.CheckpointError(f"--resume: {out} holds no checkpoint to resume")
    elif not resume and out.exists() and any(out.iterdir()) and not is_leftover(out):
        raise ValueError(f"--out {out}: folder is not empty; pass --resume to continue the run in it, "
                         f"or choose a new folder")
    if not (run.resume_from is not None and has_split(out / "data")):  # a resumed run reads its own split
        check_source(train_cfg.data, seq_len=model_cfg.seq_len)
    return run


def _check_resume(run: Run) -> Path:
    out, world = run.out, run.world
    ckpt = checkpoint.find(out)
    if world is not None and not checkpoint.is_sharded(ckpt):
        raise checkpoint.CheckpointError(f"--resume: {ckpt} was written by a single-process run; resume it "
                                         f"without torchrun (checkpoints written under torchrun resume on "
                                         f"any number of processes)")
    if not checkpoint.is_sharded(ckpt) and not (ckpt / "optimizer.pt").is_file():
        raise checkpoint.CheckpointError(f"--resume: {ckpt} holds no optimizer state (an inference checkpoint, "
                                         f"e.g. from dla quantize): it cannot be resumed")
    saved = checkpoint.read_json(ckpt, "config.json")
    requested = run.config()
    what = f"the checkpoint in {out}"
    note = f"a resumed run keeps its configuration; only {', '.join('--' + f.replace('_', '-') for f in RESUMABLE)} may change"
    # read through ModelConfig, so that a field the checkpoint predates takes the value it had then
    saved_model = checkpoint.model_config(ckpt, saved).to_dict()
    checkpoint.check_compatible(saved_model, requested["model"], what=what, note=note)
    saved_train = {**dataclasses.asdict(TrainConfig()), **saved.get("train", {})}
    fixed = {k: v for k, v in requested["train"].items() if k not in RESUMABLE}
    checkpoint.check_compatible({k: v for k, v in saved_train.items() if k not in RESUMABLE}, fixed, what=what,
                                note=note)
    step = int(checkpoint.read_json(ckpt, "state.json").get("step", 0))
    if run.train_cfg.steps < step:
        raise ValueError(f"--steps {run.train_cfg.steps} is below the step of {what}, {step}: a resumed run "
                         f"goes on from there (pass --steps {step} or more)")
    return ckpt


@contextmanager
def _run_lock(out: Path):
    """Hold `out/.lock` while the block runs, or raise `RunError` naming the process that holds
    it. The holder writes its pid just after taking the lock and empties the file before letting
    go, so a refused process waits briefly for the pid to appear (on a busy machine it may look
    between the two) instead of naming nobody, or a holder that has finished."""
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = ""
            for _ in range(LOCK_WAIT_POLLS):
                f.seek(0)
                holder = f.read().strip()
                if holder:
                    break
                time.sleep(0.01)
            raise RunError(f"--out {out}: another dla train is writing to it ({holder or 'another process'}); "
                           f"wait for it to finish or choose another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def _discard(out: Path, created: bool, before: set[str]) -> None:
    """After a run failed: remove the unpublished checkpoint writes, and, unless a checkpoint is
    kept, everything the run added to `out` (the folder itself when the run made it)."""
    root = out / "checkpoints"
    if root.is_dir():
        for debris in root.glob(".*.tmp"):
            shutil.rmtree(debris, ignore_errors=True) if debris.is_dir() else debris.unlink(missing_ok=True)
    if checkpoint.has_checkpoint(out):
        return
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in RUN_FILES:
        if name not in before and name != LOCK:
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _kept(out: Path) -> str:
    if checkpoint.has_checkpoint(out):
        return f"the last checkpoint, {checkpoint.find(out)}, is kept (continue with --resume)"
    return "no checkpoint had been written"


def train(run: Run, *, log=None) -> dict:
    """Train, checkpoint, evaluate; return the final metrics. Raises `NonFiniteLoss` when the
    loss or the gradient norm stops being finite (the last good checkpoint stays), `Interrupted`
    on Ctrl-C, `RunError` when a write fails (a full disk) or another process holds the folder,
    and `DataError`/`CheckpointError` for a split or checkpoint that turns out unusable. On each
    of these the run removes its partial writes, and all it wrote when no checkpoint is kept."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out, world = run.out, run.world
    main = world is None or world.is_main  # the process that writes the folder, logs, and writes metrics
    created = False
    if main:
        try:
            out.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise RunError(f"--out {out}: cannot create it ({e.strerror})") from None
    with _run_lock(out) if main else nullcontext():
        before = {p.name for p in out.iterdir()} - {LOCK} if main else set()
        resumed_at = 0 if run.resume_from is None else int(checkpoint.read_json(run.resume_from, "state.json")["step"])
        done = [resumed_at]  # steps finished, for the report of an interruption
        try:
            return _train(run, log if main else (lambda msg: None), main, done)
        except KeyboardInterrupt:
            if main:
                _discard(out, created, before)
            raise Interrupted(done[0], checkpoint.find(out) if checkpoint.has_checkpoint(out) else None) from None
        except OSError as e:
            if main:
                _discard(out, created, before)
            where = f" ({e.filename})" if e.filename else ""
            raise RunError(f"--out {out}: {e.strerror or e}{where} after step {done[0]}; {_kept(out)}") from None
        except BaseException:
            if main:
                _discard(out, created, before)
            raise


def _train(run: Run, log, main: bool, done: list[int]) -> dict:
    mcfg, tcfg, out, device = run.model_cfg, run.train_cfg, run.out, run.device
    world = run.world  # under torchrun: the process group is up (distributed.process_group)
    with distributed.main_first(world):  # rank 0 writes the token cache, the others map it
        if run.resume_from is not None and has_split(out / "data"):
            split = load_split(out / "data", tcfg.data)  # the run's own split, with or without its source
        else:
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
    per_row = sequences = None
    if tcfg.pack:
        # one static number of sequences for the whole run, so the step keeps one shape (one
        # compiled graph): room for every window of this process cut into as many pieces as any
        # window of the data can be, the rest left empty
        per_row = pieces_per_row(split.documents, mcfg.seq_len)
        sequences = (tcfg.batch_size if world is None else tcfg.batch_size // world.size) * per_row
        log(f"packing {len(split.documents)} documents apart: {sequences} sequences of at most {mcfg.seq_len} "
            f"tokens per step (up to {per_row} pieces per window: {per_row}x the blocks' work of unpacked windows)")

    # under torchrun the blocks were compiled one by one before sharding
    loss_fn = compiled_loss(model) if run.compile and world is None else model.loss
    if run.compile and start < tcfg.steps:
        log("compiling the training step (the first step includes it)")
    tokens_per_step = tcfg.batch_size * mcfg.seq_len
    t0 = time.monotonic()
    window_t, window_steps = t0, 0
    # a bar on a terminal; on a pipe (a log file) a line every twentieth of the run instead
    bar = tqdm(total=tcfg.steps, initial=start, unit="step", disable=True if not main else None, leave=True,
               dynamic_ncols=True, file=sys.stderr)
    every = max(1, tcfg.steps // 20)

    def save(step: int) -> Path:
        state = {"schedule": {"lr": tcfg.lr, "warmup": tcfg.warmup, "steps": tcfg.steps,
                              "next_lr": lr_at(tcfg, min(step, tcfg.steps - 1))},
                 "data": {"source": split.source, "seed": tcfg.seed, "next_step": step,
                          "train_tokens": len(split.train), "pack": tcfg.pack,
                          **({"documents": len(split.documents), "pieces_per_window": per_row} if tcfg.pack else {})}}
        write = checkpoint.save if world is None else distributed.save
        return write(out, step=step, model=model, optimizer=optimizer, config=run.config(), state=state)

    model.train()
    with bar, open(metrics_path if main else os.devnull, "a") as metrics:
        for step in range(start, tcfg.steps):
            if tcfg.pack:
                starts = window_starts(split.train, step, batch_size=tcfg.batch_size, seq_len=mcfg.seq_len,
                                       seed=tcfg.seed)
                if world is not None:
                    starts = starts[world.rows(tcfg.batch_size)]
                # under torchrun each process's loss is the mean over its own scored targets, so
                # ranks whose rows cross more documents weigh each target slightly more
                batch = packed_batch(split.train, split.documents, starts, seq_len=mcfg.seq_len,
                                     sequences=sequences, device=device)
                loss, grad_norm = train_step(model, loss_fn, optimizer, tcfg, step, batch.x, batch.y,
                                             batch.cu_seqlens, batch.max_seqlen)
            else:
                x, y = batch_at(split.train, step, batch_size=tcfg.batch_size, seq_len=mcfg.seq_len,
                                seed=tcfg.seed, device=device)
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
            done[0] = step + 1
            if (step + 1) % run.checkpoint_every == 0 or step + 1 == tcfg.steps:
                save(step + 1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tokens_per_s=f"{tokens_per_s:,.0f}", refresh=False)
            bar.update(1)
            if bar.disable and ((step + 1) % every == 0 or step + 1 == tcfg.steps):
                log(f"step {step + 1}/{tcfg.steps}: loss {loss_value:.3f}, {tokens_per_s:,.0f} tokens/s, "
                    f"{now - t0:.0f} s")
    ckpt = checkpoint.find(out)
    # every rank evaluates the same held-out windows (the sharded forward is collective), a
    # rank's share of the global batch at a time
    eval_batch = tcfg.batch_size if world is None else tcfg.batch_size // world.size
    result = evaluate_heldout(model, split, batch_size=eval_batch, max_tokens=tcfg.eval_tokens, device=device,
                              progress=main)
    result.update(step=tcfg.steps, checkpoint=str(ckpt), train_s=round(time.monotonic() - t0, 1), pack=tcfg.pack)
    if not main:
        return {**result, "plot": None}
    with open(metrics_path, "a") as metrics:
        metrics.write(json.dumps({"step": tcfg.steps, **{k: result[k] for k in
                                  ("heldout_loss", "heldout_bpb", "unigram_bpb", "heldout_tokens",
                                   "segmentation", "pack")}}) + "\n")
    result["plot"] = str(plot_loss(_read_metrics(metrics_path), out / "loss.png"))
    return result
