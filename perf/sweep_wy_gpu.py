"""Launch bounds of the delta rule's WY forward (`dla.ops.backbone.delta_wy._wy_fwd_kernel`) on a
GPU, each verified before it is timed.

    python -m perf.sweep_wy_gpu --out DIR [--length 2048]

The WY forward solves each chunk's `T = (I + A_kk)⁻¹` and forms `w = T diag(βγ) K`,
`u = T diag(β) V`, the largest kernel of `single` Gated DeltaNet in the H100 profile
(`perf/results/profile_gpu-h100.md`), with registers for one program per SM at its launch
(`python -m perf.sm90_resources --stages backbone`). For each candidate (warps, stages, the
`Dk`/`Dv` block of the products) it runs the kernel on SPEC §7's Gated DeltaNet inputs (32,768
tokens, H = 16, Dk = Dv = 128, bf16, chunks of 64), compares `w` and `u` with the stage's float64
torch chunks (`dla.ops.backbone.delta._chunks`) as `‖out − ref‖ / ‖ref‖`, and times it (median
ms, `triton.testing.do_bench`). The first row is `wy_meta`'s own choice. Writes `sweep_wy.json`
and `sweep_wy.md` to DIR.
"""

from __future__ import annotations

import torch
import triton

from dla.ops.backbone import delta, delta_wy
from dla.ops.triton_utils import split_products
from dla.testing import relative_error
from perf.inputs import layer_inputs
from perf.sweep import arguments, measured, write_sweep

TOKENS, HEADS, DIM, CHUNK = 32768, 16, 128, 64
CANDIDATES = [(4, 2, 32), (4, 2, 16), (8, 1, 32), (8, 3, 32), (8, 2, 64), (16, 2, 32), (4, 1, 32)]


def run(T: int) -> list[dict]:
    from triton.testing import do_bench

    B = TOKENS // T
    t = layer_inputs(B, T, HEADS, DIM, DIM, 2, backbone="gdn", dtype=torch.bfloat16, device="cuda")
    k, v, g, beta = (t[n].contiguous() for n in ("k", "v", "g", "beta"))
    ref = delta._chunks(k.double(), v.double(), g.double(), beta.double(), None, CHUNK, torch.float64)
    w64 = ref.w.reshape(B, HEADS, T, DIM).transpose(1, 2)
    u64 = ref.u.reshape(B, HEADS, T, DIM).transpose(1, 2)
    shipped = delta_wy.wy_meta(DIM, DIM, CHUNK, k.dtype)
    configs = [(shipped["num_warps"], shipped["num_stages"], shipped["BK"])] + CANDIDATES
    rows = []
    for warps, stages, block in configs:
        meta = dict(shipped, num_warps=warps, num_stages=stages, BK=block, BV=block)
        TI = torch.full((B, T, HEADS, CHUNK), float("nan"), device="cuda")
        w = torch.full_like(k, float("nan"))
        u = torch.full_like(v, float("nan"))

        def launch():
            delta_wy._wy_fwd_kernel[(triton.cdiv(T, CHUNK), B * HEADS)](
                k, v, beta, g, None, TI, w, u, T, HEADS, DIM, DIM, BC=delta_wy.BC, HAS_G=True, HAS_RESET=False,
                **split_products(k), **meta)

        def measure(row: dict) -> None:
            launch()
            torch.cuda.synchronize()
            row["err_w"] = relative_error(w, w64)
            row["err_u"] = relative_error(u, u64)
            row["ms"] = do_bench(launch, warmup=3, rep=20, return_mode="median")

        rows.append(measured({"T": T, "warps": warps, "stages": stages, "block": block, "shipped": not rows},
                             measure))
    return rows


def main() -> int:
    args = arguments(2048)
    rows = run(args.length)

    def cells(r: dict) -> list[str]:
        values = ([f"{r['err_w']:.1e}", f"{r['err_u']:.1e}", f"{r['ms']:.3f}"] if "error" not in r
                  else [r["error"][:60], "", ""])
        return [str(r["warps"]), str(r["stages"]), str(r["block"]), "yes" if r["shipped"] else "", *values]

    write_sweep(args.out, "sweep_wy", "WY forward launch bounds",
                f"T = {args.length}, 32,768 tokens, H = 16, Dk = Dv = 128, bf16 (perf/sweep_wy_gpu.py)",
                ["warps", "stages", "block", "shipped", "error w", "error u", "ms"], rows, cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
