"""`dla experiment FILE.toml`: train and evaluate a grid of models on synthetic tasks, then write
`results.json`, `results.md` and `results.png` into the experiment's folder.

The file (see `experiments/recall_grid.toml`):

    name = "recall-grid"          out = "runs/recall-grid"      compile = true
    [model]        ModelConfig fields every run shares (and `preset`, default "tiny")
    [shapes.NAME]  ModelConfig fields of one model shape (e.g. d_model and its head geometry)
    [grid]         shape = [NAMES], mixer = ["mamba2/dla", …, "attention"], seed = [0, 1, 2]
    [[tasks]]      label, task (a `dla.run.eval.tasks` name), params (the generator's fields),
                   steps, batch_size, lr, warmup, weight_decay, grad_clip (the training budget;
                   the last four default to `TrainConfig`'s),
                   eval = [{overrides of params}, …] (default: the training params),
                   eval_examples, eval_seed

A run is one (task, shape, mixer, seed). Training: `dla train`'s step (`dla.run.train.train_step`:
AdamW with its parameter groups and schedule, linear warmup and cosine decay, gradient clipping,
bf16 autocast on CUDA), forward and loss compiled with `torch.compile(fullgraph=True)` unless
`compile = false`; the loss is the cross-entropy on query positions only (targets are −100
elsewhere, as in Zoology's MQAR), a fixed number of steps per task. Each run is built for the longest length it is evaluated at
(`seq_len = max` over its training and evaluation lengths), so the `fenwick` policy has the
levels that length needs; shorter training sequences leave the higher levels untrained, which
is what Log-Linear attention meets when it is run past its training length.

Runs are independent: each writes `OUT/runs/ID/result.json` (and its checkpoint) when it
finishes, a finished run is skipped when the command is repeated, and `--shard i/n` takes every
n-th run, so a grid spreads over several processes or machines that share `OUT`. The report
is rebuilt from every finished run in `OUT` after each shard, so it is complete after the last.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import platform
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dla.model import BACKBONES, POLICIES, CausalLM, ModelConfig, preset
from dla.run import checkpoint
from dla.run.eval.task_accuracy import check_vocab, evaluate_task
from dla.run.eval.tasks import make_task
from dla.run.train import TrainConfig, compiled_loss, make_optimizer, train_step

TOP_KEYS = {"name", "out", "compile", "model", "shapes", "grid", "tasks"}
TASK_KEYS = {"label", "task", "params", "steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "eval",
             "eval_examples", "eval_seed"}
TRAIN_DEFAULTS = TrainConfig()
LOG_EVERY = 25  # steps between loss reads (each read synchronises the GPU)


@dataclass(frozen=True)
class TaskSpec:
    label: str
    task: str
    params: dict
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    grad_clip: float
    eval: tuple  # of dicts: overrides of params
    eval_examples: int
    eval_seed: int

    def eval_label(self, overrides: dict) -> str:
        shown = overrides or {"seq_len": self.params.get("seq_len", make_task(self.task, **self.params).seq_len)}
        return ", ".join(f"{k}={v}" for k, v in shown.items())

    def longest(self) -> int:
        """The longest sequence the run trains or is tested on."""
        return max(make_task(self.task, **{**self.params, **o}).seq_len for o in ({}, *self.eval))


@dataclass(frozen=True)
class RunSpec:
    task: TaskSpec
    shape: str
    backbone: str
    policy: str
    seed: int
    model: dict  # ModelConfig fields

    @property
    def mixer(self) -> str:
        return self.backbone if self.backbone == "attention" else f"{self.backbone}/{self.policy}"

    @property
    def id(self) -> str:
        return f"{self.task.label}--{self.shape}--{self.mixer.replace('/', '-')}--seed{self.seed}"

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    def describe(self) -> dict:
        """Everything that determines the run's result (compared when a run is found done)."""
        return {"task": dataclasses.asdict(self.task), "shape": self.shape, "backbone": self.backbone,
                "policy": self.policy, "seed": self.seed, "model": self.model}


@dataclass
class Experiment:
    name: str
    path: Path
    out: Path
    compile: bool
    runs: list[RunSpec] = field(default_factory=list)


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _int(path: Path, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_where(path, key)} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(path: Path, key: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"{_where(path, key)} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _table(path: Path, key: str, value) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{_where(path, key)} must be a table, got {value!r}")
    return value


def _task_spec(path: Path, i: int, raw) -> TaskSpec:
    where = f"tasks[{i}]"
    raw = _table(path, where, raw)
    unknown = sorted(set(raw) - TASK_KEYS)
    if unknown:
        raise ValueError(f"{_where(path, where)}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TASK_KEYS))})")
    for key in ("task", "steps", "batch_size"):
        if key not in raw:
            raise ValueError(f"{_where(path, where)}: missing {key!r}")
    params = dict(_table(path, f"{where}.params", raw.get("params", {})))
    evals = raw.get("eval", [])
    if not isinstance(evals, list) or not all(isinstance(e, dict) for e in evals):
        raise ValueError(f"{_where(path, where + '.eval')} must be a list of tables, got {evals!r}")
    try:
        for overrides in [{}] + evals:
            make_task(raw["task"], **{**params, **overrides})
    except ValueError as e:
        raise ValueError(f"{_where(path, where)}: {e}") from None
    label = raw.get("label", raw["task"])
    if not isinstance(label, str) or not label or "--" in label or "/" in label:
        raise ValueError(f"{_where(path, where + '.label')} must be a non-empty name without '--' or '/', "
                         f"got {label!r}")
    return TaskSpec(
        label=label, task=raw["task"], params=params,
        steps=_int(path, f"{where}.steps", raw["steps"]),
        batch_size=_int(path, f"{where}.batch_size", raw["batch_size"]),
        lr=_float(path, f"{where}.lr", raw.get("lr", TRAIN_DEFAULTS.lr), positive=True),
        warmup=_int(path, f"{where}.warmup", raw.get("warmup", TRAIN_DEFAULTS.warmup), minimum=0),
        weight_decay=_float(path, f"{where}.weight_decay", raw.get("weight_decay", TRAIN_DEFAULTS.weight_decay),
                            positive=False),
        grad_clip=_float(path, f"{where}.grad_clip", raw.get("grad_clip", TRAIN_DEFAULTS.grad_clip), positive=True),
        eval=tuple(evals), eval_examples=_int(path, f"{where}.eval_examples", raw.get("eval_examples", 512)),
        eval_seed=_int(path, f"{where}.eval_seed", raw.get("eval_seed", 0), minimum=0),
    )


def _mixer(path: Path, value) -> tuple[str, str]:
    if value == "attention":
        return "attention", "single"
    backbone, _, policy = str(value).partition("/")
    if backbone not in BACKBONES or backbone == "attention" or policy not in POLICIES:
        raise ValueError(f"{_where(path, 'grid.mixer')}: {value!r} is not 'attention' or BACKBONE/POLICY with "
                         f"BACKBONE in {[b for b in BACKBONES if b != 'attention']} and POLICY in {list(POLICIES)}")
    return backbone, policy


def load(path: str | Path, *, out: str | Path | None = None) -> Experiment:
    """Read and check an experiment file; every mistake is a `ValueError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such experiment file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    name = raw.get("name", path.stem)
    compile_ = raw.get("compile", True)
    if not isinstance(compile_, bool):
        raise ValueError(f"{_where(path, 'compile')} must be true or false, got {compile_!r}")
    model = dict(_table(path, "model", raw.get("model", {})))
    preset_name = model.pop("preset", "tiny")
    shapes = {k: _table(path, f"shapes.{k}", v) for k, v in _table(path, "shapes", raw.get("shapes", {})).items()}
    grid = _table(path, "grid", raw.get("grid", {}))
    unknown = sorted(set(grid) - {"shape", "mixer", "seed"})
    if unknown:
        raise ValueError(f"{_where(path, 'grid')}: unknown axis {unknown[0]!r} (axes: shape, mixer, seed)")
    shape_names = grid.get("shape", list(shapes) or ["default"])
    for s in shape_names:
        if s not in shapes and not (s == "default" and not shapes):
            raise ValueError(f"{_where(path, 'grid.shape')}: {s!r} is not one of the [shapes] ({', '.join(shapes)})")
    mixers = [_mixer(path, m) for m in grid.get("mixer", ["mamba2/dla"])]
    seeds = [_int(path, "grid.seed", s, minimum=0) for s in grid.get("seed", [0])]
    tasks = raw.get("tasks", [])
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{_where(path, 'tasks')}: at least one [[tasks]] entry is needed")
    specs = [_task_spec(path, i, t) for i, t in enumerate(tasks)]
    labels = [t.label for t in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{_where(path, 'tasks')}: labels must be distinct, got {labels}")
    exp = Experiment(name=name, path=path, out=Path(out if out is not None else raw.get("out", f"runs/{name}")),
                     compile=compile_)
    for task in specs:
        for shape in shape_names:
            for backbone, policy in mixers:
                for seed in seeds:
                    fields = {**model, **shapes.get(shape, {}), "backbone": backbone, "policy": policy,
                              "seq_len": task.longest()}
                    try:
                        cfg = preset(preset_name, **fields)
                        check_vocab(cfg, make_task(task.task, **task.params))
                    except (TypeError, ValueError) as e:
                        raise ValueError(f"{path}: model of shape {shape!r}, {backbone}/{policy}: {e}") from None
                    exp.runs.append(RunSpec(task, shape, backbone, policy, seed, cfg.to_dict()))
    return exp


def parse_shard(text: str | None) -> tuple[int, int]:
    """`"i/n"` (1 ≤ i ≤ n) → (i, n); None → (1, 1)."""
    if text is None:
        return 1, 1
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with 1 <= I <= N, got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard must be I/N with 1 <= I <= N, got {text!r}")
    return i, n


def select(runs: list[RunSpec], shard: tuple[int, int] = (1, 1), only: str | None = None) -> list[RunSpec]:
    """Every n-th run from the i-th (round robin keeps the shards' mixes, and so their times,
    alike), then those whose id matches the glob `only`."""
    i, n = shard
    chosen = runs[i - 1::n]
    if only is not None:
        chosen = [r for r in chosen if fnmatch.fnmatchcase(r.id, only)]
    return chosen


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def train_run(spec: RunSpec, *, device: torch.device, compile: bool, log=None):
    """Train one run's model on its task by `dla train`'s step; return the model, its optimizer
    and the training record."""
    t = spec.task
    tcfg = TrainConfig(steps=t.steps, batch_size=t.batch_size, lr=t.lr, warmup=t.warmup,
                       weight_decay=t.weight_decay, grad_clip=t.grad_clip, seed=spec.seed)
    task = make_task(t.task, **t.params)
    torch.manual_seed(spec.seed)
    model = CausalLM(spec.model_config()).to(device)
    optimizer = make_optimizer(model, tcfg)
    if compile:
        torch.compiler.reset()  # each run is a new model; stale frames would count towards the recompile limit
    loss_fn = compiled_loss(model) if compile else model.loss
    model.train()
    curve, pending = [], []
    t0 = time.monotonic()
    first_step_s = None
    status = "ok"
    for step in range(t.steps):
        x, y = task.batch(t.batch_size, seed=spec.seed, step=step, split="train", device=device)
        loss, _ = train_step(model, loss_fn, optimizer, tcfg, step, x, y)
        pending.append(loss)
        if first_step_s is None:
            float(loss)
            first_step_s = time.monotonic() - t0
        if (step + 1) % LOG_EVERY == 0 or step + 1 == t.steps:
            values = torch.stack(pending).float().cpu().tolist()
            pending = []
            curve.append([step + 1, sum(values) / len(values)])
            if not all(math.isfinite(v) for v in values):
                status = f"non-finite loss by step {step + 1}"
                break
            if log is not None and (step + 1) % (LOG_EVERY * 8) == 0:
                log(f"  {spec.id}: step {step + 1}/{t.steps} loss {curve[-1][1]:.3f}")
    train_s = time.monotonic() - t0
    return model, optimizer, {"status": status, "steps": t.steps, "train_s": round(train_s, 2),
                   "first_step_s": round(first_step_s or 0.0, 2), "loss_curve": curve,
                   "final_loss": curve[-1][1] if curve else None, "parameters": model.num_params(),
                   "train_config": dataclasses.asdict(tcfg)}


def run_one(spec: RunSpec, out: Path, *, device: torch.device, compile: bool, command: str, checkpoints: bool = True,
            log=None) -> dict:
    """Train, evaluate and (with `checkpoints`) checkpoint one run; write `out/runs/ID/result.json` last."""
    folder = out / "runs" / spec.id
    model, optimizer, record = train_run(spec, device=device, compile=compile, log=log)
    t = spec.task
    evals = []
    if record["status"] == "ok":
        t0 = time.monotonic()
        for overrides in t.eval or ({},):
            task = make_task(t.task, **{**t.params, **overrides})
            result = evaluate_task(model, task, examples=t.eval_examples, seed=t.eval_seed)
            evals.append({"label": t.eval_label(overrides), "params": task.params(), **result})
        record["eval_s"] = round(time.monotonic() - t0, 2)
    if record["status"] == "ok" and checkpoints:
        config = {"model": spec.model, "train": record["train_config"],
                  "task": {"name": t.task, "params": make_task(t.task, **t.params).params()}}
        checkpoint.save(folder, step=t.steps, model=model, optimizer=optimizer, config=config,
                        state={"experiment_run": spec.id})
    result = {"id": spec.id, "task": t.label, "task_name": t.task, "shape": spec.shape, "mixer": spec.mixer,
              "backbone": spec.backbone, "policy": spec.policy, "seed": spec.seed,
              "d_model": spec.model["d_model"], **record, "evals": evals, "device": device_name(device),
              "torch": torch.__version__, "compiled": compile, "command": command, "spec": spec.describe()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, folder / "result.json")
    return result


def finished(spec: RunSpec, out: Path) -> dict | None:
    """The stored result of `spec` in `out`, or None; a result made by another spec is refused."""
    path = out / "runs" / spec.id / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if result.get("spec") != json.loads(json.dumps(spec.describe())):
        raise ValueError(f"--out {out}: run {spec.id} there was made with another configuration; "
                         f"choose a new --out or remove {path.parent}")
    return result


def run_experiment(exp: Experiment, *, shard=(1, 1), only: str | None = None, device: torch.device,
                   time_limit: float | None = None, command: str = "", checkpoints: bool = True, log=None) -> dict:
    """Run the unfinished runs of the shard (stopping before one that would pass
    `time_limit` seconds, judged by the longest run so far), then rebuild the report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    runs = select(exp.runs, shard, only)
    todo = [r for r in runs if finished(r, exp.out) is None]
    log(f"{exp.name}: shard {shard[0]}/{shard[1]} holds {len(runs)} of {len(exp.runs)} runs, {len(todo)} to do; "
        f"device {device_name(device)}; results in {exp.out}")
    t0, longest, done = time.monotonic(), 0.0, 0
    for spec in todo:
        elapsed = time.monotonic() - t0
        if time_limit is not None and done and elapsed + longest > time_limit:
            break
        start = time.monotonic()
        result = run_one(spec, exp.out, device=device, compile=exp.compile, command=command, checkpoints=checkpoints,
                         log=log)
        longest = max(longest, time.monotonic() - start)
        done += 1
        accs = ", ".join(f"{e['label']}: {e['accuracy']:.3f}" for e in result["evals"])
        loss = "-" if result["final_loss"] is None else f"{result['final_loss']:.3f}"
        log(f"[{done}/{len(todo)}] {spec.id}: {result['status']}, loss {loss}, "
            f"{result['train_s']:.0f} s training; accuracy {accs or '-'}")
    report = write_report(exp)
    report["left"] = len(todo) - done
    return report


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def collect(exp: Experiment) -> tuple[list[dict], list[str]]:
    """Finished results of the grid's runs in `exp.out`, and the ids still missing."""
    results, missing = [], []
    for spec in exp.runs:
        r = finished(spec, exp.out)
        (results.append(r) if r is not None else missing.append(spec.id))
    return results, missing


def summarise(results: list[dict]) -> list[dict]:
    """Mean and spread over seeds of each (task, shape, mixer, evaluation)."""
    groups: dict[tuple, list[float]] = {}
    chance: dict[tuple, float] = {}
    for r in results:
        for e in r["evals"]:
            key = (r["task"], r["shape"], r["mixer"], e["label"])
            groups.setdefault(key, []).append(e["accuracy"])
            chance[key] = e["chance"]
    return [{"task": k[0], "shape": k[1], "mixer": k[2], "eval": k[3], **_stats(v), "chance": chance[k]}
            for k, v in groups.items()]


def compare(summary: list[dict]) -> list[dict]:
    """DLA against Log-Linear (`fenwick`) and the single-state backbone, per backbone, shape and
    evaluation. The verdict is "higher"/"lower" only when the seed ranges do not overlap (every
    DLA seed above, or below, every seed of the other), else "within spread"."""
    by = {(s["task"], s["shape"], s["mixer"], s["eval"]): s for s in summary}
    rows = []
    for (task, shape, mixer, ev), dla in by.items():
        if not mixer.endswith("/dla"):
            continue
        backbone = mixer.split("/")[0]
        for other in ("fenwick", "single"):
            o = by.get((task, shape, f"{backbone}/{other}", ev))
            if o is None:
                continue
            verdict = "higher" if dla["min"] > o["max"] else "lower" if dla["max"] < o["min"] else "within spread"
            rows.append({"task": task, "shape": shape, "backbone": backbone, "eval": ev, "against": other,
                         "dla": dla["mean"], "other": o["mean"], "difference": dla["mean"] - o["mean"],
                         "verdict": verdict, "n": min(dla["n"], o["n"])})
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(exp: Experiment, results: list[dict], missing: list[str], summary: list[dict],
             comparisons: list[dict]) -> str:
    devices = sorted({r["device"] for r in results})
    commands = sorted({r["command"] for r in results if r.get("command")})
    lines = [f"# {exp.name}", "",
             f"Experiment file `{exp.path}`; {len(results)} of {len(exp.runs)} runs finished"
             + (f" ({len(missing)} missing)" if missing else "") + ".",
             f"Device: {', '.join(devices) or '-'}; torch {', '.join(sorted({r['torch'] for r in results})) or '-'}.",
             "", "Commands:", ""] + [f"    {c}" for c in commands] + [
             "", "Accuracy on query positions, in percent: mean ± sample standard deviation over seeds (n seeds).", ""]
    diverged = [r["id"] for r in results if r["status"] != "ok"]
    for task in dict.fromkeys(s["task"] for s in summary):
        rows = [s for s in summary if s["task"] == task]
        cols = list(dict.fromkeys((s["shape"], s["eval"]) for s in rows))
        spec = next(r for r in exp.runs if r.task.label == task).task
        lines += [f"## {task}", "",
                  f"`{spec.task}` {json.dumps(spec.params)}; {spec.steps} steps of {spec.batch_size} sequences, "
                  f"lr {spec.lr}; {spec.eval_examples} evaluation sequences per column; chance "
                  f"{_pct(make_task(spec.task, **spec.params).chance)}.", "",
                  "| mixer | " + " | ".join(f"{s} {e}" for s, e in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        cell = {(s["mixer"], s["shape"], s["eval"]): s for s in rows}
        for mixer in dict.fromkeys(s["mixer"] for s in rows):
            vals = []
            for c in cols:
                s = cell.get((mixer, *c))
                vals.append("-" if s is None else f"{_pct(s['mean'])} ± {_pct(s['sd'])} ({s['n']})")
            lines.append(f"| {mixer} | " + " | ".join(vals) + " |")
        times = [r["train_s"] for r in results if r["task"] == task]
        lines += ["", f"Training time per run: {min(times):.0f}–{max(times):.0f} s (first step, with compilation, "
                      f"included).", ""]
    if comparisons:
        lines += ["## DLA against Log-Linear (fenwick) and the single-state backbone", "",
                  "\"higher\"/\"lower\": every DLA seed above (below) every seed of the other; otherwise "
                  "\"within spread\".", "",
                  "| task | shape | backbone | evaluation | against | DLA | other | difference | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c['task']} | {c['shape']} | {c['backbone']} | {c['eval']} | {c['against']} | "
                         f"{_pct(c['dla'])} | {_pct(c['other'])} | {100 * c['difference']:+.1f} | {c['verdict']} |")
        lines.append("")
    if diverged:
        lines += ["Runs stopped by a non-finite loss (left out of the means): " + ", ".join(diverged), ""]
    if missing:
        lines += ["Runs not yet finished: " + ", ".join(missing), ""]
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> Path:
    """One panel per (task, shape): accuracy by evaluation (lines when there are several, as
    for length generalisation; bars otherwise), error bars spanning the seeds' min–max."""
    # matplotlib: heavy to import, and needed only once runs have finished
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys((s["task"], s["shape"]) for s in summary))
    cols = min(2, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(6.5 * cols, 4 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (task, shape) in zip(axes.flat, panels):
        entries = [s for s in summary if s["task"] == task and s["shape"] == shape]
        evals = list(dict.fromkeys(s["eval"] for s in entries))
        mixers = list(dict.fromkeys(s["mixer"] for s in entries))
        for j, mixer in enumerate(mixers):
            pts = {s["eval"]: s for s in entries if s["mixer"] == mixer}
            xs = [i for i, e in enumerate(evals) if e in pts]
            mean = np.array([pts[evals[i]]["mean"] for i in xs])
            err = np.array([[pts[evals[i]]["mean"] - pts[evals[i]]["min"] for i in xs],
                            [pts[evals[i]]["max"] - pts[evals[i]]["mean"] for i in xs]])
            if len(evals) > 1:
                ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=mixer)
            else:
                ax.bar(j, mean, yerr=err, capsize=3, label=mixer)
        if len(evals) > 1:
            ax.set_xticks(range(len(evals)), evals, rotation=20, fontsize=8)
        else:
            ax.set_xticks(range(len(mixers)), mixers, rotation=30, fontsize=8)
        ax.axhline(entries[0]["chance"], color="gray", ls="--", lw=1, label="chance")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("query accuracy")
        ax.set_title(f"{task}, {shape}")
        ax.grid(alpha=0.3)
        if len(evals) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_report(exp: Experiment) -> dict:
    """`results.json`, `results.md` and (when anything finished) `results.png` in `exp.out`."""
    results, missing = collect(exp)
    ok = [r for r in results if r["status"] == "ok"]
    summary = summarise(ok)
    comparisons = compare(summary)
    exp.out.mkdir(parents=True, exist_ok=True)
    report = {"experiment": exp.name, "file": str(exp.path), "complete": not missing, "missing": missing,
              "devices": sorted({r["device"] for r in results}), "summary": summary, "comparisons": comparisons,
              "runs": [{k: v for k, v in r.items() if k != "spec"} for r in results]}
    (exp.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (exp.out / "results.md").write_text(markdown(exp, results, missing, summary, comparisons))
    paths = {"json": str(exp.out / "results.json"), "markdown": str(exp.out / "results.md")}
    if summary:
        paths["plot"] = str(plot(summary, exp.out / "results.png"))
    return {**report, "paths": paths}
