"""torchao features on the CPU: the 8-bit AdamW (trains, checkpoints its quantized moments and
resumes exactly), float8 training (its refusal without an H100-class GPU, before anything is
written; the module swap itself), and int8 weight-only quantization of a trained checkpoint
(held-out bits per byte before and after, loading by `dla eval` and `dla generate`).

The float8 matmuls need a GPU of compute capability ≥ 8.9; their training run is measured by
`perf/bench_train_gpu.py` on the H100, not here. torchao compiles the 8-bit AdamW's per-parameter
update with Inductor, which takes minutes on two busy CPU cores; these tests run that update
eagerly (`set_stance("force_eager")`: the same ops, uncompiled).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dla.run.train as train_mod
from dla.cli import main
from dla.model import CausalLM, ModelConfig
from dla.run import checkpoint
from dla.run.optim import convert_to_float8, float8_eligible
from dla.run.train import TrainConfig, make_optimizer, plan, train
from tests.helpers import MICRO, MICRO_RECIPE, add_micro_preset, train_curve, write_corpus
# int8 per-row weights perturb each weight by ≤ half a step (absmax/254); on these models the
# held-out bits per byte move by ~1e-3 or less. 1% of the value still catches a broken
# dequantisation (a wrong scale moves it by whole bits) while leaving room for rounding.
BPB_RTOL = 0.01


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch):
    add_micro_preset(monkeypatch)
    with torch.compiler.set_stance("force_eager"):
        yield


def train_args(out, corpus, *extra) -> list[str]:
    return ["train", "--preset", "micro", "--backbone", "gdn", "--out", str(out), "--data", str(corpus),
            "--no-compile", "--device", "cpu", "--eval-tokens", "64", *extra]


@pytest.fixture(scope="module")
def run_8bit(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("adamw8bit") / "run"
    with pytest.MonkeyPatch.context() as m, torch.compiler.set_stance("force_eager"):
        add_micro_preset(m)
        assert main(train_args(out, corpus, "--optim", "adamw8bit", "--checkpoint-every", "2")) == 0
    return out


# ---------------------------------------------------------------------------------------------
# 8-bit AdamW


def test_adamw8bit_is_torchaos_and_quantizes_large_moments():
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    model = CausalLM(ModelConfig(**MICRO))
    opt = make_optimizer(model, TrainConfig(optim="adamw8bit"))
    assert isinstance(opt, AdamW8bit)
    decay, keep = opt.param_groups
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in keep["params"])
    model.loss(torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64)).backward()
    opt.step()
    # torchao quantizes moments of ≥ 4096 values (the 256 × 16 embedding here)
    assert isinstance(opt.state[model.embed.weight]["exp_avg"], OptimState8bit)
    with pytest.raises(ValueError, match="--optim"):
        TrainConfig(optim="sgd")


def test_adamw8bit_trains_checkpoints_and_resumes_exactly(run_8bit, corpus, tmp_path, monkeypatch):
    """The uninterrupted 4-step run against one killed after its step-2 checkpoint and resumed:
    the 8-bit moments (and the lr tensor torchao keeps) round-trip through optimizer.pt."""
    from torchao.optim.subclass_8bit import OptimState8bit

    ckpt = checkpoint.find(run_8bit)
    assert json.loads((ckpt / "config.json").read_text())["train"]["optim"] == "adamw8bit"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # loads without pickled code
    assert any(isinstance(s["exp_avg"], OptimState8bit) for s in saved["state"].values())
    whole = train_curve(run_8bit)
    assert [s for s, _ in whole] == [1, 2, 3, 4] and whole[-1][1] < whole[0][1]

    cfg = ModelConfig(**{**MICRO, "backbone": "gdn"})
    tcfg = TrainConfig(**MICRO_RECIPE, data=str(corpus), eval_tokens=64, optim="adamw8bit")
    real = train_mod.batch_at

    def killed_at_step_4(stream, step, **kw):
        if step == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint and one more step
        return real(stream, step, **kw)

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "batch_at", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train(plan(cfg, tcfg, out, compile=False, device="cpu", checkpoint_every=2), log=lambda msg: None)
    assert checkpoint.find(out).name == "step-00000002"
    train(plan(cfg, tcfg, out, resume=True, compile=False, device="cpu", checkpoint_every=2), log=lambda msg: None)
    resumed = train_curve(out)
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], rel=1e-6)


def test_resume_with_another_optimizer_is_refused(run_8bit, corpus, capsys):
    before = sorted(p.name for p in (run_8bit / "checkpoints").iterdir())
    assert main(train_args(run_8bit, corpus, "--resume", "--optim", "adamw")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim = 'adamw8bit', but this run asks for optim = 'adamw'" in err
    assert sorted(p.name for p in (run_8bit / "checkpoints").iterdir()) == before


# ---------------------------------------------------------------------------------------------
# float8


def test_float8_is_refused_without_an_h100_before_anything_is_written(corpus, tmp_path, capsys):
    out = tmp_path / "f8"
    for extra in (["--float8"], ["--float8", "--float8-recipe", "rowwise"]):
        assert main(train_args(out, corpus, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--float8 needs an NVIDIA GPU of compute capability >= 8.9" in err
        assert not out.exists()
    assert main(train_args(out, corpus, "--float8-recipe", "rowwise")) == 2
    assert "--float8-recipe rowwise needs --float8" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="--float8"):
        plan(ModelConfig(**MICRO), TrainConfig(float8="tensorwise", data=str(corpus)), out, device="cpu")
    with pytest.raises(ValueError, match="--float8-recipe"):
        TrainConfig(float8="blockwise")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_swaps_the_eligible_linear_layers(recipe):
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(backbone="gdn", d_model=64, n_heads=4, head_dim=16, head_dim_v=32, n_layers=1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    convert_to_float8(model, recipe)
    modules = dict(model.named_modules())
    for name, old in linear.items():
        assert isinstance(modules[name], Float8Linear) == float8_eligible(old, name)
    assert isinstance(modules["blocks.0.mixer.q_proj"], Float8Linear)
    assert not isinstance(modules["blocks.0.mixer.a_proj"], Float8Linear)  # 4 outputs: not divisible by 16
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # same state dict
    with pytest.raises(ValueError, match="--float8-recipe"):
        convert_to_float8(model, "blockwise")


# ---------------------------------------------------------------------------------------------
# int8 weight-only quantization


def test_quantize_reports_bpb_before_and_after(run_8bit, tmp_path, capsys):
    from torchao.quantization import Int8Tensor

    out = tmp_path / "int8"
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", str(run_8bit), "--out", str(out), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    before, after = result["heldout_bpb_before"], result["heldout_bpb_after"]
    assert before == pytest.approx(json.loads(main_eval(run_8bit, capsys))["heldout_bpb"])
    assert after != before and abs(after - before) <= BPB_RTOL * before
    assert result["bytes_before"] > 0 and result["bytes_after"] > 0  # reported (the micro model is mostly embedding)
    ckpt = checkpoint.find(out)
    assert not (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / "config.json").read_text())["quantization"]["method"] == "int8_weight_only"
    # dla eval reads it as int8
    assert json.loads(main_eval(out, capsys))["heldout_bpb"] == pytest.approx(after)
    model = CausalLM(ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text())["model"]))
    checkpoint.restore(ckpt, model)
    assert isinstance(model.blocks[0].mixer.q_proj.weight, Int8Tensor)
    assert model.blocks[0].mixer.q_proj.weight.qdata.dtype == torch.int8
    # dla generate decodes with it
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the", "--max-new-tokens", "5",
                 "--temperature", "0", "--no-compile", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the")
    # an existing --out is kept unless --overwrite; an int8 checkpoint cannot be resumed
    assert main(["quantize", "--checkpoint", str(run_8bit), "--out", str(out), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["quantize", "--checkpoint", str(run_8bit), "--out", str(out), "--no-eval", "--overwrite"]) == 0
    with pytest.raises(checkpoint.CheckpointError, match="cannot be resumed"):
        checkpoint.restore(checkpoint.find(out), CausalLM(model.cfg), torch.optim.AdamW(model.parameters()))
    assert main(["quantize", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint" in err and not (tmp_path / "x").exists()


def main_eval(path, capsys) -> str:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(path), "--json", "--device", "cpu"]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# torchao as an optional extra; an int8 folder stands alone


@pytest.fixture(scope="module")
def quantized(run_8bit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "run"
    assert main(["quantize", "--checkpoint", str(run_8bit), "--out", str(out), "--no-eval"]) == 0
    return out


def test_an_int8_folder_cannot_be_resumed_and_says_so(quantized, corpus, capsys):
    capsys.readouterr()
    assert main(train_args(quantized, corpus, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no optimizer state" in err and "Traceback" not in err


def test_quantize_and_eval_need_no_source_data(run_8bit, tmp_path, capsys):
    """With the run's --data gone, the source and the int8 folder both evaluate on the split the
    run keeps."""
    run = tmp_path / "run"
    shutil.copytree(run_8bit, run)
    config_path = checkpoint.find(run) / "config.json"
    config = json.loads(config_path.read_text())
    config["train"]["data"] = str(tmp_path / "gone.txt")
    config_path.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", str(run), "--out", str(tmp_path / "int8"), "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["heldout_bpb_before"] == pytest.approx(recorded["heldout_bpb"], rel=1e-6)
    assert abs(result["heldout_bpb_after"] - result["heldout_bpb_before"]) <= BPB_RTOL * result["heldout_bpb_before"]
    assert json.loads(main_eval(tmp_path / "int8", capsys))["heldout_bpb"] == pytest.approx(result["heldout_bpb_after"])


@pytest.mark.parametrize("argv, needs", [
    (["train", "--optim", "adamw8bit"], "--optim adamw8bit"),
    (["quantize"], "dla quantize"),
    (["eval"], "(an int8 checkpoint)"),
])
def test_without_torchao_one_line_names_the_extra(argv, needs, run_8bit, quantized, corpus, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: importing it raises ImportError
    if argv[0] == "train":
        argv = train_args(tmp_path / "run", corpus, *argv[1:])
    elif argv[0] == "quantize":
        argv = ["quantize", "--checkpoint", str(run_8bit), "--out", str(tmp_path / "int8"), "--no-eval"]
    else:
        argv = ["eval", "--checkpoint", str(quantized), "--device", "cpu"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "ModuleNotFoundError" not in err
    assert needs in err and "needs torchao, an optional extra: pip install 'dla[quant]'" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "int8").exists()


def test_quantize_prints_no_torchao_import_warnings(run_8bit, tmp_path):
    """In a fresh process (torchao's import-time warnings come once per process)."""
    done = subprocess.run([sys.executable, "-m", "dla", "quantize", "--checkpoint", str(run_8bit), "--out",
                           str(tmp_path / "int8"), "--no-eval"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout.startswith("int8 weight-only checkpoint: ")
