r"""The SSD stage without `β` on CUDA (Triton): the same functions, signatures and math as
`ssd.py`, composed from the state pass (`ssd_states.py`) and the chunk-parallel kernels
(`ssd_output.py`):

    forward:   h, S = state pass (K, V)                    → o = output (Q, K, V, λ0, h)
    backward:  h = state pass (K, V);  D = reverse state pass (Q, dO, λ0, dS)
               → dq, dk, dv, dλ0, dg = chunk gradients (Q, K, V, dO, λ0, h, D)

Launches: 2 forward, 3 backward. Inputs `q, k, v, lam0` in one of bfloat16, float16, float32
(float64 stays on `ssd.py`), `g` float32 or their dtype, `reset` bool, `S0` and `dS` float32;
`chunk_size` 16, 32 or 64 (a power of two for the `[C, C]` tiles, at most 64 for the backward's
registers). `h` of `ssd_chunk_states_triton` is stored in the inputs' dtype: 16-bit states are
rounded once, for the GEMMs that read them (as fla stores its chunk states); the final state and
`dS0` are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.backbone.ssd import check_ssd_args
from dla.ops.backbone.ssd_output import output_backward, output_forward
from dla.ops.backbone.ssd_states import state_backward, state_forward
from dla.ops.triton_utils import check_state_offsets

__all__ = ["ssd_forward_triton", "ssd_backward_triton", "ssd_chunk_states_triton", "ssd_chunk_states_backward_triton",
           "CHUNK_SIZES"]

CHUNK_SIZES = (16, 32, 64)


def _check(name: str, k: Tensor, v: Tensor, chunk_size: int) -> None:
    if k.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name}: inputs must be bfloat16, float16 or float32 (float64 runs on dla.ops.backbone.ssd), "
                        f"got {k.dtype}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"{name}: chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    _, T, H, Dk = k.shape
    check_state_offsets(name, T, H, Dk, v.shape[-1], chunk_size)


def _contiguous(*xs: Tensor | None) -> list[Tensor | None]:
    return [None if x is None else x.contiguous() for x in xs]


def _state(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.to(torch.float32).contiguous()


def ssd_chunk_states_triton(k: Tensor, v: Tensor, g: Tensor | None, reset: Tensor | None, S0: Tensor | None,
                            chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(h [B,H,NC,Dk,Dv] in k's dtype, S [B,H,Dk,Dv] float32)`: the state before each chunk
    and the final state."""
    check_ssd_args("ssd_chunk_states_triton", k, v, g, reset, S0, chunk_size)
    _check("ssd_chunk_states_triton", k, v, chunk_size)
    k, v, g, reset = _contiguous(k, v, g, reset)
    return state_forward(k, v, g, reset, _state(S0), chunk_size)


def ssd_chunk_states_backward_triton(dh: Tensor | None, dS_final: Tensor | None, k: Tensor, v: Tensor,
                                     g: Tensor | None, reset: Tensor | None, S0: Tensor | None, chunk_size: int):
    """`(dk, dv, dg, dS0)` of `ssd_chunk_states_triton` for the gradients `dh` of `h` and
    `dS_final` of `S` (either None: zero); `dg` None without `g`, `dS0` None without `S0`."""
    name = "ssd_chunk_states_backward_triton"
    check_ssd_args(name, k, v, g, reset, S0, chunk_size)
    _check(name, k, v, chunk_size)
    k, v, g, reset, dh = _contiguous(k, v, g, reset, dh)
    S0c = _state(S0)
    h = state_forward(k, v, g, reset, S0c, chunk_size)[0] if g is not None else None
    dhe, dS0 = state_backward(None, None, None, dh, _state(dS_final), k, v, g, reset, S0 is not None, 1.0,
                              chunk_size)
    _, dk, dv, _, dg = output_backward(None, k, v, None, None, g, reset, h, dhe, 1.0, chunk_size)
    return dk, dv, dg, None if dS0 is None else dS0.to(S0.dtype)


def ssd_forward_triton(q: Tensor, k: Tensor, v: Tensor, lam0: Tensor, g: Tensor | None, reset: Tensor | None,
                       S0: Tensor | None, scale: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,Dk,Dv] float32)` (`ssd.py`'s module doc)."""
    check_ssd_args("ssd_forward_triton", k, v, g, reset, S0, chunk_size, q=q, lam0=lam0)
    _check("ssd_forward_triton", k, v, chunk_size)
    q, k, v, lam0, g, reset = _contiguous(q, k, v, lam0, g, reset)
    h, S = state_forward(k, v, g, reset, _state(S0), chunk_size)
    if q.shape[1] == 0:
        return q.new_empty(*q.shape[:3], v.shape[-1]), S
    return output_forward(q, k, v, lam0, g, reset, h, scale, chunk_size), S


def ssd_backward_triton(do: Tensor | None, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, lam0: Tensor,
                        g: Tensor | None, reset: Tensor | None, S0: Tensor | None, scale: float, chunk_size: int):
    """`(dq, dk, dv, dlam0, dg, dS0)` of `ssd_forward_triton` for the gradients `do` of `o` and
    `dS` of `S` (either None: zero); `dg` None without `g`, `dS0` None without `S0`."""
    check_ssd_args("ssd_backward_triton", k, v, g, reset, S0, chunk_size, q=q, lam0=lam0)
    _check("ssd_backward_triton", k, v, chunk_size)
    if do is None:
        dk, dv, dg, dS0 = ssd_chunk_states_backward_triton(None, dS, k, v, g, reset, S0, chunk_size)
        return torch.zeros_like(q), dk, dv, torch.zeros_like(lam0), dg, dS0
    q, k, v, lam0, g, reset, do = _contiguous(q, k, v, lam0, g, reset, do.to(q.dtype))
    h = state_forward(k, v, g, reset, _state(S0), chunk_size)[0]
    dhe, dS0 = state_backward(q, do, lam0, None, _state(dS), k, v, g, reset, S0 is not None, scale, chunk_size)
    dq, dk, dv, dlam, dg = output_backward(q, k, v, do, lam0, g, reset, h, dhe, scale, chunk_size)
    return dq, dk, dv, dlam, dg, None if dS0 is None else dS0.to(S0.dtype)
