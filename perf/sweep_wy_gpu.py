"""Launch bounds of the delta rule's WY stage (`dla.ops.backbone.delta_wy`) on a GPU, each
verified before it is timed.

    python -m perf.sweep_wy_gpu --out DIR [--length 2048]

The WY forward solves each chunk's `T = (I + A_kk)⁻¹` and forms `w = T diag(βγ) K`,
`u = T diag(β) V`; with the WY backward it was the largest kernel of `single` Gated DeltaNet in
the H100 profile (`perf/results/profile_gpu-h100.md`); ptxas's registers and spills at each
launch: `python -m perf.sm90_resources --stages wy`. On SPEC §7's Gated DeltaNet
inputs (32,768 tokens, H = 16, Dk = Dv = 128, bf16, chunks of 64) it times (median ms,
`triton.testing.do_bench`):

- the fused forward `_wy_fwd_kernel` at each candidate (warps, stages, the `Dk`/`Dv` block of the
  products), `wy_meta`'s own choice first;
- the backward `wy_backward` at each (warps, stages, BK, BV).

(Its first run on an H100 also timed a split forward — the solve, then `w`, `u` by tiles in a
grid of their own — at best within noise of the fused kernel at 4 warps, and `dw = −dU hᵀ` by a
launch of its own, slower than the fused backward at 4 warps; both were deleted:
`perf/results/sweep_wy-h100.md`.)

Forward rows compare `w` and `u` with the stage's float64 torch chunks
(`dla.ops.backbone.delta._chunks`) as `‖out − ref‖ / ‖ref‖`; backward rows compare with the
shipped launch's results (which the GPU tests hold to float64). Writes `sweep_wy.json` and
`sweep_wy.md` to DIR.
"""

from __future__ import annotations

import torch
import triton

from dla.ops.backbone import delta, delta_wy
from dla.ops.triton_utils import split_products
from dla.testing import poisoned_empty, relative_error
from perf.inputs import layer_inputs
from perf.sweep import arguments, measured, write_sweep

TOKENS, HEADS, DIM, CHUNK = 32768, 16, 128, 64
# the fused forward `_wy_fwd_kernel`: (warps, stages, the Dk/Dv block of the products)
CANDIDATES = [(8, 2, 32), (4, 1, 32), (4, 3, 32), (4, 2, 64), (2, 2, 32)]
# the backward `wy_backward`: (warps, stages, BK, BV), compared with the shipped launch's own results
BACKWARD_CANDIDATES = [(8, 2, 32, 32), (4, 1, 32, 32), (4, 2, 64, 32), (4, 2, 32, 64), (2, 2, 32, 32)]


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

        rows.append(measured({"T": T, "design": "fused", "warps": warps, "stages": stages, "block": block,
                              "shipped": not rows}, measure))
    rows += backward_rows(k, v, g, beta, T, B)
    return rows


def backward_rows(k, v, g, beta, T: int, B: int) -> list[dict]:
    """The WY backward at each launch of BACKWARD_CANDIDATES (the shipped one first) on the
    stage's own inputs: `h` from the state pass, a random float32 `dU` and `dk_part`, `dG_part`."""
    from triton.testing import do_bench

    from dla.ops.backbone.delta_states import states_forward

    TI, w, u = delta_wy.wy_forward(k, v, g, beta, None, CHUNK)
    h, _, _ = states_forward(k, w, u, g, None, None, CHUNK, k.dtype, store_u=False)
    gen = torch.Generator(device="cuda").manual_seed(1)
    dU = torch.randn(u.shape, device="cuda", generator=gen) * 0.1
    dk_part = torch.randn(k.shape, device="cuda", generator=gen) * 0.1
    dG_part = torch.randn(g.shape, device="cuda", generator=gen) * 0.1
    shipped = delta_wy.wy_meta(DIM, DIM, CHUNK, k.dtype)
    configs = [(shipped["num_warps"], shipped["num_stages"], shipped["BK"], shipped["BV"])]
    reference, rows, outs = None, [], []
    for warps, stages, bk, bv in configs + BACKWARD_CANDIDATES:
        meta = dict(num_warps=warps, num_stages=stages, BK=bk, BV=bv)
        part = torch.empty_like(dk_part)

        def launch():
            part.copy_(dk_part)  # the backward accumulates into it
            outs[:] = delta_wy.wy_backward(k, v, g, beta, None, TI, h, dU, part, dG_part, CHUNK, meta)

        def measure(row: dict) -> None:
            nonlocal reference
            with poisoned_empty():
                launch()
            torch.cuda.synchronize()
            if reference is None:
                reference = [x.double() for x in outs]
            for name, x, ref in zip(("dk", "dv", "dg", "dbeta"), outs, reference):
                row[f"err_{name}"] = relative_error(x, ref)
            row["ms"] = do_bench(launch, warmup=3, rep=20, return_mode="median")

        rows.append(measured({"T": T, "design": "backward", "warps": warps,
                              "stages": stages, "block": f"{bk}x{bv}", "shipped": not rows}, measure))
    return rows


def main() -> int:
    args = arguments(2048)
    rows = run(args.length)

    def cells(r: dict) -> list[str]:
        if "error" in r:
            values = [r["error"][:60], "", ""]
        elif "err_w" in r:
            values = [f"{r['err_w']:.1e}", f"{r['err_u']:.1e}", f"{r['ms']:.3f}"]
        else:  # the backward, against the shipped launch
            values = [f"dk {r['err_dk']:.1e}, dv {r['err_dv']:.1e}", f"dβ {r['err_dbeta']:.1e}, dg {r['err_dg']:.1e}",
                      f"{r['ms']:.3f}"]
        return [r["design"], str(r["warps"]), str(r["stages"]), str(r["block"]), "yes" if r["shipped"] else "",
                *values]

    write_sweep(args.out, "sweep_wy", "WY stage launch bounds",
                f"T = {args.length}, 32,768 tokens, H = 16, Dk = Dv = 128, bf16 (perf/sweep_wy_gpu.py)",
                ["design", "warps", "stages", "block", "shipped", "error w", "error u", "ms"], rows, cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
