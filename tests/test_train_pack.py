"""`dla train --pack` (issue #24): the packed forward of the language model against each document
run alone, a document untouched by what precedes it, the packer's batches (every token once, no
piece across documents or rows, no target across documents, one shape per run), the packed step
compiling to one graph, and the command end to end on the default corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from dla.cli import main
from dla.model import BACKBONES, POLICIES, CausalLM, ModelConfig
from dla.run import checkpoint
from dla.run.data import (IGNORE_INDEX, batch_at, default_corpus_files, packed_batch, pieces_per_row, prepare,
                          window_starts)
from tests.helpers import MICRO, add_micro_preset, train_curve, write_corpus

# every backbone and, but for attention (which has none), every policy
COMBOS = [(b, p) for b in BACKBONES for p in (POLICIES if b != "attention" else ("dla",))]


def micro(backbone: str, policy: str = "dla") -> ModelConfig:
    return ModelConfig(**{**MICRO, "backbone": backbone, "policy": policy})


def offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("backbone, policy", COMBOS)
def test_packed_forward_is_each_document_alone(backbone, policy):
    """Sequences of every kind of length (one token, empty in the middle and at the end, the full
    `max_seqlen`), packed into one row: each position's logits are its document's run alone, in
    float64. The bound is the model's own rounding between lengths (its decays are float32),
    far below what one token of another document changes (`test_model.test_causal`)."""
    torch.manual_seed(0)
    model = CausalLM(micro(backbone, policy)).double()
    lengths = [3, 0, 8, 1, 5, 0]
    idx = tokens(sum(lengths), seed=1)
    cu = offsets(lengths)
    with torch.no_grad():
        packed = model(idx, cu, 8)
        alone = torch.cat([model(idx[:, a:e]) for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > a], dim=1)
    assert packed.shape == (1, sum(lengths), 256)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-6)


def test_packed_loss_and_gradients_are_the_documents():
    """The packed loss is the token-weighted mean of the documents' losses (float32, as
    `CausalLM.loss` computes it), ignored targets left out, and its gradients are theirs."""
    torch.manual_seed(0)
    model = CausalLM(micro("mamba2")).double()
    lengths = [5, 8, 2]
    idx, targets = tokens(15, seed=1), tokens(15, seed=2)
    targets[0, [4, 12]] = IGNORE_INDEX
    cu = offsets(lengths)
    packed = model.loss(idx, targets, cu, 8)
    grads = torch.autograd.grad(packed, list(model.parameters()))
    total, count = 0.0, 0
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = model(idx[:, a:e])
        total = total + F.cross_entropy(logits[0].float(), targets[0, a:e], reduction="sum")
        count += int((targets[0, a:e] != IGNORE_INDEX).sum())
    separate = torch.autograd.grad(total / count, list(model.parameters()))
    torch.testing.assert_close(packed, total / count, rtol=0, atol=1e-6)
    for g, h in zip(grads, separate):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backbone, policy", COMBOS)
def test_a_document_is_unchanged_when_the_one_before_is_replaced(backbone, policy):
    """[A, B] and [A', B], A' another text of another length: B's logits are the same."""
    torch.manual_seed(0)
    model = CausalLM(micro(backbone, policy)).double()
    a, a2, b = tokens(3, seed=1), tokens(7, seed=2), tokens(5, seed=3)
    with torch.no_grad():
        first = model(torch.cat([a, b], 1), offsets([3, 5, 0]), 8)[:, 3:]
        second = model(torch.cat([a2, b], 1), offsets([7, 5, 0]), 8)[:, 7:]
    torch.testing.assert_close(first, second, rtol=0, atol=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(x, offsets([4, 4]).long(), 8), "cu_seqlens must be a 1-D int32 tensor"),
    (lambda m, x: m(x, [0, 4, 8], 8), "cu_seqlens must be a torch.Tensor"),
    (lambda m, x: m(x.view(2, 4), offsets([4, 4]), 8), "batch must be 1"),
    (lambda m, x: m(x, offsets([4, 4]), 9), "max_seqlen = 9 .* seq_len = 8"),
    (lambda m, x: m(torch.cat([x, x], 1), offsets([8, 8])), "max_seqlen = 16 .* seq_len = 8"),
    (lambda m, x: m(x, None, 8), "max_seqlen applies to packed sequences"),
    (lambda m, x: m(x[0], offsets([4, 4]), 8), "idx must be"),
])
def test_bad_packing_arguments_are_refused_by_name(call, message):
    model = CausalLM(micro("mamba2"))
    with pytest.raises((ValueError, TypeError), match=message):
        call(model, tokens(8, seed=0))


def test_packed_training_step_compiles_to_one_graph():
    """Packed forward and loss in one fullgraph frame (nothing read back to the host); another
    batch with other offsets, of the same shapes, runs without recompiling."""
    torch.manual_seed(0)
    model = CausalLM(micro("mamba2"))
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(model.loss, backend=counter, fullgraph=True)
    idx, targets = tokens(16, seed=1), tokens(16, seed=2)
    targets[0, 4] = IGNORE_INDEX
    cu = offsets([5, 3, 8, 0])
    loss = step(idx, targets, cu, 8)
    loss.backward()
    assert counter.frame_count == 1 and not counters["graph_break"]
    torch.testing.assert_close(loss, model.loss(idx, targets, cu, 8), rtol=1e-5, atol=1e-5)
    with torch.compiler.set_stance("fail_on_recompile"):
        step(tokens(16, seed=3), tokens(16, seed=4), offsets([8, 1, 1, 6]), 8).backward()
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# the packer


def document_of(documents: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(documents, positions, side="right") - 1


@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12), seq_len=st.integers(1, 12),
       batch_size=st.integers(1, 4), step=st.integers(0, 1000))
def test_packed_batches_keep_documents_and_rows_apart(sizes, seq_len, batch_size, step, tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    sizes = [*sizes, 2 * seq_len + 2]  # enough bytes for a training window
    rng = np.random.default_rng(step)
    for i, n in enumerate(sizes):
        (folder / f"{i:02d}.txt").write_bytes(rng.integers(97, 123, size=n, dtype=np.uint8).tobytes())
    split = prepare(str(folder), folder / "cache", seq_len=seq_len)
    stream, documents = np.asarray(split.train), split.documents
    sequences = batch_size * pieces_per_row(documents, seq_len)
    starts = window_starts(stream, step, batch_size=batch_size, seq_len=seq_len, seed=0)
    batch = packed_batch(stream, documents, starts, seq_len=seq_len, sequences=sequences)
    T, BT = seq_len, batch_size * seq_len
    cu = batch.cu_seqlens.numpy()

    # one static shape per run, the flash-attention convention, every row boundary a cut
    assert batch.cu_seqlens.dtype == torch.int32 and cu.shape == (sequences + 1,) and batch.max_seqlen == T
    assert cu[0] == 0 and cu[-1] == BT and (np.diff(cu) >= 0).all() and (np.diff(cu) <= T).all()
    assert set(range(0, BT + 1, T)) <= set(cu.tolist())
    # every token of the windows once, in order: the unpacked batch flattened
    x, y = batch_at(stream, step, batch_size=batch_size, seq_len=seq_len, seed=0)
    assert torch.equal(batch.x, x.reshape(1, BT))
    # a piece lies within one document (and, being cut at every row boundary, within one row)
    absolute = (starts[:, None] + np.arange(T)).reshape(-1)
    doc = document_of(documents, absolute)
    for a, e in zip(cu[:-1], cu[1:]):
        assert len(set(doc[a:e])) <= 1 and len({p // T for p in range(a, e)}) <= 1
    # a target is ignored exactly where it would predict the first token of the next document
    crosses = document_of(documents, absolute + 1) != doc
    assert torch.equal(batch.y[0] == IGNORE_INDEX, torch.from_numpy(crosses))
    assert torch.equal(batch.y[0][~crosses], y.reshape(-1)[~crosses])


@given(starts=st.lists(st.integers(1, 60), unique=True, max_size=10), seq_len=st.integers(1, 16))
def test_pieces_per_row_is_the_most_any_window_holds(starts, seq_len):
    documents = np.array(sorted({0, *starts}), dtype=np.int64)
    most = max(1 + int(((documents > s) & (documents < s + seq_len)).sum()) for s in range(0, 80))
    assert pieces_per_row(documents, seq_len) == most


def test_documents_are_the_source_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "part0b.txt").write_text("")  # an empty file starts no document
    split = prepare(str(corpus), tmp_path / "cache", seq_len=8)
    sizes = [p.stat().st_size for p in sorted(corpus.glob("*.txt")) if p.stat().st_size]
    assert split.documents.tolist() == np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist()


def test_the_default_corpus_documents_are_its_plays(tmp_path):
    split = prepare(None, tmp_path, seq_len=8)
    files = default_corpus_files()
    assert 35 <= len(split.documents) <= len(files)  # the last plays are held out
    for start, f in zip(split.documents, files):
        head = f.read_bytes()[:64]
        assert bytes(split.train[start:start + len(head)]) == head
    assert pieces_per_row(split.documents, 2048) == 2  # its shortest document is longer than any preset's window


# ---------------------------------------------------------------------------------------------
# dla train --pack


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch):
    add_micro_preset(monkeypatch)


def train_args(out, *extra) -> list[str]:
    return ["train", "--preset", "micro", "--out", str(out), "--no-compile", "--device", "cpu", "--eval-tokens", "32",
            *extra]


def test_dla_train_pack_on_the_default_corpus(tmp_path, capsys):
    """A few steps on the plays, packed, the choice recorded in the checkpoint and the metrics;
    a resumed run keeps it, and an unpacked run cannot resume packed."""
    out = tmp_path / "packed"
    assert main(train_args(out, "--pack", "--steps", "2", "--checkpoint-every", "1")) == 0
    assert "packing" in capsys.readouterr().err
    ckpt = checkpoint.find(out)
    assert checkpoint.read_json(ckpt, "config.json")["train"]["pack"] is True
    data = checkpoint.read_json(ckpt, "state.json")["data"]
    assert data["pack"] is True and data["source"] == "shakespeare" and data["pieces_per_window"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["pack"] is True and len(train_curve(out)) == 2
    assert all(np.isfinite(loss) for _, loss in train_curve(out))

    assert main(train_args(out, "--resume", "--steps", "3")) == 0  # no --pack: the checkpoint's
    assert checkpoint.read_json(checkpoint.find(out), "config.json")["train"]["pack"] is True
    assert [s for s, _ in train_curve(out)] == [1, 2, 3]

    plain = tmp_path / "plain"
    assert main(train_args(plain, "--steps", "1", "--data", str(write_corpus(tmp_path / "corpus")))) == 0
    assert checkpoint.read_json(checkpoint.find(plain), "config.json")["train"]["pack"] is False
    capsys.readouterr()
    assert main(train_args(plain, "--resume", "--pack", "--steps", "2")) == 2
    assert "pack" in capsys.readouterr().err
