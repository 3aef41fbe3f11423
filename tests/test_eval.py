"""Synthetic recall tasks, query-position accuracy, `dla eval --task` and `dla experiment`.

The generators are checked against what they promise: the same `(seed, split, step)` gives the
same batch; an exact-recall oracle that reads only the inputs answers every query; a constant
guess scores chance; only query positions count. The runner is run end to end on the CPU smoke
grid (`experiments/smoke.toml`), in two shards."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dla.run.train as train_mod
from dla.cli import main
from dla.model import preset
from dla.run import experiment as ex
from dla.run.eval.metrics import merge, query_accuracy
from dla.run.eval.task_accuracy import evaluate_task, model_for_length
from dla.run.eval.tasks import IGNORE, make_task

SMOKE = Path(__file__).resolve().parent.parent / "experiments" / "smoke.toml"

SMALL = [
    ("mqar", dict(seq_len=64, pairs=8, vocab=64, noise=8)),
    ("mqar", dict(seq_len=256, pairs=32)),
    ("niah-single", dict(seq_len=200)),
    ("niah-single", dict(seq_len=300, depth=0.5, digits=3)),
    ("niah-multikey", dict(seq_len=400, needles=3)),
    ("selective-copy", dict(seq_len=40, tokens=6, vocab=10)),
]
IDS = [f"{n}-{p['seq_len']}" for n, p in SMALL]


@pytest.mark.parametrize("name, params", SMALL, ids=IDS)
def test_batches_are_a_function_of_seed_split_and_step(name, params):
    task = make_task(name, **params)
    x, y = task.batch(6, seed=3, step=5)
    x2, y2 = task.batch(6, seed=3, step=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (6, task.seq_len) and x.dtype == y.dtype == torch.int64
    for other in (dict(seed=4, step=5), dict(seed=3, step=6), dict(seed=3, step=5, split="eval")):
        assert not torch.equal(task.batch(6, **other)[0], x), other
    assert 0 <= int(x.min()) and int(x.max()) < task.vocab_needed


@pytest.mark.parametrize("name, params", SMALL, ids=IDS)
def test_oracle_scores_all_and_a_constant_guess_scores_chance(name, params):
    task = make_task(name, **params)
    x, y = task.batch(64, seed=0, step=0, split="eval")
    oracle = torch.from_numpy(task.oracle(x.numpy()))
    counts = query_accuracy(oracle, y)
    assert counts["queries"] == 64 * task.queries_per_example
    assert counts["correct"] == counts["queries"] and counts["exact"] == counts["sequences"] == 64
    # every query's answer is an answer id, drawn uniformly: a constant guess is right at rate chance
    answers = torch.from_numpy(task.answer_ids())
    assert torch.isin(y[y != IGNORE], answers).all()
    x, y = task.batch(400, seed=1, step=0, split="eval")
    n = int((y != IGNORE).sum())
    for guess in (int(answers[0]), int(answers[-1])):
        acc = merge([query_accuracy(torch.full_like(y, guess), y)])["accuracy"]
        assert abs(acc - task.chance) <= 5 * math.sqrt(task.chance * (1 - task.chance) / n) + 1e-12, (guess, acc)


def test_accuracy_counts_query_positions_only():
    task = make_task("mqar", seq_len=64, pairs=8, vocab=64, noise=8)
    x, y = task.batch(16, seed=0)
    oracle = torch.from_numpy(task.oracle(x.numpy()))
    query = y != IGNORE
    scrambled = torch.where(query, oracle, torch.randint_like(oracle, 0, 64))
    assert query_accuracy(scrambled, y) == query_accuracy(oracle, y)
    wrong_queries = torch.where(query, (oracle + 1) % 64, oracle)
    counts = query_accuracy(wrong_queries, y)
    assert counts["correct"] == 0 and counts["queries"] == 16 * 8 and counts["exact"] == 0
    half = oracle.clone()
    half[:8][query[:8]] = -1
    assert merge([query_accuracy(half, y)])["accuracy"] == 0.5
    with pytest.raises(ValueError, match="no query positions"):
        merge([query_accuracy(oracle, torch.full_like(y, IGNORE))])


def test_mqar_layout():
    task = make_task("mqar", seq_len=256, pairs=32, vocab=256)
    x, y = (t.numpy() for t in task.batch(500, seed=0))
    nk = task.n_keys
    keys, values = x[:, 0:64:2], x[:, 1:64:2]
    assert (keys < nk).all() and ((values >= nk) & (values < 2 * nk)).all()
    assert all(len(set(r)) == 32 for r in keys) and all(len(set(r)) == 32 for r in values)
    rest = x[:, 64:]
    assert (rest[rest < nk].size == 500 * 32) and not ((rest >= nk) & (rest < 2 * nk)).any()
    q_rows, q_cols = np.nonzero(y != IGNORE)
    assert (q_cols >= 64).all() and (q_cols % 2 == 0).all()
    assert (np.sort(x[y != IGNORE].reshape(500, 32), 1) == np.sort(keys, 1)).all()  # every key asked once
    # power-law gaps: queries crowd the start of the query region
    offsets = q_cols - 64
    assert (offsets < 64).mean() > 0.5 > (offsets >= 128).mean()


def test_needle_sits_at_its_depth():
    needle = len("The pass key is 12345. Remember it. 12345 is the pass key. ")
    # depth 0: the first byte; depth 1: the last sentence start of the haystack (at most one
    # filler sentence, the longest being 24 bytes, between the needle and the question)
    for depth, where in ((0.0, lambda i, q: i == 0), (1.0, lambda i, q: 0 <= q - (i + needle) <= 24)):
        task = make_task("niah-single", seq_len=512, depth=depth)
        x, _ = task.batch(4, seed=0)
        for row in x.numpy():
            text = bytes(row.astype(np.uint8).tolist()).decode()
            i = text.index("The pass key is ")
            assert where(i, text.index("What is")) and text.count("The pass key is ") == 2, text
    # multi-key: four needles with distinct keys, then the question names one of them, and the
    # digits it is answered with are that needle's number and the query targets
    task = make_task("niah-multikey", seq_len=600, needles=4, digits=7)
    x, y = (t[0].numpy() for t in task.batch(1, seed=2))
    text = bytes(np.append(x, y[-1]).astype(np.uint8).tolist()).decode()  # the whole stream: x, then y's last
    numbers = dict(re.findall(r"The magic number for ([a-z]{4}) is ([0-9]{7})\. ", text))
    asked = re.fullmatch(r"(?s).*What is the magic number for ([a-z]{4})\? The magic number for \1 is ([0-9]{7})", text)
    assert text.count("The magic number for ") == 5 and len(numbers) == 4 and asked is not None, text
    assert numbers[asked[1]] == asked[2]
    assert bytes(y[y != IGNORE].astype(np.uint8).tolist()).decode() == asked[2]


@pytest.mark.parametrize("name, params, message", [
    ("mqar", dict(pairs=200), "pairs = 200"),
    ("mqar", dict(seq_len=100, pairs=32), "seq_len = 100 is too short"),
    ("mqar", dict(power_a=2.0), "power_a"),
    ("niah-single", dict(seq_len=50), "seq_len = 50"),
    ("niah-single", dict(depth=1.5), "depth"),
    ("niah-multikey", dict(needles=0), "needles"),
    ("niah-multikey", dict(seq_len=200, needles=4), "seq_len = 200 is shorter than the needles"),
    ("selective-copy", dict(seq_len=10, tokens=8), "tokens = 8"),
    ("mqar", dict(depth=0.5), "unknown parameter 'depth'"),
    ("passkey", {}, "task must be one of"),
])
def test_bad_task_parameters_are_named(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, **params)


class OracleLM(nn.Module):
    """Logits that put all mass on the task oracle's answer (and token 0 elsewhere)."""

    def __init__(self, task, cfg):
        super().__init__()
        self.task, self.cfg = task, cfg
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        answer = torch.from_numpy(self.task.oracle(x.numpy())).clamp(min=0)
        return nn.functional.one_hot(answer, self.cfg.vocab_size).float()


def test_evaluate_task_scores_an_oracle_model_fully():
    task = make_task("niah-single", seq_len=160, digits=4)
    result = evaluate_task(OracleLM(task, preset("tiny", seq_len=160)), task, examples=10, batch_size=3)
    assert result["accuracy"] == result["exact_accuracy"] == 1.0
    assert result["queries"] == 40 and result["sequences"] == result["examples"] == 10 and result["chance"] == 0.1
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        evaluate_task(OracleLM(task, preset("tiny", seq_len=128)), task, examples=1)


def test_longer_evaluation_keeps_the_weights_or_says_why_not():
    for backbone, policy in (("mamba2", "single"), ("gdn", "dla"), ("attention", "single")):
        cfg = preset("tiny", backbone=backbone, policy=policy, seq_len=64)
        assert model_for_length(cfg, 1024).seq_len == 1024 and model_for_length(cfg, 32) is cfg
    with pytest.raises(ValueError, match="fenwick policy's level count grows"):
        model_for_length(preset("tiny", policy="fenwick", seq_len=64), 1024)


# ---- dla experiment and dla eval --task, end to end on the smoke grid -------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "out"
    first = main(["experiment", str(SMOKE), "--out", str(out), "--device", "cpu", "--shard", "1/2"])
    partial = json.loads((out / "results.json").read_text())
    second = main(["experiment", str(SMOKE), "--out", str(out), "--device", "cpu", "--shard", "2/2"])
    return out, (first, second), partial


def test_experiment_writes_the_report_from_all_shards(smoke_run):
    out, codes, partial = smoke_run
    assert codes == (0, 0)
    assert not partial["complete"] and len(partial["missing"]) == 4
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] and len(report["runs"]) == 8
    for run in report["runs"]:
        assert run["status"] == "ok" and run["steps"] == 2 and run["device"].startswith("cpu")
        evals = {e["label"]: e for e in run["evals"]}
        if run["task"] == "copy":
            assert set(evals) == {"seq_len=24", "seq_len=48"}
        for e in evals.values():
            assert 0 <= e["accuracy"] <= 1 and e["examples"] == 8
    summary = {(s["task"], s["mixer"], s["eval"]): s for s in report["summary"]}
    assert len(summary) == 6 and all(s["n"] == 2 for s in summary.values())
    s = summary[("mqar", "mamba2/dla", "seq_len=32")]
    accs = [e["accuracy"] for r in report["runs"] if r["task"] == "mqar" and r["mixer"] == "mamba2/dla"
            for e in r["evals"]]
    assert s["mean"] == pytest.approx(np.mean(accs)) and s["sd"] == pytest.approx(np.std(accs, ddof=1))
    assert {c["against"] for c in report["comparisons"]} == {"fenwick"}
    md = (out / "results.md").read_text()
    assert "| mamba2/dla |" in md and "## copy" in md and "--shard 2/2" in md and "missing" not in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # the fenwick model was built for the longest evaluation, so it has the levels 48 tokens need
    config = json.loads((out / "runs" / "copy--micro--mamba2-fenwick--seed0" / "checkpoints" / "step-00000002"
                         / "config.json").read_text())
    assert config["model"]["seq_len"] == 48 and config["task"]["name"] == "selective-copy"


def test_finished_runs_are_kept_and_listed(smoke_run, capsys):
    out, _, _ = smoke_run
    results = sorted((out / "runs").glob("*/result.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    assert main(["experiment", str(SMOKE), "--out", str(out), "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in results} == before
    capsys.readouterr()
    assert main(["experiment", str(SMOKE), "--out", str(out), "--list", "--shard", "1/2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("\tdone\t" in line for line in lines)


def test_eval_scores_an_experiment_checkpoint(smoke_run, capsys):
    out, _, _ = smoke_run
    run = out / "runs" / "mqar--micro--mamba2-dla--seed0"
    assert main(["eval", "--checkpoint", str(run), "--task", "mqar", "--examples", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"]["pairs"] == 4 and result["params"]["vocab"] == 64  # the training task's
    assert result["queries"] == 24 and result["sequences"] == 6 and result["policy"] == "dla"
    stored = json.loads((run / "result.json").read_text())["evals"][0]
    assert main(["eval", "--checkpoint", str(run), "--task", "mqar", "--examples", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(stored["accuracy"])
    # dla weights do not depend on the length: it reads a longer task
    assert main(["eval", "--checkpoint", str(run), "--task", "mqar", "--seq-len", "64", "--examples", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--task", "niah-single", "--pairs", "3"], "--pairs does not apply to --task niah-single"),
    (["--task", "lm", "--examples", "3"], "--examples does not apply to --task lm"),
    (["--task", "mqar", "--pairs", "500"], "pairs = 500"),
    (["--task", "mqar", "--examples", "0"], "--examples must be positive"),
    (["--task", "selective-copy", "--vocab", "300"], "beyond the model's vocab_size = 256"),
])
def test_bad_eval_task_input(smoke_run, argv, message, capsys):
    out, _, _ = smoke_run
    run = out / "runs" / "mqar--micro--mamba2-fenwick--seed0"
    assert main(["eval", "--checkpoint", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_fenwick_checkpoint_refuses_a_longer_task(smoke_run, capsys):
    out, _, _ = smoke_run
    run = out / "runs" / "mqar--micro--mamba2-fenwick--seed0"
    assert main(["eval", "--checkpoint", str(run), "--task", "mqar", "--seq-len", "64"]) == 2
    assert "--seq-len 64 is longer than the checkpoint's seq_len = 32" in capsys.readouterr().err


def _toml(tmp_path, text):
    path = tmp_path / "e.toml"
    path.write_text(text)
    return str(path)


GOOD = ("compile = false\n[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\nhead_dim = 4\nhead_dim_v = 8\n"
        "capacity = 3\n[[tasks]]\ntask = 'mqar'\nsteps = 1\nbatch_size = 1\neval_examples = 1\n"
        "params = { seq_len = 32, pairs = 4, vocab = 64 }\n")


@pytest.mark.parametrize("text, extra, message", [
    ("colour = 1\n" + GOOD, [], "unknown key 'colour'"),
    (GOOD + "[grid]\nmixer = ['mamba2/linear']\n", [], "grid.mixer"),
    (GOOD + "[grid]\nshape = ['big']\n", [], "'big' is not one of the [shapes]"),
    (GOOD.replace("steps = 1", "steps = 0"), [], "tasks[0].steps must be an integer >= 1"),
    (GOOD.replace("pairs = 4", "pairs = 40"), [], "tasks[0]: mqar: pairs = 40"),
    (GOOD.replace("steps = 1\n", ""), [], "missing 'steps'"),
    ("name = \n", [], "not valid TOML"),
    (GOOD, ["--shard", "3/2"], "--shard must be I/N"),
    (GOOD, ["--only", "nothing*"], "--only nothing*: matches no run"),
    (GOOD, ["--time-limit", "0"], "--time-limit must be positive"),
])
def test_bad_experiment_input(tmp_path, text, extra, message, capsys):
    path = _toml(tmp_path, text)
    assert main(["experiment", path, "--out", str(tmp_path / "out"), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_changed_file_does_not_reuse_old_runs(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["experiment", _toml(tmp_path, GOOD), "--out", out, "--device", "cpu", "--no-checkpoints"]) == 0
    run = tmp_path / "out" / "runs" / "mqar--default--mamba2-dla--seed0"
    assert [p.name for p in run.iterdir()] == ["result.json"]
    changed = GOOD.replace("batch_size = 1", "batch_size = 2")
    assert main(["experiment", _toml(tmp_path, changed), "--out", out, "--device", "cpu"]) == 2
    assert "was made with another configuration" in capsys.readouterr().err


def test_experiment_trains_by_the_step_of_dla_train(tmp_path, monkeypatch):
    """One training step for both commands: `dla experiment` calls `dla.run.train.train_step`,
    once per step, in order."""
    assert ex.train_step is train_mod.train_step
    steps = []

    def counted(model, loss_fn, optimizer, cfg, step, x, y):
        steps.append(step)
        return train_mod.train_step(model, loss_fn, optimizer, cfg, step, x, y)

    monkeypatch.setattr(ex, "train_step", counted)
    path = _toml(tmp_path, GOOD.replace("steps = 1", "steps = 3"))
    assert main(["experiment", path, "--out", str(tmp_path / "out"), "--device", "cpu", "--no-checkpoints"]) == 0
    assert steps == [0, 1, 2]


def test_the_recall_grid_file_is_the_issue_grid():
    exp = ex.load(Path(__file__).resolve().parent.parent / "experiments" / "recall_grid.toml")
    assert len(exp.runs) == 2 * 2 * 7 * 3
    assert {r.mixer for r in exp.runs} == {"mamba2/single", "mamba2/fenwick", "mamba2/dla", "gdn/single",
                                          "gdn/fenwick", "gdn/dla", "attention"}
    assert {r.model["d_model"] for r in exp.runs} == {64, 128} and {r.seed for r in exp.runs} == {0, 1, 2}
    assert {r.model["n_layers"] for r in exp.runs} == {2}
    tasks = {r.task.label: r.task for r in exp.runs}
    assert tasks["mqar"].params["seq_len"] == 256 and tasks["mqar"].params["pairs"] == 32
    niah = tasks["niah"]
    assert niah.task == "niah-single" and niah.params["seq_len"] == 1024
    assert [e["seq_len"] for e in niah.eval] == [1024, 2048, 4096, 8192]
    assert {r.model["seq_len"] for r in exp.runs if r.task.label == "niah"} == {8192}
    shards = [ex.select(exp.runs, (i, 8)) for i in range(1, 9)]
    assert sorted(r.id for s in shards for r in s) == sorted(r.id for r in exp.runs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_grid_runs_on_the_gpu(tmp_path, capsys):
    """The recall grid's path on CUDA: several compiled runs in one process (each after a
    compiler reset), bf16 autocast, evaluation past the training length."""
    text = ("compile = true\n[model]\nn_layers = 2\ncapacity = 4\n[shapes.s]\nd_model = 64\nn_heads = 2\n"
            "head_dim = 32\nhead_dim_v = 64\n[grid]\nmixer = ['mamba2/dla', 'gdn/fenwick', 'gdn/dla', 'attention']\n"
            "[[tasks]]\nlabel = 'niah'\ntask = 'niah-single'\nparams = { seq_len = 256 }\nsteps = 3\nbatch_size = 4\n"
            "eval = [{ seq_len = 256 }, { seq_len = 2048 }]\neval_examples = 8\n")
    assert main(["experiment", _toml(tmp_path, text), "--out", str(tmp_path / "out"), "--device", "cuda"]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["complete"] and all(r["status"] == "ok" and r["compiled"] for r in report["runs"])
    assert {len(r["evals"]) for r in report["runs"]} == {2}
