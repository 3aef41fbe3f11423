"""`dla segments`: how a trained model's DLA layers segment one text, drawn so that a reader sees
whether the memory follows the text, and counted (`dla.run.eval.segmentation`).

The model reads the text's bytes once from an empty cache (`CausalLM.prefill`: the recurrent
backbones take a text of any length, longer than the `seq_len` they were trained at). For each
chosen layer and head the picture has two panels: the text, wrapped, with a bar before every
token that opened a slot and its segments shaded in turn; and the slot structure over time, the
slot (the cache's order, 0 the oldest) that holds each past token `s` after each step `t`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dla.model import CausalLM
from dla.ops.levels import EMPTY, level_of
from dla.ops.segment.stats import segmentation_stats
from dla.run import checkpoint
from dla.run.data import encode
from dla.run.device import autocast, resolve_device
from dla.run.eval.segmentation import SKIP_FIRST, LayerLevelMaps, dla_layers, recording
from dla.run.generate import activation_dtype

MAX_TOKENS = 4096  # the slot panel draws T × T cells
MAX_PANELS = 32
WRAP = 64  # text columns per line of the text panel
QUARTERS = 4


@dataclass(frozen=True)
class HeadSegmentation:
    """The statistics of one drawn head (`dla.ops.segment.stats` over the text; rates over the
    positions `≥ SKIP_FIRST`), and the boundary rate in each quarter of the text."""

    layer: int
    head: int
    boundary_rate: float | None
    boundary_rate_by_quarter: list[float | None]
    merges_per_1000: float
    mean_segment_length: float
    median_segment_length: float
    slots_changed_per_chunk: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_choice(model: CausalLM, layers: list[int] | None, heads: list[int] | None) -> list[tuple[int, int]]:
    """The (layer, head) panels to draw: `layers` among the model's DLA layers (default all of them),
    `heads` among its heads (default all); `ValueError` naming the flag otherwise."""
    cfg = model.cfg
    available = [index for index, _ in dla_layers(model)]
    if not available:
        raise ValueError(f"--checkpoint: the model ({cfg.backbone}/{cfg.policy}) has no DLA layer to draw (it "
                         f"needs --policy dla and a mamba2 or gdn backbone)")
    for index in layers or []:
        if index not in available:
            raise ValueError(f"--layers: {index} is not a DLA layer of the model (it has {available})")
    for head in heads or []:
        if not 0 <= head < cfg.n_heads:
            raise ValueError(f"--heads: {head} is not a head of the model (0 to {cfg.n_heads - 1})")
    panels = [(layer, head) for layer in (layers or available) for head in (heads or range(cfg.n_heads))]
    if len(panels) > MAX_PANELS:
        raise ValueError(f"--layers/--heads: {len(panels)} panels, more than {MAX_PANELS}; choose fewer")
    return panels


def check_tokens(tokens: np.ndarray) -> None:
    if len(tokens) < 1:
        raise ValueError("the text must hold at least one byte")
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"the text is {len(tokens):,} bytes, more than the {MAX_TOKENS:,} a picture shows")


@torch.no_grad()
def segment_text(model: CausalLM, tokens: np.ndarray) -> list[LayerLevelMaps]:
    """Each DLA layer's level map `[1, T, H, K]` over `tokens [T]` (bytes), read from an empty
    cache in one call."""
    device = model.embed.weight.device
    idx = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None].to(device)
    cache = model.empty_cache(1, max_len=idx.shape[1], dtype=activation_dtype(model))
    with recording(model) as layers, autocast(device):
        model.prefill(idx, cache)
    return layers


def quarter_rates(level_start: Tensor) -> Tensor:
    """Per head, the fraction of tokens at positions `≥ SKIP_FIRST` in each quarter of the call
    that open a slot: `level_start [1, T, H, K]` → `[H, 4]` float64 (NaN for a quarter without
    such tokens)."""
    _, T, H, _ = level_start.shape
    t = torch.arange(T)
    counted = t >= SKIP_FIRST
    opened = level_start[0, :, :, 0].long() == t[:, None]  # [T, H]
    quarter = t * QUARTERS // T
    out = torch.full((H, QUARTERS), float("nan"), dtype=torch.float64)
    for q in range(QUARTERS):
        rows = counted & (quarter == q)
        if rows.any():
            out[:, q] = opened[rows].double().mean(0)
    return out


def _number(x: Tensor) -> float | None:
    return None if torch.isnan(x) else float(x)


def head_statistics(layers: list[LayerLevelMaps], panels: list[tuple[int, int]]) -> list[HeadSegmentation]:
    """`HeadSegmentation` of each panel, from `segmentation_stats` of its layer's map."""
    by_layer = {}
    for record in layers:
        level_start, _ = record.pooled()
        by_layer[record.layer] = (segmentation_stats(level_start, chunk_size=record.chunk_size, skip_first=SKIP_FIRST),
                                  quarter_rates(level_start))
    out = []
    for layer, head in panels:
        stats, quarters = by_layer[layer]
        out.append(HeadSegmentation(
            layer=layer, head=head, boundary_rate=_number(stats.late_boundaries_per_1k[head] / 1000),
            boundary_rate_by_quarter=[_number(x) for x in quarters[head]],
            merges_per_1000=float(stats.merges_per_1k[head]), mean_segment_length=float(stats.mean_segment[head]),
            median_segment_length=float(stats.median_segment[head]),
            slots_changed_per_chunk=float(stats.slots_changed_per_chunk[head])))
    return out


def slot_map(starts: Tensor, rows: int = 256) -> np.ndarray:
    """The slot (cache order, 0 the oldest) holding token `s` after step `t`: `starts [T, K]` (one
    head's level map) → `[T, T]` float with NaN for `s > t`."""
    T = starts.shape[0]
    starts = starts.long()
    live = (starts != EMPTY).sum(-1)  # slots after each step
    positions = torch.arange(T)
    out = np.full((T, T), np.nan, dtype=np.float32)
    for t0 in range(0, T, rows):
        block = starts[t0:t0 + rows]
        rank = level_of(block, positions.expand(len(block), T))  # [rows, T]
        slot = (live[t0:t0 + rows, None] - 1 - rank).float()
        future = positions[None, :] > positions[t0:t0 + rows, None]
        out[t0:t0 + rows] = slot.masked_fill(future, float("nan")).numpy()
    return out


def _glyph(byte: int) -> str:
    if byte == 10:
        return "\u21b5"
    return chr(byte) if 32 <= byte < 127 else "\u00b7"


def draw(path: str | Path, tokens: np.ndarray, layers: list[LayerLevelMaps], panels: list[tuple[int, int]],
         stats: list[HeadSegmentation], *, title: str) -> Path:
    """The module doc's picture, one row of two panels per (layer, head) in `panels`, to a PNG."""
    # matplotlib: slow to import, and needed for pictures only
    import matplotlib
    from matplotlib.collections import LineCollection
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    by_layer = {r.layer: r for r in layers}
    T = len(tokens)
    lines = -(-T // WRAP)
    K = by_layer[panels[0][0]].level_starts[0].shape[-1]
    palette = matplotlib.colormaps["tab10" if K <= 10 else "tab20" if K <= 20 else "turbo"]
    colors = ListedColormap([palette(i / max(K - 1, 1) if K > 20 else i) for i in range(K)])
    norm = BoundaryNorm(np.arange(K + 1) - 0.5, K)
    text_height = 0.9 + 0.17 * lines
    height = max(text_height, 3.2)
    total = height * len(panels) + 0.6
    fig = Figure(figsize=(13, total), dpi=100)
    axes = fig.subplots(len(panels), 2, squeeze=False, gridspec_kw=dict(width_ratios=[1.55, 1]))
    rows, cols = np.arange(T) // WRAP, np.arange(T) % WRAP
    for (layer, head), stat, (text_ax, slot_ax) in zip(panels, stats, axes):
        starts = by_layer[layer].level_starts[0][0, :, head]  # [T, K]
        opened = (starts[:, 0].long() == torch.arange(T)).numpy()
        parity = (np.cumsum(opened) % 2).astype(float)
        shade = np.full(lines * WRAP, np.nan)
        shade[:T] = parity
        text_ax.imshow(shade.reshape(lines, WRAP), extent=(0, WRAP, lines, 0), aspect="auto", vmin=0, vmax=1,
                       cmap=ListedColormap(["#e8eef7", "#f7efe2"]), interpolation="nearest")
        boundaries = np.flatnonzero(opened[1:]) + 1  # the first token opens its slot unscored
        bars = [[(cols[i], rows[i]), (cols[i], rows[i] + 1)] for i in boundaries]
        text_ax.add_collection(LineCollection(bars, colors="tab:red", linewidths=1.2))
        for i, byte in enumerate(tokens.tolist()):
            text_ax.text(cols[i] + 0.5, rows[i] + 0.5, _glyph(byte), ha="center", va="center", family="monospace",
                         fontsize=7, parse_math=False)
        text_ax.set_xlim(0, WRAP)
        text_ax.set_ylim(lines, 0)
        text_ax.set_xticks([])
        text_ax.set_yticks(np.arange(lines) + 0.5, [str(r * WRAP) for r in range(lines)], fontsize=6)
        rate = "n/a" if stat.boundary_rate is None else f"{stat.boundary_rate:.3f}"
        text_ax.set_title(f"layer {layer}, head {head}: boundary rate {rate}, {stat.merges_per_1000:.1f} merges "
                          f"per 1000 tokens, mean segment {stat.mean_segment_length:.1f}", fontsize=9, loc="left")
        image = slot_ax.imshow(slot_map(starts), cmap=colors, norm=norm, interpolation="nearest", aspect="auto",
                               extent=(-0.5, T - 0.5, T - 0.5, -0.5))
        slot_ax.set_xlabel("past token s", fontsize=8)
        slot_ax.set_ylabel("after step t", fontsize=8)
        slot_ax.tick_params(labelsize=7)
        bar = fig.colorbar(image, ax=slot_ax, ticks=np.arange(K), fraction=0.05)
        bar.set_label("slot (0 = oldest)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    # at the top of the band that tight_layout leaves free (its default y, 0.98 of a tall figure, fell on the
    # first panel's title)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / total, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / total))
    path = Path(path)
    fig.savefig(path)
    return path


def check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: must name a .png file")
    folder = out.parent
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {out}: cannot write there ({folder} is not a writable folder)")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder")
    return out


def segments_of_checkpoint(path: str | Path, text: str, out: str | Path, *, layers: list[int] | None = None,
                           heads: list[int] | None = None, device: str | None = None) -> dict:
    """Draw how the checkpoint that `path` names segments `text` into `out` (a PNG) and return the
    statistics of each drawn head (`HeadSegmentation`) with what the picture shows. Raises
    `ValueError` naming the flag for anything it cannot do, before it writes."""
    out = check_out(out)
    tokens = encode(text)
    try:
        check_tokens(tokens)
    except ValueError as e:
        raise ValueError(f"--text/--prompt: {e}") from None
    dev = resolve_device(device)
    try:
        model, ckpt, state = checkpoint.load_model(path, device=dev)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith("--") else f"--checkpoint {message}") from None
    panels = check_choice(model, layers, heads)
    maps = segment_text(model, tokens)
    stats = head_statistics(maps, panels)
    cfg = model.cfg
    step = int(state["step"])
    title = (f"{ckpt} ({cfg.backbone}/dla, score {cfg.score}, tau {cfg.tau:g}, K = {cfg.capacity}, step {step}): "
             f"{len(tokens):,} tokens")
    picture = draw(out, tokens, maps, panels, stats, title=title)
    return {"checkpoint": str(ckpt), "step": step, "backbone": cfg.backbone, "policy": cfg.policy,
            "score": cfg.score, "tau": cfg.tau, "capacity": cfg.capacity, "tokens": len(tokens),
            "picture": str(picture), "segmentation": [s.to_dict() for s in stats]}
