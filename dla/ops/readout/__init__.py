"""The readout stage (SPEC §3 phase 2): every query reads every live slot through the level map,
`o_t = Σ_i λ_t[r_i] · S_iᵀ (scale·q_t)`, and the final slot states; with its backward.

| file | what it holds |
| --- | --- |
| `chunked.py` | the CPU kernel: the chunked form in torch, every transition, forward and backward written out |
| `scan_triton.py` | CUDA: the chunked scan over the slot states, linear in `T`, every transition, `Dk ≤ 128` |
| `masked_triton.py` | CUDA: the masked quadratic form `(A_base ⊙ Λ) V` without a sequential part, transitions without `β` |

The references are `dla.ops.reference.multistate_attention_materialized` (the masked form) and
`multistate_attention_recurrent`.

The rule (`readout_forward`, `readout_backward`): CPU tensors take the torch kernel. On CUDA, `β`
(the delta rule) takes the scan, the only kernel that has it; without `β` the kernel with fewer
multiply-adds per token and pass, by the counts each kernel's derivation gives:

    masked:  (T/2)·(Dk + Dv)       (a query meets T/2 keys on average, each in two products)
    scan:    K·Dk·Dv               (a query reads every slot's Dk×Dv state)

so the scan where `K·Dk·Dv < (T/2)·(Dk + Dv)` (`K < T/128` at `Dk = Dv = 128`) and `Dk ≤ 128`.
Results agree to rounding (both are held to the same oracles): the choice is one of speed, made
from shapes alone, with no constant measured on any card.
"""

from __future__ import annotations

from torch import Tensor

from dla.ops.readout.chunked import chunked_backward, chunked_forward
from dla.ops.readout.masked_triton import masked_backward, masked_forward
from dla.ops.readout.scan_triton import scan_backward, scan_forward

__all__ = ["readout_forward", "readout_backward", "readout_forward_triton", "readout_backward_triton",
           "scan_has_fewer_products"]

SCAN_MAX_DK = 128  # the scan keeps a [Dk, BV] slot tile per program in registers


def scan_has_fewer_products(T: int, K: int, Dk: int, Dv: int) -> bool:
    """The rule without `β`: the scan's `K·Dk·Dv` multiply-adds per token and pass against the
    masked form's `(T/2)·(Dk + Dv)`; see the module doc."""
    return Dk <= SCAN_MAX_DK and K * Dk * Dv < (T / 2) * (Dk + Dv)


def readout_forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int):
    """`dla::readout` on the tensors' device: `(o [B,T,H,Dv], S [B,H,K,Dk,Dv])` (SCHEMAS.md)."""
    if q.is_cuda:
        return readout_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)
    return chunked_forward(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)


def readout_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int):
    """`dla::readout_backward` on the tensors' device: `(dq, dk, dv, dlam, dg, dbeta, dS0)`."""
    if q.is_cuda:
        return readout_backward_triton(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)
    return chunked_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)


def readout_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int):
    """The CUDA side of the rule (scan or masked kernels), for the tensors' device."""
    if _takes_scan(q, v, lam, beta):
        return scan_forward(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)
    return masked_forward(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)


def readout_backward_triton(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int):
    """The backward of `readout_forward_triton`, by the same rule."""
    if _takes_scan(q, v, lam, beta):
        return scan_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)
    return masked_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)


def _takes_scan(q: Tensor, v: Tensor, lam: Tensor, beta: Tensor | None) -> bool:
    return beta is not None or scan_has_fewer_products(q.shape[1], lam.shape[-1], q.shape[-1], v.shape[-1])
