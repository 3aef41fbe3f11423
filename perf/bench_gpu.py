"""GPU benchmark (SPEC §7): DLA beside its anchors in one run, on one card.

    python -m perf.bench_gpu --out DIR [--lengths 2048 8192 32768] [--quick]

Checks every timed DLA configuration against the stage's float64 torch kernels on the same GPU
first (a kernel that is fast and wrong is not reported as fast), then times forward and
forward+backward (median ms, `triton.testing.do_bench`) at 32,768 tokens per call, 16 heads,
Dk = Dv = 128, bf16: SDPA causal attention, fla's `chunk_simple_gla` (SSD) and
`chunk_gated_delta_rule`, and `dla.multistate_attention` for the Mamba-2 transition under
the `single`, `fenwick` and `dla` (K = 16, 32) policies — without β the persistent-object readout
(`dla::readout_without_beta`, object or dense heads by the stage's rule), on SPEC §7's sparse
inputs under the `token` score, each row with its segmentation counts and the heads on objects;
segmentation alone on the benchmark inputs and on Gaussian (boundary-dense) inputs; peak memory of
forward+backward; the readout's TFLOP/s by SPEC §3's count (3 GEMM passes × K·Dk·Dv
multiply-adds per token and head). The same
for DLA-Gated DeltaNet (`β` and `g`, l2-normalised `q, k`: the delta-rule kernels and the readout
by windows, its rows with the window plan's counts and model) beside fla's
`chunk_gated_delta_rule`, verified first like the Mamba-2 transition. Writes
`bench_gpu.json` and `bench_gpu.md` to DIR and prints the table last.

fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1 (fla issue #640, a Triton
miscompile). For anchor *timings only* this script switches that check off and says so in
its output; fla's numbers are timings, not verified results.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dla import level_map, multistate_attention
from dla.compile.ops import readout
from dla.ops.readout import cost, readout_backward, readout_forward
from dla.testing import relative_error
from perf.cost_model import predict, predict_delta
from perf.inputs import REGIMES, layer_inputs

TOKENS, HEADS, DIM = 32768, 16, 128
START = time.monotonic()


def bench(fn, warmup=25, rep=200) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def peak_memory_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fla_anchors():
    """fla's kernels with the #640 refusal switched off (timing only)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - report and run without anchors
        print(f"fla unavailable ({exc!r}); anchors omitted")
        return None, None
    chunk_o.TRITON_ABOVE_3_7_1 = True
    print("NOTE: fla's Triton<3.7.1 Hopper refusal (fla #640) is patched off for anchor timings only")
    return chunk_simple_gla, chunk_gated_delta_rule


def anchor_step(fla_op, length: int, backbone: str):
    """fwd+bwd of fla's op for `backbone` (`chunk_simple_gla` for mamba2, `chunk_gated_delta_rule`
    for gdn, from `fla_anchors`) on our inputs at `length`, over detached leaves."""
    t = inputs(length, 16, backbone)
    xs = [t[n].detach().requires_grad_() for n in ("q", "k", "v")]
    gates = {"g": t["g"].detach().requires_grad_()}
    if backbone == "gdn":
        gates["beta"] = t["beta"].detach().requires_grad_()
    do = torch.randn_like(xs[2])
    return lambda: torch.autograd.backward(fla_op(*xs, **gates)[0], do)


def inputs(length, levels, backbone, dtype=torch.bfloat16, regime="sparse"):
    batch = TOKENS // length
    return layer_inputs(batch, length, HEADS, DIM, DIM, levels, backbone=backbone, dtype=dtype, device="cuda",
                        regime=regime)


def train_step(t, compiled: bool = False, **kw):
    """fwd and fwd+bwd closures over detached leaves of `t`; `compiled`: the operator under
    torch.compile(fullgraph=True), as a model trains."""
    xs = {n: (x.detach().requires_grad_() if n in ("q", "k", "v", "lam") else x) for n, x in t.items()}
    do = torch.randn_like(xs["v"])
    attend = functools.partial(multistate_attention, **kw)
    if compiled:
        torch.compiler.reset()  # each row its own frame: the recompile limit would fall back to eager
        attend = torch.compile(attend, fullgraph=True)

    def fwd():
        return attend(xs["q"], xs["k"], xs["v"], xs["lam"], g=xs["g"], beta=xs["beta"])

    def fwd_bwd():
        o = fwd()
        torch.autograd.backward(o, do)

    return fwd, fwd_bwd


def verify(length, levels, policy, backbone) -> dict:
    """The readout path the operator takes on this GPU (`dla.compile.ops.readout`: the Triton op
    without β, the readout by windows with β) against the stage's float64 torch kernels on the same inputs and
    level map (the object path without β, the chunked form with β)."""
    batch, heads = 1, 4
    t = layer_inputs(batch, length, heads, DIM, DIM, levels, backbone=backbone, dtype=torch.bfloat16, device="cuda",
                     seed=1)
    starts = level_map(t["k"], t["v"], capacity=levels, policy=policy, score="token")
    S0 = torch.zeros(batch, heads, levels, DIM, DIM, device="cuda")
    step = torch.zeros(batch, dtype=torch.int64, device="cuda")
    scale = DIM**-0.5
    leaves = {n: (x.detach().requires_grad_() if x is not None else None) for n, x in t.items()}
    o, S = readout(leaves["q"], leaves["k"], leaves["v"], leaves["lam"], leaves["g"], leaves["beta"], starts, S0,
                   scale, 64, step)
    do = torch.randn_like(o)
    wrt = [leaves[n] for n in ("q", "k", "v", "lam", "g", "beta") if leaves[n] is not None]
    grads = torch.autograd.grad(o, wrt, do)
    d = {n: (x.double() if x is not None else None) for n, x in t.items()}
    args64 = (d["q"], d["k"], d["v"], d["lam"], d["g"], d["beta"], starts, S0.double(), scale, 64, step)
    o_ref, S_ref = readout_forward(*args64)
    g_ref = readout_backward(do.double(), torch.zeros_like(S_ref), *args64)
    refs = dict(zip(("q", "k", "v", "lam", "g", "beta"), g_ref))

    names = [n for n in ("q", "k", "v", "lam", "g", "beta") if leaves[n] is not None]
    errs = {"o": relative_error(o, o_ref), "S": relative_error(S, S_ref),
            **{f"d{n}": relative_error(a, refs[n]) for n, a in zip(names, grads)}}
    finite = all(torch.isfinite(x).all() for x in (o, S, *grads))
    heads = regime_counts(t, levels, policy)["heads_on_objects"] if policy != "single" else "—"
    return {"policy": policy, "K": levels, "T": length, "backbone": backbone, "errors": errs, "finite": bool(finite),
            "heads_on_objects": heads, "ok": bool(finite and max(errs.values()) <= 2e-2)}


def verify_loglinear(loglinear, length=2048) -> dict:
    """The Log-Linear reference's output against our `fenwick` policy in float64 on the same
    inputs (Log-Linear Mamba-2 is `fenwick` with Mamba-2's decay, scale 1): the anchor computes
    what our rows compute."""
    levels = (length - 1).bit_length() + 1
    t = inputs(length, levels, "mamba2")
    t = {n: x[:1, :, :4].contiguous() if x is not None else None for n, x in t.items()}
    o = loglinear(t["q"], t["k"], t["v"], t["g"], t["lam"])
    ref = multistate_attention(*(t[n].double() for n in ("q", "k", "v", "lam")), g=t["g"].double(),
                               policy="fenwick", scale=1.0)
    err = relative_error(o, ref)
    return {"T": length, "relative_error": err, "ok": err <= 2e-2}


def regime_counts(t: dict, levels: int, policy: str) -> dict:
    """The timed inputs' segmentation counts (SPEC §7: every figure states its regime), how many
    heads the readout's rule gives to the object kernels, and the cost model's prediction for
    this card (`perf.cost_model.predict`: FLOPs, DRAM bytes, roofline ms of the readout and the
    segmentation)."""
    T = t["k"].shape[1]
    starts = level_map(t["k"], t["v"], capacity=levels, g=t["g"], beta=t["beta"], policy=policy, score="token")
    shapes = cost.Shapes(T=T, K=levels, Dk=DIM, Dv=DIM, itemsize=t["q"].element_size())
    arch = cost.arch_of(t["q"].device)
    if t["beta"] is not None:  # with β the readout by windows (`perf.cost_model.predict_delta`)
        p = predict_delta(starts, shapes, arch)
        counts = {"boundaries_per_1000": p["counts"]["boundaries_per_1000"],
                  "merges_per_1000": p["counts"]["merges_per_1000"], "window_R": p["window_R"],
                  "objects_read_per_token": p["counts"]["per_token"]["reads"], "heads_on_objects": "— (β: windows)"}
    else:
        p = predict(starts, shapes, arch)
        counts = p["counts"]
    return {**counts, "model_tflop": p["flops_fwd_bwd"] / 1e12, "model_gb": p["bytes_fwd_bwd"] / 1e9,
            "model_roofline_ms": p["roofline_ms"]}


def progress(what: str) -> None:
    """One line per measurement as it is taken, with the seconds since the start, so that a run
    stopped by a time limit still shows what it measured and where the time went."""
    print(f"[{time.monotonic() - START:6.0f} s] {what}", flush=True)


def time_policy(row: dict, name: str, t: dict, policy: str, levels: int, rep: int, save=None,
                compiled: bool = False) -> None:
    """fwd, fwd+bwd, peak memory and readout TFLOP/s of one policy into `row` (`name_…`), under
    the `token` score that defines SPEC §7's regimes (the inputs are the sparse regime's), with
    the inputs' counts; then `save()`, which writes what has been measured so far."""
    fwd, fwd_bwd = train_step(t, compiled, policy=policy, score="token")
    if policy != "single":
        row[f"{name}_counts"] = regime_counts(t, levels, policy)
    try:
        row[f"{name}_fwd"] = bench(lambda: fwd(), rep=rep)
        row[f"{name}_fwd_bwd"] = bench(fwd_bwd, rep=rep)
        row[f"{name}_peak_mb"] = peak_memory_mb(fwd_bwd)
        flop = 3 * 2 * TOKENS * HEADS * levels * DIM * DIM
        row[f"{name}_readout_tflops"] = flop / (row[f"{name}_fwd_bwd"] * 1e-3) / 1e12
        if "model_tflop" in row.get(f"{name}_counts", {}):  # achieved rates by the cost model's count
            c = row[f"{name}_counts"]
            row[f"{name}_model_tflops"] = c["model_tflop"] / (row[f"{name}_fwd_bwd"] * 1e-3)
            row[f"{name}_model_gbs"] = c["model_gb"] / (row[f"{name}_fwd_bwd"] * 1e-3)
    except torch.OutOfMemoryError as exc:
        row[f"{name}_error"] = f"OOM: {exc}"[:200]
    progress(f"T={row['T']} {name}: fwd+bwd {row.get(f'{name}_fwd_bwd', float('nan')):.2f} ms")
    if save is not None:
        save()
    del t, fwd, fwd_bwd
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--backbones", nargs="+", choices=["mamba2", "gdn"], default=["mamba2", "gdn"])
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES),
                        help="segmentation regimes (SPEC §7) the DLA rows are timed in; sparse always")
    parser.add_argument("--compiled", action="store_true",
                        help="time our rows with the operator under torch.compile(fullgraph=True) (Inductor "
                             "fuses the torch glue around the Triton readout); the anchors stay as they are")
    parser.add_argument("--skip-verify", action="store_true",
                        help="no comparison with the float64 path first (the output says so); for runs "
                             "whose kernels the GPU suite has just verified")
    parser.add_argument("--loglinear", type=Path, metavar="DIR",
                        help="a directory holding the Log-Linear reference's hattention/ (perf/loglinear.py)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rep = 50 if args.quick else 200
    dev = torch.cuda.get_device_name()
    env = {"device": dev, "torch": torch.__version__, "triton": __import__("triton").__version__,
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(env)
    results = {"env": env, "verify": [], "rows": []}

    for backbone in ([] if args.skip_verify else args.backbones):
        # T = 8192 as well: there the rule gives the heads to the object kernels
        for length, policy, levels in ((2048, "single", 2), (2048, "fenwick", 16), (2048, "dla", 16),
                                       (2048, "dla", 32), (8192, "fenwick", 16), (8192, "dla", 32)):
            r = verify(length, levels, policy, backbone)
            results["verify"].append(r)
            progress(f"verify {r}")

    ssd, gdn = fla_anchors()
    patched = "fla's Triton<3.7.1 Hopper refusal (fla #640) is patched off for anchor timings only"
    results["notes"] = [patched] if ssd else []
    loglinear = None
    if args.loglinear is not None and "mamba2" in args.backbones:
        from perf import loglinear as ll  # fla, which it needs, is only on the GPU machine

        print("NOTE:", ll.NOTE)
        results["notes"].append(ll.NOTE)
        try:
            loglinear = ll.mamba2(args.loglinear)
            results["loglinear_verify"] = verify_loglinear(loglinear)
        except Exception as exc:  # noqa: BLE001 - a foreign anchor that fails is reported, not fatal
            loglinear, results["loglinear_verify"] = None, {"ok": False, "error": repr(exc)[:500]}
        print("verify loglinear", results["loglinear_verify"])
    if args.skip_verify:
        results["notes"].append("verification against the float64 path skipped (--skip-verify)")
    if args.compiled:
        results["notes"].append("our rows: the operator under torch.compile(fullgraph=True) (--compiled)")

    def save():
        (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=1))

    for length in args.lengths:
        batch = TOKENS // length
        row = {"T": length, "B": batch}
        results["rows"].append(row)  # filled in place: a stopped run keeps what it measured
        q, k, v = (torch.randn(batch, HEADS, length, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        row["sdpa_fwd_bwd"] = bench(lambda: torch.autograd.backward(
            F.scaled_dot_product_attention(q, k, v, is_causal=True), do), rep=rep)
        del q, k, v, do
        if ssd is not None and "mamba2" in args.backbones:
            row["fla_ssd_fwd_bwd"] = bench(anchor_step(ssd, length, "mamba2"), rep=rep)
        if gdn is not None and "gdn" in args.backbones:
            row["fla_gdn_fwd_bwd"] = bench(anchor_step(gdn, length, "gdn"), rep=rep)
        if loglinear is not None and length <= 16384:  # the reference's own limit
            levels = (length - 1).bit_length() + 1
            t = inputs(length, levels, "mamba2")
            xs = [t[n].detach().requires_grad_() for n in ("q", "k", "v", "g", "lam")]
            do = torch.randn_like(xs[2])
            row["loglinear_fwd_bwd"] = bench(lambda: torch.autograd.backward(loglinear(*xs), do), rep=rep)
            del xs, do
        anchors = (f"{name} {ms:.2f} ms" for name, ms in row.items() if name.endswith("_fwd_bwd"))
        progress(f"T={length} anchors: " + ", ".join(anchors))
        save()
        fenwick_levels = max(16, (length - 1).bit_length() + 1)
        for backbone, prefix in (("mamba2", ""), ("gdn", "gdn_")):
            if backbone not in args.backbones:
                continue
            for name, policy, levels in (("single", "single", 2), ("fenwick", "fenwick", fenwick_levels),
                                         ("dla16", "dla", 16), ("dla32", "dla", 32)):
                time_policy(row, prefix + name, inputs(length, levels, backbone), policy, levels, rep, save,
                            args.compiled)
            for regime in (r for r in args.regimes if r != "sparse"):
                for name, levels in (("dla16", 16), ("dla32", 32)):
                    time_policy(row, f"{prefix}{name}_{regime}", inputs(length, levels, backbone, regime=regime),
                                "dla", levels, rep, save, args.compiled)
            # the layer's own segmentation (the default `drift` score, with the layer's g and β)
            for regime in ("sparse", "dense"):
                t = inputs(length, 32, backbone, regime=regime)
                row[f"{prefix}seg_{regime}_ms"] = bench(
                    lambda: level_map(t["k"], t["v"], capacity=32, g=t["g"], beta=t["beta"]), rep=rep)
                progress(f"T={length} {prefix}drift segmentation ({regime}): {row[f'{prefix}seg_{regime}_ms']:.2f} ms")
        print(json.dumps(row))
        save()

    table = render(results)
    (args.out / "bench_gpu.md").write_text(table)
    print(table)
    return 0 if all(r["ok"] for r in results["verify"]) else 1


def _f(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _ratio(a, b) -> str:
    return _f(a / b if a and b else None)


def _backbone_table(results, prefix: str, anchor: str, anchor_name: str) -> list[str]:
    """One backbone's sparse-regime rows: anchors, policies, ratios, the segmentation's share (the
    `drift` default, on the sparse and the dense inputs, of DLA K=32's time), peak memory, and the
    cost model's roofline with the achieved rates by its count."""
    lines = [f"| T | SDPA | {anchor_name} | Log-Linear | single | single / anchor | fenwick | DLA K=16 | DLA K=32 | "
             "K=16 / anchor | K=32 / anchor | K=32 / Log-Linear | drift seg share K=32 (sparse / dense) | "
             "peak MB single / K=32 | K=32 model ms (roofline) | K=32 achieved TFLOP/s, GB/s (model count) |",
             "|" + "---|" * 16]
    for r in sorted(results["rows"], key=lambda r: r["T"]):
        a, d16, d32 = r.get(anchor), r.get(f"{prefix}dla16_fwd_bwd"), r.get(f"{prefix}dla32_fwd_bwd")
        single, ll = r.get(f"{prefix}single_fwd_bwd"), r.get("loglinear_fwd_bwd") if not prefix else None
        c = r.get(f"{prefix}dla32_counts", {})
        seg = [r.get(f"{prefix}seg_{regime}_ms") for regime in ("sparse", "dense")]
        share = " / ".join(f"{100 * x / d32:.0f}%" if x and d32 else "—" for x in seg)
        lines.append("| " + " | ".join([
            str(r["T"]), _f(r.get("sdpa_fwd_bwd")), _f(a), _f(ll), _f(single), _ratio(single, a),
            _f(r.get(f"{prefix}fenwick_fwd_bwd")), _f(d16), _f(d32), _ratio(d16, a), _ratio(d32, a), _ratio(d32, ll),
            share, f"{_f(r.get(f'{prefix}single_peak_mb'))} / {_f(r.get(f'{prefix}dla32_peak_mb'))}",
            _f(c.get("model_roofline_ms")),
            f"{_f(r.get(f'{prefix}dla32_model_tflops'))}, {_f(r.get(f'{prefix}dla32_model_gbs'))}"]) + " |")
    return lines


def _regime_table(results, prefix: str, anchor: str) -> list[str]:
    lines = ["| T | regime | boundaries / 1000 (K=32) | DLA K=16 | DLA K=32 | K=16 / anchor | K=32 / anchor | "
             "K=32 model ms (roofline) | heads on objects K=32 |", "|" + "---|" * 9]
    for r in results["rows"]:
        for regime in REGIMES:
            suffix = "" if regime == "sparse" else f"_{regime}"
            d16, d32 = r.get(f"{prefix}dla16{suffix}_fwd_bwd"), r.get(f"{prefix}dla32{suffix}_fwd_bwd")
            c = r.get(f"{prefix}dla32{suffix}_counts")
            if c is None:
                continue
            lines.append("| " + " | ".join([
                str(r["T"]), regime, f"{c['boundaries_per_1000']:.1f}", _f(d16), _f(d32), _ratio(d16, r.get(anchor)),
                _ratio(d32, r.get(anchor)), _f(c.get("model_roofline_ms")), c["heads_on_objects"]]) + " |")
    return lines


def render(results) -> str:
    env = results["env"]
    lines = [f"GPU benchmark on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['time']}",
             "fwd+bwd median ms, bf16, 32,768 tokens per call, H = 16, Dk = Dv = 128 (perf/bench_gpu.py); "
             "DLA rows under the `token` score (SPEC §7's regimes), segmentation timed under the default `drift`",
             ""]
    for note in results.get("notes", []):
        lines.append(f"NOTE: {note}")
    ll = results.get("loglinear_verify")
    if ll is not None:
        lines.append(f"Log-Linear Mamba-2 against our float64 `fenwick`: "
                     f"{'ok, relative error %.1e' % ll['relative_error'] if ll.get('ok') else 'FAILED ' + str(ll)}")
    lines += ["", "DLA-Mamba-2, sparse regime (anchor: fla SSD `chunk_simple_gla`):", ""]
    lines += _backbone_table(results, "", "fla_ssd_fwd_bwd", "fla SSD")
    lines += ["", "DLA-Mamba-2 by segmentation regime:", ""] + _regime_table(results, "", "fla_ssd_fwd_bwd")
    if any("gdn_dla32_fwd_bwd" in r for r in results["rows"]):
        lines += ["", "DLA-Gated DeltaNet, sparse regime (anchor: fla `chunk_gated_delta_rule`, l2-normalised q, k):",
                  ""]
        lines += _backbone_table(results, "gdn_", "fla_gdn_fwd_bwd", "fla GDN")
        lines += ["", "DLA-Gated DeltaNet by segmentation regime:", ""]
        lines += _regime_table(results, "gdn_", "fla_gdn_fwd_bwd")
    lines += ["", "segmentation counts of the timed DLA rows (token score, per 1000 tokens; objects read and slots "
              "changed per chunk; heads the rule gives to objects; the cost model's prediction):"]
    for r in results["rows"]:
        for key in sorted(k for k in r if k.endswith("_counts")):
            c = r[key]
            plan = (f"window R {c['window_R']}, objects read/token {c['objects_read_per_token']:.1f}"
                    if "window_R" in c else
                    f"objects {c['objects_per_1000']:.1f}, read/chunk {c['objects_read_per_chunk']:.1f}, "
                    f"changed/chunk {c['slots_changed_per_chunk']:.2f}, heads on objects {c['heads_on_objects']}")
            lines.append(f"- T={r['T']} {key[:-7]}: boundaries {c['boundaries_per_1000']:.1f}, merges "
                         f"{c['merges_per_1000']:.1f}, {plan}"
                         + (f"; model {c['model_tflop']:.2f} TFLOP, {c['model_gb']:.2f} GB, roofline "
                            f"{c['model_roofline_ms']:.2f} ms" if "model_tflop" in c else ""))
    lines += ["", "verification vs the stage's float64 torch kernels on this GPU (bf16 inputs):"]
    for v in results["verify"]:
        worst = max(v["errors"].items(), key=lambda kv: kv[1])
        lines.append(f"- {v.get('backbone', 'mamba2')} {v['policy']} K={v['K']} T={v['T']} (heads on objects "
                     f"{v.get('heads_on_objects', '—')}): {'ok' if v['ok'] else 'FAILED'}; "
                     f"worst {worst[0]} {worst[1]:.1e}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
