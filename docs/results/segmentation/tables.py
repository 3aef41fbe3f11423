"""The tables of docs/segmentation.md from the JSON beside this file: for each run NAME,
`NAME-eval.json` (`dla eval --checkpoint runs/NAME --json`) and `NAME-segments.json`
(`dla segments --checkpoint runs/NAME --text docs/segmentation-text.txt --json`).

    python docs/results/segmentation/tables.py seg-main seg-mamba2-drift-0.6 ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(name: str) -> tuple[dict, dict]:
    return (json.loads((HERE / f"{name}-eval.json").read_text()),
            json.loads((HERE / f"{name}-segments.json").read_text()))


def rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def middle_heads(rates: list[float]) -> tuple[float, float]:
    """The lower and upper middle of the heads' rates (one value twice for an odd count)."""
    ordered = sorted(rates)
    n = len(ordered)
    return ordered[(n - 1) // 2], ordered[n // 2]


def summary(names: list[str]) -> str:
    rows = ["| run | score | τ | held-out bpb | layer | eval boundary rate by head (128-token windows) | "
            "middle heads | text boundary rate (mean of heads) | text merges / 1000 (mean of heads) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        ev, seg = load(name)
        by_layer = {}
        for h in seg["segmentation"]:
            by_layer.setdefault(h["layer"], []).append(h)
        for i, e in enumerate(ev["segmentation"]):
            heads = by_layer[e["layer"]]
            lo, hi = middle_heads(e["boundary_rate_by_head"])
            run = [name, seg["score"], f"{seg['tau']:g}", f"{ev['heldout_bpb']:.3f}"] if i == 0 else [""] * 4
            cells = run + [str(e["layer"]), " ".join(rate(r) for r in e["boundary_rate_by_head"]),
                           f"{rate(lo)}, {rate(hi)}", f"{statistics.mean(h['boundary_rate'] for h in heads):.3f}",
                           f"{statistics.mean(h['merges_per_1000'] for h in heads):.1f}"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_head(name: str) -> str:
    ev, seg = load(name)
    eval_rates = {e["layer"]: e["boundary_rate_by_head"] for e in ev["segmentation"]}
    rows = [f"`{name}` ({seg['backbone']}, {seg['score']}, τ = {seg['tau']}, step {seg['step']}; held-out "
            f"{ev['heldout_bpb']:.3f} bits per byte over {ev['heldout_tokens']:,} bytes)", "",
            "| layer | head | eval boundary rate | text boundary rate | by quarter (tokens 16–511, 512–1023, "
            "1024–1535, 1536–2047) | merges / 1000 | mean / median segment | slots changed / chunk |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h in seg["segmentation"]:
        rows.append(f"| {h['layer']} | {h['head']} | {rate(eval_rates[h['layer']][h['head']])} | "
                    f"{rate(h['boundary_rate'])} | {' '.join(rate(q) for q in h['boundary_rate_by_quarter'])} | "
                    f"{h['merges_per_1000']:.1f} | {h['mean_segment_length']:.1f} / {h['median_segment_length']:g} | "
                    f"{h['slots_changed_per_chunk']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    names = sys.argv[1:]
    print(summary(names))
    for name in names:
        print()
        print(per_head(name))
