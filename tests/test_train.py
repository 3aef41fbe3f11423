"""Data streams, the learning-rate schedule, checkpoints (round trip, atomic writes, no pickled
code, config refusal) and the training loop's resume and NaN behaviour, on tiny shapes."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import dla.run.checkpoint as checkpoint
import dla.run.train as train_mod
from dla.model import PRESETS, CausalLM, ModelConfig
from dla.run.data import (DataError, batch_at, decode, default_corpus_files, encode, heldout_batches, prepare,
                          source_files, unigram_log_probs)
from dla.run.train import RECIPES, NonFiniteLoss, TrainConfig, lr_at, make_optimizer, plan, recipe, train
from tests.helpers import MICRO as MICRO_FIELDS
from tests.helpers import train_curve, write_corpus

MICRO = ModelConfig(**MICRO_FIELDS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tcfg(corpus: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 2, "lr": 1e-2, "warmup": 2, "eval_tokens": 32,
                          "data": str(corpus), **kw})


# ---------------------------------------------------------------------------------------------
# data


def test_byte_tokenizer_round_trip():
    text = "To be, or not to be — Æsop's «fables» 🎭\n"
    tokens = encode(text)
    assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode("utf-8")) and decode(tokens) == text


def test_default_corpus_is_the_shipped_modern_texts():
    files = default_corpus_files()
    assert len(files) >= 35 and all(f.name.endswith("_gut.txt") for f in files)  # no Folio duplicates
    assert sum(f.stat().st_size for f in files) > 4_000_000
    assert b"HAMLET" in next(f for f in files if f.name.startswith("hamlet")).read_bytes()[:200]


def test_split_is_the_tail_and_deterministic(corpus, tmp_path):
    split = prepare(str(corpus), tmp_path / "a", seq_len=8)
    again = prepare(str(corpus), tmp_path / "b", seq_len=8)
    raw = b"".join(p.read_bytes() for p in sorted(corpus.glob("*.txt")))
    assert bytes(split.train) + bytes(split.heldout) == raw  # .md ignored, files in sorted order
    assert len(split.heldout) == max(int(len(raw) * 0.05), 9)
    assert np.array_equal(split.train, again.train) and split.source == str(corpus.resolve())


def test_token_cache_is_reused_until_the_source_changes(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh" * 40)
    prepare(str(text), tmp_path / "cache", seq_len=8)
    stamp = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
    prepare(str(text), tmp_path / "cache", seq_len=8)
    assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == stamp
    text.write_text("zyxwvuts" * 50)
    split = prepare(str(text), tmp_path / "cache", seq_len=8)
    assert bytes(split.train[:8]) == b"zyxwvuts" and len(split.train) + len(split.heldout) == 400


def test_bad_sources_are_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        source_files(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        source_files(str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.md").write_text("x")
    with pytest.raises(DataError, match="no .txt files"):
        source_files(str(tmp_path / "folder"))
    (tmp_path / "short.txt").write_text("abc" * 5)
    with pytest.raises(DataError, match="too small for --seq-len 8"):
        prepare(str(tmp_path / "short.txt"), tmp_path / "cache", seq_len=8)


def test_batches_are_a_function_of_seed_and_step(corpus, tmp_path):
    split = prepare(str(corpus), tmp_path, seq_len=8)
    x, y = batch_at(split.train, 3, batch_size=4, seq_len=8, seed=1)
    x2, y2 = batch_at(split.train, 3, batch_size=4, seq_len=8, seed=1)
    x3, _ = batch_at(split.train, 4, batch_size=4, seq_len=8, seed=1)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens


def test_heldout_windows_are_disjoint_and_bounded(corpus, tmp_path):
    split = prepare(str(corpus), tmp_path, seq_len=8)
    batches = list(heldout_batches(split.heldout, batch_size=3, seq_len=8, max_tokens=40))
    rows = torch.cat([x for x, _ in batches])
    assert rows.shape == (5, 8) and [len(x) for x, _ in batches] == [3, 2]
    assert len(list(heldout_batches(split.heldout, batch_size=3, seq_len=8, max_tokens=1))) == 1


def test_unigram_model_is_add_one_byte_frequencies():
    train = np.frombuffer(b"aab", dtype=np.uint8)
    logp = unigram_log_probs(train)
    assert logp.shape == (256,) and math.isclose(np.exp(logp).sum(), 1.0)
    assert math.isclose(logp[ord("a")], math.log(3 / 259)) and math.isclose(logp[0], math.log(1 / 259))


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_every_model_preset_has_a_training_recipe():
    assert set(RECIPES) == set(PRESETS)
    cfg = recipe("tiny", lr=1e-3, steps=None)
    assert cfg.lr == 1e-3 and cfg.steps == RECIPES["tiny"]["steps"] and cfg.warmup == RECIPES["tiny"]["warmup"]
    with pytest.raises(ValueError, match="--preset must be one of"):
        recipe("huge")


# ---------------------------------------------------------------------------------------------
# checkpoints


def stepped_model(seed: int = 0):
    torch.manual_seed(seed)
    model = CausalLM(MICRO)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, 256, (2, 8))
    model.loss(x, x).backward()
    opt.step()
    return model, opt


def save(run: Path, step: int, model, opt) -> Path:
    return checkpoint.save(run, step=step, model=model, optimizer=opt, config={"model": MICRO.to_dict()},
                           state={"data": {"next_step": step}})


def test_checkpoint_round_trip(tmp_path):
    model, opt = stepped_model()
    path = save(tmp_path, 7, model, opt)
    assert path == tmp_path / "checkpoints" / "step-00000007" and checkpoint.find(tmp_path) == path
    fresh, fresh_opt = stepped_model(seed=1)
    state = checkpoint.restore(path, fresh, fresh_opt)
    assert state == {"step": 7, "data": {"next_step": 7}}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    for i in saved["state"]:
        for k in saved["state"][i]:
            assert torch.equal(saved["state"][i][k], loaded["state"][i][k])
    assert json.loads((path / "config.json").read_text())["model"] == MICRO.to_dict()
    later = save(tmp_path, 9, model, opt)
    assert checkpoint.find(tmp_path) == later and not path.exists()  # older checkpoints are removed
    assert checkpoint.find(tmp_path / "checkpoints") == later and checkpoint.find(later) == later


def _crash(*args, **kwargs):
    raise OSError("simulated crash")


@pytest.mark.parametrize("where", ["weights", "optimizer", "rename", "pointer"])
def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    model, opt = stepped_model()
    good = save(tmp_path, 3, model, opt)
    before = {f: (good / f).read_bytes() for f in checkpoint.FILES}
    newer, _ = stepped_model(seed=5)
    with monkeypatch.context() as m:
        if where == "weights":
            def half_written(tensors, filename, metadata=None):
                Path(filename).write_bytes(b"\x00" * 17)
                raise OSError("simulated crash")

            m.setattr(checkpoint, "save_file", half_written)
        elif where == "optimizer":
            m.setattr(checkpoint.torch, "save", _crash)
        else:
            real = os.replace

            def replace(src, dst):
                is_pointer = Path(dst).name == checkpoint.LATEST
                if (where == "pointer") == is_pointer:
                    raise OSError("simulated crash")
                return real(src, dst)

            m.setattr(checkpoint.os, "replace", replace)
        with pytest.raises(OSError, match="simulated crash"):
            save(tmp_path, 6, newer, opt)
    assert checkpoint.find(tmp_path) == good
    assert {f: (good / f).read_bytes() for f in checkpoint.FILES} == before
    fresh, _ = stepped_model(seed=2)
    assert checkpoint.restore(good, fresh)["step"] == 3
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    save(tmp_path, 6, newer, opt)  # the next save succeeds and clears the debris
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000006"]


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload.mark, ())

    @staticmethod
    def mark():
        _Payload.ran = True
        return {}


def test_loading_never_runs_pickled_code(tmp_path):
    model, opt = stepped_model()
    path = save(tmp_path, 1, model, opt)
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump(_Payload(), f, protocol=2)
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt: refused to load"):
        checkpoint.restore(path, model, opt)
    assert not _Payload.ran


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint folder"):
        checkpoint.find(tmp_path / "nowhere")
    (tmp_path / "somefile.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is not a dla checkpoint"):
        checkpoint.find(tmp_path)


def test_incompatible_weights_are_refused_by_name(tmp_path):
    model, opt = stepped_model()
    path = save(tmp_path, 1, model, opt)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        checkpoint.restore(path, CausalLM(ModelConfig(**{**MICRO.to_dict(), "d_model": 32})))


# ---------------------------------------------------------------------------------------------
# the training loop


def quiet(msg):
    pass


def test_training_lowers_the_loss_and_writes_its_record(corpus, tmp_path):
    run = plan(MICRO, tcfg(corpus, steps=30, lr=2e-2), tmp_path / "run", compile=False, device="cpu",
               checkpoint_every=10)
    result = train(run, log=quiet)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert records[-1]["heldout_bpb"] == pytest.approx(result["heldout_bpb"])
    assert result["heldout_bpb"] < result["unigram_bpb"]
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.find(tmp_path / "run").name == "step-00000030"


def test_resumed_run_repeats_the_uninterrupted_one(corpus, tmp_path, monkeypatch):
    whole = train(plan(MICRO, tcfg(corpus), tmp_path / "whole", compile=False, device="cpu", checkpoint_every=3),
                  log=quiet)
    real = train_mod.batch_at

    def crash_at_step_5(stream, step, **kw):
        if step == 4:
            raise KeyboardInterrupt  # killed after the step-3 checkpoint and one more step
        return real(stream, step, **kw)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "batch_at", crash_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(plan(MICRO, tcfg(corpus), tmp_path / "cut", compile=False, device="cpu", checkpoint_every=3),
                  log=quiet)
    assert checkpoint.find(tmp_path / "cut").name == "step-00000003"
    resumed = train(plan(MICRO, tcfg(corpus), tmp_path / "cut", resume=True, compile=False, device="cpu",
                         checkpoint_every=3), log=quiet)

    a, b = train_curve(tmp_path / "whole"), train_curve(tmp_path / "cut")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-6, atol=0)
    assert resumed["heldout_loss"] == pytest.approx(whole["heldout_loss"], rel=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real = CausalLM.loss
    calls = []

    def poisoned(self, idx, targets):
        calls.append(1)
        loss = real(self, idx, targets)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(CausalLM, "loss", poisoned)
    run = plan(MICRO, tcfg(corpus), tmp_path, compile=False, device="cpu", checkpoint_every=2)
    with pytest.raises(NonFiniteLoss, match="step 5"):
        train(run, log=quiet)
    good = checkpoint.find(tmp_path)
    assert good.name == "step-00000004"
    model = CausalLM(MICRO)
    checkpoint.restore(good, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_refuses_another_config_naming_the_field(corpus, tmp_path):
    train(plan(MICRO, tcfg(corpus, steps=2), tmp_path, compile=False, device="cpu"), log=quiet)
    with pytest.raises(checkpoint.CheckpointError, match="capacity = 3, but this run asks for capacity = 4"):
        plan(ModelConfig(**{**MICRO.to_dict(), "capacity": 4}), tcfg(corpus, steps=2), tmp_path, resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="batch_size"):
        plan(MICRO, tcfg(corpus, steps=2, batch_size=3), tmp_path, resume=True)
    with pytest.raises(ValueError, match="not empty"):
        plan(MICRO, tcfg(corpus, steps=2), tmp_path)


def test_resume_accepts_a_checkpoint_from_before_later_train_fields(corpus, tmp_path):
    """A run saved before `optim`/`float8` existed held their defaults: it resumes, and a run
    that asks for another value is still refused by name."""
    train(plan(MICRO, tcfg(corpus, steps=2), tmp_path, compile=False, device="cpu"), log=quiet)
    config_path = checkpoint.find(tmp_path) / "config.json"
    config = json.loads(config_path.read_text())
    for field in ("optim", "float8"):
        del config["train"][field]
    config_path.write_text(json.dumps(config))
    assert plan(MICRO, tcfg(corpus, steps=2), tmp_path, resume=True).resume_from == config_path.parent
    with pytest.raises(checkpoint.CheckpointError, match="optim = 'adamw', but this run asks for optim = 'adamw8bit'"):
        plan(MICRO, tcfg(corpus, steps=2, optim="adamw8bit"), tmp_path, resume=True)
