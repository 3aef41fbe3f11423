"""The tables of docs/segmentation.md from the JSON beside this file: for each run NAME,
`NAME-eval.json` (`dla eval --checkpoint runs/NAME --json`) and `NAME-segments.json`
(`dla segments --checkpoint runs/NAME --text docs/segmentation-text.txt --json`).

    python docs/results/segmentation/tables.py seg-main seg-mamba2-drift-0.6 ...

and, where `by_byte.py` wrote `NAME-bytes.json`, which byte classes of the text open a slot.

    python docs/results/segmentation/tables.py --doc docs/segmentation.md

rewrites the blocks of docs/segmentation.md between `<!-- begin: tables.py KIND NAME ... -->` and
`<!-- end: tables.py -->` (KIND: `summary` or `heads`) with the tables of those names.
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


def spread(rates: list[float | None]) -> str:
    """`median [min–max]` of the heads' rates (the median of an even count: the mean of the middle two)."""
    known = [r for r in rates if r is not None]
    if not known:
        return "–"
    return f"{statistics.median(known):.3f} [{min(known):.3f}–{max(known):.3f}]"


def summary(names: list[str]) -> str:
    """One row per run and DLA layer: held-out bits per byte and the boundary rate over the heads
    (median, range and the two middle heads) in `dla eval`'s held-out windows, and on the 2048-byte
    text of `dla segments`: overall, by quarter (median of the heads) and merges per 1000 tokens."""
    rows = ["| run | backbone | score | τ | steps | held-out bpb | layer | eval boundary rate: median of heads "
            "[min–max] | eval: middle heads | text boundary rate: median of heads [min–max] | text rate by quarter "
            "(median of heads) | text merges / 1000 (median of heads) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        ev, seg = load(name)
        assert (ev["checkpoint"], ev["step"]) == (seg["checkpoint"], seg["step"]), name
        by_layer = {}
        for h in seg["segmentation"]:
            by_layer.setdefault(h["layer"], []).append(h)
        for i, e in enumerate(ev["segmentation"]):
            heads = by_layer[e["layer"]]
            lo, hi = middle_heads(e["boundary_rate_by_head"])
            quarters = zip(*(h["boundary_rate_by_quarter"] for h in heads))
            run = ([f"`{name}`", seg["backbone"], seg["score"], str(seg['tau']), str(ev["step"]),
                    f"{ev['heldout_bpb']:.3f}"] if i == 0 else [""] * 6)
            cells = run + [str(e["layer"]), spread(e["boundary_rate_by_head"]), f"{rate(lo)}, {rate(hi)}",
                           spread([h["boundary_rate"] for h in heads]),
                           " ".join(rate(statistics.median(q)) for q in quarters),
                           f"{statistics.median(h['merges_per_1000'] for h in heads):.1f}"]
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


def by_byte(name: str) -> str | None:
    """The table of `NAME-bytes.json` (`by_byte.py`), if there is one: per head, the fraction of the
    text's tokens of each byte class that open a slot (positions 16 and later), and the lengths of
    the slots held after the text's last token."""
    path = HERE / f"{name}-bytes.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    _, seg = load(name)
    text_rates = {(h["layer"], h["head"]): h["boundary_rate"] for h in seg["segmentation"]}
    names = list(data["heads"][0]["opened_by_class"])
    counts = [data["heads"][0]["opened_by_class"][c][1] for c in names]
    rows = [f"`{name}`: the fraction of the text's tokens of each class that open a slot, and the lengths of the "
            f"slots held after its last token (oldest first)",
            "", "| layer | head | all | " + " | ".join(f"{c} ({n})" for c, n in zip(names, counts)) +
            " | slot lengths after the last token |",
            "| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for h in data["heads"]:
        # the same level map as dla segments' (the text's boundary rate, from its statistics)
        assert abs(h["boundary_rate"] - text_rates[(h["layer"], h["head"])]) < 1e-9, (name, h["layer"], h["head"])
        cells = [rate(o / n if n else None) for o, n in h["opened_by_class"].values()]
        rows.append(f"| {h['layer']} | {h['head']} | {rate(h['boundary_rate'])} | " + " | ".join(cells) +
                    f" | {' '.join(map(str, h['slot_lengths_at_end']))} |")
    return "\n".join(rows)


def tables(names: list[str], *, with_summary: bool = True) -> str:
    """The summary of `names`, then each run's per-head table and by-byte table (where there is one)."""
    parts = [summary(names)] if with_summary else []
    for name in names:
        parts.append(per_head(name))
        table = by_byte(name)
        if table is not None:
            parts.append(table)
    return "\n\n".join(parts)


BEGIN, END = "<!-- begin: tables.py", "<!-- end: tables.py -->"


def rewrite(doc: Path) -> None:
    """Replace each block of `doc` between `<!-- begin: tables.py KIND NAME ... -->` and
    `<!-- end: tables.py -->` with the tables of those names: KIND `summary` the summary table,
    `heads` each run's per-head and by-byte tables."""
    text = doc.read_text()
    out, rest = [], text
    while BEGIN in rest:
        head, rest = rest.split(BEGIN, 1)
        marker, rest = rest.split("-->", 1)
        _, rest = rest.split(END, 1)
        kind, *names = marker.split()
        block = {"summary": lambda: summary(names), "heads": lambda: tables(names, with_summary=False)}[kind]()
        out += [head, BEGIN, marker, "-->\n\n", block, "\n\n", END]
    doc.write_text("".join(out + [rest]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--doc"]:
        rewrite(Path(sys.argv[2]))
    else:
        print(tables(sys.argv[1:]))
