"""The fixed-shape decode cache of the causal LM (SPEC §3, §5).

Every field is a tensor whose shape is fixed when the cache is made, so a decode step
`(cache, token) → (logits, new cache)` is one static graph: `torch.compile(fullgraph=True)`
traces it once and, on CUDA, CUDA graphs replay it. The cache is updated functionally (the
step returns new tensors) and is a pytree of named tuples, which `torch.compile` and
`torch.utils._pytree` take apart without registration.

    LMCache(layers, pos)      pos: [] int64, tokens consumed so far (all rows of a batch together)
    RecurrentCache(conv, state)   Mamba-2 and Gated DeltaNet: the inputs of each short
                                  convolution's last `conv_size − 1` steps, and the operator's
                                  `MultiStateCache` (slot states, counts, open block, step)
    KVCache(k, v)             attention: keys (after RoPE) and values at positions `< max_len`,
                              [B, max_len, H, D]; positions `≥ pos` are masked, never sliced
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from dla.ops.state import MultiStateCache


class RecurrentCache(NamedTuple):
    conv: tuple[Tensor, ...]  # one [B, conv_size − 1, C] per short convolution of the mixer
    state: MultiStateCache


class KVCache(NamedTuple):
    k: Tensor  # [B, max_len, H, D]
    v: Tensor  # [B, max_len, H, D]


class LMCache(NamedTuple):
    layers: tuple  # one RecurrentCache or KVCache per block
    pos: Tensor  # [] int64


__all__ = ["LMCache", "RecurrentCache", "KVCache", "MultiStateCache"]
