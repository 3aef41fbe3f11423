"""Registration of `dla::segment`, `dla::readout`, `dla::backbone` and their backward ops, and of
the Triton ops `dla::readout_without_beta` and `dla::readout_without_beta_backward` (SCHEMAS.md).

Each op takes its kernels from its stage in `dla/ops` — `dla.ops.segment.segment`,
`dla.ops.readout.readout_forward` / `readout_backward`, `dla.ops.backbone.backbone_forward` /
`backbone_backward` — whose documented rule picks the kernel for the tensors' device (torch on
the CPU, Triton on CUDA). These are opaque custom ops: each gets a fake (meta) rule for tracing,
and the two differentiable ones an autograd rule whose backward is itself an op, so code calling
them compiles as one graph with `torch.compile(fullgraph=True)` and AOT autograd produces the
backward. The CUDA readout without `β` launches only fixed grids and allocates nothing from
tensor values (its plan is torch, its choice between object and dense heads is made on the
device), so it is also registered through `torch.library.triton_op`: `torch.compile` sees its
Triton kernels (`readout` below picks it for CUDA tensors without `β`).
(`dla.testing.triton_interpreter()` swaps the CPU kernels for the
Triton path through the interpreter for the length of a `with` block.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.backbone import backbone_backward, backbone_forward
from dla.ops.readout import readout_backward, readout_forward
from dla.ops.readout.objects_triton import mixed_backward, mixed_forward
from dla.ops.segment import segment

SEGMENT = (
    "segment(Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor S0, Tensor n0, Tensor I0, Tensor m0, Tensor Z0, "
    "Tensor zz0, Tensor N0, Tensor step0, int levels, str policy, str score, float tau, int chunk_size, "
    "Tensor? end=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
READOUT = (
    "readout(Tensor q, Tensor k, Tensor v, Tensor lam, Tensor? g, Tensor? beta, Tensor level_start, "
    "Tensor S0, float scale, int chunk_size, Tensor? step=None, bool final=True) -> (Tensor, Tensor)"
)
READOUT_BACKWARD = (
    "readout_backward(Tensor do, Tensor? dS, Tensor q, Tensor k, Tensor v, Tensor lam, Tensor? g, "
    "Tensor? beta, Tensor level_start, Tensor S0, float scale, int chunk_size, Tensor? step=None, "
    "bool dS0_needed=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

BACKBONE = (
    "backbone(Tensor q, Tensor k, Tensor v, Tensor lam0, Tensor? g, Tensor? beta, Tensor S0, float scale, "
    "int chunk_size) -> (Tensor, Tensor)"
)
BACKBONE_BACKWARD = (
    "backbone_backward(Tensor do, Tensor dS, Tensor q, Tensor k, Tensor v, Tensor lam0, Tensor? g, Tensor? beta, "
    "Tensor S0, float scale, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _segment_fake(k, v, g, beta, S0, n0, I0, m0, Z0, zz0, N0, step0, levels, policy, score, tau, chunk_size,
                  end=None):
    B, T, H, _ = k.shape
    return (
        k.new_empty(B, T, H, levels, dtype=torch.int32),
        *(_contiguous_like(x) for x in (n0, I0, m0, Z0, zz0, N0)),
    )


def _readout_fake(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step=None, final=True):
    o = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    return o, _contiguous_like(S0) if final else S0.new_empty(0)


def _contiguous_like(x: Tensor, **kw) -> Tensor:
    """A contiguous tensor of x's shape (`empty_like` would copy a view's strides)."""
    return torch.empty(x.shape, **{"dtype": x.dtype, "device": x.device, **kw})


def _gate_grad_like(x: Tensor | None, like: Tensor) -> Tensor:
    return _contiguous_like(x) if x is not None else torch.empty(like.shape[:3], dtype=torch.float32, device=like.device)


def _readout_backward_fake(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step=None,
                           dS0_needed=True):
    # the kernels return contiguous gradients whatever the inputs' strides: so must the fake
    return tuple(_contiguous_like(x) for x in (q, k, v, lam)) + (
        _gate_grad_like(g, q), _gate_grad_like(beta, q), _contiguous_like(S0) if dS0_needed else S0.new_empty(0))


def _backbone_fake(q, k, v, lam0, g, beta, S0, scale, chunk_size):
    return torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device), _contiguous_like(S0)


def _backbone_backward_fake(do, dS, q, k, v, lam0, g, beta, S0, scale, chunk_size):
    return tuple(_contiguous_like(x) for x in (q, k, v, lam0)) + (
        _gate_grad_like(g, q), _gate_grad_like(beta, q), _contiguous_like(S0))


def _register() -> torch.library.Library:
    lib = torch.library.Library("dla", "DEF")
    for schema in (SEGMENT, READOUT, READOUT_BACKWARD, BACKBONE, BACKBONE_BACKWARD):
        lib.define(schema)
    kernels = (("segment", segment), ("readout", readout_forward), ("readout_backward", readout_backward),
               ("backbone", backbone_forward), ("backbone_backward", backbone_backward))
    for name, kernel in kernels:
        lib.impl(name, kernel, "CPU")
        lib.impl(name, kernel, "CUDA")
    for name, fake in (("segment", _segment_fake), ("readout", _readout_fake), ("readout_backward", _readout_backward_fake),
                       ("backbone", _backbone_fake), ("backbone_backward", _backbone_backward_fake)):
        torch.library.register_fake(f"dla::{name}", fake, lib=lib)
    torch.library.register_autograd("dla::readout", _readout_grad, setup_context=_readout_setup_context, lib=lib)
    torch.library.register_autograd("dla::backbone", _backbone_grad, setup_context=_backbone_setup_context, lib=lib)
    return lib


def _readout_setup_context(ctx, inputs, output):
    q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step, final = inputs  # defaults filled in
    ctx.save_for_backward(q, k, v, lam, g, beta, level_start, S0, step)
    ctx.scale, ctx.chunk_size, ctx.final = scale, chunk_size, final
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros


def _readout_grad(ctx, do, dS):
    q, k, v, lam, g, beta, level_start, S0, step = ctx.saved_tensors
    do = torch.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device) if do is None else do
    # an unused final state (dS None) and initial states without a gradient (the empty cache's)
    # cost the backward nothing: no [B,H,K,Dk,Dv] zeros made for the one, no sum for the other
    dS0_needed = ctx.needs_input_grad[7]
    dS = dS if ctx.final else None  # the empty S of a call without a final state has no gradient to pass on
    dq, dk, dv, dlam, dg, dbeta, dS0 = torch.ops.dla.readout_backward(
        do, dS, q, k, v, lam, g, beta, level_start, S0, ctx.scale, ctx.chunk_size, step, dS0_needed)
    return (dq, dk, dv, dlam, dg if g is not None else None, dbeta if beta is not None else None,
            None, dS0 if dS0_needed else None, None, None, None, None)


def _backbone_setup_context(ctx, inputs, output):
    q, k, v, lam0, g, beta, S0, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, lam0, g, beta, S0)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _backbone_grad(ctx, do, dS):
    q, k, v, lam0, g, beta, S0 = ctx.saved_tensors
    do = torch.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device) if do is None else do
    dS = torch.zeros_like(S0) if dS is None else dS
    dq, dk, dv, dlam0, dg, dbeta, dS0 = torch.ops.dla.backbone_backward(
        do, dS, q, k, v, lam0, g, beta, S0, ctx.scale, ctx.chunk_size)
    return (dq, dk, dv, dlam0, dg if g is not None else None, dbeta if beta is not None else None, dS0, None, None)


LIBRARY = _register()  # kept alive: the registrations last as long as this object


@torch.library.triton_op("dla::readout_without_beta", mutates_args=())
def readout_without_beta(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, g: Tensor | None, level_start: Tensor,
                         S0: Tensor, scale: float, step: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """`(o, S, plan)` of `dla::readout` without β, by the Triton kernels (object and dense heads);
    `plan` (int32, no gradient) is the object plan and the row modes, which the backward reads
    instead of building them again."""
    return mixed_forward(q, k, v, lam, g, level_start, S0, scale, step, keep_plan=True)


@torch.library.triton_op("dla::readout_without_beta_backward", mutates_args=())
def readout_without_beta_backward(do: Tensor, dS: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor,
                                  g: Tensor | None, level_start: Tensor, S0: Tensor, scale: float, step: Tensor | None,
                                  S: Tensor, plan: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(dq, dk, dv, dlam, dg, dS0)`; `S` and `plan` are the forward's; `dg` float32 zeros without g."""
    return mixed_backward(do, dS, q, k, v, lam, g, level_start, S0, scale, step, S, plan=plan)


def _without_beta_setup_context(ctx, inputs, output):
    q, k, v, lam, g, level_start, S0, scale, step = inputs
    ctx.save_for_backward(q, k, v, lam, g, level_start, S0, step, output[1], output[2])
    ctx.scale = scale


def _without_beta_grad(ctx, do, dS, _plan):
    q, k, v, lam, g, level_start, S0, step, S, plan = ctx.saved_tensors
    do = torch.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device) if do is None else do
    dS = torch.zeros_like(S) if dS is None else dS
    dq, dk, dv, dlam, dg, dS0 = torch.ops.dla.readout_without_beta_backward(
        do, dS, q, k, v, lam, g, level_start, S0, ctx.scale, step, S, plan)
    return dq, dk, dv, dlam, dg if g is not None else None, None, dS0.to(S0.dtype), None, None


readout_without_beta.register_autograd(_without_beta_grad, setup_context=_without_beta_setup_context)


def readout(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int, step, final: bool = True):
    """The readout op for these tensors: `dla::readout_without_beta` for 16/32-bit CUDA tensors
    without β (so that `torch.compile` sees its Triton kernels), else the opaque `dla::readout`.
    `final` false: the caller reads no final state, which `dla::readout` then neither makes nor
    returns (`S` empty); the op without β makes it anyway (its backward reads it)."""
    if beta is None and q.is_cuda and q.dtype != torch.float64:
        o, S, _ = torch.ops.dla.readout_without_beta(q, k, v, lam, g, level_start, S0, scale, step)
        return o, S
    return torch.ops.dla.readout(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step, final)
