"""Generation: the fixed-shape decode cache reproduces the parallel forward for every backbone ×
policy (token by token, and prefill + decode), the decode step compiles to one graph that never
recompiles, sampling, and `dla generate` end to end with its errors.

Decisions of `dla` are thresholds (SPEC §2): each test computes the segmentation of every layer's
operator inputs with the reference `segment_naive` and asserts that it is well-conditioned (SPEC §2
margins: 1e-9 in float64, 1e-4 in float32), and that boundaries, in-block merges and capacity merges all happened, so the
comparison covers every kind of decision. `tau` is chosen per backbone so that the freshly
initialised model makes all three (measured margins are ≥ 3e-4, far above 1e-9).

Tolerance: the model runs in float64, but its gates `g`, `β` and the gated RMSNorm compute in
float32 by design (as in training), so the operator sees float32 log-decays and the chunked
prefix sums of `g` round at float32: decode and forward agree to ~1e-7, not 1e-10. The bound is
the float32 one of SPEC §6 (1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_flatten

import dla.model.layers as layers
from dla.cli import main
from dla.model import CausalLM, ModelConfig
from dla.model.cache import KVCache, LMCache, RecurrentCache
from dla.ops.reference import segment_naive
from dla.run import checkpoint
from dla.run.data import decode, encode
from dla.run.generate import check_request, decode_step, generate, sample
from tests.helpers import add_micro_preset, write_corpus
from tests.strategies import DELTA, relative_error

TOL = 1e-5
MICRO = dict(d_model=16, n_layers=2, n_heads=2, head_dim=4, head_dim_v=4, capacity=3, seq_len=16, mlp_ratio=2.0)
# boundaries, absorptions and capacity merges at initialisation under the default score `drift`
# (the untrained Mamba-2 decays little, so its backbone state moves slowly)
TAU = {"mamba2": 0.05, "gdn": 0.3}
COMBOS = [("mamba2", p) for p in ("single", "fenwick", "dla")] + [("gdn", p) for p in ("single", "fenwick", "dla")] + [
    ("attention", "dla")]


def model_for(backbone: str, policy: str, seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**MICRO, "backbone": backbone, "policy": policy, "tau": TAU.get(backbone, 0.6), **kw})
    return CausalLM(cfg).double().eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def operator_inputs(model: CausalLM, x: torch.Tensor, monkeypatch) -> list[tuple]:
    """(k, v, g, beta) that each layer hands the operator in the parallel forward."""
    calls = []
    real = layers.multistate_attention

    def spy(q, k, v, lam, **kw):
        calls.append((k, v, kw.get("g"), kw.get("beta")))
        return real(q, k, v, lam, **kw)

    monkeypatch.setattr(layers, "multistate_attention", spy)
    with torch.no_grad():
        model(x)
    monkeypatch.setattr(layers, "multistate_attention", real)
    return calls


def assert_decisions_well_conditioned(model: CausalLM, x: torch.Tensor, monkeypatch) -> None:
    cfg = model.cfg
    delta = DELTA[model.embed.weight.dtype]
    totals = dict(boundaries=0, absorbed=0, capacity_merges=0)
    for k, v, g, beta in operator_inputs(model, x, monkeypatch):
        seg = segment_naive(k, v, levels=cfg.levels, g=g, beta=beta, policy="dla", tau=cfg.tau, score=cfg.score)
        assert float(seg.boundary_margin.min()) >= delta and float(seg.merge_margin.min()) >= delta
        for name in totals:
            totals[name] += int(getattr(seg, name).sum())
    assert all(n > 0 for n in totals.values()), totals


def decode_all(model: CausalLM, x: torch.Tensor, cache: LMCache, step=None) -> tuple[torch.Tensor, LMCache]:
    step = step or model.step
    out = []
    for t in range(x.shape[1]):
        logits, cache = step(x[:, t], cache)
        out.append(logits)
    return torch.stack(out, dim=1), cache


@pytest.mark.parametrize("backbone,policy", COMBOS)
def test_decode_reproduces_the_parallel_forward(backbone, policy, monkeypatch):
    model = model_for(backbone, policy)
    x = tokens(2, MICRO["seq_len"])
    if policy == "dla" and backbone != "attention":
        assert_decisions_well_conditioned(model, x, monkeypatch)
    with torch.no_grad():
        ref = model(x)
        by_token, cache = decode_all(model, x, model.empty_cache(2))
        assert relative_error(by_token, ref) <= TOL
        assert int(cache.pos) == x.shape[1]
        # prefill of a prompt, then token by token; and a prompt prefilled in two pieces
        split = 9
        head, after = model.prefill(x[:, :split], model.empty_cache(2))
        tail, after = decode_all(model, x[:, split:], after)
        assert relative_error(torch.cat([head, tail], dim=1), ref) <= TOL
        first, mid = model.prefill(x[:, :5], model.empty_cache(2))
        second, mid = model.prefill(x[:, 5:], mid)
        assert relative_error(torch.cat([first, second], dim=1), ref) <= TOL
    # every path leaves the same cache behind
    for a, b in zip(tree_flatten(cache)[0], tree_flatten(mid)[0]):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.is_floating_point():
            assert relative_error(a, b) <= TOL
        else:
            assert torch.equal(a, b)


def test_cache_layout():
    """The cache is named tuples of fixed-shape tensors: recurrent state and convolution tails
    for the linear backbones, a key/value cache of `max_len` for attention."""
    gdn = model_for("gdn", "dla").float()
    cache = gdn.empty_cache(3)
    (layer, _), pos = cache.layers, cache.pos
    assert isinstance(layer, RecurrentCache) and len(layer.conv) == 3 and pos.shape == () and int(pos) == 0
    assert layer.conv[0].shape == (3, gdn.cfg.conv_size - 1, 2 * 4)  # [B, conv_size − 1, H·Dk]
    assert layer.state.S.shape == (3, 2, 3, 4, 4) and layer.state.S.dtype == torch.float32
    assert int(layer.state.m.sum()) == 0
    attn = model_for("attention", "dla").float().empty_cache(1, max_len=40)
    assert isinstance(attn.layers[0], KVCache) and attn.layers[0].k.shape == (1, 40, 2, 4)
    with pytest.raises(ValueError, match="max_len"):
        gdn.empty_cache(1, max_len=0)


def test_attention_decodes_past_seq_len():
    """RoPE is computed per position, so the key/value cache may be longer than `seq_len`; within
    `seq_len` it still equals the forward."""
    model = model_for("attention", "dla")
    x = tokens(1, 24)
    with torch.no_grad():
        logits, cache = decode_all(model, x, model.empty_cache(1, max_len=24))
        assert relative_error(logits[:, :16], model(x[:, :16])) <= TOL
    assert torch.isfinite(logits).all() and int(cache.pos) == 24


def test_compiled_decode_step_is_one_graph_without_recompiles(monkeypatch):
    """fullgraph=True, no graph break, and the same graph for every step (positions are tensors).
    In float32, so the decisions must clear float32's margin (1e-4)."""
    model = model_for("mamba2", "dla").float()
    x = tokens(1, 12)  # batch 1, as `dla generate` decodes (a size-1 dimension has loose strides)
    assert_decisions_well_conditioned(model, x, monkeypatch)
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    step = decode_step(model, "default", backend=counter)  # the frame `dla generate` compiles
    with torch.no_grad():
        ref = model(x)
        logits, cache = step(x[:, 0], model.empty_cache(1))
        out = [logits]
        with torch.compiler.set_stance("fail_on_recompile"):
            for t in range(1, x.shape[1]):
                logits, cache = step(x[:, t], cache)
                out.append(logits)
    assert counter.frame_count == 1 and not counters["graph_break"]
    assert relative_error(torch.stack(out, dim=1), ref) <= TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backbone,policy", [("mamba2", "dla"), ("gdn", "dla"), ("mamba2", "single"),
                                             ("gdn", "fenwick"), ("attention", "dla")])
def test_decode_under_cuda_graphs_matches_eager_steps(backbone, policy, monkeypatch):
    """The compiled decode step under CUDA graphs (what `dla generate` runs on CUDA): nothing in
    it may copy from the host or synchronise while the graph is captured (fenwick's level check
    is skipped while capturing: `max_context` bounds the request), and replays equal the eager
    step."""
    model = model_for(backbone, policy).float()
    x = tokens(2, MICRO["seq_len"])  # at 12 tokens the tiny Gated DeltaNet makes no capacity merge
    if policy == "dla" and backbone != "attention":  # no decision within float32's reach of flipping
        assert_decisions_well_conditioned(model, x, monkeypatch)
    model, x = model.cuda(), x.cuda()
    step = decode_step(model, "reduce-overhead")
    with torch.no_grad():
        ref, _ = decode_all(model, x, model.empty_cache(2))
        out, cache = decode_all(model, x, model.empty_cache(2), step=step)
    assert torch.isfinite(out).all() and int(cache.pos) == x.shape[1]
    assert relative_error(out, ref) <= 1e-4  # float32: compiled and eager kernels round differently


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, temperature=0, top_k=None, generator=None).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, temperature=1.0, top_k=2, generator=gen) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}  # top-2 only, both drawn
    assert sample(logits, temperature=5.0, top_k=1, generator=gen).tolist() == [1, 0]


def test_generate_is_seeded_and_greedy_is_argmax():
    model = model_for("gdn", "dla").float()
    prompt = tokens(1, 6)
    a = generate(model, prompt, 5, temperature=1.0, seed=3, compile="none")
    b = generate(model, prompt, 5, temperature=1.0, seed=3, compile="none")
    assert a.shape == (1, 5) and torch.equal(a, b)
    greedy = generate(model, prompt, 4, temperature=0, compile="none")
    seq = prompt
    with torch.no_grad():
        for i in range(4):
            nxt = model(seq)[:, -1].argmax(-1)
            assert int(nxt) == int(greedy[0, i])
            seq = torch.cat([seq, nxt[:, None]], dim=1)


def test_requests_the_model_cannot_serve_name_the_argument():
    attn = ModelConfig(**{**MICRO, "backbone": "attention"})
    rec = ModelConfig(**{**MICRO, "backbone": "mamba2", "policy": "dla"})
    check_request(rec, 16, 1000, 0.7, 5)  # a recurrent state decodes past seq_len
    for cfg, args, name in [(rec, (17, 1, 0.7, None), "--prompt"), (rec, (0, 1, 0.7, None), "--prompt"),
                            (attn, (10, 7, 0.7, None), "--max-new-tokens"),
                            (ModelConfig(**{**MICRO, "policy": "fenwick"}), (10, 7, 0.7, None), "--max-new-tokens"),
                            (rec, (4, 0, 0.7, None), "--max-new-tokens"), (rec, (4, 1, -1.0, None), "--temperature"),
                            (rec, (4, 1, float("nan"), None), "--temperature"), (rec, (4, 1, 1.0, 0), "--top-k"),
                            (rec, (4, 1, 1.0, 257), "--top-k")]:
        with pytest.raises(ValueError, match=name):
            check_request(cfg, *args)


# ---------------------------------------------------------------------------------------------
# dla generate


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as m:
        add_micro_preset(m, model=dict(MICRO, n_layers=1), recipe=dict(steps=3, batch_size=2, lr=1e-2, warmup=1))
        assert main(["train", "--preset", "micro", "--backbone", "gdn", "--out", str(out), "--data", str(corpus),
                     "--no-compile", "--device", "cpu", "--eval-tokens", "32"]) == 0
    return out


def greedy_by_parallel_forward(model: CausalLM, prompt: str, n: int) -> str:
    """The oracle of greedy decoding: the argmax of the parallel forward (no decode cache) on the
    growing sequence, `n` times."""
    seq = torch.tensor(encode(prompt), dtype=torch.int64)[None]
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1)[:, None]], dim=1)
    return prompt + decode(seq[0, -n:].numpy())


def test_generate_cli(trained, capsys):
    """`dla generate` samples reproducibly from its seed, and decodes greedily (temperature 0, or
    the top 1 at any temperature) what the parallel forward of the checkpoint's model predicts."""
    def run(*flags) -> str:
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(trained), "--prompt", "the king", "--max-new-tokens", "8",
                     "--no-compile", "--device", "cpu", *flags]) == 0
        return capsys.readouterr().out

    sampled = run("--temperature", "0.9", "--top-k", "20", "--seed", "7")
    assert run("--temperature", "0.9", "--top-k", "20", "--seed", "7") == sampled and sampled.startswith("the king")
    expected = greedy_by_parallel_forward(checkpoint.load(trained, device="cpu"), "the king", 8) + "\n"
    assert run("--temperature", "0") == expected
    assert run("--temperature", "0.9", "--top-k", "1", "--seed", "3") == expected


@pytest.mark.parametrize("flag,value", [
    ("--checkpoint", "/nonexistent/run"), ("--prompt", "x" * 17), ("--temperature", "-1"), ("--top-k", "0"),
    ("--max-new-tokens", "0"),
])
def test_generate_cli_errors(trained, capsys, flag, value):
    options = {"--checkpoint": str(trained), "--prompt": "the", "--device": "cpu", flag: value}
    capsys.readouterr()
    assert main(["generate", "--no-compile", *(x for kv in options.items() for x in kv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dla: error: ") and flag in err
