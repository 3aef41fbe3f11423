"""The backbone stage: one state read out per query (SPEC §3.1).

It is the `single` policy (the plain backbone: linear attention, Mamba-2's SSD, DeltaNet, Gated
DeltaNet) and DLA's open block, which restarts at every boundary (`reset`).

| file | what it holds |
| --- | --- |
| `naive.py` | the reference: one state, token by token, in float64 |
| `ssd.py` | transitions without `β`: the chunked SSD in torch (any device, float32/float64), with its stage pieces |
| `ssd_states.py`, `ssd_output.py`, `ssd_triton.py` | the same in Triton: the sequential state pass, the chunk-parallel output and gradients, and the entry points |
| `delta.py` | transitions with `β`: the chunked (gated) delta rule in WY/UT form in torch, with its stage pieces |
| `delta_wy.py`, `delta_states.py`, `delta_output.py`, `delta_triton.py` | the same in Triton: the UT solve and `w, u`, the state pass, the output and gradients, and the entry points |

The rule (`backbone_forward`, `backbone_backward`): the torch kernels for float64 inputs and CPU
tensors, the Triton kernels for 16- and 32-bit CUDA tensors — without `β` the SSD, with `β` and
gates (Gated DeltaNet) the delta rule, each at its own chunk of 64 tokens (the result does not
depend on the chunk beyond rounding). With `β` and no gates (DeltaNet) CUDA tensors stay on the
torch delta rule: on an H100 (torch 2.11, Triton 3.6) the Triton kernels passed every gated case
of the GPU suite but missed the bf16 bound in one ungated case (`dq` 2.1e-2 at Dk = Dv = 128,
T = 4096; `perf/results/gpu_tests-h100.log`), and a launch configuration that passes both
ungated cases has not been found on the card yet. The miss comes with resets and shows in the
outputs of `delta_output._dqkwg_kernel` (`dq`, `dk`, `dλ0`), not in the bf16 storage the stages
share: the forward's `o` matches a bf16-storage emulation of the kernels to three digits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.backbone.delta import delta_backward, delta_forward
from dla.ops.backbone.delta_triton import delta_backward_triton, delta_forward_triton
from dla.ops.backbone.ssd import ssd_backward, ssd_forward
from dla.ops.backbone.ssd_triton import ssd_backward_triton, ssd_forward_triton

__all__ = ["backbone_forward", "backbone_backward", "backbone_forward_triton", "backbone_backward_triton"]

TRITON_CHUNK = 64  # the largest chunk the Triton backward holds in registers


def _zeros_for_absent(dg: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros(like.shape[:3], dtype=torch.float32, device=like.device) if dg is None else dg


def backbone_forward(q: Tensor, k: Tensor, v: Tensor, lam0: Tensor, g: Tensor | None, beta: Tensor | None,
                     S0: Tensor, scale: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`dla::backbone` on the tensors' device: `(o [B,T,H,Dv], S [B,H,Dk,Dv])`."""
    if q.is_cuda and q.dtype != torch.float64:
        return backbone_forward_triton(q, k, v, lam0, g, beta, S0, scale, chunk_size)
    if beta is not None:
        return delta_forward(q, k, v, lam0, g, beta, None, S0, scale, chunk_size)
    return ssd_forward(q, k, v, lam0, g, None, S0, scale, chunk_size)


def backbone_backward(do: Tensor, dS: Tensor, q: Tensor, k: Tensor, v: Tensor, lam0: Tensor, g: Tensor | None,
                      beta: Tensor | None, S0: Tensor, scale: float, chunk_size: int):
    """`dla::backbone_backward`: `(dq, dk, dv, dlam0, dg, dbeta, dS0)`, `dg`/`dbeta` float32 zeros
    `[B,T,H]` where `g`/`beta` is absent."""
    if q.is_cuda and q.dtype != torch.float64:
        return backbone_backward_triton(do, dS, q, k, v, lam0, g, beta, S0, scale, chunk_size)
    if beta is not None:
        return _delta_backward(do, dS, q, k, v, lam0, g, beta, S0, scale, chunk_size)
    dq, dk, dv, dlam0, dg, dS0 = ssd_backward(do, dS, q, k, v, lam0, g, None, S0, scale, chunk_size)
    return dq, dk, dv, dlam0, _zeros_for_absent(dg, q), _zeros_for_absent(None, q), dS0


def backbone_forward_triton(q, k, v, lam0, g, beta, S0, scale: float, chunk_size: int):
    """The CUDA side of the rule, for the tensors' device (CPU tensors run through the Triton
    interpreter, as under `dla.testing.triton_interpreter()`): the Triton SSD, or with `β` the
    Triton delta rule with gates, the torch delta rule without (module doc)."""
    if beta is not None and g is None:
        return delta_forward(q, k, v, lam0, g, beta, None, S0, scale, chunk_size)
    if beta is not None:
        return delta_forward_triton(q, k, v, lam0, g, beta, None, S0.float(), scale, TRITON_CHUNK)
    return ssd_forward_triton(q, k, v, lam0, g, None, S0, scale, TRITON_CHUNK)


def backbone_backward_triton(do, dS, q, k, v, lam0, g, beta, S0, scale: float, chunk_size: int):
    """The backward of `backbone_forward_triton`."""
    if beta is not None and g is None:
        return _delta_backward(do, dS, q, k, v, lam0, g, beta, S0, scale, chunk_size)
    if beta is not None:
        dq, dk, dv, dlam0, dg, dbeta, dS0 = delta_backward_triton(do, dS, q, k, v, lam0, g, beta, None, S0.float(),
                                                                  scale, TRITON_CHUNK)
        return dq, dk, dv, dlam0, dg, dbeta, dS0.to(S0.dtype)
    dq, dk, dv, dlam0, dg, dS0 = ssd_backward_triton(do, dS, q, k, v, lam0, g, None, S0, scale, TRITON_CHUNK)
    return dq, dk, dv, dlam0, _zeros_for_absent(dg, q), _zeros_for_absent(None, q), dS0


def _delta_backward(do, dS, q, k, v, lam0, g, beta, S0, scale: float, chunk_size: int):
    dq, dk, dv, dlam0, dg, dbeta, dS0 = delta_backward(do, dS, q, k, v, lam0, g, beta, None, S0, scale, chunk_size)
    return dq, dk, dv, dlam0, _zeros_for_absent(dg, q), dbeta, dS0
