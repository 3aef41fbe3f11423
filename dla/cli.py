"""The `dla` command line.

Mistakes in the input (unknown names, non-positive sizes, missing data, a folder that holds
no checkpoint, a checkpoint from another config) end with one line on stderr and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(message: str) -> int:
    print(f"dla: error: {message}", file=sys.stderr)
    return 2


def _relative(lower: float) -> str:
    return f"{lower:.1%} lower" if lower >= 0 else f"{-lower:.1%} higher"


def _add_train(sub) -> None:
    from dla.model.config import BACKBONES, POLICIES, PRESETS

    p = sub.add_parser("train", help="train a language model on the embedded corpus or --data, then evaluate it")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model and training shape (default tiny)")
    p.add_argument("--backbone", default="mamba2", choices=BACKBONES)
    p.add_argument("--policy", default="dla", choices=POLICIES, help="dla, fenwick (Log-Linear) or single (base)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--data", help="a text file or a folder of .txt files (default: the embedded Shakespeare corpus)")
    p.add_argument("--seq-len", type=int, help="tokens (bytes) per training window (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="windows per step (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--capacity", type=int, help="states K of the dla policy (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out bytes scored at the end (default 32768)")
    p.add_argument("--no-compile", action="store_true", help="run eagerly instead of torch.compile(fullgraph=True)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and bits per byte of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a run folder (the --out of dla train) or a checkpoint folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _train(args) -> int:
    from pathlib import Path

    from dla.model.config import preset
    from dla.train import TRAIN_PRESETS, NonFiniteLoss, TrainConfig, plan, train

    try:
        for name in ("--steps", "--seq-len", "--batch-size", "--lr", "--checkpoint-every", "--eval-tokens"):
            _positive(name, getattr(args, name[2:].replace("-", "_")))
        if args.capacity is not None and args.policy == "dla" and args.capacity < 2:
            raise ValueError(f"--capacity must be >= 2 with --policy dla, got {args.capacity}")
        overrides = {"backbone": args.backbone, "policy": args.policy}
        if args.seq_len is not None:
            overrides["seq_len"] = args.seq_len
        if args.capacity is not None:
            overrides["capacity"] = args.capacity
        model_cfg = preset(args.preset, **overrides)
        given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
        train_cfg = TrainConfig(
            **{**TRAIN_PRESETS[args.preset], **{k: v for k, v in given.items() if v is not None}},
            seed=args.seed, eval_tokens=args.eval_tokens,
            data=None if args.data is None else str(Path(args.data).resolve()),
        )
        run = plan(model_cfg, train_cfg, args.out, resume=args.resume, compile=not args.no_compile,
                   device=args.device, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        return _fail(str(e))
    try:
        result = train(run)
    except NonFiniteLoss as e:
        from dla.checkpoint import has_checkpoint

        kept = "the last good checkpoint is kept" if has_checkpoint(run.out) else "no checkpoint was written before it"
        print(f"dla: error: {e}; training stopped, {kept} in {run.out}", file=sys.stderr)
        return 1
    lower = 1 - result["heldout_bpb"] / result["unigram_bpb"]
    print(f"held-out bits per byte: {result['heldout_bpb']:.3f} (model, {result['heldout_tokens']:,} bytes)  vs  "
          f"{result['unigram_bpb']:.3f} (unigram byte model fitted on the training split): {_relative(lower)}")
    print(f"loss plot: {result['plot']}")
    print(f"checkpoint: {result['checkpoint']}  ({result['train_s']:.0f} s of training)")
    return 0


def _eval(args) -> int:
    from dla.train import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.checkpoint, device=args.device)
    except ValueError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(result))
    else:
        lower = 1 - result["heldout_bpb"] / result["unigram_bpb"]
        print(f"{result['checkpoint']} ({result['backbone']}/{result['policy']}, step {result['step']}): "
              f"held-out loss {result['heldout_loss']:.4f} nats, {result['heldout_bpb']:.3f} bits per byte "
              f"over {result['heldout_tokens']:,} bytes; unigram byte model {result['unigram_bpb']:.3f} "
              f"({_relative(lower)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="dla", description="Dynamic Linear Attention")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="segment a piecewise-stationary stream and check the readout against the reference")
    _add_train(sub)
    _add_eval(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dla.demo import main as demo

        return demo()
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
