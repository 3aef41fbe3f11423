"""The Log-Linear Mamba-2 reference (Guo et al. 2025, the `hattention` package of
github.com/HanGuo97/log-linear-attention) as a same-run timing anchor for `perf/bench_gpu.py`.

Its source is not a dependency of `dla` and is never committed here: fetch the repository, put
its `hattention/` folder under a directory, carry that directory to the GPU machine, and pass it
as `--loglinear DIR`. Three things are changed at load time, for timing only (the benchmark prints
this):

* the package is loaded without its `__init__`, which imports its model classes and through them
  `mamba_ssm` and `causal_conv1d` (compiled extensions the kernels do not use);
* fla 0.6 no longer has two names the package imports: `fla.ops.utils.op.safe_exp` is supplied
  with its old definition (`exp(x)` for `x ≤ 0`, 0 above) and `fla.utils.use_cuda_graph` with its
  old default, off;
* fla 0.6's `chunk_local_cumsum` refuses the `head_first` and `offsets` keywords the package
  passes (it always passes `head_first=False` and `offsets=None`, which are fla 0.6's layout and
  default): the package's modules see a wrapper that drops them, refusing any other value;
* its level table `make_levels_matrix` is replaced by the same table computed in one vectorised
  expression: the original reads `16384²` tables from absolute paths of the authors' machines, or
  else builds them with a Python loop over every pair of positions. The weak base-2 table is
  `bitlen(t XOR s)` for `s < t`, 0 on the diagonal — the `fenwick` policy's levels (SPEC §2), which
  is why `verify` can hold its output to our float64 `fenwick` path.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import triton
import triton.language as tl

NOTE = ("Log-Linear Mamba-2: the hattention reference kernels, loaded without the package __init__, with "
        "fla's old safe_exp supplied, chunk_local_cumsum's removed head_first/offsets keywords dropped and a "
        "vectorised level table (timing only)")


@triton.jit
def _safe_exp(x):
    return tl.exp(tl.where(x <= 0, x, float("-inf")))


def _levels_matrix(length, base, htype, dtype, device, default=-1, clamp_min=None, file_name=None, cached_length=None):
    if base != 2 or htype.name != "WEAK":
        raise NotImplementedError("only the weak base-2 table is vectorised")
    t = torch.arange(length, device=device)
    xor = t[:, None] ^ t[None, :]
    levels = torch.where(xor > 0, torch.frexp(xor.double()).exponent.long(), 0)  # bitlen
    levels = torch.where(t[None, :] <= t[:, None], levels, default).to(dtype)
    return levels.clamp(min=clamp_min) if clamp_min is not None else levels


def _local_cumsum(cumsum):
    def wrapper(g, chunk_size, *args, head_first=False, offsets=None, **kwargs):
        if head_first or offsets is not None:
            raise NotImplementedError("the Log-Linear anchor runs [B, T, H] layouts without offsets only")
        return cumsum(g, chunk_size, *args, **kwargs)

    return wrapper


def load(directory: str | Path):
    """`hattention.kernel` from `directory/hattention`, with `make_levels_matrix` replaced."""
    root = Path(directory) / "hattention"
    if not (root / "kernel.py").exists():
        raise FileNotFoundError(f"--loglinear: no hattention/kernel.py under {directory}")
    import fla.ops.utils.op as fla_op  # fla is only on the GPU machine, carried as a wheel
    import fla.utils as fla_utils

    for module, name, old in ((fla_op, "safe_exp", _safe_exp), (fla_utils, "use_cuda_graph", False)):
        if not hasattr(module, name):
            setattr(module, name, old)
    package = types.ModuleType("hattention")
    package.__path__ = [str(root)]
    sys.modules["hattention"] = package
    base = importlib.import_module("hattention.base")
    base.make_levels_matrix = _levels_matrix
    for name in ("hattention.chunkwise", "hattention.parallel"):
        importlib.import_module(name).make_levels_matrix = _levels_matrix
    kernel = importlib.import_module("hattention.kernel")
    for module in (importlib.import_module("hattention.chunkwise"), kernel):
        module.chunk_local_cumsum = _local_cumsum(module.chunk_local_cumsum)
    return kernel, base


def mamba2(directory: str | Path):
    """`f(q, k, v, g, lam) -> o`: Log-Linear Mamba-2 on our layouts (`q, k [B,T,H,Dk]`,
    `v [B,T,H,Dv]`, `g [B,T,H]`, `lam [B,T,H,L]` with `L = bitlen(T − 1) + 1` levels), chunk 64,
    no scale (SSD's convention)."""
    kernel, base = load(directory)

    def run(q, k, v, g, lam):
        return kernel.hattention_kernel(q=q, k=k, v=v, b=None, g=g, l=lam, scale=None, head_first=False,
                                        level_base=2, htype=base.HType.WEAK, hstruct=base.HStruct.MAMBA2)

    return run
