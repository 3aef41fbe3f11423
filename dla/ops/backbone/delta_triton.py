r"""The chunked gated delta rule with λ0 and resets on the GPU: the Triton stages in order, with
the signatures of the torch kernel (`delta.py`, whose module doc has the math).

Forward (structured as fla's `chunk_gated_delta_rule`):

    delta_wy.wy_forward           T = (I + A_kk)⁻¹, w, u            parallel over chunks
    delta_states.states_forward   h before each chunk, U, S_final    sequential over chunks
    delta_output.output_forward   o                                  parallel over chunks

Backward (nothing is saved by the forward: the signature takes the inputs only, so the first
two forward stages run again):

    delta_output.output_dU        dU_out = (QKᵀ ⊙ Γ)ᵀ dÕ             parallel
    delta_states.states_backward  dS after each chunk, dU, dS0        sequential
    delta_output.output_backward  dq, dλ0, dk (part), dG (part)      parallel
    delta_wy.wy_backward          dw, then dk, dv, dβ, dg            parallel

Inputs: `q, k, v, lam0` in one dtype (float32, bfloat16 or float16), `g, beta` float32 or that
dtype, `reset` bool, `S0` float32 (or None); CUDA tensors, or CPU tensors under the Triton
interpreter. `chunk_size ∈ {16, 32, 64}`, `Dk ≤ 256`. Outputs and gradients as in `delta.py`
(states float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.backbone.delta_output import output_backward, output_dU, output_forward
from dla.ops.backbone.delta_states import states_backward, states_forward
from dla.ops.backbone.delta_wy import wy_backward, wy_forward
from dla.ops.triton_utils import check_state_offsets

__all__ = ["delta_forward_triton", "delta_backward_triton", "delta_chunk_states_triton",
           "delta_chunk_states_backward_triton"]

CHUNK_SIZES = (16, 32, 64)


def _inputs(k, v, g, beta, reset, S0, chunk_size: int, *more: Tensor | None):
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES} for the Triton kernels, got {chunk_size!r}")
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"k must be float32, bfloat16 or float16 for the Triton kernels, got {k.dtype}")
    if k.shape[-1] > 256:
        raise ValueError(f"k's head dimension must be at most 256 for the Triton kernels, got {k.shape[-1]}")
    if S0 is not None and S0.dtype != torch.float32:
        raise TypeError(f"S0 must be float32 for the Triton kernels, got {S0.dtype}")
    _, T, H, Dk = k.shape
    check_state_offsets("the Triton delta rule", T, H, Dk, v.shape[-1], chunk_size)

    def c(x):
        return None if x is None else x.contiguous()

    return (c(k), c(v), c(g), c(beta), c(reset), c(S0), *(c(x) for x in more))


def delta_forward_triton(q, k, v, lam0, g, beta, reset, S0, scale: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,Dk,Dv] float32)`."""
    k, v, g, beta, reset, S0, q, lam0 = _inputs(k, v, g, beta, reset, S0, chunk_size, q, lam0)
    _, w, u = wy_forward(k, v, g, beta, reset, chunk_size)
    h, U, S = states_forward(k, w, u, g, reset, S0, chunk_size, q.dtype)
    return output_forward(q, k, U, h, lam0, g, reset, scale, chunk_size), S


def delta_backward_triton(do, dS, q, k, v, lam0, g, beta, reset, S0, scale: float, chunk_size: int):
    """`(dq, dk, dv, dlam0, dg, dbeta, dS0)` typed like the inputs (`dS0` float32); `dg` None
    without g, `dS0` None without S0; `do` or `dS` may be None (zero)."""
    k, v, g, beta, reset, S0, q, lam0, do, dS = _inputs(k, v, g, beta, reset, S0, chunk_size, q, lam0, do, dS)
    TI, w, u = wy_forward(k, v, g, beta, reset, chunk_size)
    h, U, _ = states_forward(k, w, u, g, reset, S0, chunk_size, q.dtype)
    if do is not None:
        do = do.to(q.dtype)
        dU_out = output_dU(q, k, do, lam0, g, reset, scale, chunk_size)
        out = (q, do, lam0)
    else:
        dU_out, out = None, (None, None, None)
    dS = None if dS is None else dS.float().contiguous()
    dSa, dU, dS0 = states_backward(out[0], k, w, out[1], out[2], g, reset, dU_out, None, dS, scale, chunk_size,
                                   v.shape[-1])
    dq, dk_part, dG_part, dlam = output_backward(out[0], k, U, h, dSa, out[1], out[2], g, reset, scale, chunk_size)
    dk, dv, dg, dbeta = wy_backward(k, v, g, beta, reset, TI, h, dU, dk_part, dG_part, chunk_size)
    if do is None:
        dq, dlam = torch.zeros_like(q), torch.zeros_like(lam0)
    return dq, dk, dv, dlam, dg, dbeta, (dS0 if S0 is not None else None)


def delta_chunk_states_triton(k, v, g, beta, reset, S0, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(h [B,H,NC,Dk,Dv], S [B,H,Dk,Dv])`, float32: the state before each chunk and after the
    last."""
    k, v, g, beta, reset, S0 = _inputs(k, v, g, beta, reset, S0, chunk_size)
    _, w, u = wy_forward(k, v, g, beta, reset, chunk_size)
    h, _, S = states_forward(k, w, u, g, reset, S0, chunk_size, torch.float32, store_u=False)
    return h, S


def delta_chunk_states_backward_triton(dh, dS, k, v, g, beta, reset, S0, chunk_size: int):
    """`(dk, dv, dg, dbeta, dS0)` from the gradients of the chunk-start states `dh
    [B,H,NC,Dk,Dv]` and of the final state `dS` (either may be None)."""
    k, v, g, beta, reset, S0 = _inputs(k, v, g, beta, reset, S0, chunk_size)
    TI, w, u = wy_forward(k, v, g, beta, reset, chunk_size)
    h, U, _ = states_forward(k, w, u, g, reset, S0, chunk_size, k.dtype)
    dh = None if dh is None else dh.float().contiguous()
    dS = None if dS is None else dS.float().contiguous()
    dSa, dU, dS0 = states_backward(None, k, w, None, None, g, reset, None, dh, dS, 1.0, chunk_size, v.shape[-1])
    _, dk_part, dG_part, _ = output_backward(None, k, U, h, dSa, None, None, g, reset, 1.0, chunk_size)
    dk, dv, dg, dbeta = wy_backward(k, v, g, beta, reset, TI, h, dU, dk_part, dG_part, chunk_size)
    return dk, dv, dg, dbeta, (dS0 if S0 is not None else None)
