"""Model throughput on one GPU (issue #7): training tokens/s per backbone × policy, float8 beside
bf16, and decode tokens/s against context length.

    python -m perf.bench_train_gpu --out DIR [--sections train float8 decode] [--backbones ...]
        [--policies ...] [--batch-size 4] [--seq-len 4096] [--capacity 16]
    python -m perf.bench_train_gpu --out DIR --smoke     # tiny shapes, CPU-friendly, eager

train   the `base` preset (~125M parameters) at T = 4096, bf16 autocast, the training step as
        `dla train` runs it (forward and loss in one `torch.compile(fullgraph=True)` frame,
        backward, clipping, AdamW), for every backbone × policy, K = 16. Tokens/s over timed
        steps after compiled warm-up steps, peak memory; the `dla` row is also given as a fraction
        of the `single` row of its backbone (target ≥ 60%).
float8  the same step with torchao float8 linear layers (tensorwise and rowwise recipes) beside
        the bf16 row; refused (and recorded as such) below compute capability 8.9.
decode  `model.step` compiled as `dla generate` runs it (CUDA graphs on CUDA) at batch 1 and 16,
        after a prefill of 1k and 16k tokens: tokens/s and ms per step. The recurrent backbones
        should be flat in context length; attention reads a key/value cache that grows with it.

Inputs are windows of the embedded corpus (the segmentation's cost depends on real boundaries).
Each section writes its rows into DIR/bench_train.json as it goes (rows of earlier calls with
other keys are kept, so the sections can run in separate calls) and DIR/bench_train.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dla.model import CausalLM
from dla.model.config import preset

BACKBONES = ("mamba2", "gdn", "attention")
POLICIES = ("single", "fenwick", "dla")


def corpus_windows(batch: int, length: int, *, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from dla.run.data import default_corpus_files

    data = np.frombuffer(b"".join(f.read_bytes() for f in default_corpus_files()[:4]), dtype=np.uint8)
    need = batch * (length + 1)
    start = offset % max(1, len(data) - need)
    rows = np.resize(data[start:start + need], need).reshape(batch, length + 1).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device):
    """Call `fn` `n` times, then wait for the device: (the last result or None, seconds)."""
    out, t0 = None, time.perf_counter()
    for _ in range(n):
        out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def combos(args) -> list[tuple[str, str]]:
    out = []
    for backbone in args.backbones:
        for policy in (["dla"] if backbone == "attention" else args.policies):
            out.append((backbone, policy))
    return out


def model_config(args, backbone: str, policy: str, seq_len: int):
    return preset(args.preset, backbone=backbone, policy=policy, seq_len=seq_len, capacity=args.capacity)


def train_row(args, device, backbone: str, policy: str, float8: str | None = None) -> dict:
    from dla.run.optim import convert_to_float8, float8_unavailable
    from dla.run.train import RECIPES, TrainConfig, make_optimizer

    row = {"section": "float8" if float8 else "train", "backbone": backbone, "policy": policy,
           "precision": f"float8-{float8}" if float8 else "bf16", "batch": args.batch_size, "T": args.seq_len}
    if float8:
        reason = float8_unavailable(device)
        if reason:
            return {**row, "skipped": reason}
    torch._dynamo.reset()
    cfg = model_config(args, backbone, policy, args.seq_len)
    torch.manual_seed(0)
    model = CausalLM(cfg).to(device)
    if float8:
        convert_to_float8(model, float8)
    tcfg = TrainConfig(**{**RECIPES.get(args.preset, {}), "batch_size": args.batch_size})
    optimizer = make_optimizer(model, tcfg)
    loss_fn = torch.compile(model.loss, fullgraph=True) if args.compile else model.loss
    x, y = (t.to(device) for t in corpus_windows(args.batch_size, args.seq_len))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak(device)
    _, warm_s = timed(step, args.warmup, device)
    loss, elapsed = timed(step, args.steps, device)
    tokens = args.batch_size * args.seq_len * args.steps
    row.update(params_m=round(model.num_params() / 1e6, 1), levels=cfg.levels, tokens_per_s=round(tokens / elapsed, 1),
               ms_per_step=round(1e3 * elapsed / args.steps, 2), warmup_s=round(warm_s, 1),
               peak_gb=None if peak_gb(device) is None else round(peak_gb(device), 2), loss=round(float(loss), 4))
    del model, optimizer, loss_fn
    return row


@torch.no_grad()
def decode_row(args, device, backbone: str, policy: str, batch: int, context: int) -> dict:
    from dla.run.generate import activation_dtype, decode_step

    row = {"section": "decode", "backbone": backbone, "policy": policy, "batch": batch, "context": context,
           "mode": args.decode_compile if args.compile else "none"}
    torch._dynamo.reset()
    # seq_len bounds fenwick's levels and nothing the other policies read: size it for the context
    cfg = model_config(args, backbone, policy, context + args.decode_steps + args.warmup + 1)
    torch.manual_seed(0)
    model = CausalLM(cfg).to(device).eval()
    dtype = activation_dtype(model)
    cache = model.empty_cache(batch, max_len=context + args.decode_steps + args.warmup + 1, dtype=dtype)
    prompt, _ = corpus_windows(batch, context)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    reset_peak(device)
    t0 = time.perf_counter()
    with autocast:
        for start in range(0, context, args.prefill_chunk):  # bounded activation memory
            logits, cache = model.prefill(prompt[:, start:start + args.prefill_chunk].to(device), cache)
    sync(device)
    prefill_s = time.perf_counter() - t0
    step = decode_step(model, args.decode_compile if args.compile else "none")
    token = logits[:, -1].argmax(-1)

    def greedy_step() -> None:
        nonlocal logits, cache, token
        logits, cache = step(token, cache)
        token = logits.argmax(-1)

    with autocast:
        _, warm_s = timed(greedy_step, args.warmup, device)
        _, elapsed = timed(greedy_step, args.decode_steps, device)
    row.update(tokens_per_s=round(batch * args.decode_steps / elapsed, 1),
               ms_per_step=round(1e3 * elapsed / args.decode_steps, 3), prefill_s=round(prefill_s, 2),
               warmup_s=round(warm_s, 1), peak_gb=None if peak_gb(device) is None else round(peak_gb(device), 2),
               finite=bool(torch.isfinite(logits).all()))
    del model, cache, step
    return row


def key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("section", "backbone", "policy", "precision", "batch", "T", "context", "mode"))


def render(results: dict) -> str:
    env = results["env"]
    rows = results["rows"]
    lines = [f"# Model throughput — {env['device']}, torch {env['torch']}", "",
             f"preset `{env['preset']}`, K = {env['capacity']}, compiled: {env['compile']}", ""]
    train = [r for r in rows if r["section"] == "train" and "tokens_per_s" in r]
    if train:
        lines += ["## Training (bf16)", "", "| backbone | policy | batch × T | tokens/s | ms/step | peak GB | vs single |",
                  "|---|---|---|---|---|---|---|"]
        single = {r["backbone"]: r["tokens_per_s"] for r in train if r["policy"] == "single"}
        for r in train:
            ratio = (f"{r['tokens_per_s'] / single[r['backbone']]:.0%}"
                     if r["backbone"] in single and r["backbone"] != "attention" else "")
            lines.append(f"| {r['backbone']} | {r['policy']} | {r['batch']} × {r['T']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['ms_per_step']} | {r['peak_gb']} | {ratio} |")
        lines.append("")
    f8 = [r for r in rows if r["section"] == "float8"]
    if f8:
        bf16 = {(r["backbone"], r["policy"]): r["tokens_per_s"] for r in train}
        lines += ["## float8 vs bf16 training", "", "| backbone | policy | recipe | tokens/s | vs bf16 |", "|---|---|---|---|---|"]
        for r in f8:
            if "skipped" in r:
                lines.append(f"| {r['backbone']} | {r['policy']} | {r['precision']} | skipped: {r['skipped']} | |")
                continue
            base = bf16.get((r["backbone"], r["policy"]))
            ratio = "" if base is None else f"{r['tokens_per_s'] / base:.2f}×"
            lines.append(f"| {r['backbone']} | {r['policy']} | {r['precision']} | {r['tokens_per_s']:,.0f} | {ratio} |")
        lines.append("")
    dec = [r for r in rows if r["section"] == "decode"]
    if dec:
        lines += ["## Decode", "", "| backbone | policy | mode | batch | context | tokens/s | ms/step | vs shortest context |",
                  "|---|---|---|---|---|---|---|---|"]

        def group(r):
            return r["backbone"], r["policy"], r.get("mode"), r["batch"]

        for r in sorted(dec, key=lambda r: (*map(str, group(r)), r["context"])):
            first = min((d for d in dec if group(d) == group(r)), key=lambda d: d["context"])
            lines.append(f"| {r['backbone']} | {r['policy']} | {r.get('mode')} | {r['batch']} | {r['context']:,} | "
                         f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']} | {r['ms_per_step'] / first['ms_per_step']:.2f}× time |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", nargs="+", default=["train", "float8", "decode"], choices=["train", "float8", "decode"])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--preset", default="base")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--capacity", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, CUDA graph capture)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--float8-recipes", nargs="+", default=["tensorwise", "rowwise"], choices=["tensorwise", "rowwise"])
    p.add_argument("--float8-backbones", nargs="+", default=["mamba2", "gdn", "attention"], choices=BACKBONES)
    p.add_argument("--decode-batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--decode-contexts", nargs="+", type=int, default=[1024, 16384])
    p.add_argument("--decode-policies", nargs="+", default=["single", "dla"], choices=POLICIES)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--decode-compile", default="auto", choices=["auto", "default", "reduce-overhead"],
                   help="mode of the compiled decode step (auto: CUDA graphs on CUDA, as dla generate); under "
                        "CUDA graphs each step also copies the cache out of the graph's memory")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (preset tiny, T = 64), eager unless --compile-smoke")
    p.add_argument("--compile-smoke", action="store_true", help="with --smoke: compile as on the GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch_size, args.capacity = "tiny", 64, 2, 4
        args.warmup, args.steps, args.decode_steps, args.prefill_chunk = 1, 2, 4, 16
        args.decode_batches, args.decode_contexts = [1, 2], [16, 64]
        args.compile = args.compile_smoke
    device = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = 64  # one compiled step per shape and model in a run
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "preset": args.preset, "capacity": args.capacity, "compile": args.compile,
           "smoke": args.smoke}
    path = args.out / "bench_train.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    results["env"] = env

    def record(row: dict) -> None:
        results["rows"] = [r for r in results["rows"] if key(r) != key(row)] + [row]
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(results, indent=1))
        (args.out / "bench_train.md").write_text(render(results))

    if "train" in args.sections:
        for backbone, policy in combos(args):
            record(train_row(args, device, backbone, policy))
    if "float8" in args.sections:
        for backbone in args.float8_backbones:
            for recipe in args.float8_recipes:
                record(train_row(args, device, backbone, "dla", float8=recipe))
    if "decode" in args.sections:
        for backbone in args.backbones:
            for policy in (["dla"] if backbone == "attention" else args.decode_policies):
                for batch in args.decode_batches:
                    for context in args.decode_contexts:
                        record(decode_row(args, device, backbone, policy, batch, context))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
