"""Launch bounds of the `drift` detection kernels on a GPU, each verified before it is timed.

    python -m perf.sweep_drift_gpu --out DIR [--length 8192]

For each candidate (chunk `C`, state tile `BV`, warps, dot precision) it runs
`dla.ops.segment.detect_triton`'s `_prepare_kernel` and `_pass_kernel` on SPEC §7's inputs
(32,768 tokens, H = 16, Dk = Dv = 128, bf16 upcast to float32; the Mamba-2 transition and the
Gated DeltaNet one with β), compares `p_t` and `ρ_t` with the float64 torch products
(`dla.ops.segment.detect.readout_products`) as `‖out − ref‖ / ‖ref‖`, and times both kernels
(median ms, `triton.testing.do_bench`). The first row is `launch_meta`'s own choice. Only IEEE
rows within 1e-5 of the float64 products may become `launch_meta`'s bounds (SPEC §2); the
`tf32x3` rows say what the rule costs. Writes `sweep_drift.json` and `sweep_drift.md` to DIR.
"""

from __future__ import annotations

import torch
import triton

from dla.ops.segment import detect_triton
from dla.ops.segment.detect import readout_products
from dla.testing import relative_error
from perf.inputs import layer_inputs
from perf.sweep import arguments, measured, write_sweep

TOKENS, HEADS, DIM = 32768, 16, 128
CANDIDATES = [(16, 32, 8, "ieee"), (16, 16, 4, "ieee"), (16, 16, 8, "ieee"), (32, 32, 8, "ieee"),
              (16, 32, 4, "ieee"), (64, 64, 8, "tf32x3"), (16, 32, 8, "tf32x3")]


def run(backbone: str, T: int) -> list[dict]:
    from triton.testing import do_bench

    B = TOKENS // T
    t = layer_inputs(B, T, HEADS, DIM, DIM, 32, backbone=backbone, dtype=torch.bfloat16, device="cuda")
    k, v, g, beta = t["k"], t["v"], t["g"], t["beta"]
    S0 = torch.zeros(B, HEADS, DIM, DIM, device="cuda")
    p64, r64 = readout_products(k.double(), v.double(), g.double(), None if beta is None else beta.double(),
                                S0.double(), 64)
    kf, vf, gf = k.float().contiguous(), v.float().contiguous(), g.float().contiguous()
    bf = beta.float().contiguous() if beta is not None else kf
    shipped = detect_triton.launch_meta(DIM, DIM, 64, on_interpreter=False)
    configs = [(shipped["C"], shipped["BV"], shipped["num_warps"], shipped["PREC"])] + CANDIDATES
    rows = []
    for C, BV, warps, prec in configs:
        NC, NV = triton.cdiv(T, C), triton.cdiv(DIM, BV)
        meta = dict(C=C, BK=DIM, BV=BV, PREC=prec, num_warps=warps, num_stages=1)
        flags = dict(HAS_G=True, HAS_BETA=beta is not None)
        Q = torch.empty(B * HEADS, T, DIM, device="cuda")
        R0 = torch.empty_like(Q)
        W = torch.empty_like(Q) if beta is not None else Q
        U0 = torch.empty_like(Q) if beta is not None else R0
        p = torch.full((NV, B * HEADS, T), float("nan"), device="cuda")
        rr = torch.full_like(p, float("nan"))

        def prepare():
            detect_triton._prepare_kernel[(B * HEADS, NC)](kf, vf, gf, bf, Q, R0, W, U0, T, HEADS, DIM, DIM,
                                                           **flags, **meta)

        def scan():
            detect_triton._pass_kernel[(B * HEADS, NV)](kf, vf, gf, S0, Q, R0, W, U0, p, rr, T, HEADS, DIM, DIM, NC,
                                                        **flags, **meta)

        def measure(row: dict) -> None:
            prepare()
            scan()
            torch.cuda.synchronize()
            row["err_p"] = relative_error(p.sum(0).view(B, HEADS, T), p64)
            row["err_rho"] = relative_error(rr.sum(0).view(B, HEADS, T), r64)
            row["prepare_ms"] = do_bench(prepare, warmup=3, rep=20, return_mode="median")
            row["pass_ms"] = do_bench(scan, warmup=2, rep=20, return_mode="median")

        rows.append(measured({"backbone": backbone, "T": T, "C": C, "BV": BV, "warps": warps, "precision": prec,
                              "shipped": not rows}, measure))
    return rows


def main() -> int:
    args = arguments(8192)
    rows = run("mamba2", args.length) + run("gdn", args.length)

    def cells(r: dict) -> list[str]:
        values = ([f"{r['err_p']:.1e}", f"{r['err_rho']:.1e}", f"{r['prepare_ms']:.2f}", f"{r['pass_ms']:.2f}"]
                  if "error" not in r else [r["error"][:60], "", "", ""])
        return [r["backbone"], str(r["C"]), str(r["BV"]), str(r["warps"]), r["precision"],
                "yes" if r["shipped"] else "", *values]

    write_sweep(args.out, "sweep_drift", "drift detection launch bounds",
                f"T = {args.length}, 32,768 tokens, H = 16, Dk = Dv = 128 (perf/sweep_drift_gpu.py)",
                ["backbone", "C", "BV", "warps", "precision", "shipped", "error p", "error ρ", "prepare ms",
                 "pass ms"], rows, cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
