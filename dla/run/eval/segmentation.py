"""How a model's DLA layers segment what they read (issue #16): each layer's level map, recorded
while the model runs from the inputs its operator receives, and the statistics of
`dla.ops.segment.stats.segmentation_stats` over it, in the form that `metrics.jsonl`,
`dla eval --json` and `dla segments` report.

A layer's entry (`layer_summary`), every rate per head and pooled over the recorded windows:

* `boundary_rate_by_head`: the fraction of tokens at positions `≥ SKIP_FIRST` of each window that
  open a slot (the first tokens of a window open slots whatever the content), `boundary_rate`
  their mean over heads;
* `merges_per_1000(_by_head)`: capacity merges per 1000 tokens;
* `mean_segment_length(_by_head)`, `median_segment_length_by_head`: the lengths of the pieces
  the openings cut each window into;
* `slots_changed_per_chunk_by_head`: slots a readout chunk of `chunk_size` tokens changes.

Statistics a head has nothing to count for (a window no longer than `SKIP_FIRST`) are `None`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dla.model.layers import MultiState
from dla.operator import level_map
from dla.ops.segment.stats import SegmentationStats, segmentation_stats

SKIP_FIRST = 16  # positions of a window whose openings are not counted in the boundary rate

_MIXER_ARGS = ("x", "q", "k", "v")  # MultiState.forward's positional arguments


@dataclass
class LayerLevelMaps:
    """The level maps one DLA layer computed, one per forward call: `level_start [B,T,H,K]` and
    the live slots `m0 [B,H]` of the cache each call started from, both on the CPU."""

    layer: int  # the block's index in the model
    chunk_size: int
    level_starts: list[Tensor] = field(default_factory=list)
    initial_live: list[Tensor] = field(default_factory=list)

    def pooled(self) -> tuple[Tensor, Tensor]:
        """The recorded calls stacked along the batch (they must share their length T)."""
        lengths = sorted({ls.shape[1] for ls in self.level_starts})
        if len(lengths) != 1:
            raise ValueError(f"layer {self.layer}: recorded windows of lengths {lengths}, expected one length")
        return torch.cat(self.level_starts), torch.cat(self.initial_live)

    def statistics(self) -> SegmentationStats:
        level_start, m0 = self.pooled()
        return segmentation_stats(level_start, m0=m0, chunk_size=self.chunk_size, skip_first=SKIP_FIRST)


def dla_layers(model: torch.nn.Module) -> list[tuple[int, MultiState]]:
    """(block index, operator module) of every layer of `model` that runs the `dla` policy."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MultiState) and module.cfg.policy == "dla":
            found.append((_block_index(name), module))
    return found


def _block_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("blocks") + 1])


@contextmanager
def recording(model: torch.nn.Module):
    """Within the block, every forward of `model` records each DLA layer's level map; yields the
    `LayerLevelMaps` of those layers, in block order. The map is the operator's own: the same
    function of the same inputs (`dla.level_map` on what `MultiState` passes to
    `multistate_attention`; SPEC §2: it sees the writes and transitions only). Compiled parts of
    the model (the blocks under torchrun) run eagerly within the block: a compiled graph would
    not call hooks added after it was traced."""
    records, handles = [], []
    for index, module in dla_layers(model):
        record = LayerLevelMaps(layer=index, chunk_size=module.cfg.chunk_size)
        records.append(record)
        handles.append(module.register_forward_hook(_recorder(record), with_kwargs=True))
    try:
        with torch.compiler.set_stance("force_eager"):
            yield records
    finally:
        for handle in handles:
            handle.remove()


def _recorder(record: LayerLevelMaps):
    def hook(module: MultiState, args: tuple, kwargs: dict, output) -> None:
        inputs = {**dict(zip(_MIXER_ARGS, args)), **kwargs}
        k, v, g, beta, state = inputs["k"], inputs["v"], inputs.get("g"), inputs.get("beta"), inputs.get("state")
        cfg = module.cfg
        # the casts MultiState.forward applies before it calls the operator
        with torch.no_grad():
            level_start = level_map(k.to(v.dtype), v, capacity=cfg.capacity, g=None if g is None else g.float(),
                                    beta=None if beta is None else beta.float(), policy="dla", tau=cfg.tau,
                                    score=cfg.score, chunk_size=cfg.chunk_size, initial_state=state)
        B, _, H, _ = level_start.shape
        m0 = torch.zeros(B, H, dtype=torch.int64) if state is None else state.m.detach().long().cpu()
        record.level_starts.append(level_start.cpu())
        record.initial_live.append(m0)

    return hook


def _numbers(values: Tensor) -> list[float | None]:
    return [None if math.isnan(x) else x for x in values.double().tolist()]


def _mean(values: Tensor) -> float | None:
    finite = values[~values.isnan()]
    return float(finite.mean()) if len(finite) == len(values) and len(values) else None


def layer_summary(record: LayerLevelMaps) -> dict:
    """The module doc's entry for one layer, from the statistics of all it recorded."""
    stats = record.statistics()
    rate = stats.late_boundaries_per_1k / 1000
    level_start, _ = record.pooled()
    B, T, H, _ = level_start.shape
    return {
        "layer": record.layer,
        "heads": H,
        "windows": B,
        "window_tokens": T,
        "boundary_rate": _mean(rate),
        "boundary_rate_by_head": _numbers(rate),
        "merges_per_1000": _mean(stats.merges_per_1k),
        "merges_per_1000_by_head": _numbers(stats.merges_per_1k),
        "mean_segment_length": _mean(stats.mean_segment),
        "mean_segment_length_by_head": _numbers(stats.mean_segment),
        "median_segment_length_by_head": _numbers(stats.median_segment),
        "slots_changed_per_chunk_by_head": _numbers(stats.slots_changed_per_chunk),
    }


def summaries(records: list[LayerLevelMaps]) -> list[dict]:
    """One `layer_summary` per DLA layer that ran (an empty list for a model without one)."""
    return [layer_summary(r) for r in records if r.level_starts]
