"""GPU benchmark of the backbone stage without β (`dla.ops.backbone.ssd_triton`) beside fla's SSD.

    python -m perf.bench_ssd_gpu --out DIR [--lengths 2048 8192 32768] [--rep 200] [--smoke]

SPEC §7's `single` target: forward+backward within 1.3× of fla's `chunk_simple_gla` at 32,768
tokens per call, H = 16, Dk = Dv = 128, bf16, Mamba-2 decays (`perf/inputs.py`). First checks
the Triton kernels against the float64 torch path (`dla.ops.backbone.ssd`) on the same card
(bf16 and float32, with and without resets and an initial state: a kernel that is fast and wrong
is not reported as fast), then times (median ms, `triton.testing.do_bench`): our forward and
forward+backward without resets and with resets at 2% of tokens (DLA's open block restarts at
every boundary), each stage alone, and fla's kernel when it imports. Writes `bench_ssd_gpu.json`
and `bench_ssd_gpu.md` to DIR (with the bytes/FLOPs model of `costs`) and prints the table.

`--smoke` runs the same code on the CPU through the Triton interpreter at tiny shapes (timings
there are meaningless): a check that the script works, not a measurement.

fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1 (fla issue #640); as
`perf/bench_gpu.py` does, its check is switched off for fla's *timings only*, and said so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from perf.inputs import layer_inputs

TOKENS, HEADS, DIM, CHUNK = 32768, 16, 128, 64
RESET_RATE = 0.02
PEAK_BYTES_PER_S, PEAK_FLOP_PER_S = 3.35e12, 800e12  # H100 SXM: HBM3 bandwidth, dense bf16


def costs(batch: int, length: int, heads: int, dk: int, dv: int, chunk: int, elem: int = 2) -> list[dict]:
    """Bytes moved (DRAM, each operand once per kernel: tiles re-read by one program hit L2) and
    FLOPs (tensor-core GEMMs as executed, the masked half of the `[C, C]` tiles included) of
    each kernel of our forward and backward. `elem` bytes per input element; states and their
    gradients are stored in the inputs' dtype, `g` float32, `λ0` in the inputs' dtype."""
    P = batch * length * heads  # token-heads
    states = batch * heads * math.ceil(length / chunk) * dk * dv * elem
    scalars = P * (4 + elem)  # g and λ0 (reset bytes, 1 per token when given, left out)
    rows = [
        ("state_fwd", P * (dk + dv) * elem + P * 4 + states, 2 * P * dk * dv),
        ("output_fwd", P * (2 * dk + 2 * dv) * elem + scalars + states, 2 * P * (dk * dv + chunk * (dk + dv))),
        ("state_bwd", P * (dk + dv) * elem + scalars + states, 2 * P * dk * dv),
        ("output_bwd", P * (2 * dk + 2 * dv) * elem + scalars + 2 * states + P * (2 * dk + dv) * elem + P * (elem + 4),
         2 * P * (3 * dk * dv + 3 * chunk * (dk + dv))),
    ]
    out = [dict(kernel=name, bytes=b, flop=f) for name, b, f in rows]
    for passes, kernels in (("forward", ("state_fwd", "output_fwd")),
                            ("backward", ("state_fwd", "state_bwd", "output_bwd"))):
        picked = [r for r in out if r["kernel"] in kernels]
        out.append(dict(kernel=passes, bytes=sum(r["bytes"] for r in picked), flop=sum(r["flop"] for r in picked)))
    total = [r for r in out if r["kernel"] in ("forward", "backward")]
    out.append(dict(kernel="forward+backward", bytes=sum(r["bytes"] for r in total),
                    flop=sum(r["flop"] for r in total)))
    for r in out:
        r["roofline_ms"] = 1e3 * max(r["bytes"] / PEAK_BYTES_PER_S, r["flop"] / PEAK_FLOP_PER_S)
    return out


def inputs(batch: int, length: int, dim: int, dtype: torch.dtype, device: str, reset_rate: float, seed: int = 0,
           heads: int = HEADS) -> dict:
    """`q, k, v, lam0, g` as the Mamba-2 layer makes them (`perf/inputs.py`) and resets at
    `reset_rate` of the tokens (None at 0)."""
    t = layer_inputs(batch, length, heads, dim, dim, 2, backbone="mamba2", dtype=dtype, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    reset = (torch.rand(batch, length, heads, generator=gen) < reset_rate).to(device) if reset_rate > 0 else None
    return dict(q=t["q"], k=t["k"], v=t["v"], lam0=t["lam"][..., 0].contiguous(), g=t["g"], reset=reset)


def verify(dtype: torch.dtype, reset_rate: float, device: str, smoke: bool) -> dict:
    """Triton against the float64 torch path on `device`, forward and every gradient. float32:
    ≤ 1e-5 (IEEE dots). 16-bit: ≤ 2e-2, and outputs in that dtype at most twice the error of
    the torch path on the same inputs (float32 arithmetic, outputs rounded like ours)."""
    from dla.ops.backbone.ssd import ssd_backward, ssd_forward
    from dla.ops.backbone.ssd_triton import ssd_backward_triton, ssd_forward_triton
    from dla.testing import relative_error

    batch, length, heads, dim, chunk = (1, 40, 2, 16, 16) if smoke else (1, 2048, 4, DIM, CHUNK)
    x = inputs(batch, length, dim, dtype, device, reset_rate, seed=3, heads=heads)
    gen = torch.Generator().manual_seed(4)
    S0 = torch.randn(batch, heads, dim, dim, generator=gen).to(device)
    do = torch.randn(batch, length, heads, dim, generator=gen).to(device=device, dtype=dtype)
    dS = torch.randn(batch, heads, dim, dim, generator=gen).to(device)
    scale = dim**-0.5
    args = (x["q"], x["k"], x["v"], x["lam0"], x["g"], x["reset"], S0)
    x64 = [a.double() if a is not None and a.is_floating_point() else a for a in args]
    names = ("o", "S", "dq", "dk", "dv", "dlam0", "dg", "dS0")
    ours = (*ssd_forward_triton(*args, scale, chunk), *ssd_backward_triton(do, dS, *args, scale, chunk))
    ref = (*ssd_forward(*x64, scale, chunk), *ssd_backward(do.double(), dS.double(), *x64, scale, chunk))
    errors = {n: relative_error(a, b) for n, a, b in zip(names, ours, ref)}
    finite = all(bool(torch.isfinite(a).all()) for a in ours)
    if dtype == torch.float32:
        ok = finite and max(errors.values()) <= 1e-5
    else:
        torch_path = (*ssd_forward(*args, scale, chunk), *ssd_backward(do, dS, *args, scale, chunk))
        torch_errors = {n: relative_error(a, b) for n, a, b in zip(names, torch_path, ref)}
        ok = finite and all(e <= 2e-2 and (ours[i].dtype != dtype or e <= 2 * torch_errors[n])
                            for i, (n, e) in enumerate(errors.items()))
        errors = {n: (e, torch_errors[n]) for n, e in errors.items()}
    return dict(dtype=str(dtype).removeprefix("torch."), resets=reset_rate, T=length, errors=errors, finite=finite,
                ok=ok)


def fla_ssd():
    """fla's `chunk_simple_gla`, or None when fla does not import (its #640 refusal off, as in
    `perf/bench_gpu.py`)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - report and run without the anchor
        print(f"fla unavailable ({exc!r}); its columns stay empty")
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True
    print("NOTE: fla's Triton<3.7.1 Hopper refusal (fla #640) is patched off for fla's timings only")
    return chunk_simple_gla


def timer(smoke: bool, rep: int):
    """Median ms by `do_bench` on the GPU; one wall-clock run under `--smoke`."""
    if smoke:
        def once(fn) -> float:
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        return once
    from triton.testing import do_bench

    return lambda fn: float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def time_row(length: int, device: str, smoke: bool, rep: int, fla) -> dict:
    from dla.ops.backbone.ssd_output import output_backward, output_forward
    from dla.ops.backbone.ssd_states import state_backward, state_forward
    from dla.ops.backbone.ssd_triton import ssd_backward_triton, ssd_forward_triton

    tokens, dim, chunk, dtype = (80, 16, 16, torch.float32) if smoke else (TOKENS, DIM, CHUNK, torch.bfloat16)
    heads = 2 if smoke else HEADS
    length = min(length, tokens)
    batch = tokens // length
    bench = timer(smoke, rep)
    scale = dim**-0.5
    row = dict(T=length, B=batch)
    for tag, rate in (("", 0.0), ("reset_", RESET_RATE)):
        x = inputs(batch, length, dim, dtype, device, rate, heads=heads)
        do = torch.randn_like(x["v"])
        args = (x["q"], x["k"], x["v"], x["lam0"], x["g"], x["reset"], None)
        row[f"{tag}fwd"] = bench(lambda: ssd_forward_triton(*args, scale, chunk))
        row[f"{tag}fwd_bwd"] = bench(lambda: (ssd_forward_triton(*args, scale, chunk),
                                              ssd_backward_triton(do, None, *args, scale, chunk)))
        if rate > 0:
            row["resets_per_1000"] = 1000 * float(x["reset"].float().mean())
            continue
        h = state_forward(x["k"], x["v"], x["g"], None, None, chunk)[0]
        dhe = state_backward(x["q"], do, x["lam0"], None, None, x["k"], x["v"], x["g"], None, False, scale, chunk)[0]
        row["stage_state_fwd"] = bench(lambda: state_forward(x["k"], x["v"], x["g"], None, None, chunk))
        row["stage_output_fwd"] = bench(lambda: output_forward(x["q"], x["k"], x["v"], x["lam0"], x["g"], None, h,
                                                               scale, chunk))
        row["stage_state_bwd"] = bench(lambda: state_backward(x["q"], do, x["lam0"], None, None, x["k"], x["v"],
                                                              x["g"], None, False, scale, chunk))
        row["stage_output_bwd"] = bench(lambda: output_backward(x["q"], x["k"], x["v"], do, x["lam0"], x["g"], None, h,
                                                                dhe, scale, chunk))
        if fla is not None:
            q, k, v = (x[n].detach().requires_grad_() for n in ("q", "k", "v"))
            g = x["g"].detach().requires_grad_()
            row["fla_fwd"] = bench(lambda: fla(q, k, v, g=g, scale=scale))
            row["fla_fwd_bwd"] = bench(lambda: torch.autograd.backward(fla(q, k, v, g=g, scale=scale)[0], do))
    for key in ("fwd", "fwd_bwd", "reset_fwd", "reset_fwd_bwd"):
        fla_key = "fla_fwd" if key.endswith("fwd") else "fla_fwd_bwd"
        if fla_key in row:
            row[f"{key}_vs_fla"] = row[key] / row[fla_key]
    return row


def render(results: dict) -> str:
    env = results["env"]

    def f(x):
        return "—" if x is None else f"{x:.2f}"

    lines = [f"SSD stage without β on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['time']}"
             + (" — SMOKE RUN (interpreter, tiny shapes: not a measurement)" if env["smoke"] else ""),
             "median ms, bf16, 32,768 tokens per call, H = 16, Dk = Dv = 128, chunk 64, Mamba-2 decays "
             "(perf/bench_ssd_gpu.py); target fwd+bwd ≤ 1.3× fla", "",
             "| T | ours fwd | ours fwd+bwd | resets: fwd | resets: fwd+bwd | fla fwd | fla fwd+bwd | "
             "fwd+bwd / fla | resets: fwd+bwd / fla | resets per 1000 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append("| " + " | ".join([str(r["T"]), f(r.get("fwd")), f(r.get("fwd_bwd")), f(r.get("reset_fwd")),
                                         f(r.get("reset_fwd_bwd")), f(r.get("fla_fwd")), f(r.get("fla_fwd_bwd")),
                                         f(r.get("fwd_bwd_vs_fla")), f(r.get("reset_fwd_bwd_vs_fla")),
                                         f(r.get("resets_per_1000"))]) + " |")
    lines += ["", "each stage alone (no resets), ms, beside its roofline (`costs`: bytes at "
              f"{PEAK_BYTES_PER_S / 1e12:.2f} TB/s, FLOPs at {PEAK_FLOP_PER_S / 1e12:.0f} TFLOP/s):", "",
              "| T | state_fwd | output_fwd | state_bwd | output_bwd | roofline fwd+bwd |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        roof = {c["kernel"]: c["roofline_ms"] for c in r["costs"]}
        lines.append("| " + " | ".join([str(r["T"])] + [f"{f(r.get('stage_' + k))} ({roof[k]:.2f})" for k in
                                                          ("state_fwd", "output_fwd", "state_bwd", "output_bwd")]
                                         + [f"{roof['forward+backward']:.2f}"]) + " |")
    lines += ["", "verification against the float64 torch path on this device (T = "
              f"{results['verify'][0]['T']}; 16-bit: error (torch path's error)):"]
    for v in results["verify"]:
        worst = max(v["errors"].items(), key=lambda kv: kv[1][0] if isinstance(kv[1], tuple) else kv[1])
        shown = (f"{worst[1][0]:.1e} ({worst[1][1]:.1e})" if isinstance(worst[1], tuple) else f"{worst[1]:.1e}")
        lines.append(f"- {v['dtype']}, resets {v['resets']}: {'ok' if v['ok'] else 'FAILED'}; worst {worst[0]} {shown}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--rep", type=int, default=200, help="do_bench's time budget per figure, ms")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = parser.parse_args(argv)
    if args.smoke and not torch.cuda.is_available():
        # the kernels are built for the interpreter when their module is imported, so this comes first
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke for the CPU check")
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               time=time.strftime("%Y-%m-%d %H:%M:%S"), smoke=args.smoke)
    print(env)
    results = dict(env=env, verify=[], rows=[])
    dtypes = (torch.float32,) if args.smoke else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        for rate in (0.0, RESET_RATE):
            results["verify"].append(verify(dtype, rate, device, args.smoke))
            print("verify", results["verify"][-1])
    fla = None if args.smoke else fla_ssd()
    for length in args.lengths:
        row = time_row(length, device, args.smoke, args.rep, fla)
        row["costs"] = costs(TOKENS // length, length, HEADS, DIM, DIM, CHUNK)
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "costs"}))
        (args.out / "bench_ssd_gpu.json").write_text(json.dumps(results, indent=1))
    table = render(results)
    (args.out / "bench_ssd_gpu.md").write_text(table)
    print(table)
    return 0 if all(v["ok"] for v in results["verify"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
