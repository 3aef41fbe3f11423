"""The readout's two CUDA paths without `β`, each forced on every head, against the rule's pick:
forward+backward of `mixed_forward`/`mixed_backward` alone (no segmentation, no operator glue)
on `perf.bench_gpu`'s inputs, by length, segmentation regime (`token` score) and `K`, beside the
cost model's roofline of each path (`dla.ops.readout.cost`). It is the measurement behind the
rule (`cost.takes_objects`): a head whose plan overflows the pool stays dense even when forced.

    python -m perf.paths_gpu --out DIR [--lengths 2048 8192] [--levels 16 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dla import level_map
from dla.ops.readout import cost
from dla.ops.readout.objects_triton import _Prepared, mixed_backward, mixed_forward, row_modes
from perf.bench_gpu import bench, inputs
from perf.inputs import REGIMES


def measure(T: int, regime: str, K: int) -> dict:
    t = inputs(T, K, "mamba2", regime=regime)
    q, k, v, lam, g = (t[n] for n in ("q", "k", "v", "lam", "g"))
    B, _, H, D = q.shape
    starts = level_map(k, v, capacity=K, g=g, policy="dla", score="token")
    S0 = torch.zeros(B, H, K, D, D, device="cuda")
    do = torch.randn_like(v)
    plan, mode = row_modes(_Prepared(q, k, v, lam, g, starts, S0, None), starts, None)
    n = cost.plan_counts(plan)
    shapes = cost.Shapes(T=T, K=K, Dk=D, Dv=D, itemsize=q.element_size())
    arch = cost.arch_of(q.device)
    row = {"T": T, "regime": regime, "K": K, "rows": B * H, "rule_objects": int(mode.sum()),
           "overflow": int(plan.overflow.sum()),
           "model_objects_ms": 1e3 * float(cost.roofline_s(cost.object_kernels(shapes, n), arch).sum()),
           "model_dense_ms": 1e3 * float(cost.roofline_s(cost.dense_kernels(shapes, n), arch).sum())}
    for name, objects in (("objects", torch.ones(B * H, dtype=torch.bool, device="cuda")),
                          ("dense", torch.zeros(B * H, dtype=torch.bool, device="cuda")), ("rule", None)):
        def fwd_bwd():
            _, S = mixed_forward(q, k, v, lam, g, starts, S0, D**-0.5, objects=objects)
            mixed_backward(do, None, q, k, v, lam, g, starts, S0, D**-0.5, S=S, objects=objects)

        row[f"{name}_ms"] = bench(fwd_bwd, warmup=3, rep=10)
    return row


def render(rows: list[dict], env: dict) -> str:
    lines = [f"Readout paths forced, fwd+bwd median ms — {env['device']}, torch {env['torch']}, triton {env['triton']}",
             "bf16, 32,768 tokens per call, H = 16, Dk = Dv = 128, `token` score (`python -m perf.paths_gpu`)", "",
             "| T | regime | K | heads on objects by the rule | overflowing the pool | objects forced | dense forced | "
             "rule | model objects ms | model dense ms |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['T']} | {r['regime']} | {r['K']} | {r['rule_objects']}/{r['rows']} | {r['overflow']} | "
                     f"{r['objects_ms']:.2f} | {r['dense_ms']:.2f} | {r['rule_ms']:.2f} | {r['model_objects_ms']:.2f} | "
                     f"{r['model_dense_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--levels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("perf.paths_gpu needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__}
    rows = []
    for T in args.lengths:
        for regime in args.regimes:
            for K in args.levels:
                rows.append(measure(T, regime, K))
                print(json.dumps(rows[-1]), flush=True)
                torch.cuda.empty_cache()
    (args.out / "paths_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (args.out / "paths_gpu.md").write_text(render(rows, env))
    print(render(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
