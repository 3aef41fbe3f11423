"""`dla train` under torchrun on CPU processes (gloo, FSDP2, `--no-compile`, float32): two
processes train the `tiny` preset for 5 steps as one process does on the same global batch,
write sharded checkpoints (DCP) that resume identically, on two processes or on one, and bad
set-ups fail with one line. Two torchrun launches carry the run (killed during step 5, then
resumed), to keep the file near a minute on two busy cores.

The torchrun workers run this file as a script (see the bottom): `dla.cli.main` on the given
arguments, optionally killed at a step the way test_train kills a single process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dla.cli import main
from dla.run import checkpoint
from dla.run.data import batch_at, prepare
from tests.helpers import heldout_oracle, write_corpus

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5


def train_args(corpus: Path, out: Path, *extra: str, batch: int = 4, steps: int = STEPS) -> list[str]:
    # tiny preset, float32 on the CPU; a short window and a global batch of 4 keep it quick, a
    # high learning rate and the clipped gradient (its norm is well above 1) make steps matter
    return ["train", "--preset", "tiny", "--seq-len", "16", "--batch-size", str(batch), "--steps", str(steps),
            "--lr", "0.05", "--checkpoint-every", "3", "--eval-tokens", "64", "--no-compile", "--device", "cpu",
            "--data", str(corpus), "--out", str(out), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, nproc: int = 2, crash_at: int | None = None,
             record: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc` of this file's worker on 127.0.0.1."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    worker = [str(Path(__file__).resolve())] + (["--crash-at", str(crash_at)] if crash_at is not None else [])
    worker += ["--record", str(record)] if record is not None else []
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *worker, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def eval_record(run: Path) -> dict:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def relative(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / np.abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process; two processes killed during step 5 (after the step-3 checkpoint and one step
    more), then resumed on two; the killed run resumed on one plain process instead."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(tmp / "corpus")
    assert main(train_args(corpus, tmp / "one")) == 0
    cut = torchrun(train_args(corpus, tmp / "two"), crash_at=4, record=tmp / "batches")
    assert cut.returncode != 0 and "dla: interrupted at step 4; last checkpoint: " in cut.stderr, cut.stderr[-3000:]
    assert checkpoint.find(tmp / "two").name == "step-00000003"
    uninterrupted = records(tmp / "two")
    assert [r["step"] for r in uninterrupted] == [1, 2, 3, 4]  # a step past the checkpoint, to be redone
    shutil.copytree(tmp / "two", tmp / "two-then-one")
    resumed = torchrun(train_args(corpus, tmp / "two", "--resume"))
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-3000:]
    assert main(train_args(corpus, tmp / "two-then-one", "--resume")) == 0
    return {"corpus": corpus, "uninterrupted": uninterrupted, "stderr": resumed.stderr, "batches": tmp / "batches",
            **{k: tmp / k for k in ("one", "two", "two-then-one")}}


def test_two_processes_train_as_one_on_the_global_batch(runs):
    """Steps 1-4 straight through and 5 after the resume, on two processes, against one process."""
    one, two = records(runs["one"]), records(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    two = runs["uninterrupted"] + two[4:]
    assert max(relative([r["loss"] for r in two], [r["loss"] for r in one])) < 1e-5
    # the clip threshold is 1: the sharded gradient norm must be the global one for the steps to agree
    assert min(r["grad_norm"] for r in one) > 1.0
    assert max(relative([r["grad_norm"] for r in two], [r["grad_norm"] for r in one])) < 1e-5
    assert one[-1]["loss"] < one[0]["loss"] - 0.5  # the steps move the model: the comparison is not vacuous
    assert relative(eval_record(runs["two"])["heldout_loss"], eval_record(runs["one"])["heldout_loss"]) < 1e-5


def test_each_rank_trains_on_its_rows_of_the_global_batch(runs):
    """Rank r saw rows [2r, 2r + 2) of `batch_at(seed, step)`, for each step before the kill (every
    rank training on the whole batch would match one process too, at twice the cost)."""
    split = prepare(str(runs["corpus"]), runs["two"] / "data", seq_len=16)
    seen = {r: [json.loads(line) for line in (runs["batches"] / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 4
    for step in range(4):
        x, _ = batch_at(split.train, step, batch_size=4, seq_len=16, seed=0)
        assert seen[0][step] == x[:2].tolist() and seen[1][step] == x[2:].tolist(), step


def test_resume_from_the_sharded_checkpoint_continues_identically(runs):
    """Step 4 redone from the step-3 checkpoint is the step 4 of the uninterrupted processes, to
    the bit (weights, data position and learning rate restored); step 5 then needs the restored
    optimizer moments too, and matches one process."""
    before, after = runs["uninterrupted"], records(runs["two"])
    assert after[:3] == before[:3]  # the record up to the checkpoint is kept
    for key in ("loss", "grad_norm", "lr"):
        assert after[3][key] == before[3][key], key


def test_only_rank_0_writes_the_record(runs):
    lines = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + 1 and "heldout_bpb" in json.loads(lines[-1])
    assert (runs["two"] / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runs["stderr"].count("resuming") == 1 and runs["stderr"].count("model: mamba2/dla") == 1


def test_sharded_checkpoint_layout(runs):
    ckpt = checkpoint.find(runs["two"])
    assert ckpt.name == f"step-{STEPS:08d}" and checkpoint.is_sharded(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "config.json",
                                                      "state.json"]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["latest", ckpt.name]  # no temporary folders left
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["data"]["next_step"] == STEPS


def test_sharded_checkpoint_resumes_on_one_process(runs):
    """DCP reshards on load: the two-process checkpoint continues on one plain process."""
    a, b = records(runs["one"]), records(runs["two-then-one"])
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert max(relative([r["loss"] for r in b], [r["loss"] for r in a])) < 1e-5
    assert not checkpoint.is_sharded(checkpoint.find(runs["two-then-one"]))  # a plain process writes a plain one


def test_dla_eval_reads_a_sharded_checkpoint(runs, capsys):
    """`dla eval` of the sharded checkpoint scores its model as computed directly, that model is
    the one the single process trained (to the agreement of the two runs), and its segmentation
    is the one rank 0 recorded."""
    assert main(["eval", "--checkpoint", str(runs["two"]), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == STEPS
    oracle = heldout_oracle(checkpoint.load(runs["two"], device="cpu"), runs["two"], max_tokens=64)
    assert result["heldout_tokens"] == oracle["heldout_tokens"]
    assert relative(result["heldout_loss"], oracle["heldout_loss"]) < 1e-5
    one = heldout_oracle(checkpoint.load(runs["one"], device="cpu"), runs["one"], max_tokens=64)
    assert relative(oracle["heldout_loss"], one["heldout_loss"]) < 1e-5
    # the segmentation that rank 0 recorded through the sharded model: the same layers and windows,
    # and no more than one decision of 64 tokens apart from a plain process's
    sharded, plain = eval_record(runs["two"])["segmentation"], result["segmentation"]
    assert [e["layer"] for e in sharded] == [e["layer"] for e in plain] == [0, 1]
    for a, b in zip(sharded, plain):
        assert a["windows"] == b["windows"] == 4
        assert a["merges_per_1000_by_head"] == pytest.approx(b["merges_per_1000_by_head"], abs=1000 / 64 + 1e-9)


def torchrun_env(monkeypatch, rank: int = 0, size: int = 2) -> None:
    for name, value in {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": size,
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}.items():
        monkeypatch.setenv(name, str(value))


def fails_with_one_line(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dla: error: ") and match in err[0], err


def test_bad_setups_fail_with_one_line_before_writing(tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        torchrun_env(m)
        fails_with_one_line(capsys, train_args(corpus, out, batch=3),
                            "--batch-size 3 (the global batch) is not divisible by the world size 2")
        m.setattr(torch.cuda, "is_available", lambda: False)  # a machine without GPUs, wherever this runs
        fails_with_one_line(capsys, train_args(corpus, out, "--dist-backend", "nccl"),
                            "--dist-backend nccl needs CUDA GPUs, and this machine has none")
        m.setattr(torch.cuda, "is_available", lambda: True)  # and one with a single GPU
        m.setattr(torch.cuda, "device_count", lambda: 1)
        fails_with_one_line(capsys, train_args(corpus, out, "--dist-backend", "nccl"),
                            "--dist-backend nccl needs --device cuda, got --device cpu")
        fails_with_one_line(capsys, train_args(corpus, out, "--device", "cuda"),
                            "torchrun started 2 processes on this node, but it has 1 GPU(s)")
        fails_with_one_line(capsys, train_args(corpus, out, "--device", "cuda", "--dist-backend", "gloo"),
                            "--dist-backend gloo trains CPU processes")
        torchrun_env(m, rank=1)  # the other ranks meet the same error and stay quiet
        assert main(train_args(corpus, out, batch=3)) == 2 and capsys.readouterr().err == ""
    fails_with_one_line(capsys, train_args(corpus, out, "--dist-backend", "gloo"), "only for runs started by torchrun")
    assert not out.exists()


def test_single_process_checkpoint_is_not_resumed_by_torchrun(runs, monkeypatch, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in runs["one"].rglob("*"))
    with monkeypatch.context() as m:
        torchrun_env(m)
        fails_with_one_line(capsys, train_args(runs["corpus"], runs["one"], "--resume"),
                            "was written by a single-process run; resume it without torchrun")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in runs["one"].rglob("*")) == before


def test_torchrun_reports_a_bad_batch_once(tmp_path):
    """Through torchrun itself: rank 0 exits 2 with the one line of ours (torchrun adds its own
    failure summary), the quiet rank waits for torchrun to stop it — had it exited first, torchrun
    could stop rank 0 before it printed, as it did on a slow machine — and nothing is written."""
    corpus = write_corpus(tmp_path / "corpus")
    done = torchrun(train_args(corpus, tmp_path / "run", batch=3))
    ours = [line for line in done.stderr.splitlines() if line.startswith("dla: error:")]
    assert ours == ["dla: error: --batch-size 3 (the global batch) is not divisible by the world size 2 "
                    "(torchrun processes); choose a multiple of 2"], done.stderr[-3000:]
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":  # a torchrun worker: `[--crash-at STEP] [--record DIR] ARGS...` of `dla`
    argv = sys.argv[1:]
    if argv[:1] == ["--crash-at"]:
        import dla.run.train as train_mod

        crash_at, argv = int(argv[1]), argv[2:]
        real = train_mod.batch_at

        def crashing(stream, step, **kw):
            if step == crash_at:
                raise KeyboardInterrupt  # killed after the last checkpoint and some steps more
            return real(stream, step, **kw)

        train_mod.batch_at = crashing
    if argv[:1] == ["--record"]:  # the token rows each rank trains on, a line per step
        from dla.model import CausalLM

        record, argv = Path(argv[1]), argv[2:]
        record.mkdir(parents=True, exist_ok=True)
        real_loss = CausalLM.loss

        def recording(self, idx, targets):
            if self.training:
                with open(record / f"rank{os.environ['RANK']}.jsonl", "a") as f:
                    f.write(json.dumps(idx.tolist()) + "\n")
            return real_loss(self, idx, targets)

        CausalLM.loss = recording
    sys.exit(main(argv))
