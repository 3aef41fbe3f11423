"""The model: config and presets, every backbone × policy, what the mixers hand the operator,
causality, and the training step compiling to one graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import dla.model.layers as layers
from dla.model import BACKBONES, POLICIES, PRESETS, CausalLM, ModelConfig, preset
from dla.model.layers import LevelWeights

# small enough for the float64 reference operator, big enough to exercise every path
MICRO = dict(d_model=16, n_layers=1, n_heads=2, head_dim=4, head_dim_v=4, capacity=3, seq_len=8, mlp_ratio=2.0)


def micro(backbone: str, policy: str = "dla", **kw) -> ModelConfig:
    return ModelConfig(**{**MICRO, "backbone": backbone, "policy": policy, **kw})


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_shapes_and_gradients(backbone, policy):
    torch.manual_seed(0)
    model = CausalLM(micro(backbone, policy))
    x = tokens(2, 8)
    logits = model(x)
    assert logits.shape == (2, 8, 256) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    loss = model.loss(x, tokens(2, 8, seed=1))
    assert loss.shape == () and 4.0 < loss.item() < 7.0  # near ln 256 at initialisation
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    if backbone != "attention":
        has_lam = any(isinstance(m, LevelWeights) for m in model.modules())
        assert has_lam == (policy != "single")


@pytest.mark.parametrize("backbone", ["mamba2", "gdn", "attention"])
def test_causal(backbone):
    """Changing the future leaves the logits of the past untouched (convolutions included)."""
    torch.manual_seed(0)
    model = CausalLM(micro(backbone))
    x = tokens(1, 8)
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


def test_levels_follow_the_policy():
    assert micro("mamba2", "dla", capacity=5).levels == 5
    assert micro("mamba2", "single").levels == 1
    # fenwick needs L > bitlen(T − 1): derived from seq_len, capacity ignored
    for seq_len, levels in [(1, 1), (2, 2), (8, 4), (9, 5), (128, 8), (129, 9)]:
        assert micro("mamba2", "fenwick", seq_len=seq_len, capacity=2).levels == levels
    model = CausalLM(micro("gdn", "fenwick", seq_len=9))
    assert model(tokens(1, 9)).shape == (1, 9, 256)  # the longest window passes the operator's check


def test_level_weights_start_at_ones():
    model = CausalLM(micro("mamba2", "dla"))
    lam = [m for m in model.modules() if isinstance(m, LevelWeights)]
    assert lam and all(torch.equal(m.L, torch.ones(2, 3)) for m in lam)
    x = torch.randn(1, 4, 16)
    out = lam[0](x)
    assert out.shape == (1, 4, 2, 3) and (out > 0).all()
    torch.testing.assert_close(out, F.softplus(lam[0].proj(x)).unflatten(-1, (2, 3)))


def _capture(monkeypatch):
    """Record each call of the operator from the mixers, with its output under "out"."""
    calls = []
    real = layers.multistate_attention

    def spy(q, k, v, lam, **kw):
        out = real(q, k, v, lam, **kw)
        calls.append(dict(q=q, k=k, v=v, lam=lam, out=out, **kw))
        return out

    monkeypatch.setattr(layers, "multistate_attention", spy)
    return calls


def test_mamba2_hands_the_operator_its_write(monkeypatch):
    """k = B_t, v = dt_t · x_t, g = −exp(A_log)·softplus(dt), q = C_t, no 1/√N scale."""
    calls = _capture(monkeypatch)
    torch.manual_seed(0)
    cfg = micro("mamba2", "dla", tau=0.3)
    model = CausalLM(cfg)
    mixer = model.blocks[0].mixer
    u = torch.randn(2, 8, 16)
    mixer(u)
    (call,) = calls
    H, N, P = 2, 4, 4
    z, xBC, dt = mixer.in_proj(u).split([H * P, H * P + 2 * N, H], dim=-1)
    conv = F.silu(F.conv1d(xBC.transpose(1, 2), mixer.conv.conv.weight, mixer.conv.conv.bias, padding=3,
                           groups=H * P + 2 * N)[..., :8]).transpose(1, 2)
    x, B, C = conv.split([H * P, N, N], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias)
    torch.testing.assert_close(call["k"], B[:, :, None].expand(2, 8, H, N))
    torch.testing.assert_close(call["q"], C[:, :, None].expand(2, 8, H, N))
    torch.testing.assert_close(call["v"], x.unflatten(-1, (H, P)) * dt[..., None])
    torch.testing.assert_close(call["g"], -torch.exp(mixer.A_log) * dt)
    assert (call["g"] <= 0).all() and call["beta"] is None and call["scale"] == 1.0
    assert call["policy"] == "dla" and call["tau"] == 0.3 and call["lam"].shape == (2, 8, H, 3)


def test_gated_deltanet_hands_the_operator_normalised_keys(monkeypatch):
    calls = _capture(monkeypatch)
    torch.manual_seed(0)
    model = CausalLM(micro("gdn", "fenwick"))
    model.blocks[0].mixer(torch.randn(2, 8, 16))
    (call,) = calls
    torch.testing.assert_close(call["q"].norm(dim=-1), torch.ones(2, 8, 2))
    torch.testing.assert_close(call["k"].norm(dim=-1), torch.ones(2, 8, 2))
    assert ((call["beta"] > 0) & (call["beta"] < 1)).all() and (call["g"] <= 0).all()
    assert call["scale"] is None and call["policy"] == "fenwick" and call["lam"].shape == (2, 8, 2, 4)


@pytest.mark.parametrize("backbone", ["mamba2", "gdn"])
@pytest.mark.parametrize("policy", ["dla", "fenwick"])
def test_unit_level_weights_reproduce_the_base_model(backbone, policy, monkeypatch):
    """λ ≡ 1 turns every policy into the base backbone (SPEC §2), so a multi-state model with
    its level weights forced to one equals the `single` model with the same weights."""
    torch.manual_seed(0)
    multi = CausalLM(micro(backbone, policy)).double()
    base = CausalLM(micro(backbone, "single")).double()
    base.load_state_dict({k: v for k, v in multi.state_dict().items() if ".lam." not in k})
    x = tokens(2, 8)
    calls = _capture(monkeypatch)
    with torch.no_grad():
        multi(x), base(x)
        learned, single = calls[0]["out"], calls[1]["out"]
        assert (learned - single).norm() / single.norm() > 1e-2  # the level weights matter
        monkeypatch.setattr(LevelWeights, "forward",
                            lambda self, u: torch.ones(*u.shape[:2], *self.L.shape, dtype=u.dtype))
        torch.testing.assert_close(multi(x), base(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(calls[2]["out"], single, rtol=1e-9, atol=1e-12)


def test_config_rejects_bad_fields_by_name():
    with pytest.raises(ValueError, match="backbone"):
        micro("transformer")
    with pytest.raises(ValueError, match="policy"):
        micro("mamba2", "tree")
    with pytest.raises(ValueError, match="capacity"):
        micro("mamba2", "dla", capacity=1)
    micro("mamba2", "single", capacity=1)  # capacity only binds dla
    with pytest.raises(ValueError, match="seq_len"):
        micro("mamba2", seq_len=0)
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
    with pytest.raises(ValueError, match="'depth'"):
        ModelConfig.from_dict({**micro("gdn").to_dict(), "depth": 3})
    assert ModelConfig.from_dict(micro("gdn").to_dict()) == micro("gdn")


def test_score_defaults_to_drift_and_a_config_without_one_was_token():
    """A checkpoint keeps the score it was trained with; one whose config predates the field
    was trained with `token`."""
    assert ModelConfig().score == "drift"
    fields = micro("gdn").to_dict()
    del fields["score"]
    assert ModelConfig.from_dict(fields).score == "token"
    assert ModelConfig.from_dict({**fields, "score": "state"}).score == "state"


def test_presets_are_data_with_the_promised_sizes():
    assert set(PRESETS) == {"tiny", "small", "base", "paper"}
    sizes = {}
    for name in PRESETS:
        for backbone in BACKBONES:
            with torch.device("meta"):
                sizes[name, backbone] = CausalLM(preset(name, backbone=backbone)).num_params()
    assert all(sizes["tiny", b] < 2e6 for b in BACKBONES)
    assert 100e6 < sizes["base", "mamba2"] < 150e6  # ~125M
    assert all(780e6 <= sizes["paper", b] <= 1.3e9 for b in ("mamba2", "gdn"))
    paper = preset("paper")
    assert paper.capacity == 30 and paper.tau == 0.6 and paper.levels == 30
    assert dataclasses.replace(paper, policy="fenwick").levels == 12  # bitlen(2047) + 1


def _compile_counter():
    counters.clear()
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_step_compiles_to_one_graph(backbone):
    """Forward and loss in one fullgraph frame, backward by AOT autograd; a second batch of the
    same shape runs without recompiling."""
    torch.manual_seed(0)
    model = CausalLM(micro(backbone, "dla"))
    assert model.cfg.score == "drift"  # the default score, whose detection runs inside the segment op
    counter = _compile_counter()
    step = torch.compile(model.loss, backend=counter, fullgraph=True)
    loss = step(tokens(2, 8), tokens(2, 8, seed=1))
    loss.backward()
    assert counter.frame_count == 1
    assert not counters["graph_break"]
    assert all(p.grad is not None for p in model.parameters())
    eager = model.loss(tokens(2, 8), tokens(2, 8, seed=1))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    with torch.compiler.set_stance("fail_on_recompile"):
        step(tokens(2, 8, seed=2), tokens(2, 8, seed=3)).backward()
    assert counter.frame_count == 1
