"""Launch-configuration sweep of the chunked-scan readout (`dla/ops/triton/readout_scan.py`) on one GPU.

    python3 -m perf.sweep_scan_gpu --out DIR [--configs "" "C=128,num_warps=16" ...] [--length 8192]

Each configuration is a `DLA_SCAN_CONFIG` string (the empty string: the launcher's own choice,
which picks a narrower `Dv` tile for the check's 4 heads than for the timed 64 — give `BV`).
For every configuration and case (backbone : policy : K) the script first checks the kernels
against the float64 torch chunked path on this GPU (`perf.bench_gpu.verify`, T = 2048; a
configuration that is fast and wrong is reported as wrong, not timed), then times forward and
forward+backward on the inputs of `perf/bench_gpu.py` (32,768 tokens, H = 16, Dk = Dv = 128,
bf16). Mamba-2 is forced onto the scan (`SCALAR_READOUT = "scan"`). Writes `sweep_scan.json`
and `sweep_scan.md` to DIR and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import dla.compile.ops
from perf.bench_gpu import bench, inputs, train_step, verify
from perf.profile_gpu import parse_config


def run_case(config: str, case: str, length: int, rep: int) -> dict:
    os.environ["DLA_SCAN_CONFIG"] = config
    backbone, policy, levels = parse_config(case)
    row = {"config": config or "default", "case": case}
    try:
        check = verify(2048, levels, policy, backbone)
        row["ok"], row["worst"] = check["ok"], max(check["errors"].values())
        if row["ok"]:
            fwd, fwd_bwd = train_step(inputs(length, levels, backbone), policy=policy)
            row["fwd_ms"] = bench(lambda: fwd(), warmup=2, rep=rep)
            row["fwd_bwd_ms"] = bench(fwd_bwd, warmup=2, rep=rep)
    except Exception as exc:  # noqa: BLE001 - a configuration that fails to compile or run is a result too
        row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"[:300]
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def render(result: dict) -> str:
    env = result["env"]
    lines = [f"# Scan readout launch configurations — {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}; fwd / fwd+bwd median ms at T = {result['length']}, "
             "32,768 tokens, H = 16, Dk = Dv = 128, bf16, after the float64 check at T = 2048. "
             f"`python3 -m perf.sweep_scan_gpu {' '.join(result['argv'])}`", "",
             "| configuration | case | check (worst rel. error) | fwd ms | fwd+bwd ms |", "|---|---|---|---:|---:|"]
    for r in result["rows"]:
        check = f"{'ok' if r['ok'] else 'FAILED'} ({r['worst']:.1e})" if "worst" in r else f"error: {r.get('error')}"
        lines.append(f"| `{r['config']}` | {r['case']} | {check} | {r.get('fwd_ms', float('nan')):.2f} | "
                     f"{r.get('fwd_bwd_ms', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    # BV is given in each: the check at T = 2048 (4 heads) then runs the tile of the timed shape
    p.add_argument("--configs", nargs="+", default=["BV=32", "BV=32,num_warps=16", "C=128,BV=32,num_warps=16"])
    p.add_argument("--cases", nargs="+", default=["mamba2:single:2", "mamba2:dla:32", "gdn:single:2", "gdn:dla:32"])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rep", type=int, default=100, help="do_bench's timing budget per measurement, ms")
    args = p.parse_args(argv)
    for case in args.cases:
        parse_config(case)
    dla.compile.ops.SCALAR_READOUT = "scan"
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": __import__("triton").__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")},
              "length": args.length, "argv": argv if argv is not None else __import__("sys").argv[1:], "rows": []}
    for case in args.cases:
        for config in args.configs:
            result["rows"].append(run_case(config, case, args.length, args.rep))
            (args.out / "sweep_scan.json").write_text(json.dumps(result, indent=1))
    md = render(result)
    (args.out / "sweep_scan.md").write_text(md)
    print(md)
    return 0 if all(r["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
