"""The regression checks of issue #9 on recorded data (no timing here): `perf.compare` on a GPU
result derived from a recorded run (`tests/data/bench_gpu-h200-2026-11-26.json`, the
`perf/results/bench_gpu-h200.json` of that day, frozen so that refreshed results do not move
these checks), and the CPU suite's bound check and baseline refresh (`perf.timing`). Each check
passes on identical input and fails on an injected regression."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `perf` is a folder of the checkout, not an installed package

from perf import compare, timing  # noqa: E402

H200 = ROOT / "tests" / "data" / "bench_gpu-h200-2026-11-26.json"


@pytest.fixture
def result() -> dict:
    return json.loads(H200.read_text())


@pytest.fixture
def baseline(tmp_path, result) -> Path:
    """A baseline written from a copy of the H200 result, as the lead writes h100.json."""
    src = tmp_path / "base-result.json"
    src.write_text(json.dumps(result))
    path = tmp_path / "baselines" / "gpu.json"
    assert compare.main(["--write-baseline", str(src), str(path)]) == 0
    return path


def run(tmp_path, new: dict, baseline: Path, capsys, *extra) -> tuple[int, str]:
    path = tmp_path / "new.json"
    path.write_text(json.dumps(new))
    capsys.readouterr()
    rc = compare.main([str(path), str(baseline), *extra])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def row(result: dict, T: int) -> dict:
    return next(r for r in result["rows"] if r["T"] == T)


def line_of(out: str, figure: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(figure + " "))


def test_identical_result_passes(tmp_path, result, baseline, capsys):
    rc, out = run(tmp_path, result, baseline, capsys)
    assert rc == 0, out
    assert "PASS: 42 tracked figures" in out and "WARNING" not in out
    assert "+0.0%" in line_of(out, "T=8192 dla16_fwd_bwd / fla_ssd_fwd_bwd")


def test_baseline_records_card_and_definitions(baseline, result):
    b = json.loads(baseline.read_text())
    assert b["device"] == "NVIDIA H200" and b["source"]["torch"] == result["env"]["torch"]
    f = b["figures"]["T=2048 dla16_fwd_bwd / fla_ssd_fwd_bwd"]
    r = row(result, 2048)
    assert (f["T"], f["num"], f["den"]) == (2048, "dla16_fwd_bwd", "fla_ssd_fwd_bwd")
    assert f["value"] == pytest.approx(r["dla16_fwd_bwd"] / r["fla_ssd_fwd_bwd"], rel=1e-12)
    assert b["figures"]["T=2048 dla32_peak_mb / single_peak_mb"]["value"] == pytest.approx(
        r["dla32_peak_mb"] / r["single_peak_mb"], rel=1e-12)
    assert b["figures"]["T=2048 single_peak_mb"]["den"] is None
    assert not any("tflops" in k or k.startswith(("T=2048 sdpa", "T=2048 fla")) for k in b["figures"])


@pytest.mark.parametrize("key", ["dla16_fwd_bwd", "seg_gaussian_ms", "fenwick_fwd"])
def test_time_regression_fails_with_table(tmp_path, result, baseline, capsys, key):
    """Ours 11% slower at one T fails, naming the figure; 9% slower passes."""
    slow = copy.deepcopy(result)
    row(slow, 8192)[key] *= 1.11
    rc, out = run(tmp_path, slow, baseline, capsys)
    assert rc == 1, out
    assert "WORSE" in line_of(out, f"T=8192 {key} / fla_ssd_fwd_bwd") and "+11.0%" in out
    assert "FAIL: 1 of 42" in out.splitlines()[-1]
    ok = copy.deepcopy(result)
    row(ok, 8192)[key] *= 1.09
    assert run(tmp_path, ok, baseline, capsys)[0] == 0


def test_readout_doing_its_work_twice_fails(tmp_path, result, baseline, capsys):
    """The issue's injected regression as bench_gpu would record it: every DLA time doubles (the
    readout run twice), the anchors and the segmentation alone unchanged."""
    slow = copy.deepcopy(result)
    for r in slow["rows"]:
        for k in r:
            if k.startswith(("single", "fenwick", "dla")) and k.endswith(("_fwd", "_fwd_bwd")):
                r[k] *= 2
    rc, out = run(tmp_path, slow, baseline, capsys)
    assert rc == 1, out
    assert "FAIL: 24 of 42" in out  # 4 configurations × (fwd, fwd+bwd) × 3 lengths
    assert "+100.0%" in line_of(out, "T=32768 dla32_fwd_bwd / fla_ssd_fwd_bwd")
    assert "ok" in line_of(out, "T=32768 seg_piecewise_ms / fla_ssd_fwd_bwd")


def test_card_drift_cancels_and_is_warned(tmp_path, result, baseline, capsys):
    """Another card, every time 1.4× longer (anchors too), memory unchanged: passes, with a warning."""
    other = copy.deepcopy(result)
    other["env"]["device"] = "NVIDIA H100 80GB HBM3"
    for r in other["rows"]:
        for k in r:
            if k.endswith(compare.TIME_SUFFIXES):
                r[k] *= 1.4
    rc, out = run(tmp_path, other, baseline, capsys)
    assert rc == 0, out
    assert out.startswith("WARNING: NEW was measured on NVIDIA H100 80GB HBM3, the baseline on NVIDIA H200")


def test_peak_memory_regression_fails(tmp_path, result, baseline, capsys):
    worse = copy.deepcopy(result)
    row(worse, 2048)["dla32_peak_mb"] *= 1.2
    rc, out = run(tmp_path, worse, baseline, capsys)
    assert rc == 1 and "WORSE" in line_of(out, "T=2048 dla32_peak_mb / single_peak_mb")


def test_anchor_getting_faster_shows_as_regression(tmp_path, result, baseline, capsys):
    """Only ratios are tracked: a faster anchor with our time unchanged is a relative loss."""
    faster = copy.deepcopy(result)
    row(faster, 2048)["fla_ssd_fwd_bwd"] /= 1.2
    rc, out = run(tmp_path, faster, baseline, capsys)
    assert rc == 1 and "WORSE" in line_of(out, "T=2048 dla16_fwd_bwd / fla_ssd_fwd_bwd")


def test_missing_figure_fails(tmp_path, result, baseline, capsys):
    """A figure of the baseline that NEW lacks fails, with the reason (OOM recorded by bench_gpu,
    a dropped row, a dropped anchor)."""
    oom = copy.deepcopy(result)
    r = row(oom, 32768)
    for k in [k for k in r if k.startswith("dla32_")]:
        del r[k]
    r["dla32_error"] = "OOM: CUDA out of memory"
    rc, out = run(tmp_path, oom, baseline, capsys)
    assert rc == 1
    assert "MISSING: dla32_fwd_bwd absent (OOM: CUDA out of memory)" in line_of(
        out, "T=32768 dla32_fwd_bwd / fla_ssd_fwd_bwd")
    assert "FAIL: 3 of 42" in out  # fwd, fwd+bwd, peak

    short = copy.deepcopy(result)
    short["rows"] = [x for x in short["rows"] if x["T"] != 8192]
    rc, out = run(tmp_path, short, baseline, capsys)
    assert rc == 1 and "MISSING: no row with T=8192" in out and "FAIL: 14 of 42" in out

    no_anchor = copy.deepcopy(result)
    del row(no_anchor, 2048)["fla_ssd_fwd_bwd"]
    rc, out = run(tmp_path, no_anchor, baseline, capsys)
    assert rc == 1 and "MISSING: fla_ssd_fwd_bwd absent" in line_of(out, "T=2048 single_fwd / fla_ssd_fwd_bwd")


def test_new_rows_are_listed_not_failing(tmp_path, result, baseline, capsys):
    """Delta-rule rows (named as bench_gpu.py names them: `gdn_<policy>_…`) appear against fla
    Gated DeltaNet and their own `single`, and do not fail until a baseline holds them."""
    more = copy.deepcopy(result)
    for r in more["rows"]:
        r.update(gdn_single_fwd_bwd=3 * r["fla_gdn_fwd_bwd"], gdn_dla16_fwd_bwd=6 * r["fla_gdn_fwd_bwd"],
                 gdn_single_peak_mb=1000.0, gdn_dla16_peak_mb=1500.0)
    rc, out = run(tmp_path, more, baseline, capsys)
    assert rc == 0, out
    assert "new, not in the baseline" in line_of(out, "T=2048 gdn_dla16_fwd_bwd / fla_gdn_fwd_bwd")
    assert "| 6 " in line_of(out, "T=2048 gdn_dla16_fwd_bwd / fla_gdn_fwd_bwd")
    assert "| 1.5 " in line_of(out, "T=2048 gdn_dla16_peak_mb / gdn_single_peak_mb")
    assert "12 new figure(s)" in out.splitlines()[-1]

    # once the baseline holds them, a regression of a delta row fails
    src = tmp_path / "with-delta.json"
    src.write_text(json.dumps(more))
    b2 = tmp_path / "b2.json"
    assert compare.main(["--write-baseline", str(src), str(b2)]) == 0
    row(more, 2048)["gdn_dla16_fwd_bwd"] *= 1.5
    rc, out = run(tmp_path, more, b2, capsys)
    assert rc == 1 and "WORSE" in line_of(out, "T=2048 gdn_dla16_fwd_bwd / fla_gdn_fwd_bwd")


def test_failed_verification_fails(tmp_path, result, baseline, capsys):
    wrong = copy.deepcopy(result)
    wrong["verify"][2]["ok"] = False
    rc, out = run(tmp_path, wrong, baseline, capsys)
    assert rc == 1 and "FAILED VERIFICATION in NEW: mamba2 dla K=16 T=2048" in out
    src = tmp_path / "wrong.json"
    src.write_text(json.dumps(wrong))
    with pytest.raises(compare.InputError, match="RESULT: .* failed verification"):
        compare.write_baseline(src, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def test_tolerance_option(tmp_path, result, baseline, capsys):
    slow = copy.deepcopy(result)
    row(slow, 2048)["dla16_fwd_bwd"] *= 1.15
    assert run(tmp_path, slow, baseline, capsys)[0] == 1
    assert run(tmp_path, slow, baseline, capsys, "--tolerance", "0.2")[0] == 0
    rc, out = run(tmp_path, slow, baseline, capsys, "--tolerance", "-1")
    assert rc == 2 and "--tolerance must be" in out


def test_unusable_input_names_the_argument(tmp_path, result, baseline, capsys):
    rc, out = run(tmp_path, {"rows": []}, baseline, capsys)
    assert rc == 2 and "NEW:" in out and "not a perf/bench_gpu.py result" in out
    rc, out = run(tmp_path, result, tmp_path / "absent.json", capsys)
    assert rc == 2 and "BASELINE: no such file" in out
    rc, out = run(tmp_path, result, H200, capsys)  # a result given as the baseline
    assert rc == 2 and "BASELINE:" in out and "is not a baseline" in out
    (tmp_path / "broken.json").write_text("{")
    assert compare.main([str(tmp_path / "broken.json"), str(baseline)]) == 2
    assert "NEW:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# CPU suite: the bound check and the baseline refresh
# --------------------------------------------------------------------------------------------


def test_cpu_bounds_file_covers_the_suite():
    """Every ratio the CPU suite asserts has a committed bound, on every CPU type the CI machines
    have had, that lets 2× through nowhere."""
    figures = {"readout/calibration", "segment/calibration", "operator/recurrent", "compiled/eager step"}
    cpus = json.loads(timing.CPU_BASELINE.read_text())["cpus"]
    assert {"Intel Xeon", "AMD EPYC"} <= set(cpus)
    for cpu in cpus:
        bounds = timing.load_bounds(cpu=cpu)
        assert set(bounds) == figures, cpu
        for name, b in bounds.items():
            assert b["ratio"] > 0 and 0 < b["tolerance"] < 1, (cpu, name, b)
            assert timing.check_ratio(name, b["ratio"], bounds) is None
            assert timing.check_ratio(name, 2 * b["ratio"], bounds) is not None


def test_cpu_type_keys_the_bounds(tmp_path):
    assert timing.cpu_type("AMD EPYC") == "AMD EPYC"
    assert timing.cpu_type("AMD EPYC 7B13 64-Core Processor") == "AMD EPYC"
    assert timing.cpu_type("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz") == "Intel Xeon"
    assert timing.cpu_type("Apple M3") == "Apple M3"
    base = tmp_path / "cpu.json"
    base.write_text(json.dumps({"cpus": {"A": {"ratios": {"a/b": {"ratio": 1.0, "tolerance": 0.3}}},
                                         "B": {"ratios": {"a/b": {"ratio": 2.0, "tolerance": 0.3}}}}}))
    assert timing.load_bounds(base, cpu="B")["a/b"]["ratio"] == 2.0
    with pytest.raises(ValueError, match=r"no bounds for this CPU type, 'C' .*bounds exist for \['A', 'B'\]"):
        timing.load_bounds(base, cpu="C")


def test_cpu_check_ratio():
    bounds = {"x/y": {"ratio": 2.0, "tolerance": 0.25}}
    assert timing.check_ratio("x/y", 2.0, bounds) is None
    assert timing.check_ratio("x/y", 2.5, bounds) is None
    message = timing.check_ratio("x/y", 2.6, bounds)
    assert "x/y: 2.6 exceeds its bound 2.5" in message and "1.30× the baseline" in message
    assert "no bound" in timing.check_ratio("z/y", 1.0, bounds)


def test_cpu_refresh(tmp_path):
    base = tmp_path / "cpu.json"
    xeon = {"ratios": {"a/b": {"ratio": 1.0, "tolerance": 0.3, "note": "kept"}}}
    base.write_text(json.dumps({"cpus": {"Intel Xeon": xeon}}))
    runs = []
    for i, r in enumerate((1.2, 1.5, 1.3)):
        runs.append(tmp_path / f"run{i}.json")
        runs[-1].write_text(json.dumps({"benchmarks": [{"extra_info": {"figure": "a/b", "ratio": r}},
                                                       {"extra_info": {}}]}))
    assert timing.main(["refresh", *map(str, runs), "--baseline", str(base), "--cpu", "Intel Xeon"]) == 0
    entry = json.loads(base.read_text())["cpus"]["Intel Xeon"]["ratios"]["a/b"]
    assert entry == {"ratio": 1.3, "tolerance": 0.3, "note": "kept", "measured": [1.2, 1.5, 1.3]}
    # a CPU type new to the file: its own entry, the figure's tolerance, the other type untouched
    assert timing.main(["refresh", *map(str, runs[:2]), "--baseline", str(base), "--cpu", "AMD EPYC"]) == 0
    cpus = json.loads(base.read_text())["cpus"]
    assert cpus["AMD EPYC"]["ratios"]["a/b"] == {"ratio": 1.35, "tolerance": 0.3, "measured": [1.2, 1.5]}
    assert cpus["Intel Xeon"]["ratios"]["a/b"]["ratio"] == 1.3
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match=r"no measurement of \['a/b'\]"):
        timing.refresh([empty], base, cpu="AMD EPYC")
