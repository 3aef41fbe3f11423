"""Launch options of the readout-with-β kernels (`dla.ops.readout.objects_delta_triton.LAUNCH`)
on a GPU, each verified before it is timed.

    python -m perf.sweep_readout_gpu --out DIR [--length 2048] [--kernels NAME ...]

The readout by windows is most of DLA-Gated DeltaNet's layer (`perf/results/profile_windows-h100.md`),
and its kernels launched at 8 warps, chosen from ptxas's register counts, until this sweep found
4 faster for the four heaviest (`perf/results/sweep_readout-h100.md`), as the WY stage's sweep
(`perf/results/sweep_wy-h100.md`) had for its kernels: spills that register counts do not price.
For each kernel and candidate options, this sets `LAUNCH[kernel]` for the run, then on SPEC §7's Gated DeltaNet inputs (32,768
tokens, H = 16, Dk = Dv = 128, bf16, sparse regime, DLA K = 32 under the `token` score, as
`perf.bench_gpu` times it):

- runs the operator's forward and backward once with `torch.empty` poisoned (NaN), and compares
  `o` and the gradients of `q, k, v, λ, g, β` with the shipped launch's as `‖out − ref‖ / ‖ref‖`
  (the GPU tests hold the shipped launch to float64);
- times the layer's fwd+bwd (median ms, `triton.testing.do_bench`) and the kernel's own CUDA
  time in one fwd+bwd (`torch.profiler`).

A configuration that does not compile or run (shared memory, registers) is a row with its error.
Writes `sweep_readout.json` and `sweep_readout.md` to DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

import torch

import dla.ops.readout.objects_delta_triton as kernels
from dla import multistate_attention
from dla.testing import poisoned_empty, relative_error
from perf.inputs import layer_inputs
from perf.sweep import measured, write_sweep

TOKENS, HEADS, DIM, LEVELS = 32768, 16, 128, 32
# the four heaviest kernels take the same candidates
HEAVY = [dict(num_warps=8), dict(num_warps=4, num_stages=2), dict(num_warps=2), dict(num_warps=8, num_stages=2)]
# candidates by kernel, the shipped options (kernels.LAUNCH) first in every sweep; the heaviest
# kernels of the layer's profile first
CANDIDATES = {
    **dict.fromkeys(("_readout_bwd_band_kernel", "_readout_bwd_chain_kernel", "_readout_kernel", "_ut_bwd_kernel"),
                    HEAVY),
    "_object_bwd_kernel": [dict(num_warps=4, num_stages=1), dict(num_warps=16, num_stages=1)],
    "_suffix_bwd_kernel": [dict(num_warps=4, num_stages=1), dict(num_warps=16, num_stages=1)],
    "_object_kernel": [dict(num_warps=4), dict(num_warps=4, num_stages=2)],
    "_suffix_kernel": [dict(num_warps=4), dict(num_warps=4, num_stages=2)],
}
NAMES = ("o", "dq", "dk", "dv", "dlam", "dg", "dbeta")


@contextlib.contextmanager
def launch_options(kernel: str, options: dict):
    """`LAUNCH[kernel]` is `options` inside the block (the launchers read it at each call)."""
    if kernel not in kernels.LAUNCH:
        raise KeyError(f"{kernel!r} is not one of the readout's kernels {sorted(kernels.LAUNCH)}")
    shipped = kernels.LAUNCH[kernel]
    kernels.LAUNCH[kernel] = dict(options)
    try:
        yield
    finally:
        kernels.LAUNCH[kernel] = shipped


def layer(T: int):
    """`step()` → `(o, dq, dk, dv, dλ, dg, dβ)`: one fwd+bwd of DLA K = 32 with `β` on the sparse
    regime's inputs, the gradients of ⟨o, R⟩ for a fixed random R."""
    t = layer_inputs(TOKENS // T, T, HEADS, DIM, DIM, LEVELS, backbone="gdn", dtype=torch.bfloat16, device="cuda")
    leaves = {n: t[n].detach().requires_grad_() for n in ("q", "k", "v", "lam", "g", "beta")}
    do = torch.randn_like(leaves["v"])
    attend = functools.partial(multistate_attention, policy="dla", score="token")

    def step():
        for x in leaves.values():
            x.grad = None
        o = attend(leaves["q"], leaves["k"], leaves["v"], leaves["lam"], g=leaves["g"], beta=leaves["beta"])
        torch.autograd.backward(o, do)
        return (o.detach(), *(leaves[n].grad for n in ("q", "k", "v", "lam", "g", "beta")))

    return step


def kernel_ms(step, kernel: str) -> float:
    """The kernel's CUDA time in one fwd+bwd (ms, all its launches)."""
    from perf.profile_gpu import kernel_times

    return kernel_times(step).get(kernel, {"us": 0.0})["us"] / 1e3


def run(T: int, names: list[str]) -> list[dict]:
    from triton.testing import do_bench

    step = layer(T)
    with poisoned_empty():
        reference = [x.double() for x in step()]
    rows = []
    for kernel in names:
        for options in [kernels.LAUNCH[kernel]] + CANDIDATES[kernel]:
            def measure(row: dict) -> None:
                with launch_options(kernel, options):
                    with poisoned_empty():  # an element left unwritten shows as NaN in the errors
                        got = step()
                    torch.cuda.synchronize()
                    row["errors"] = {n: relative_error(a, b) for n, a, b in zip(NAMES, got, reference)}
                    row["kernel_ms"] = kernel_ms(step, kernel)
                    row["layer_ms"] = do_bench(step, warmup=250, rep=1000, return_mode="median")  # ms budgets

            # the shipped row's own errors are the run-to-run floor (atomic sums are not ordered)
            shipped = options == kernels.LAUNCH[kernel]
            rows.append(measured({"T": T, "kernel": kernel, "options": dict(options), "shipped": shipped}, measure))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--kernels", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.length, args.kernels)

    def cells(r: dict) -> list[str]:
        options = ", ".join(f"{k.removeprefix('num_')} {v}" for k, v in r["options"].items())
        head = [r["kernel"], options, "yes" if r["shipped"] else ""]
        if "error" in r:
            return head + [r["error"][:60], "", ""]
        worst = max(r["errors"], key=r["errors"].get)
        return head + [f"{worst} {r['errors'][worst]:.1e}", f"{r['kernel_ms']:.2f}", f"{r['layer_ms']:.2f}"]

    write_sweep(args.out, "sweep_readout", "readout-with-β launch options",
                f"T = {args.length}, 32,768 tokens, H = 16, Dk = Dv = 128, bf16, DLA K = 32, sparse, token score "
                "(perf/sweep_readout_gpu.py)",
                ["kernel", "options", "shipped", "worst error vs shipped", "kernel ms", "layer fwd+bwd ms"], rows,
                cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
