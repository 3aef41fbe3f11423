"""Accuracy on query positions only: positions whose target is `IGNORE` never count, whatever
the model predicts there."""

from __future__ import annotations

import torch

from dla.run.eval.tasks import IGNORE


def query_accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> dict:
    """`predictions, targets [B, T]` → counts: `correct` and `queries` (query positions),
    `exact` and `sequences` (sequences with a query, and those whose every query is right)."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    query = targets != IGNORE
    right = (predictions == targets) & query
    has_query = query.any(-1)
    all_right = (right.sum(-1) == query.sum(-1)) & has_query
    return {"correct": int(right.sum()), "queries": int(query.sum()),
            "exact": int(all_right.sum()), "sequences": int(has_query.sum())}


def merge(counts: list[dict]) -> dict:
    """Sum of `query_accuracy` counts, with `accuracy` and `exact_accuracy` fractions."""
    total = {k: sum(c[k] for c in counts) for k in ("correct", "queries", "exact", "sequences")}
    if total["queries"] == 0:
        raise ValueError("no query positions were scored")
    total["accuracy"] = total["correct"] / total["queries"]
    total["exact_accuracy"] = total["exact"] / total["sequences"]
    return total
