"""The readout stage (SPEC §3 phase 2): every query reads every live slot through the level map,
`o_t = Σ_i λ_t[r_i] · S_iᵀ (scale·q_t)`, and the final slot states; with its backward.

| file | what it holds |
| --- | --- |
| `plan.py` | the object plan from the level map (static shapes, on the device): what each chunk reads and builds |
| `objects.py` | the CPU kernel without `β`: the persistent-object readout of SPEC §3.1 in torch, forward and backward written out |
| `chunked.py` | the CPU kernel with `β`: the chunked form in torch, every slot rewritten per chunk |
| `objects_triton.py` | CUDA without `β`: the object kernels, and the call that mixes object and dense heads |
| `masked_triton.py` | CUDA without `β`, the dense path: the masked quadratic form `(A_base ⊙ Λ) V` for heads whose plan is too dense or overflows the pool, and for calls of one chunk |
| `cost.py` | what each CUDA kernel costs (FLOPs, bytes), the pool bound, and the rule between objects and the dense path |
| `objects_delta.py`, `objects_delta_triton.py`, `cost_delta.py` | with `β`: the readout by windows of `R` chunks (objects re-framed once per window, the window's tokens read through the query's WY transport) in torch (float64-exact, the prototype and oracle) and Triton (CUDA with `β`), its cost, and the window `R` (`window_for`) |

The references are `dla.ops.reference.multistate_attention_materialized` (the masked form) and
`multistate_attention_recurrent`.

The rule (`readout_forward`, `readout_backward`): CPU tensors (and float64 ones on any device)
take the torch kernels — objects without `β`, the chunked form with it. On CUDA, `β` takes the
readout by windows, its `R` by `cost_delta.window_for` from the shapes and the device's peaks
(no host read); without `β` each head takes
the object kernels or the dense ones by `cost.takes_objects` — objects whenever the plan fits
the pool bound (derived from the memory target) — evaluated on the device, so no host read
happens; a call of at most one chunk (decode) is dense from its shapes alone. Results agree to
rounding (all kernels are held to the same oracles): the choice is one of speed and memory.
"""

from __future__ import annotations

import torch

from dla.ops.readout.chunked import chunked_backward, chunked_forward
from dla.ops.readout.objects import objects_backward, objects_forward
from dla.ops.readout.objects_triton import mixed_backward, mixed_forward
from dla.ops.readout.cost import arch_of
from dla.ops.readout.cost_delta import window_for
from dla.ops.readout.objects_delta_triton import objects_delta_backward_triton, objects_delta_forward_triton

__all__ = ["readout_forward", "readout_backward", "readout_forward_triton", "readout_backward_triton"]


def readout_forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int, step=None,
                    final: bool = True):
    """`dla::readout` on the tensors' device: `(o [B,T,H,Dv], S [B,H,K,Dk,Dv])` (SCHEMAS.md); `S`
    empty (`[0]`) unless `final`."""
    if q.is_cuda and q.dtype != torch.float64:
        return readout_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step, final)
    if beta is not None:
        o, S = chunked_forward(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)
    else:
        o, S = objects_forward(q, k, v, lam, g, level_start, S0, scale, chunk_size, _steps(step, q))
    return o, _kept(S, S0, final)


def readout_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int, step=None,
                     dS0_needed: bool = True):
    """`dla::readout_backward` on the tensors' device: `(dq, dk, dv, dlam, dg, dbeta, dS0)`; `dS`
    None for a final state without a gradient; with `dS0_needed` false `dS0` is empty (`[0]`)."""
    if q.is_cuda and q.dtype != torch.float64:
        return readout_backward_triton(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step,
                                       dS0_needed)
    dS = torch.zeros_like(S0) if dS is None else dS
    if beta is not None:
        *grads, dS0 = chunked_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)
    else:
        dq, dk, dv, dlam, dg, dS0 = objects_backward(do, dS, q, k, v, lam, g, level_start, S0, scale, chunk_size,
                                                     _steps(step, q))
        grads = [dq, dk, dv, dlam, _gate_grad(dg, q), _gate_grad(None, q)]
    return *grads, _kept(dS0, S0, dS0_needed)


def _kept(x, S0, asked: bool):
    """`x` (a final state `S` or `dS0`), or the empty tensor the ops return in its place when the
    caller asked for none (`x` is then None where the kernels skipped it)."""
    return x if asked else S0.new_empty(0)


def _steps(step, q):
    """`step [B]` int64, zeros when the caller gives none."""
    return torch.zeros(q.shape[0], dtype=torch.int64, device=q.device) if step is None else step


def _gate_grad(dg, q):
    """The gradient of an absent gate: float32 zeros `[B,T,H]` (SCHEMAS.md)."""
    return torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device) if dg is None else dg


def _window(q, v, lam, chunk_size: int) -> int:
    """The readout by windows' `R` for these shapes on q's device (`cost_delta.window_for`)."""
    arch = arch_of(q.device)
    return window_for(q.shape[1], lam.shape[-1], q.shape[-1], v.shape[-1], q.element_size(), chunk_size, arch.flops,
                      arch.bandwidth)


def readout_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int, step=None,
                           final: bool = True):
    """The CUDA side of the rule, for the tensors' device: the readout by windows with β (which
    does not write a final state no one asked for), else objects or dense rows
    (`objects_triton.mixed_forward`)."""
    if beta is not None:
        o, S = objects_delta_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step,
                                            _window(q, v, lam, chunk_size), final=final)
        return o, _kept(S, S0, final)
    o, S = mixed_forward(q, k, v, lam, g, level_start, S0, scale, step)
    return o, _kept(S, S0, final)


def readout_backward_triton(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                            step=None, dS0_needed: bool = True):
    """The backward of `readout_forward_triton`, by the same rule."""
    if beta is not None:
        dq, dk, dv, dlam, dg, dbeta, dS0 = objects_delta_backward_triton(
            do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step, _window(q, v, lam, chunk_size),
            dS0_needed=dS0_needed)
        return dq, dk, dv, dlam, dg, dbeta, _kept(dS0.to(S0.dtype) if dS0_needed else None, S0, dS0_needed)
    dS = torch.zeros_like(S0) if dS is None else dS
    dq, dk, dv, dlam, dg, dS0 = mixed_backward(do, dS, q, k, v, lam, g, level_start, S0, scale, step)
    return dq, dk, dv, dlam, dg, _gate_grad(None, q), _kept(dS0.to(S0.dtype), S0, dS0_needed)
