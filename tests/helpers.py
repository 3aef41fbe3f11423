"""What several test modules share: a small corpus, the training curve of a run folder, a
`micro` preset small enough for end-to-end runs of a few steps within the test budget, and the
held-out figures of a run's model computed directly (the oracle of `dla eval` and of the record)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dla.model import PRESETS
from dla.run.train import LOCK, RECIPES

MICRO = dict(d_model=16, n_layers=1, n_heads=2, head_dim=4, head_dim_v=4, capacity=3, seq_len=8, mlp_ratio=2.0)
MICRO_RECIPE = dict(steps=4, batch_size=2, lr=1e-2, warmup=1)


def write_corpus(folder: Path) -> Path:
    """A few KB of text with structure a model can pick up."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "sword", "crown", "night", "speak", "love", "death", "and", "of"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        lines = [" ".join(rng.choice(words, size=8)) + "." for _ in range(60)]
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    (folder / "notes.md").write_text("not a .txt file: ignored\n")
    return folder


def train_curve(run: Path) -> list[tuple[int, float]]:
    """(step, training loss) from a run's metrics.jsonl."""
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def add_micro_preset(monkeypatch: pytest.MonkeyPatch, model: dict = MICRO, recipe: dict = MICRO_RECIPE, *,
                     name: str = "micro") -> None:
    """`dla train --preset NAME` trains `model` by `recipe` until `monkeypatch` is undone."""
    monkeypatch.setitem(PRESETS, name, dict(model))
    monkeypatch.setitem(RECIPES, name, dict(recipe))


def exit_code(main, argv: list[str]) -> int:
    """`main(argv)`'s return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its modification time and bytes ({} when it does not exist),
    but the run's lock file, which names the process holding the lock (and is empty otherwise)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK}


def heldout_oracle(model, run: Path, max_tokens: int) -> dict:
    """The held-out figures of `model` on `run`'s split (`RUN/data/{train,heldout}.bin`), computed
    as `dla.run.data.heldout_batches` and `dla.run.eval.lm` document them but not by their code:
    mean next-byte cross-entropy (nats) of the plain forward over evenly spaced disjoint windows
    of `seq_len + 1` bytes (at most `max_tokens` targets, at least one window), and of the add-one
    unigram byte model of the training split on the same targets."""
    heldout = np.fromfile(run / "data" / "heldout.bin", dtype=np.uint8)
    train = np.fromfile(run / "data" / "train.bin", dtype=np.uint8)
    T = model.cfg.seq_len
    count = max(1, min((len(heldout) - 1) // T, max_tokens // T))
    starts = np.linspace(0, len(heldout) - T - 1, count).astype(np.int64)
    windows = torch.from_numpy(np.stack([heldout[s:s + T + 1] for s in starts]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        loss = F.cross_entropy(model(x).double().flatten(0, 1), y.flatten())
    unigram = -np.log((np.bincount(train, minlength=256) + 1.0) / (len(train) + 256.0))
    return {"heldout_loss": float(loss), "unigram_loss": float(unigram[y.numpy()].mean()), "heldout_tokens": y.numel()}
