"""The readout's cost model (SPEC §3.1, §7): FLOPs, DRAM bytes and H100 roofline of one
forward+backward at the §7 shapes, kernel by kernel, from the plan the kernels consume.

    python -m perf.cost_model --backbone mamba2 --policy dla --T 8192 --K 32 --regime sparse --json
    python -m perf.cost_model --backbone gdn --policy dla --T 8192 --K 32 --regime sparse

Shapes: `B·T = 32768` tokens, `H = 16` heads, `Dk = Dv = 128`, bf16. Inputs (`perf/inputs.py`,
SPEC §7): *sparse* piecewise-stationary `k, v` (regime mean 64), *moderate* (regime mean 8),
*dense* Gaussian; segmented on the CPU by the `token` score at `τ = 0.6` (`dla.level_map`),
the plan built by `dla.ops.readout.plan.build_plan` and costed by `dla.ops.readout.cost` —
the functions the CUDA readout's rule evaluates on the device. Each head takes the path the rule
gives it on the reference card (an H100 at 800 TFLOP/s and 3.35 TB/s); the totals add the
segmentation and both paths' kernels over all heads. Counts are per 1000 tokens or per chunk,
averaged over heads.

`--backbone gdn` (transitions with `β`): the readout by windows of `R` chunks
(`dla.ops.readout.objects_delta`, SPEC §3.1 "With β"), its plan built by `window_plan`, `R`
chosen by `cost_delta.window_for` on the reference card, and costed by `cost_delta` kernel by
kernel, beside the worst case at that `R` (every window holding `K` objects). The inputs are
the Gated DeltaNet's (l2-normalised `q, k`, `β`, a gate `g`), segmented the same way; the
stage's rule takes that path on CUDA (`dla.ops.readout`).
"""

from __future__ import annotations

import argparse
import json

import torch

from dla import level_map
from dla.ops.readout import cost, cost_delta
from dla.ops.readout.objects_delta import window_plan
from dla.ops.readout.plan import Plan, build_plan
from dla.ops.segment.stats import segmentation_stats
from perf.inputs import REGIMES, layer_inputs

TOKENS, HEADS, DIM = 32768, 16, 128


def regime_inputs(regime: str, batch: int, length: int, seed: int = 0):
    """`k, v` of a segmentation regime (only the writes decide the segmentation)."""
    t = layer_inputs(batch, length, HEADS, DIM, DIM, 2, backbone="mamba2", seed=seed, regime=regime)
    return t["k"], t["v"]


def counts(level_start, plan: Plan, T: int, C: int) -> dict:
    """The counts the model reports, means over heads: slots opened after a scored boundary and
    capacity merges per 1000 tokens (the segmentation's own, `segmentation_stats`), objects created
    per 1000 tokens, objects a token's chunk reads, and objects created per chunk (`slots changed`:
    the new elements each chunk with tokens leads to, read by the next chunk) — from the plan the
    kernels consume."""
    stats = segmentation_stats(level_start, chunk_size=C)
    n = cost.plan_counts(plan)
    ntok = plan.starts[:, 1:] - plan.starts[:, :-1]
    changed = (plan.new_count[:, 1:].double() * (ntok > 0)).sum(1) / (ntok > 0).sum(1)
    return {
        "boundaries_per_1000": float(stats.boundaries_per_1k.mean()),
        "merges_per_1000": float(stats.merges_per_1k.mean()),
        "objects_per_1000": float((n["created"] / T).mean() * 1000),
        "masters_per_1000": float((n["masters"] / T).mean() * 1000),
        "objects_read_per_chunk": float((n["reads"] / T).mean()),
        "slots_changed_per_chunk": float(changed.mean()),
    }


def predict(starts: torch.Tensor, shapes: cost.Shapes, arch: cost.Arch = cost.H100_ROOFLINE) -> dict:
    """The plan of the level map `starts [B,T,H,K]` (from step 0) and its cost on `arch`: each head
    on the path the rule gives it, the segmentation and both paths' kernels over all heads; with
    the counts, and the totals had every head taken one path."""
    B, T = starts.shape[:2]
    capacity, masters = cost.pool_capacity(T, shapes.K, shapes.Dk, shapes.Dv, shapes.itemsize, shapes.C)
    plan = build_plan(starts, torch.zeros(B, dtype=torch.int64, device=starts.device), shapes.C, capacity, masters)
    n = {name: x.cpu() for name, x in cost.plan_counts(plan).items()}
    objects = cost.takes_objects(plan).cpu() & torch.tensor(not cost.decode_sized(T, shapes.C))
    N = plan.read.shape[0]
    shared = {name: (f * N, b * N) for name, (f, b) in
              {**cost.segmentation_kernel(shapes), **cost.shared_kernels(shapes)}.items()}

    def call(on_objects: torch.Tensor) -> dict:
        rows = dict(shared)
        for name, (f, b) in cost.object_kernels(shapes, n).items():
            rows[name] = ((f * on_objects).sum(), (b * on_objects).sum())
        for name, (f, b) in cost.dense_kernels(shapes, n).items():
            rows[name] = ((f * ~on_objects).sum(), (b * ~on_objects).sum())
        return {name: (float(f), float(b)) for name, (f, b) in rows.items() if float(f) or float(b)}

    rows = call(objects)
    counted = counts(starts, plan, T, shapes.C)
    paths = {}
    for path, mask in (("all heads on objects", torch.ones_like(objects)),
                       ("all heads dense", torch.zeros_like(objects))):
        r = call(mask)
        paths[path] = {"tflop": sum(f for f, _ in r.values()) / 1e12, "gb": sum(b for _, b in r.values()) / 1e9,
                       "roofline_ms": 1e3 * cost.roofline_s(r, arch)}
    counted.update({"heads_on_objects": f"{int(objects.sum())}/{N}", "pool_capacity_objects": capacity,
                    "pool_capacity_masters": masters})
    return {
        "card": arch.name,
        "flops_fwd_bwd": sum(f for f, _ in rows.values()), "bytes_fwd_bwd": sum(b for _, b in rows.values()),
        "roofline_ms": 1e3 * cost.roofline_s(rows, arch),
        "counts": counted,
        "paths": paths,
        "kernels": {name: {"gflop": f / 1e9, "gb": b / 1e9, "ms": 1e3 * max(f / arch.flops, b / arch.bandwidth)}
                    for name, (f, b) in rows.items()},
    }


def model(T: int, K: int, regime: str, policy: str = "dla", arch: cost.Arch = cost.H100_ROOFLINE) -> dict:
    """`predict` on the §7 inputs of `regime`, segmented on the CPU by the `token` score."""
    batch = TOKENS // T
    k, v = regime_inputs(regime, batch, T)
    starts = level_map(k, v, capacity=K, policy=policy, score="token", tau=0.6)
    shapes = cost.Shapes(T=T, K=K, Dk=DIM, Dv=DIM, itemsize=2)
    return {"backbone": "mamba2", "policy": policy, "T": T, "K": K, "regime": regime, "B": batch, "H": HEADS,
            "Dk": DIM, "Dv": DIM, "dtype": "bfloat16", **predict(starts, shapes, arch)}


def predict_delta(starts: torch.Tensor, shapes: cost.Shapes, arch: cost.Arch = cost.H100_ROOFLINE) -> dict:
    """With `β`: the window plan of the level map `starts [B,T,H,K]` (from step 0) at the `R` the
    rule picks on `arch` (`cost_delta.window_for`), and its cost kernel by kernel with the
    segmentation's, beside the worst case at that `R` (every window holding `K` objects)."""
    B, T, H, K = starts.shape
    C, Dk, Dv, s = shapes.C, shapes.Dk, shapes.Dv, shapes.itemsize
    R = cost_delta.window_for(T, K, Dk, Dv, s, C, arch.flops, arch.bandwidth)
    plan = window_plan(starts, None, C, R)  # a fresh call
    n = {name: x.cpu() for name, x in cost_delta.window_counts(plan, starts).items()}
    N = B * H
    rows = {name: (f * N, b * N) for name, (f, b) in cost.segmentation_kernel(shapes).items()}
    rows.update({name: (float(torch.as_tensor(f).sum()), float(torch.as_tensor(b).sum()))
                 for name, (f, b) in cost_delta.delta_kernels(n, Dk, Dv, K, s, C).items()})
    worst = {name: (f * N, b * N) for name, (f, b) in
             cost_delta.delta_kernels(cost_delta.worst_counts(T, K, C, R), Dk, Dv, K, s, C).items()}
    stats = segmentation_stats(starts, chunk_size=C)
    per_token = {name: float((x / n["tokens"]).mean()) for name, x in n.items() if name != "tokens"}
    return {
        "card": arch.name, "window_R": R,
        "flops_fwd_bwd": sum(f for f, _ in rows.values()), "bytes_fwd_bwd": sum(b for _, b in rows.values()),
        "roofline_ms": 1e3 * cost.roofline_s(rows, arch),
        "worst_case_roofline_ms": 1e3 * cost.roofline_s(worst, arch),
        "counts": {"boundaries_per_1000": float(stats.boundaries_per_1k.mean()),
                   "merges_per_1000": float(stats.merges_per_1k.mean()), "per_token": per_token},
        "kernels": {name: {"gflop": f / 1e9, "gb": b / 1e9, "ms": 1e3 * max(f / arch.flops, b / arch.bandwidth)}
                    for name, (f, b) in rows.items()},
    }


def model_delta(T: int, K: int, regime: str, policy: str = "dla", arch: cost.Arch = cost.H100_ROOFLINE) -> dict:
    """The readout by windows with `β` (module doc) on the Gated DeltaNet's §7 inputs of `regime`."""
    batch = TOKENS // T
    t = layer_inputs(batch, T, HEADS, DIM, DIM, K, backbone="gdn", regime=regime)
    starts = level_map(t["k"], t["v"], capacity=K, g=t["g"], beta=t["beta"], policy=policy, score="token", tau=0.6)
    shapes = cost.Shapes(T=T, K=K, Dk=DIM, Dv=DIM, itemsize=2, C=64)
    return {"backbone": "gdn", "policy": policy, "T": T, "K": K, "regime": regime, "B": batch, "H": HEADS, "Dk": DIM,
            "Dv": DIM, "dtype": "bfloat16", **predict_delta(starts, shapes, arch)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", choices=["mamba2", "gdn"], default="mamba2")
    parser.add_argument("--policy", choices=["dla", "fenwick", "single"], default="dla")
    parser.add_argument("--T", type=int, default=8192)
    parser.add_argument("--K", type=int, default=32)
    parser.add_argument("--regime", choices=list(REGIMES), default="sparse")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.backbone == "gdn" and args.policy == "single":
        raise SystemExit("--backbone gdn models the readout by windows: --policy dla or fenwick")
    result = (model_delta if args.backbone == "gdn" else model)(args.T, args.K, args.regime, args.policy)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.policy} K={args.K} T={args.T} {args.regime}: {result['flops_fwd_bwd'] / 1e12:.2f} TFLOP, "
              f"{result['bytes_fwd_bwd'] / 1e9:.2f} GB, {result['roofline_ms']:.2f} ms on {result['card']}")
        for name, row in result["kernels"].items():
            print(f"  {name:32s} {row['gflop']:9.1f} GFLOP {row['gb']:8.3f} GB {row['ms']:7.3f} ms")
        print("  counts:", json.dumps(result["counts"]))
        if "paths" in result:
            print("  paths:", json.dumps(result["paths"]))
        else:
            print(f"  window R = {result['window_R']}; worst case at that R (every window holding K objects): "
                  f"{result['worst_case_roofline_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
