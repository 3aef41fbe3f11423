"""Data-parallel scaling of `dla train` under torchrun + FSDP2: training tokens/s on 1 and N
processes (GPUs), the same per-process batch on each (weak scaling), and the ratio.

    python3 -m perf.bench_fsdp_gpu --out perf/results [--plain]    # base preset, T = 4096, 1 and 2 GPUs
    python3 -m perf.bench_fsdp_gpu --device cpu --preset tiny --seq-len 32 --per-rank-batch 2 \\
        --steps 4 --warmup-steps 2 --no-compile --out /tmp/fsdp-cpu   # the same path on CPU processes

For each process count P it runs `torchrun --nproc_per_node=P -m dla.cli train` on a generated
text corpus with global batch
`P × --per-rank-batch` windows of `--seq-len` tokens, for `--steps` optimizer steps, and reads
the run's `metrics.jsonl`: the step times are the differences of consecutive `elapsed_s`
(the recorded loss is a host sync, so each difference holds one whole step); the first
`--warmup-steps` steps (compilation, allocator warm-up) are left out, and tokens/s is the
global tokens of a step over the median step time. The scaling is tokens/s(P) / tokens/s(1),
judged against `--min-scaling` (1.8 for 2 GPUs, the issue's bar). A run whose loss is not
finite counts as a failure, not a figure.

Writes `fsdp_scaling-<device>.json` and `.md` to `--out` and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpus(folder: Path, size: int) -> Path:
    """`size` bytes of word salad (deterministic): throughput does not depend on the text, and the
    machine need not hold the default corpus's package."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array("the of and to in that it is was he for on are as with his they at be this from "
                     "have or by one had not but what all were when we there can an your which their".split())
    text = " ".join(rng.choice(words, size=size // 4))
    path = folder / "corpus.txt"
    path.write_text(text[:size])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_name(device: str) -> tuple[str, str]:
    """(full name, short tag for file names) of the first GPU, or of the CPU."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        tag = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name)
        return name, (tag.group(1).lower() if tag else "gpu")
    import platform

    return platform.processor() or platform.machine(), "cpu"


def run_one(nproc: int, args, data: Path, work: Path, *, plain: bool = False) -> dict:
    """One run on `nproc` torchrun processes, or (`plain`) one process without torchrun: the
    single-process path (whole-loss compile, fp32 weights under bf16 autocast)."""
    label = "plain" if plain else str(nproc)
    out = work / f"run-{label}"
    batch = nproc * args.per_rank_batch
    train = ["train", "--preset", args.preset, "--backbone", args.backbone, "--policy", args.policy,
             "--seq-len", str(args.seq_len), "--batch-size", str(batch), "--steps", str(args.steps),
             "--checkpoint-every", str(args.steps), "--eval-tokens", str(args.seq_len), "--device", args.device,
             "--data", str(data), "--out", str(out)]
    if args.no_compile:
        train.append("--no-compile")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    # torchrun pins OMP_NUM_THREADS=1 for 2+ processes but not for one: the same for every count,
    # or the baseline's host threads differ (on a busy CPU machine that alone is worth 10×)
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher = [] if plain else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                                 "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, "-m", "dla.cli", *train]
    print(f"--- {'one plain process' if plain else f'{nproc} process(es)'}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    log = done.stdout + done.stderr
    (work / f"run-{label}.log").write_text(log)
    if done.returncode != 0:
        raise SystemExit(f"run {label} failed (exit {done.returncode}); the end of its log:\n{log[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    if len(steps) != args.steps or not all(math.isfinite(r["loss"]) for r in steps):
        raise SystemExit(f"run {label}: {len(steps)} steps recorded or a non-finite loss; see {work}")
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])][args.warmup_steps - 1:]
    tokens = batch * args.seq_len
    median = statistics.median(times)
    return {"processes": nproc, "torchrun": not plain, "global_batch": batch, "tokens_per_step": tokens,
            "timed_steps": len(times),
            "median_step_s": round(median, 5), "mean_step_s": round(statistics.fmean(times), 5),
            "tokens_per_s": round(tokens / median, 1), "final_loss": steps[-1]["loss"], "wall_s": round(wall, 1),
            "first_step_s": steps[0]["elapsed_s"]}


def table(result: dict) -> str:
    rows = ["| processes | global batch | tokens/step | median step (ms) | tokens/s | scaling |",
            "|---:|---:|---:|---:|---:|---:|"]
    base = result["runs"][0]["tokens_per_s"]
    for r in result["runs"] + ([result["plain"]] if result.get("plain") else []):
        who = f"{r['processes']}" if r["torchrun"] else "1, plain (no torchrun)"
        rows.append(f"| {who} | {r['global_batch']} | {r['tokens_per_step']:,} | "
                    f"{1000 * r['median_step_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}× |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="perf/results", help="folder for fsdp_scaling-<device>.{json,md}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--nprocs", default="1,2", help="process counts, the first is the baseline (default 1,2)")
    p.add_argument("--preset", default="base")
    p.add_argument("--backbone", default="mamba2")
    p.add_argument("--policy", default="dla")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--per-rank-batch", type=int, default=4, help="windows per process and step (default 4)")
    p.add_argument("--steps", type=int, default=13, help="optimizer steps per run (default 13)")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the timing (default 3)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--min-scaling", type=float, default=1.8, help="the bar for the last process count (default 1.8)")
    p.add_argument("--plain", action="store_true", help="also time one process without torchrun (the "
                   "single-process path), for FSDP's cost on one device; not part of the scaling ratio")
    p.add_argument("--keep", action="store_true", help="keep the run folders (checkpoints) in a temporary folder")
    args = p.parse_args(argv)
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if args.warmup_steps < 1 or args.steps < args.warmup_steps + 2:
        p.error("--steps must exceed --warmup-steps by at least 2, and --warmup-steps must be >= 1")
    name, tag = device_name(args.device)
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(nprocs):
            p.error(f"--nprocs {args.nprocs} needs {max(nprocs)} GPUs; this machine has {torch.cuda.device_count()}")
    work = Path(tempfile.mkdtemp(prefix="dla-fsdp-bench-"))
    data = corpus(work, max(4 << 20, 64 * args.seq_len))
    runs = [run_one(n, args, data, work) for n in nprocs]
    plain = run_one(1, args, data, work, plain=True) if args.plain else None
    import torch

    scaling = runs[-1]["tokens_per_s"] / runs[0]["tokens_per_s"]
    result = {"device": name, "torch": torch.__version__, "preset": args.preset, "backbone": args.backbone,
              "policy": args.policy, "seq_len": args.seq_len, "per_rank_batch": args.per_rank_batch,
              "steps": args.steps, "warmup_steps": args.warmup_steps, "compile": not args.no_compile,
              "runs": runs, "plain": plain, "scaling": round(scaling, 3), "min_scaling": args.min_scaling,
              "meets_bar": scaling >= args.min_scaling,
              "command": "python3 -m perf.bench_fsdp_gpu " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fsdp_scaling-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (f"# FSDP2 data-parallel scaling: `dla train`, {args.preset} {args.backbone}/{args.policy}, "
          f"T = {args.seq_len}\n\n{name}, torch {torch.__version__}, {args.per_rank_batch} windows per process, "
          f"median of {runs[0]['timed_steps']} steps after {args.warmup_steps} left out, "
          f"{'compiled blocks' if not args.no_compile else 'eager'}.\n\n{table(result)}\n\n"
          f"Scaling {nprocs[-1]} vs {nprocs[0]}: {scaling:.2f}× (bar {args.min_scaling}×: "
          f"{'met' if scaling >= args.min_scaling else 'NOT met'})."
          + (f" The plain single process runs at {plain['tokens_per_s'] / runs[0]['tokens_per_s']:.2f}× the "
             f"{nprocs[0]}-process torchrun rate." if plain else "") + f"\n\n`{result['command']}`\n")
    (out / f"fsdp_scaling-{tag}.md").write_text(md)
    print(md)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"run folders and logs: {work}")
    return 0 if result["meets_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
