"""Where the time of one DLA layer goes, kernel by kernel (the rule of issues #4 and #5 for a
missed target: the achieved TFLOP/s and bandwidth of each kernel, and what limits it).

    python3 -m perf.profile_gpu --out DIR [--length 8192] [--configs mamba2:dla:32 gdn:dla:32 ...]

For each configuration (backbone : policy : K) it profiles one forward+backward of
`dla.multistate_attention` on the inputs of `perf/bench_gpu.py` (32,768 tokens, H = 16,
Dk = Dv = 128, bf16), after warm-up calls, twice; the policy `fla` (`gdn:fla:0`, `mamba2:fla:0`)
profiles the benchmark's anchor instead, fla's kernel for that backbone (its Hopper refusal patched
off as the benchmark does), so that `single` and the plain backbone it should match sit side by
side:

1. `torch.profiler`, the kernels as they really run (concurrent, boosted clocks): CUDA time per
   kernel name, launch count, and share of the layer's kernel time; then, in a second call with
   shapes and Python stacks recorded, torch's own kernels (copies, fills, elementwise, GEMMs) by
   operator, input shapes and the line of ours that called it.
2. Nsight Compute (`ncu --clock-control none`, each kernel replayed alone with the caches flushed),
   when `ncu` is on the PATH: DRAM bytes, tensor-core operations (bf16 and tf32 sources), FP32
   operations (2·FFMA + FADD + FMUL), SM and memory throughput as % of the card's peak, achieved
   occupancy and registers per thread. From them: achieved GB/s and TFLOP/s per kernel name.
   If the card's ncu lacks a metric, the script falls back to a smaller set and says so.

`--band G:R` (a timing experiment, never the shipped rule) runs the readout with `β` at `G` key
chunks per band block (`cost_delta.BAND_KEYS`) and windows of `R` chunks whatever `window_for`
picks, in this process and in ncu's child, so that a configuration the rule does not choose can
be profiled beside the shipped one on the same card; the output names it.

A kernel near the memory roof is bandwidth-bound; one far from both roofs with low occupancy is
latency- or launch-bound (small grids, serial scans). Writes `profile_gpu.json` and
`profile_gpu.md` to DIR and prints the table last.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FULL_METRICS = [
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
    "sm__ops_path_tensor_src_bf16_dst_fp32.sum", "sm__ops_path_tensor_src_tf32_dst_fp32.sum",
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum", "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum",
    "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum",
]
BASIC_METRICS = FULL_METRICS[:7]
SITES_SHOWN = 16  # rows of the operator-sites table


def short_name(name: str) -> str:
    """A kernel's name without its parameter list and namespaces; template arguments stay (they
    tell torch's generic elementwise and GEMM kernels apart), cut at 80 characters."""
    name = re.sub(r"^void\s+", "", name.strip())
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list is the first '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            cut = i
            break
    name = re.sub(r"\b(at::native::|at::|cutlass::|std::|\(anonymous namespace\)::)", "", name[:cut])
    return name[:80] or "?"


def force_band(spec: str) -> tuple[int, int]:
    """`--band G:R`: the readout with `β` at `G` key chunks per band block and windows of `R`
    chunks in this process (module doc); returns `(G, R)`."""
    import dla.ops.readout as readout
    import dla.ops.readout.cost_delta as cost_delta
    import dla.ops.readout.objects_delta_triton as kernels

    try:
        G, R = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--band must be KEYS:R (e.g. 2:16), got {spec!r}") from None
    if G < 1 or G & (G - 1) or R not in cost_delta.WINDOWS:
        raise SystemExit(f"--band: KEYS must be a power of two and R one of {cost_delta.WINDOWS}, got {spec!r}")
    cost_delta.BAND_KEYS = kernels.BAND_KEYS = G
    readout._window = lambda *args: R
    return G, R


def warmed_workload(config: str, length: int, warmup: int):
    """The forward+backward that bench_gpu times (its inputs, its call), run `warmup` times so
    that compilation and autotuning stay out of the profile."""
    import torch

    from perf.bench_gpu import anchor_step, fla_anchors, inputs, train_step

    backbone, policy, levels = parse_config(config)
    if policy == "fla":
        fla_op = dict(zip(("mamba2", "gdn"), fla_anchors()))[backbone]
        if fla_op is None:
            raise SystemExit(f"{config}: fla is not importable here")
        fwd_bwd = anchor_step(fla_op, length, backbone)
    else:
        _, fwd_bwd = train_step(inputs(length, levels, backbone), policy=policy)
    for _ in range(warmup):
        fwd_bwd()
    torch.cuda.synchronize()
    return fwd_bwd


def child(config: str, length: int, warmup: int) -> None:
    """Run under ncu: warm up, then one profiled forward+backward between cudaProfilerStart/Stop."""
    import torch

    fwd_bwd = warmed_workload(config, length, warmup)
    torch.cuda.profiler.start()
    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def parse_config(text: str) -> tuple[str, str, int]:
    try:
        backbone, policy, levels = text.split(":")
        return backbone, policy, int(levels)
    except ValueError:
        raise SystemExit(f"--configs entries must be BACKBONE:POLICY:K (e.g. gdn:dla:32), got {text!r}") from None


def kernel_times(fn) -> dict:
    """`{kernel's short name: {"us", "launches"}}`: the CUDA time of one call of `fn` as it runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: {"us": 0.0, "launches": 0})
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            k = kernels[short_name(ev.name)]
            k["us"] += ev.device_time
            k["launches"] += 1
    return dict(kernels)


_CALL = "profile_gpu.op_sites"


def _inside(ev) -> bool:
    """Whether a profiler event ran inside `op_sites`' call of its function."""
    parent = ev.cpu_parent
    while parent is not None and parent.name != _CALL:
        parent = parent.cpu_parent
    return parent is not None


@functools.lru_cache(maxsize=None)  # every event's stack repeats the same few files
def _ours(path: str) -> str | None:
    """`path` as the profiler names a Python file (relative to the sys.path entry it was found
    through, or absolute) relative to this repository, or None for a file outside it."""
    for base in [""] + sys.path:
        full = (Path(base or ".") / path).resolve()
        if full.is_file():
            return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else None
    return None


def _site(ev) -> str:
    """The innermost two Python functions of this repository above a profiler event, innermost
    first, as the profiler names them, `path(line): function`; "torch" where none is ours (an
    operator that autograd's C++ engine runs for a torch function's backward). This file's own
    are skipped."""
    ours = []
    parent = ev.cpu_parent
    while parent is not None and len(ours) < 2:
        path, _, rest = parent.name.partition("(")
        if path.endswith(".py"):
            mine = _ours(path)
            if mine is not None and mine != "perf/profile_gpu.py":
                ours.append(f"{mine}({rest}")
        parent = parent.cpu_parent
    return " < ".join(ours) if ours else "torch"


def op_sites(fn, device: bool = True) -> list[dict]:
    """The torch (aten) operators of one call of `fn` that launch device work — everything but
    our Triton kernels — by operator, input shapes and the code that called it (`_site`):
    `{"op", "shapes", "site", "calls", "us"}`, most time first. `us` is the operators' own device
    time (kernels they launch themselves), or with `device=False` their own CPU time (the host-side
    test of this function)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        with torch.profiler.record_function(_CALL):  # the profiler's own operators stay outside
            fn()
            if device:
                torch.cuda.synchronize()
    sites = defaultdict(lambda: {"calls": 0, "us": 0.0})
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.device_type != torch.autograd.DeviceType.CPU or not _inside(ev):
            continue
        us = ev.self_device_time_total if device else ev.self_cpu_time_total
        if us <= 0:
            continue
        entry = sites[(ev.name, str(ev.input_shapes), _site(ev))]
        entry["calls"] += 1
        entry["us"] += us
    rows = [{"op": op, "shapes": shapes, "site": site, **v} for (op, shapes, site), v in sites.items()]
    return sorted(rows, key=lambda r: -r["us"])


def torch_profile(config: str, length: int, warmup: int) -> dict:
    """Per-kernel CUDA time of one forward+backward as it really runs, then (a second call, under
    the operators' profiler with shapes and stacks) where torch's own kernels come from."""
    import torch

    fwd_bwd = warmed_workload(config, length, warmup)
    kernels = kernel_times(fwd_bwd)
    total = sum(k["us"] for k in kernels.values())
    rows = sorted(({"kernel": n, **v, "share": v["us"] / total} for n, v in kernels.items()), key=lambda r: -r["us"])
    sites = op_sites(fwd_bwd)
    del fwd_bwd
    torch.cuda.empty_cache()
    return {"total_us": total, "kernels": rows, "op_sites": sites}


def read_ncu_csv(text: str) -> list[dict]:
    """ncu --csv --page raw --print-units base: a header row, a units row, then one row per kernel."""
    start = text.find('"ID"')
    if start < 0:
        return []
    rows = list(csv.reader(io.StringIO(text[start:])))
    header, data = rows[0], rows[2:]
    out = []
    for r in data:
        if len(r) != len(header):
            continue
        rec = dict(zip(header, r))
        for key in list(rec):
            if "__" in key or key.startswith("launch"):
                try:
                    rec[key] = float(rec[key].replace(",", ""))
                except ValueError:
                    rec[key] = None
        out.append(rec)
    return out


def ncu_profile(config: str, length: int, warmup: int, work: Path, kernels: str | None = None,
                band: str | None = None) -> dict:
    """Per-kernel hardware counters under Nsight Compute; the full metric set, else the basic one."""
    ncu = shutil.which("ncu")
    if ncu is None:
        return {"error": "ncu not on PATH"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for metrics, label in ((FULL_METRICS, "full"), (BASIC_METRICS, "basic")):
        log = work / f"ncu-{config.replace(':', '_')}-{label}.csv"
        cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw",
               "--print-units", "base", "--log-file", str(log), "--metrics", ",".join(metrics),
               *(["--kernel-name", f"regex:{kernels}"] if kernels else []),
               sys.executable, "-m", "perf.profile_gpu", "--child", config, "--length", str(length),
               "--warmup", str(warmup), *(["--band", band] if band else [])]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        text = log.read_text() if log.exists() else ""
        records = read_ncu_csv(text)
        if done.returncode == 0 and records:
            return {"metric_set": label, "kernels": aggregate(records)}
        tail = (done.stdout + done.stderr + text)[-1500:]
        print(f"ncu ({label} metrics) gave no records for {config} (exit {done.returncode}):\n{tail}", flush=True)
    return {"error": f"ncu failed: {tail[-400:]}"}


def aggregate(records: list[dict]) -> list[dict]:
    """Sum counters per kernel name; derive GB/s, TFLOP/s and time-weighted percentages."""
    groups = defaultdict(list)
    for r in records:
        groups[short_name(r.get("Kernel Name", "?"))].append(r)

    def total(rs, key):
        return sum(r.get(key) or 0.0 for r in rs)

    def weighted(rs, key, ns):
        vals = [(r.get(key), r.get("gpu__time_duration.sum") or 0.0) for r in rs if r.get(key) is not None]
        return sum(v * w for v, w in vals) / ns if vals and ns else None

    out = []
    for name, rs in groups.items():
        ns = total(rs, "gpu__time_duration.sum")
        dram = total(rs, "dram__bytes_read.sum") + total(rs, "dram__bytes_write.sum")
        tensor = total(rs, "sm__ops_path_tensor_src_bf16_dst_fp32.sum") + total(rs, "sm__ops_path_tensor_src_tf32_dst_fp32.sum")
        fp32 = (2 * total(rs, "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum")
                + total(rs, "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum")
                + total(rs, "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum"))
        has_ops = any(r.get("sm__ops_path_tensor_src_bf16_dst_fp32.sum") is not None for r in rs)
        out.append({
            "kernel": name, "launches": len(rs), "us": ns / 1e3, "dram_gb": dram / 1e9,
            "gb_per_s": dram / ns if ns else None,  # bytes per ns = GB/s
            "tensor_tflops": tensor / ns / 1e3 if ns and has_ops else None,
            "fp32_tflops": fp32 / ns / 1e3 if ns and has_ops else None,
            "sm_pct": weighted(rs, "sm__throughput.avg.pct_of_peak_sustained_elapsed", ns),
            "mem_pct": weighted(rs, "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", ns),
            "occupancy_pct": weighted(rs, "sm__warps_active.avg.pct_of_peak_sustained_active", ns),
            "registers": max((r.get("launch__registers_per_thread") or 0) for r in rs),
        })
    return sorted(out, key=lambda r: -r["us"])


def limit(k: dict) -> str:
    """A one-word reading of what bounds a kernel, from its throughput percentages."""
    sm, mem, occ = k.get("sm_pct"), k.get("mem_pct"), k.get("occupancy_pct")
    if sm is None or mem is None:
        return "?"
    if mem >= 60 and mem >= sm:
        return "memory"
    if sm >= 60:
        return "compute"
    if occ is not None and occ < 25:
        return "latency (low occupancy)"
    return "latency"


def render(result: dict) -> str:
    env = result["env"]
    lines = [f"# Per-kernel profile of one DLA layer, forward+backward — {env['device']}",
             "", f"torch {env['torch']}, triton {env['triton']}; T = {result['length']}, 32,768 tokens, H = 16, "
             f"Dk = Dv = 128, bf16. Time share from torch.profiler (kernels as they run); counters from "
             f"Nsight Compute with --clock-control none, each kernel replayed alone (its duration there is "
             f"the ncu column). `python3 -m perf.profile_gpu {' '.join(result['argv'])}`", ""]
    if "band" in result:
        lines += [f"NOTE: timing experiment, not the shipped rule: the readout with β at {result['band']['keys']} key "
                  f"chunks per band block and windows of R = {result['band']['window']} chunks (--band)", ""]
    for cfg in result["configs"]:
        counters = {k["kernel"]: k for k in cfg["ncu"].get("kernels", [])}
        prof = cfg["torch"]
        if prof is None:  # counters without the real-run timing: ncu's own durations give the shares
            total = sum(k["us"] for k in counters.values())
            prof = {"total_us": total, "kernels": [{"kernel": n, "us": k["us"], "launches": k["launches"],
                                                    "share": k["us"] / total} for n, k in counters.items()]}
            lines += [f"## {cfg['config']}: {total / 1e3:.2f} ms of kernels under ncu (no torch.profiler pass; "
                      "ms and share are ncu's serialised durations)", ""]
        else:
            lines += [f"## {cfg['config']}: {prof['total_us'] / 1e3:.2f} ms of kernels", ""]
        if "error" in cfg["ncu"]:
            lines += [f"ncu: {cfg['ncu']['error']}", ""]
        elif cfg["ncu"].get("metric_set") != "full":
            lines += ["ncu: the tensor/FP32 operation counters were not available; basic set only", ""]
        lines += ["| kernel | launches | ms | share | ncu ms | DRAM GB/s | tensor TFLOP/s | FP32 TFLOP/s | SM % | mem % | occupancy % | regs | bound by |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

        def f(x, fmt="{:.1f}"):
            return "—" if x is None else fmt.format(x)

        shown = prof["kernels"][:14]
        for k in shown:
            c = counters.get(k["kernel"], {})
            lines.append(f"| `{k['kernel']}` | {k['launches']} | {k['us'] / 1e3:.3f} | {100 * k['share']:.1f}% | "
                         f"{f(c.get('us') and c['us'] / 1e3, '{:.3f}')} | {f(c.get('gb_per_s'), '{:.0f}')} | "
                         f"{f(c.get('tensor_tflops'))} | {f(c.get('fp32_tflops'), '{:.2f}')} | {f(c.get('sm_pct'))} | "
                         f"{f(c.get('mem_pct'))} | {f(c.get('occupancy_pct'))} | {c.get('registers', '—')} | "
                         f"{limit(c) if c else '—'} |")
        rest = prof["kernels"][len(shown):]
        if rest:
            us = sum(k["us"] for k in rest)
            lines.append(f"| {len(rest)} other kernels | {sum(k['launches'] for k in rest)} | {us / 1e3:.3f} | "
                         f"{100 * us / prof['total_us']:.1f}% | | | | | | | | | |")
        lines.append("")
        sites = prof.get("op_sites", [])[:SITES_SHOWN]
        if sites:
            lines += [f"torch's own kernels by operator and caller (a second call under the operators' profiler; "
                      f"the {len(sites)} largest):", "", "| operator | input shapes | called from | calls | ms |",
                      "|---|---|---|---:|---:|"]
            lines += [f"| `{r['op']}` | {r['shapes'][:90]} | {r['site']} | {r['calls']} | {r['us'] / 1e3:.3f} |"
                      for r in sites]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--configs", nargs="+", default=["mamba2:single:2", "mamba2:dla:32", "gdn:single:2", "gdn:dla:32"],
                   help="BACKBONE:POLICY:K entries (default: each backbone's single and dla K=32; POLICY fla: "
                        "fla's kernel for the backbone, e.g. gdn:fla:0)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-ncu", action="store_true", help="torch.profiler only")
    p.add_argument("--ncu-kernels", metavar="REGEX",
                   help="ncu only the kernels whose name matches (replaying every torch kernel is slow)")
    p.add_argument("--band", metavar="KEYS:R", help="timing experiment: the readout with β at KEYS key chunks per "
                   "band block and windows of R chunks, whatever the rule picks (module doc)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    band = force_band(args.band) if args.band else None
    if args.child:
        child(args.child, args.length, args.warmup)
        return 0
    if args.out is None:
        p.error("--out is required")
    for c in args.configs:
        parse_config(c)
    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__},
              "length": args.length, "argv": argv if argv is not None else sys.argv[1:], "configs": []}
    if band:
        result["band"] = {"keys": band[0], "window": band[1]}
    for config in args.configs:
        entry = {"config": config, "torch": torch_profile(config, args.length, args.warmup)}
        entry["ncu"] = ({"error": "skipped (--no-ncu)"} if args.no_ncu else
                        ncu_profile(config, args.length, args.warmup, args.out, args.ncu_kernels, args.band))
        result["configs"].append(entry)
        (args.out / "profile_gpu.json").write_text(json.dumps(result, indent=1))
        print(f"{config}: {entry['torch']['total_us'] / 1e3:.2f} ms of kernels", flush=True)
    md = render(result)
    (args.out / "profile_gpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
