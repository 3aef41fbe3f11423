"""The `dla` command line.

Mistakes in the input (unknown names, non-positive sizes, missing data, a folder that holds
no checkpoint, a checkpoint from another config) end with one line on stderr and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from dla import __version__
from dla.model import BACKBONES, POLICIES, PRESETS, ModelConfig, preset
from dla.ops import SCORES
from dla.run import checkpoint, distributed
from dla.run import experiment as ex
from dla.run.data import decode, encode
from dla.run.demo import main as demo
from dla.run.device import resolve_device
from dla.run.eval.lm import evaluate_checkpoint
from dla.run.eval.task_accuracy import evaluate_checkpoint_on_task
from dla.run.eval.tasks import TASKS, task_fields
from dla.run.generate import check_request, generate
from dla.run.quantize import quantize_checkpoint
from dla.run.segments import segments_of_checkpoint
from dla.run.train import RECIPES, Interrupted, NonFiniteLoss, TrainConfig, plan, recipe, resumed_config, train


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(message: str) -> int:
    print(f"dla: error: {message}", file=sys.stderr)
    return 2


def _relative(lower: float) -> str:
    return f"{lower:.1%} lower" if lower >= 0 else f"{-lower:.1%} higher"


# Defaults of `dla train` for a new run; a resumed run takes its configuration from its checkpoint
# and these flags only when given (so they default to None in the parser).
_TRAIN_DEFAULTS = {"preset": "tiny", "backbone": "mamba2", "policy": "dla", "seed": 0, "eval_tokens": 32768,
                   "optim": "adamw"}


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_segmentation(layers: list[dict]) -> None:
    """The statistics of `dla.run.eval.segmentation.layer_summary`, a line per DLA layer."""
    if layers:
        print(f"segmentation of the held-out windows ({layers[0]['window_tokens']} tokens; boundary rate: the "
              f"fraction of tokens at positions >= 16 of a window that open a slot):")
    for e in layers:
        print(f"  layer {e['layer']}: boundary rate {_rate(e['boundary_rate'])} (by head "
              f"{' '.join(map(_rate, e['boundary_rate_by_head']))}), {e['merges_per_1000']:.1f} merges per 1000 "
              f"tokens, mean segment {e['mean_segment_length']:.1f} tokens")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a language model on the embedded corpus or --data, then evaluate it",
                       description="A new run takes its configuration from the flags (the preset's where not "
                                   "given); --resume continues the run in --out from its latest checkpoint with the "
                                   "checkpoint's configuration, where only --steps (to train longer) and "
                                   "--eval-tokens may differ. Exit codes: 2 for a mistake in the input or a failed "
                                   "write (one line on stderr, nothing left behind but the last checkpoint), 1 when "
                                   "the loss stops being finite, 130 when interrupted.")
    p.add_argument("--preset", choices=[p for p in PRESETS if p in RECIPES],
                   help="model shape and its training recipe (default tiny)")
    p.add_argument("--backbone", choices=BACKBONES, help="mamba2 (default), gdn (Gated DeltaNet) or attention")
    p.add_argument("--policy", choices=POLICIES, help="dla (default), fenwick (Log-Linear) or single (base)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's; with --resume, more steps "
                                             "than the checkpoint's train on)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png, the corpus split")
    p.add_argument("--data", help="a text file or a folder of .txt files (default: the embedded Shakespeare corpus)")
    p.add_argument("--seq-len", type=int, help="tokens (bytes) per training window (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="windows per step (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--capacity", type=int, help="states K of the dla policy (default: the preset's)")
    p.add_argument("--score", choices=SCORES,
                   help="what the dla policy's boundary decision reads: drift (default: the change a token "
                        "makes to the layer's whole memory), token or state (ablations)")
    p.add_argument("--tau", type=float, help="boundary threshold τ of the dla policy (default: the preset's, 0.6)")
    p.add_argument("--pack", action="store_true",
                   help="keep documents apart (the corpus's plays, --data's files): cut each window at document "
                        "starts and run every piece as its own sequence; costs up to pieces-per-window times "
                        "the work (twice for the default corpus)")
    p.add_argument("--seed", type=int, help="seed of the initial weights and of the batches (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--eval-tokens", type=int, help="held-out bytes scored at the end (default 32768)")
    p.add_argument("--no-compile", action="store_true", help="run eagerly instead of torch.compile(fullgraph=True)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--optim", choices=["adamw", "adamw8bit"],
                   help="adamw (default) or torchao's 8-bit AdamW (CPU and GPU; needs the extra dla[quant])")
    p.add_argument("--float8", action="store_true",
                   help="float8 training of the linear layers (torchao, the extra dla[quant]; needs a GPU of "
                        "compute capability >= 8.9)")
    p.add_argument("--float8-recipe", choices=["tensorwise", "rowwise"],
                   help="float8 scaling recipe (default tensorwise; needs --float8)")
    p.add_argument("--dist-backend", choices=["nccl", "gloo"],
                   help="under torchrun --nproc_per_node=N: the process-group backend (default nccl on CUDA, "
                        "gloo on the CPU); the model is sharded with FSDP2, --batch-size is the global batch")


# Task parameters of `dla eval --task T`: flag, field of the task's generator, type.
_TASK_FLAGS = (("--seq-len", "seq_len", int), ("--pairs", "pairs", int), ("--vocab", "vocab", int),
               ("--noise", "noise", int), ("--power-a", "power_a", float), ("--digits", "digits", int),
               ("--depth", "depth", float), ("--needles", "needles", int), ("--key-len", "key_len", int),
               ("--tokens", "tokens", int))


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a checkpoint: held-out bits per byte (lm) or accuracy on a synthetic task")
    p.add_argument("--checkpoint", required=True, help="a run folder (the --out of dla train) or a checkpoint folder")
    p.add_argument("--task", default="lm", choices=["lm", *TASKS],
                   help="lm: held-out bits per byte (default); else accuracy on the task's query positions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g = p.add_argument_group("synthetic tasks (defaults: the checkpoint's training task's, else the task's own)")
    g.add_argument("--examples", type=int, help="evaluation sequences (default 512)")
    g.add_argument("--batch-size", type=int, help="sequences per forward pass (default: about 65,536 tokens)")
    g.add_argument("--seed", type=int, help="seed of the evaluation stream (default 0)")
    for flag, field, kind in _TASK_FLAGS:
        g.add_argument(flag, dest=f"task_{field}", type=kind, metavar=field.upper(),
                       help=f"the task's {field} ({', '.join(n for n, c in TASKS.items() if field in _fields(c))})")


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _train_configs(args) -> tuple[ModelConfig, TrainConfig]:
    """The configuration of `dla train`: the checkpoint's with the flags given (--resume of a run
    that has one), else the flags' over the preset's."""
    model = {k: getattr(args, k) for k in ("backbone", "policy", "seq_len", "capacity", "score", "tau")
             if getattr(args, k) is not None}
    train = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "eval_tokens": args.eval_tokens, "optim": args.optim,
             "float8": (args.float8_recipe or "tensorwise") if args.float8 else None,
             "pack": True if args.pack else None,
             "data": None if args.data is None else str(Path(args.data).resolve())}
    train = {k: v for k, v in train.items() if v is not None}
    if args.resume and checkpoint.has_checkpoint(Path(args.out)):
        return resumed_config(args.out, preset_name=args.preset, model=model, train=train)
    name = args.preset or _TRAIN_DEFAULTS["preset"]
    model = {"backbone": _TRAIN_DEFAULTS["backbone"], "policy": _TRAIN_DEFAULTS["policy"], **model}
    train = {k: _TRAIN_DEFAULTS[k] for k in ("seed", "eval_tokens", "optim")} | train
    return preset(name, **model), recipe(name, **train)


def _train(args) -> int:
    # under torchrun every process meets the same errors: rank 0 alone reports them
    report = distributed.is_main_process()
    try:
        world = distributed.from_env(backend=args.dist_backend, device=args.device)
        for name in ("--steps", "--seq-len", "--batch-size", "--lr", "--checkpoint-every", "--eval-tokens"):
            _positive(name, getattr(args, name[2:].replace("-", "_")))
        if args.seed is not None and args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if args.float8_recipe is not None and not args.float8:
            raise ValueError(f"--float8-recipe {args.float8_recipe} needs --float8")
        if args.capacity is not None and (args.policy or "dla") == "dla" and args.capacity < 2:
            raise ValueError(f"--capacity must be >= 2 with --policy dla, got {args.capacity}")
        if args.tau is not None and not (math.isfinite(args.tau) and args.tau >= 0):
            raise ValueError(f"--tau must be a finite number >= 0, got {args.tau}")
        model_cfg, train_cfg = _train_configs(args)
        for flag in ("score", "tau"):
            if getattr(args, flag) is not None and (model_cfg.policy != "dla" or model_cfg.backbone == "attention"):
                raise ValueError(f"--{flag} applies to the dla policy of the mamba2 and gdn backbones, not to "
                                 f"{model_cfg.backbone}/{model_cfg.policy}")
        run = plan(model_cfg, train_cfg, args.out, resume=args.resume, compile=not args.no_compile,
                   device=args.device, checkpoint_every=args.checkpoint_every, world=world)
    except ValueError as e:
        return _fail(str(e)) if report else distributed.quiet_failure()
    try:
        with distributed.process_group(world):
            result = train(run)
    except NonFiniteLoss as e:
        kept = ("the last good checkpoint is kept" if checkpoint.has_checkpoint(run.out)
                else "no checkpoint had been written, so nothing was kept")
        if report:
            print(f"dla: error: {e}; training stopped, {kept} in {run.out}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if report:
            kept = (f"last checkpoint: {e.checkpoint} (continue with --resume)" if e.checkpoint is not None
                    else "no checkpoint had been written, so nothing was kept")
            print(f"dla: interrupted at step {e.step}; {kept}", file=sys.stderr)
        return 130
    except ValueError as e:  # found while training: a failed write, a damaged checkpoint or split, a held lock
        return _fail(str(e)) if report else 2
    if not report:
        return 0
    lower = 1 - result["heldout_bpb"] / result["unigram_bpb"]
    print(f"held-out bits per byte: {result['heldout_bpb']:.3f} (model, {result['heldout_tokens']:,} bytes)  vs  "
          f"{result['unigram_bpb']:.3f} (unigram byte model fitted on the training split): {_relative(lower)}")
    print(f"loss plot: {result['plot']}")
    print(f"checkpoint: {result['checkpoint']}  ({result['train_s']:.0f} s of training)")
    _print_segmentation(result["segmentation"])
    return 0


def _eval_task(args) -> int:
    fields = task_fields(args.task)
    params = {}
    for flag, field, _ in _TASK_FLAGS:
        value = getattr(args, f"task_{field}")
        if value is None:
            continue
        if field not in fields:
            return _fail(f"{flag} does not apply to --task {args.task} (it takes "
                         f"{', '.join('--' + f.replace('_', '-') for f in fields)})")
        params[field] = value
    try:
        _positive("--examples", args.examples)
        _positive("--batch-size", args.batch_size)
        if args.seed is not None and args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        result = evaluate_checkpoint_on_task(args.checkpoint, args.task, params, examples=args.examples or 512,
                                             seed=args.seed or 0, batch_size=args.batch_size, device=args.device,
                                             progress=True)
    except ValueError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['checkpoint']} ({result['backbone']}/{result['policy']}, step {result['step']}): "
              f"{result['task']} {json.dumps(result['params'])}: accuracy {result['accuracy']:.1%} over "
              f"{result['queries']:,} query positions, all queries right in {result['exact_accuracy']:.1%} of "
              f"{result['sequences']:,} sequences (chance {result['chance']:.1%})")
    return 0


def _eval(args) -> int:
    if args.task != "lm":
        return _eval_task(args)
    given = [flag for flag, field, _ in _TASK_FLAGS if getattr(args, f"task_{field}") is not None]
    given += [f"--{n.replace('_', '-')}" for n in ("examples", "batch_size", "seed") if getattr(args, n) is not None]
    if given:
        return _fail(f"{given[0]} does not apply to --task lm (it scores the checkpoint's held-out text)")
    try:
        result = evaluate_checkpoint(args.checkpoint, device=args.device, progress=True)
    except ValueError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(result))
    else:
        lower = 1 - result["heldout_bpb"] / result["unigram_bpb"]
        dla_policy = f", score {result['score']}, tau {result['tau']:g}" if result["segmentation"] else ""
        print(f"{result['checkpoint']} ({result['backbone']}/{result['policy']}{dla_policy}, step {result['step']}): "
              f"held-out loss {result['heldout_loss']:.4f} nats, {result['heldout_bpb']:.3f} bits per byte "
              f"over {result['heldout_tokens']:,} bytes; unigram byte model {result['unigram_bpb']:.3f} "
              f"({_relative(lower)})")
        _print_segmentation(result["segmentation"])
    return 0


def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="train and evaluate a grid of models on synthetic tasks (a TOML file); "
                                          "write results.json, results.md and results.png",
                       description="Finished runs are kept and skipped when the command is repeated. Exit code 3: "
                                   "--time-limit stopped the shard with runs left (repeat the command).")
    p.add_argument("file", help="the experiment file, e.g. experiments/recall_grid.toml")
    p.add_argument("--shard", help="I/N: run every N-th run starting at the I-th (1 <= I <= N)")
    p.add_argument("--only", help="run only the runs whose id matches this glob (see --list)")
    p.add_argument("--out", help="results folder (default: the file's `out`)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--time-limit", type=float, help="seconds: start no run that would end past this, judged by "
                                                    "the longest run so far")
    p.add_argument("--list", action="store_true", help="print the shard's runs and whether each is done; run nothing")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the finished runs")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="keep only each run's result.json (small enough to copy off a GPU machine)")


def _experiment(args) -> int:
    try:
        exp = ex.load(args.file, out=args.out)
        shard = ex.parse_shard(args.shard)
        _positive("--time-limit", args.time_limit)
        runs = ex.select(exp.runs, shard, args.only)
        if not runs:
            raise ValueError(f"--only {args.only}: matches no run of shard {shard[0]}/{shard[1]} (see --list)")
        if args.list:
            for run in runs:
                done = ex.finished(run, exp.out)
                print(f"{run.id}\t{'done' if done else 'to do'}\t{run.task.steps} steps")
            return 0
        if args.report:
            report = ex.write_report(exp)
        else:
            device = resolve_device(args.device)
            words = ["dla", "experiment", args.file]
            for flag in ("shard", "only", "out", "device", "time_limit"):
                value = getattr(args, flag)
                if value is not None:
                    words += [f"--{flag.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else value]
            words += ["--no-checkpoints"] if args.no_checkpoints else []
            report = ex.run_experiment(exp, shard=shard, only=args.only, device=device, time_limit=args.time_limit,
                                       command=shlex.join(words), checkpoints=not args.no_checkpoints)
    except ValueError as e:
        return _fail(str(e))
    done = len(exp.runs) - len(report["missing"])
    print(f"{exp.name}: {done} of {len(exp.runs)} runs finished; "
          + ", ".join(f"{k} {v}" for k, v in report["paths"].items()))
    if report.get("left"):
        print(f"{report['left']} runs of this shard are left (--time-limit): repeat the command to continue")
        return 3
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint (compiled decode step)")
    p.add_argument("--checkpoint", required=True, help="a run folder (the --out of dla train or dla quantize) or a checkpoint folder")
    p.add_argument("--prompt", required=True, help="text to continue (encoded as UTF-8 bytes)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="bytes to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely bytes (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the decode step eagerly (default: torch.compile, with CUDA graphs on CUDA)")


def _generate(args) -> int:
    try:
        device = resolve_device(args.device)
        try:
            model = checkpoint.load(args.checkpoint, device=device)
        except ValueError as e:
            raise ValueError(f"--checkpoint {e}") from None
        prompt = torch.tensor(encode(args.prompt), dtype=torch.int64, device=device)[None]
        check_request(model.cfg, prompt.shape[1], args.max_new_tokens, args.temperature, args.top_k)
    except ValueError as e:
        return _fail(str(e))
    tokens = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, compile="none" if args.no_compile else "auto")
    print(args.prompt + decode(tokens[0].cpu().numpy()))
    return 0


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="int8 weight-only checkpoint (torchao), with held-out bits per byte before and after")
    p.add_argument("--checkpoint", required=True, help="a run folder (the --out of dla train) or a checkpoint folder")
    p.add_argument("--out", required=True, help="run folder for the int8 checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation before and after")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", help="device of the evaluation: cpu or cuda (default: cuda when available)")


def _quantize(args) -> int:
    try:
        resolve_device(args.device)
        try:
            out = quantize_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
        except checkpoint.CheckpointError as e:  # about the source checkpoint
            message = str(e)
            raise ValueError(message if message.startswith("--") else f"--checkpoint {message}") from None
        files = {name: checkpoint.find(path) / "model.safetensors"
                 for name, path in (("bytes_before", args.checkpoint), ("bytes_after", out))}
        weights = {name: f.stat().st_size if f.is_file() else None for name, f in files.items()}  # none if sharded
        result = {"checkpoint": str(out), "source": str(args.checkpoint), **weights}
        if not args.no_eval:
            before = evaluate_checkpoint(args.checkpoint, device=args.device, progress=True)
            after = evaluate_checkpoint(out, device=args.device, progress=True)
            result.update(heldout_bpb_before=before["heldout_bpb"], heldout_bpb_after=after["heldout_bpb"],
                          heldout_tokens=after["heldout_tokens"])
    except ValueError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(result))
        return 0
    sizes = "" if weights["bytes_before"] is None else (f" (weights {weights['bytes_before'] / 2**20:.2f} MiB -> "
                                                        f"{weights['bytes_after'] / 2**20:.2f} MiB)")
    print(f"int8 weight-only checkpoint: {out}{sizes}")
    if not args.no_eval:
        print(f"held-out bits per byte over {result['heldout_tokens']:,} bytes: {result['heldout_bpb_before']:.4f} "
              f"before, {result['heldout_bpb_after']:.4f} after quantization "
              f"({result['heldout_bpb_after'] - result['heldout_bpb_before']:+.4f})")
    return 0


def _indices(value: str) -> list[int]:
    try:
        indices = [int(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,2, got {value!r}") from None
    return sorted(set(indices))


def _add_segments(sub) -> None:
    p = sub.add_parser("segments", help="draw how a checkpoint's DLA layers segment a text, and print the "
                                        "segmentation statistics of what is drawn",
                       description="The model reads the text once from an empty cache. For each chosen layer and "
                                   "head the picture shows the text with a bar before every token that opened a "
                                   "slot, and which slot holds each past token after each step.")
    p.add_argument("--checkpoint", required=True, help="a run folder (the --out of dla train) or a checkpoint folder")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="a UTF-8 text file (at most 4096 bytes)")
    text.add_argument("--prompt", help="the text itself")
    p.add_argument("--out", required=True, help="the picture, a .png file")
    p.add_argument("--layers", type=_indices, help="DLA layers to draw, e.g. 0,1 (default: all)")
    p.add_argument("--heads", type=_indices, help="heads to draw, e.g. 0,3 (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _segments(args) -> int:
    try:
        if args.text is not None:
            try:
                text = Path(args.text).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ValueError(f"--text {args.text}: no such file") from None
            except IsADirectoryError:
                raise ValueError(f"--text {args.text}: is a folder, expected a text file") from None
            except UnicodeDecodeError:
                raise ValueError(f"--text {args.text}: not UTF-8 text") from None
        else:
            text = args.prompt
        result = segments_of_checkpoint(args.checkpoint, text, args.out, layers=args.layers, heads=args.heads,
                                        device=args.device)
    except ValueError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['checkpoint']} ({result['backbone']}/{result['policy']}, score {result['score']}, tau "
          f"{result['tau']:g}, step {result['step']}): {result['tokens']:,} tokens; picture: {result['picture']}")
    print("boundary rate: the fraction of tokens at positions >= 16 that open a slot (overall, then by quarter of "
          "the text)")
    for h in result["segmentation"]:
        print(f"  layer {h['layer']} head {h['head']}: boundary rate {_rate(h['boundary_rate'])} (quarters "
              f"{' '.join(map(_rate, h['boundary_rate_by_quarter']))}), {h['merges_per_1000']:.1f} merges per 1000 "
              f"tokens, segments mean {h['mean_segment_length']:.1f} median {h['median_segment_length']:g} tokens, "
              f"{h['slots_changed_per_chunk']:.2f} slots changed per chunk")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dla", description="Dynamic Linear Attention")
    parser.add_argument("--version", action="version", version=f"dla {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="segment a piecewise-stationary stream and check the readout against the reference")
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_quantize(sub)
    _add_experiment(sub)
    _add_segments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "quantize":
        return _quantize(args)
    if args.command == "experiment":
        return _experiment(args)
    if args.command == "segments":
        return _segments(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
