"""Segmentation statistics above the operator (issue #16): the level maps that
`dla.run.eval.segmentation.recording` takes from a model are the operator's own, the summaries
are `segmentation_stats` of them, `dla eval --json` and `metrics.jsonl` carry one entry per DLA
layer, `dla train --score/--tau` reach the checkpoint, and `dla segments` writes its picture and
prints the library's statistics of what it drew."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dla.operator
from dla.cli import main
from dla.model import CausalLM, ModelConfig
from dla.ops.levels import dense_level_map
from dla.ops.segment.stats import segmentation_stats
from dla.run import checkpoint
from dla.run.data import encode
from dla.run.eval.segmentation import SKIP_FIRST, layer_summary, recording, summaries
from dla.run.segments import quarter_rates, segment_text, slot_map
from tests.helpers import MICRO, add_micro_preset, exit_code, snapshot, write_corpus

# long enough windows that positions >= SKIP_FIRST exist
WIDE = dict(MICRO, seq_len=40, n_layers=2, capacity=4)
# a threshold inside the range of a fresh model's scores (SPEC §2's drift), so that a map computed
# at any other threshold would differ: a fifth to nine tenths of the tokens open slots
MIXED_TAU = {"mamba2": 0.03, "gdn": 0.1}
TEXT = "KING. What, is the night far gone?\nQUEEN. Not yet, my lord; the stars are out.\n"


def model_of(backbone: str, **fields) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(**{**WIDE, "backbone": backbone, **fields})).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", ["mamba2", "gdn"])
@pytest.mark.parametrize("cached", [False, True], ids=["forward", "prefill"])
def test_recorded_level_maps_are_the_operators_own(backbone, cached, monkeypatch):
    """Every segmentation the operator computes is captured (wrapping `dla.operator._segment`);
    within each layer's call the operator's comes first, then the recorder's: they are equal."""
    model = model_of(backbone, tau=MIXED_TAU[backbone])
    seen = []
    real = dla.operator._segment

    def spy(*args):
        out = real(*args)
        seen.append(out[0].clone())
        return out

    monkeypatch.setattr(dla.operator, "_segment", spy)
    x = tokens(2, 40)
    with recording(model) as layers, torch.no_grad():
        if cached:
            cache = model.empty_cache(2)
            _, cache = model.prefill(x[:, :25], cache)  # a second call starts from live slots
            model.prefill(x[:, 25:], cache)
        else:
            model(x)
    calls = 2 if cached else 1
    assert len(layers) == 2 and len(seen) == 2 * 2 * calls
    recorded = [ls for c in range(calls) for layer in layers for ls in layer.level_starts[c:c + 1]]
    operator = seen[0::2]
    assert len(recorded) == len(operator)
    for mine, theirs in zip(recorded, operator):
        assert torch.equal(mine, theirs)
    if cached:
        assert (layers[0].initial_live[1] > 0).all() and (layers[0].initial_live[0] == 0).all()
    else:
        assert all(0.2 < entry["boundary_rate"] < 0.9 for entry in summaries(layers))


def test_summary_is_segmentation_stats_pooled_over_windows():
    model = model_of("mamba2", tau=MIXED_TAU["mamba2"])
    with recording(model) as layers, torch.no_grad():
        model(tokens(3, 40, seed=1))
        model(tokens(2, 40, seed=2))
    for record in layers:
        level_start = torch.cat(record.level_starts)
        stats = segmentation_stats(level_start, chunk_size=record.chunk_size, skip_first=SKIP_FIRST)
        entry = layer_summary(record)
        assert entry["windows"] == 5 and entry["window_tokens"] == 40 and entry["heads"] == WIDE["n_heads"]
        assert entry["boundary_rate_by_head"] == pytest.approx((stats.late_boundaries_per_1k / 1000).tolist())
        # the definition, counted by hand: tokens at positions >= 16 whose rank-0 slot starts at them
        t = torch.arange(40)
        opened = (level_start[..., 0] == t[None, :, None])[:, SKIP_FIRST:]
        assert entry["boundary_rate_by_head"] == pytest.approx(opened.double().mean((0, 1)).tolist())
        assert entry["boundary_rate"] == pytest.approx(float(np.mean(entry["boundary_rate_by_head"])))
        assert entry["merges_per_1000_by_head"] == pytest.approx(stats.merges_per_1k.tolist())
        assert entry["merges_per_1000"] == pytest.approx(float(stats.merges_per_1k.mean()))
        assert entry["mean_segment_length_by_head"] == pytest.approx(stats.mean_segment.tolist())
        assert entry["median_segment_length_by_head"] == pytest.approx(stats.median_segment.tolist())
        assert entry["slots_changed_per_chunk_by_head"] == pytest.approx(stats.slots_changed_per_chunk.tolist())


@pytest.mark.parametrize("tau, rate", [(0.0, 1.0), (1e9, 0.0)])
def test_threshold_extremes_give_every_or_no_boundary(tau, rate):
    """τ = 0 opens a slot at every token (the score is never negative), a huge τ at none past the
    first: the rates and segment lengths that follow from that alone."""
    model = model_of("gdn", tau=tau)
    with recording(model) as layers, torch.no_grad():
        model(tokens(2, 40))
    for entry in summaries(layers):
        assert entry["boundary_rate_by_head"] == [rate] * WIDE["n_heads"]
        if rate:
            K = WIDE["capacity"]
            assert entry["mean_segment_length"] == 1.0
            assert entry["merges_per_1000"] == pytest.approx(1000 * (40 - K) / 40)  # full after K tokens
        else:
            assert entry["mean_segment_length"] == 40.0 and entry["merges_per_1000"] == 0.0


@pytest.mark.parametrize("fields", [dict(policy="fenwick"), dict(policy="single"), dict(backbone="attention")])
def test_a_model_without_dla_layers_reports_none(fields):
    model = model_of(fields.pop("backbone", "mamba2"), **fields)
    with recording(model) as layers, torch.no_grad():
        model(tokens(1, 40))
    assert summaries(layers) == []


def test_short_windows_have_no_boundary_rate():
    model = model_of("mamba2", seq_len=SKIP_FIRST)
    with recording(model) as layers, torch.no_grad():
        model(tokens(2, SKIP_FIRST))
    entry = layer_summary(layers[0])
    assert entry["boundary_rate"] is None and entry["boundary_rate_by_head"] == [None] * WIDE["n_heads"]
    assert entry["mean_segment_length"] >= 1 and json.loads(json.dumps(entry)) == entry


def test_recording_sees_through_a_compiled_block():
    """Blocks compiled on their own (as under torchrun) would not call hooks added after tracing;
    the recording runs them eagerly, so it sees the same maps."""
    model = model_of("mamba2", n_layers=1)
    x = tokens(1, 24)
    with recording(model) as eager, torch.no_grad():
        model(x)
    model.blocks[0].compile(fullgraph=True)
    with torch.no_grad():
        model(x)
    with recording(model) as compiled, torch.no_grad():
        model(x)
    assert len(compiled[0].level_starts) == 1
    assert torch.equal(compiled[0].level_starts[0], eager[0].level_starts[0])


# ---------------------------------------------------------------------------------------------
# the command line: dla train --score/--tau, dla eval, metrics.jsonl, dla segments


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def train_args(out, corpus, *extra) -> list[str]:
    return ["train", "--preset", "wide", "--out", str(out), "--data", str(corpus), "--no-compile", "--device", "cpu",
            "--eval-tokens", "160", "--steps", "2", *extra]


@pytest.fixture(autouse=True)
def wide_preset(monkeypatch):
    add_micro_preset(monkeypatch)
    add_micro_preset(monkeypatch, name="wide", model=WIDE)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("wide") / "run"
    with pytest.MonkeyPatch.context() as m:
        add_micro_preset(m, name="wide", model=WIDE)
        assert main(train_args(out, corpus, "--score", "token", "--tau", "0.3")) == 0
    return out


def test_train_takes_score_and_tau_and_records_the_segmentation(wide_run, capsys):
    config = json.loads((checkpoint.find(wide_run) / "config.json").read_text())
    assert config["model"]["score"] == "token" and config["model"]["tau"] == 0.3
    record = json.loads((wide_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert [e["layer"] for e in record["segmentation"]] == [0, 1]
    assert main(["eval", "--checkpoint", str(wide_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["segmentation"] == record["segmentation"]  # the same windows, the same weights
    for entry in result["segmentation"]:
        assert entry["windows"] == 4 and entry["window_tokens"] == 40
        assert len(entry["boundary_rate_by_head"]) == WIDE["n_heads"]
        assert all(0 <= r <= 1 for r in entry["boundary_rate_by_head"])
        for key in ("boundary_rate", "merges_per_1000", "mean_segment_length"):
            assert isinstance(entry[key], float)
    assert main(["eval", "--checkpoint", str(wide_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for entry, line in zip(result["segmentation"], lines[2:]):
        rates = " ".join(f"{r:.3f}" for r in entry["boundary_rate_by_head"])
        assert line.startswith(f"  layer {entry['layer']}: boundary rate {entry['boundary_rate']:.3f} (by head "
                               f"{rates}), {entry['merges_per_1000']:.1f} merges per 1000 tokens")


def test_the_default_score_is_drift_and_a_resumed_run_keeps_its_own(corpus, tmp_path, capsys):
    assert main(train_args(tmp_path / "d", corpus)) == 0
    assert "segmentation of the held-out windows (40 tokens" in capsys.readouterr().out
    config = json.loads((checkpoint.find(tmp_path / "d") / "config.json").read_text())
    assert config["model"]["score"] == "drift" and config["model"]["tau"] == 0.6
    resume = ["train", "--out", str(tmp_path / "d"), "--resume", "--no-compile", "--device", "cpu", "--steps", "3"]
    assert main(resume + ["--score", "state"]) == 2
    assert "score = 'drift', but this run asks for score = 'state'" in capsys.readouterr().err
    assert main(resume) == 0


def test_a_checkpoint_without_a_score_was_token(corpus, tmp_path, capsys):
    """Written before `score` existed, when `token` was the default: it loads, evaluates and
    resumes as `token`."""
    run = tmp_path / "old"
    assert main(train_args(run, corpus)) == 0
    path = checkpoint.find(run) / "config.json"
    config = json.loads(path.read_text())
    del config["model"]["score"]
    path.write_text(json.dumps(config))
    assert checkpoint.load(run, device="cpu").cfg.score == "token"
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-compile", "--device", "cpu", "--steps", "3"]) == 0
    assert json.loads((checkpoint.find(run) / "config.json").read_text())["model"]["score"] == "token"


BAD_TRAIN = [
    (["--score", "surprise"], "invalid choice: 'surprise'"),
    (["--tau", "-0.1"], "--tau must be a finite number >= 0"),
    (["--tau", "nan"], "--tau must be a finite number >= 0"),
    (["--tau", "high"], "invalid float value: 'high'"),
    (["--policy", "fenwick", "--score", "token"], "--score applies to the dla policy"),
    (["--policy", "single", "--tau", "0.3"], "--tau applies to the dla policy"),
    (["--backbone", "attention", "--tau", "0.3"], "--tau applies to the dla policy"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAIN, ids=[" ".join(e) for e, _ in BAD_TRAIN])
def test_bad_score_and_tau_are_refused(extra, message, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert exit_code(main, train_args(out, corpus, *extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err
    assert not out.exists()


def segments(run, out, *extra) -> list[str]:
    return ["segments", "--checkpoint", str(run), "--out", str(out), "--device", "cpu", *extra]


def test_segments_draws_and_prints_the_librarys_statistics(wide_run, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    picture = tmp_path / "seg.png"
    assert main(segments(wide_run, picture, "--text", str(text), "--json", "--layers", "1", "--heads", "0,1")) == 0
    result = json.loads(capsys.readouterr().out)
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert result["tokens"] == len(TEXT.encode()) and result["score"] == "token" and result["tau"] == 0.3

    model = checkpoint.load(wide_run, device="cpu")
    record = segment_text(model, encode(TEXT))[1]
    level_start = record.level_starts[0]
    stats = segmentation_stats(level_start, chunk_size=model.cfg.chunk_size, skip_first=SKIP_FIRST)
    assert [(h["layer"], h["head"]) for h in result["segmentation"]] == [(1, 0), (1, 1)]
    for h in result["segmentation"]:
        i = h["head"]
        assert h["boundary_rate"] == pytest.approx(float(stats.late_boundaries_per_1k[i]) / 1000)
        assert h["merges_per_1000"] == pytest.approx(float(stats.merges_per_1k[i]))
        assert h["mean_segment_length"] == pytest.approx(float(stats.mean_segment[i]))
        assert h["median_segment_length"] == pytest.approx(float(stats.median_segment[i]))
        assert h["slots_changed_per_chunk"] == pytest.approx(float(stats.slots_changed_per_chunk[i]))

    assert main(segments(wide_run, tmp_path / "seg2.png", "--prompt", TEXT, "--layers", "1", "--heads", "0,1")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"{len(TEXT.encode())} tokens; picture: {tmp_path / 'seg2.png'}")
    for h, line in zip(result["segmentation"], lines[2:]):
        assert line.startswith(f"  layer 1 head {h['head']}: boundary rate {h['boundary_rate']:.3f} (quarters ")
        assert f"), {h['merges_per_1000']:.1f} merges per 1000 tokens, segments mean {h['mean_segment_length']:.1f} " \
               f"median {h['median_segment_length']:g} tokens, {h['slots_changed_per_chunk']:.2f} slots changed" in line
    assert (tmp_path / "seg2.png").stat().st_size > 10_000


def test_a_prompt_and_a_forward_pass_segment_alike():
    """`dla segments` reads the text by `prefill` from an empty cache; within the training
    length that is the forward pass's segmentation."""
    model = model_of("gdn", tau=MIXED_TAU["gdn"])
    x = tokens(1, 40, seed=3)
    with recording(model) as layers, torch.no_grad():
        model(x)
    for mine, forward in zip(segment_text(model, x[0].numpy()), layers):
        assert torch.equal(mine.level_starts[0], forward.level_starts[0])


def test_slot_map_and_quarter_rates_follow_the_level_map():
    model = model_of("mamba2", tau=MIXED_TAU["mamba2"])
    level_start = segment_text(model, tokens(1, 80, seed=4)[0].numpy())[0].level_starts[0]
    level, _ = dense_level_map(level_start, torch.zeros(1, WIDE["n_heads"], dtype=torch.long))
    T = 80
    for h in range(WIDE["n_heads"]):
        got = slot_map(level_start[0, :, h], rows=7)
        live = (level_start[0, :, h] != 2**31 - 1).sum(-1)
        for t in range(T):
            expected = (live[t] - 1 - level[0, h, t, : t + 1]).numpy()
            assert np.array_equal(got[t, : t + 1], expected) and np.isnan(got[t, t + 1:]).all()
    opened = level_start[0, :, :, 0] == torch.arange(T)[:, None]
    rates = quarter_rates(level_start)
    for q, (lo, hi) in enumerate([(SKIP_FIRST, 20), (20, 40), (40, 60), (60, 80)]):
        assert rates[:, q].tolist() == pytest.approx(opened[lo:hi].double().mean(0).tolist())
    short = quarter_rates(level_start[:, :20])  # quarters of 5 tokens: the first three lie before 16
    assert torch.isnan(short[:, :3]).all() and not torch.isnan(short[:, 3]).any()


BAD_SEGMENTS = [
    (["--text", "{missing}"], "--text {missing}: no such file"),
    (["--text", "{binary}"], "not UTF-8 text"),
    (["--prompt", ""], "must hold at least one byte"),
    (["--prompt", "x" * 4097], "more than the 4,096 a picture shows"),
    (["--prompt", "hi", "--layers", "2"], "--layers: 2 is not a DLA layer of the model (it has [0, 1])"),
    (["--prompt", "hi", "--heads", "4"], "--heads: 4 is not a head of the model (0 to 1)"),
    (["--prompt", "hi", "--layers", "one"], "expected comma-separated integers"),
    (["--prompt", "hi", "--out", "{folder}/seg.jpg"], "must name a .png file"),
    (["--prompt", "hi", "--out", "{missing}/seg.png"], "is not a writable folder"),
    (["--prompt", "hi", "--checkpoint", "{folder}"], "--checkpoint"),
    (["--prompt", "hi", "--text", "{binary}"], "not allowed with argument"),
    ([], "one of the arguments --text --prompt is required"),
]


@pytest.mark.parametrize("extra, message", BAD_SEGMENTS, ids=[m for _, m in BAD_SEGMENTS])
def test_bad_segments_input(extra, message, wide_run, tmp_path, capsys):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    paths = dict(missing=tmp_path / "missing", binary=tmp_path / "binary.txt", folder=tmp_path)
    argv = segments(wide_run, tmp_path / "seg.png")
    argv += [e.format(**paths) for e in extra]
    before = snapshot(tmp_path)
    assert exit_code(main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert message.format(**paths) in captured.err
    assert snapshot(tmp_path) == before


def test_segments_of_a_model_without_dla_layers_is_refused(corpus, tmp_path, capsys):
    run = tmp_path / "single"
    assert main(train_args(run, corpus, "--policy", "single")) == 0
    capsys.readouterr()
    assert main(segments(run, tmp_path / "seg.png", "--prompt", "hi")) == 2
    err = capsys.readouterr().err
    assert "has no DLA layer to draw" in err and not (tmp_path / "seg.png").exists()
