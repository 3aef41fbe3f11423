"""The segmentation stage (SPEC §2, §3 phase 1): from the writes `k, v` and the transitions `g, β`
(never `q` or `λ`), the level map `level_start [B,T,H,L]` and the final segmentation state; no
gradient.

| file | what it holds |
| --- | --- |
| `detect.py` | `drift`'s boundary detection, per token `I_t` and flag, parallel over the sequence (torch), and the rule for its products |
| `detect_triton.py` | the CUDA products of that detection (`r_t` in chunks, IEEE dots) and its scalar tail in one kernel |
| `events.py` | from per-token flags to the merge scan's events and the final open block; `dla` under `drift` on any device |
| `ends.py` | rows that end before `T` (packed sequences as padded rows): padding taken out of the segmentation |
| `closed_form.py` | `fenwick` and `single`, closed forms in plain torch on any device |
| `cpu.py` | `dla` on the CPU: the merge scan over events (`drift`), the chunked boundary walk (`token`, `state`) |
| `triton_walk.py` | `dla` on CUDA: the speculative boundary walk (`token`, `state`), merge scan and level-map fill in Triton |
| `stats.py` | a segmentation's statistics from its level map (boundaries, merges, segment lengths, slots changed per chunk) |

The reference is `dla.ops.reference.segment_naive` (and the recurrent reference's cache).

The rule (`segment`): the tensors' device picks the kernel — CUDA tensors the Triton kernels,
CPU tensors the torch scan. Under `drift` both run the detection of `detect.py` — the CPU kernel
with torch products, the CUDA kernel with the Triton ones (IEEE dots; torch for float64) — and
differ in the merge scan over its events. Both take identical well-conditioned decisions (SPEC
§2), so the choice is one of speed alone. (`dla.testing.triton_interpreter()` routes CPU tensors
to the Triton kernels through the interpreter, for fuzzing them without a GPU.)
"""

from __future__ import annotations

from torch import Tensor

from dla.ops.segment.cpu import segment_cpu
from dla.ops.segment.triton_walk import segment_triton
from dla.ops.segment.stats import SegmentationStats, segmentation_stats

__all__ = ["segment", "segmentation_stats", "SegmentationStats"]


def segment(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, S0: Tensor, n0: Tensor, I0: Tensor,
            m0: Tensor, Z0: Tensor, zz0: Tensor, N0: Tensor, step0: Tensor, levels: int, policy: str, score: str,
            tau: float, chunk_size: int, end: Tensor | None = None):
    """`dla::segment` on the tensors' device; outputs as `dla/compile/SCHEMAS.md` lays them out.
    `end [B]`: row `b` holds `end[b]` tokens and then padding (`ends.py`); each kernel freezes
    the map after it."""
    args = (k, v, g, beta, S0, n0, I0, m0, Z0, zz0, N0, step0, levels, policy, score, tau, chunk_size, end)
    if k.is_cuda:
        return segment_triton(*args)
    return segment_cpu(*args)
