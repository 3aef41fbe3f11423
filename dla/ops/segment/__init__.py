"""The segmentation stage (SPEC §2, §3 phase 1): from the writes `k, v` (never `q` or `λ`), the
level map `level_start [B,T,H,L]` and the final segmentation state; no gradient.

| file | what it holds |
| --- | --- |
| `closed_form.py` | `fenwick` and `single`, closed forms in plain torch on any device |
| `cpu.py` | `dla` on the CPU: the chunked boundary walk and merge scan in torch |
| `triton_walk.py` | `dla` on CUDA: the speculative boundary walk, merge scan and level-map fill in Triton |

The reference is `dla.ops.reference.segment_naive` (and the recurrent reference's cache).

The rule (`segment`): the tensors' device picks the kernel — CUDA tensors the Triton kernels,
CPU tensors the torch scan. Both take identical well-conditioned decisions (SPEC §2), so the
choice is one of speed alone. (`dla.testing.triton_interpreter()` routes CPU tensors to the
Triton kernels through the interpreter, for fuzzing them without a GPU.)
"""

from __future__ import annotations

from torch import Tensor

from dla.ops.segment.cpu import segment_cpu

__all__ = ["segment"]


def segment(k: Tensor, v: Tensor, n0: Tensor, I0: Tensor, m0: Tensor, Z0: Tensor, zz0: Tensor, step0: Tensor,
            levels: int, policy: str, score: str, tau: float, chunk_size: int):
    """`dla::segment` on the tensors' device; outputs as `dla/compile/SCHEMAS.md` lays them out."""
    if k.is_cuda:
        from dla.ops.segment.triton_walk import segment_triton  # compiled only where a GPU runs it

        return segment_triton(k, v, n0, I0, m0, Z0, zz0, step0, levels, policy, score, tau, chunk_size)
    return segment_cpu(k, v, n0, I0, m0, Z0, zz0, step0, levels, policy, score, tau, chunk_size)
