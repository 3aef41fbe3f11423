"""Registration of `dla::segment`, `dla::readout` and `dla::readout_backward` (SCHEMAS.md).

Each op gets a CPU kernel in plain torch (`dla/ops/segment.py`, `dla/ops/readout.py`), a
CUDA kernel in Triton (`dla/ops/triton/`), a fake (meta) rule for tracing, and `readout` an
autograd rule whose backward is itself an op, so code calling them compiles as one graph with
`torch.compile(fullgraph=True)` and AOT autograd produces the backward.

`register_ops` is a factory so that tests can register the same schemas under another
namespace with other kernels — e.g. the Triton launchers on CPU tensors under the interpreter,
which lets `opcheck` and compile tests cover the Triton path without a GPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SEGMENT = (
    "segment(Tensor k, Tensor v, Tensor n0, Tensor I0, Tensor m0, Tensor Z0, Tensor zz0, Tensor step0, "
    "int levels, str policy, str score, float tau, int chunk_size) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
READOUT = (
    "readout(Tensor q, Tensor k, Tensor v, Tensor lam, Tensor? g, Tensor? beta, Tensor level_start, "
    "Tensor S0, float scale, int chunk_size) -> (Tensor, Tensor)"
)
READOUT_BACKWARD = (
    "readout_backward(Tensor do, Tensor dS, Tensor q, Tensor k, Tensor v, Tensor lam, Tensor? g, "
    "Tensor? beta, Tensor level_start, Tensor S0, float scale, int chunk_size) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_LIBRARIES: dict[str, torch.library.Library] = {}  # keep each Library alive


def _segment_fake(k, v, n0, I0, m0, Z0, zz0, step0, levels, policy, score, tau, chunk_size):
    B, T, H, _ = k.shape
    return (
        k.new_empty(B, T, H, levels, dtype=torch.int32),
        *(_contiguous_like(x) for x in (n0, I0, m0, Z0, zz0)),
    )


def _readout_fake(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size):
    return torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device), _contiguous_like(S0)


def _contiguous_like(x: Tensor, **kw) -> Tensor:
    """A contiguous tensor of x's shape (`empty_like` would copy a view's strides)."""
    return torch.empty(x.shape, **{"dtype": x.dtype, "device": x.device, **kw})


def _gate_grad_like(x: Tensor | None, like: Tensor) -> Tensor:
    return _contiguous_like(x) if x is not None else torch.empty(like.shape[:3], dtype=torch.float32, device=like.device)


def _readout_backward_fake(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size):
    # the kernels return contiguous gradients whatever the inputs' strides: so must the fake
    return tuple(_contiguous_like(x) for x in (q, k, v, lam)) + (
        _gate_grad_like(g, q), _gate_grad_like(beta, q), _contiguous_like(S0))


def register_ops(namespace: str, kernels: dict[str, dict[str, Callable]]):
    """Define the three ops in `namespace`; `kernels[device] = {"segment", "readout",
    "readout_backward"}` gives the implementation for each device type."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    _LIBRARIES[namespace] = lib
    for schema in (SEGMENT, READOUT, READOUT_BACKWARD):
        lib.define(schema)
    for device, impls in kernels.items():
        for name, fn in impls.items():
            torch.library.impl(f"{namespace}::{name}", device, fn, lib=lib)
    torch.library.register_fake(f"{namespace}::segment", _segment_fake, lib=lib)
    torch.library.register_fake(f"{namespace}::readout", _readout_fake, lib=lib)
    torch.library.register_fake(f"{namespace}::readout_backward", _readout_backward_fake, lib=lib)
    ops = getattr(torch.ops, namespace)

    def setup_context(ctx, inputs, output):
        q, k, v, lam, g, beta, level_start, S0, scale, chunk_size = inputs
        ctx.save_for_backward(q, k, v, lam, g, beta, level_start, S0)
        ctx.scale, ctx.chunk_size = scale, chunk_size

    def backward(ctx, do, dS):
        q, k, v, lam, g, beta, level_start, S0 = ctx.saved_tensors
        do = torch.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device) if do is None else do
        dS = torch.zeros_like(S0) if dS is None else dS
        dq, dk, dv, dlam, dg, dbeta, dS0 = ops.readout_backward(
            do, dS, q, k, v, lam, g, beta, level_start, S0, ctx.scale, ctx.chunk_size)
        return (dq, dk, dv, dlam, dg if g is not None else None, dbeta if beta is not None else None,
                None, dS0, None, None)

    torch.library.register_autograd(f"{namespace}::readout", backward, setup_context=setup_context, lib=lib)
    return ops


def _cuda_segment(*args):
    from dla.ops.triton.segment import segment_triton

    return segment_triton(*args)


SCALAR_READOUT = "auto"
"""Which CUDA kernel reads out transitions without `β`: `"scan"` (the chunked scan of
`dla/ops/triton/readout_scan.py`, linear in T, its cost growing with the slot count K),
`"masked"` (the masked quadratic form of `dla/ops/triton/readout_masked.py`, O(T²) but without
a sequential part, its cost nearly independent of K), or `"auto"`: the scan where
`scan_pays(T, K)` (and `Dk ≤ 128`, the scan's limit). With `β` the scan always runs. Results
agree to rounding (both are held to the same oracles), so this is a speed setting, read when
the op runs."""
SCAN_SLOTS_PER_KTOKEN = 5.7
SCAN_SLOTS_OFFSET = 1.5


def scan_pays(T: int, K: int) -> bool:
    """The scan beats the masked kernels when `K ≤ 5.7·T/1024 − 1.5` (K ≤ 9 at T = 2048, 21 at
    4096, 44 at 8192). Fitted on Mamba-2 forward+backward, 32,768 tokens, H = 16, Dk = Dv = 128,
    bf16, both kernels in one call on one H200 (`perf/results/bench_gpu_scan-h200.md`,
    `bench_gpu_masked-h200.md`): the scan took about 20 + 2.8·K ms at every T (25.8 / 67.3 /
    102.5 ms for K = 2 / 16 / 32 at T = 2048), the masked kernels about 15.5 + 16·T/1024 ms for
    K ≥ 16 (47 / 78 / 147 ms at T = 2048 / 4096 / 8192) and less for K = 2 (34 / 61 / 119 ms).
    The rule picks the faster kernel at each of those 12 points (one a near-tie: fenwick, K = 16,
    at T = 4096, 76.8 against 77.8 ms) and at each of the 8 H100 points of `bench_gpu-h100.md`
    and `bench_gpu_scan-h100.md` (T = 2048, 8192; earlier calls)."""
    return K <= SCAN_SLOTS_PER_KTOKEN * T / 1024 - SCAN_SLOTS_OFFSET


def _scalar_kernel(q: Tensor, lam: Tensor) -> str:
    if SCALAR_READOUT not in ("auto", "scan", "masked"):
        raise ValueError(f"dla.compile.ops.SCALAR_READOUT must be 'auto', 'scan' or 'masked', got {SCALAR_READOUT!r}")
    if SCALAR_READOUT != "auto":
        return SCALAR_READOUT
    return "scan" if q.shape[3] <= 128 and scan_pays(q.shape[1], lam.shape[-1]) else "masked"


def _cuda_readout(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size):
    if beta is not None or _scalar_kernel(q, lam) == "scan":
        from dla.ops.triton.readout_scan import readout_forward_triton
    else:
        from dla.ops.triton.readout_masked import readout_forward_triton

    return readout_forward_triton(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)


def _cuda_readout_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size):
    if beta is not None or _scalar_kernel(q, lam) == "scan":
        from dla.ops.triton.readout_scan import readout_backward_triton
    else:
        from dla.ops.triton.readout_masked import readout_backward_triton

    return readout_backward_triton(do, dS, q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)


def _cpu_kernels() -> dict[str, Callable]:
    from dla.ops.readout import readout_backward, readout_forward
    from dla.ops.segment import segment

    return {"segment": segment, "readout": readout_forward, "readout_backward": readout_backward}


ops = register_ops("dla", {
    "cpu": _cpu_kernels(),
    "cuda": {"segment": _cuda_segment, "readout": _cuda_readout, "readout_backward": _cuda_readout_backward},
})
