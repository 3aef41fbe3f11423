"""perf/profile_gpu.py's host side: Nsight Compute's CSV parsed, counters summed per kernel name,
rates derived, and the table rendered (the GPU passes themselves run only on a card)."""

from __future__ import annotations

import pytest

from perf.profile_gpu import aggregate, limit, read_ncu_csv, render, short_name

HEADER = ('"ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum","dram__bytes_write.sum",'
          '"sm__throughput.avg.pct_of_peak_sustained_elapsed",'
          '"gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",'
          '"sm__warps_active.avg.pct_of_peak_sustained_active","launch__registers_per_thread",'
          '"sm__ops_path_tensor_src_bf16_dst_fp32.sum","sm__ops_path_tensor_src_tf32_dst_fp32.sum",'
          '"smsp__sass_thread_inst_executed_op_ffma_pred_on.sum","smsp__sass_thread_inst_executed_op_fadd_pred_on.sum",'
          '"smsp__sass_thread_inst_executed_op_fmul_pred_on.sum"\n'
          '"","","ns","byte","byte","%","%","%","register/thread","","","inst","inst","inst"\n')
ROWS = ('"0","_fwd_kernel","2,000","3000","1000","40","10","12.5","255","4000000","0","100","0","0"\n'
        '"1","_fwd_kernel","2000","1000","0","20","30","12.5","240","2000000","0","0","0","0"\n'
        '"2","void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, '
        'std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",'
        '"1000","2500000","500000","5","85","80","32","0","0","0","0","0"\n')


def test_counters_are_summed_per_kernel_and_turned_into_rates():
    text = "==PROF== Connected to process\n" + HEADER + ROWS
    kernels = {k["kernel"]: k for k in aggregate(read_ncu_csv(text))}
    fwd = kernels["_fwd_kernel"]
    assert fwd["launches"] == 2 and fwd["us"] == pytest.approx(4.0)  # "2,000" ns parsed as 2000
    assert fwd["gb_per_s"] == pytest.approx(5000 / 4000)  # bytes per ns
    assert fwd["tensor_tflops"] == pytest.approx(6e6 / 4000 / 1e3)
    assert fwd["fp32_tflops"] == pytest.approx(200 / 4000 / 1e3)  # an FFMA is two operations
    assert fwd["sm_pct"] == pytest.approx(30.0) and fwd["registers"] == 255  # time-weighted, max
    fill = kernels["vectorized_elementwise_kernel<4, FillFunctor<float>, array<char*, 1ul> >"]
    assert limit(fill) == "memory" and limit(fwd) == "latency (low occupancy)"


def test_short_names_drop_parameters_and_namespaces_but_keep_templates():
    assert short_name("_walk_kernel") == "_walk_kernel"
    assert short_name("void cutlass::Kernel2<cutlass_80_gemm>(cutlass_80_gemm::Params)") == "Kernel2<cutlass_80_gemm>"


def test_render_with_and_without_the_torch_profile():
    kernels = aggregate(read_ncu_csv(HEADER + ROWS))
    timed = {"total_us": 5.0, "kernels": [{"kernel": "_fwd_kernel", "us": 4.0, "launches": 2, "share": 0.8}]}
    result = {"env": {"device": "card", "torch": "t", "triton": "tr"}, "length": 8192, "argv": ["--out", "x"],
              "configs": [{"config": "mamba2:dla:32", "torch": timed, "ncu": {"metric_set": "full", "kernels": kernels}},
                          {"config": "gdn:dla:32", "torch": None, "ncu": {"metric_set": "full", "kernels": kernels}},
                          {"config": "gdn:single:2", "torch": timed, "ncu": {"error": "ncu not on PATH"}}]}
    md = render(result)
    assert "## mamba2:dla:32: 0.01 ms of kernels" in md and "| `_fwd_kernel` | 2 | 0.004 | 80.0% |" in md
    assert "under ncu (no torch.profiler pass" in md and "ncu: ncu not on PATH" in md


def test_the_fla_anchor_config_names_a_missing_fla():
    """`BACKBONE:fla:0` profiles fla's kernel; where fla cannot be imported (this CPU machine) the
    run stops with one line naming the configuration, before touching a GPU."""
    pytest.importorskip("perf.bench_gpu")
    try:
        import fla  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure is "not importable"
        pass
    else:
        pytest.skip("fla is installed here")
    from perf.profile_gpu import warmed_workload

    with pytest.raises(SystemExit, match="gdn:fla:0: fla is not importable here"):
        warmed_workload("gdn:fla:0", 64, 0)


def test_a_forced_band_reaches_the_kernels_and_the_table(monkeypatch):
    """`--band G:R` sets the band's key chunks in both modules that read them and makes the rule
    return R (restored after the test); the rendered profile says it is not the shipped rule."""
    import dla.ops.readout as readout
    import dla.ops.readout.cost_delta as cost_delta
    import dla.ops.readout.objects_delta_triton as kernels
    from perf.profile_gpu import force_band

    for module, name in ((cost_delta, "BAND_KEYS"), (kernels, "BAND_KEYS"), (readout, "_window")):
        monkeypatch.setattr(module, name, getattr(module, name))
    assert force_band("2:16") == (2, 16)
    assert cost_delta.BAND_KEYS == kernels.BAND_KEYS == 2 and readout._window(None, None, None, 64) == 16
    for bad in ("2", "3:16", "2:12"):
        with pytest.raises(SystemExit, match="--band"):
            force_band(bad)
    result = {"env": {"device": "card", "torch": "t", "triton": "tr"}, "length": 2048, "argv": ["--band", "2:16"],
              "band": {"keys": 2, "window": 16}, "configs": []}
    assert "not the shipped rule" in render(result) and "R = 16" in render(result)


def test_torch_operators_are_found_by_shapes_and_caller():
    """`op_sites` names each aten operator inside the call, its input shapes and the functions of
    this repository above it (here on the CPU, by CPU time: the GPU pass reads device time the
    same way), and the rendered profile lists them."""
    import torch

    from dla.ops.state import empty_cache
    from perf.profile_gpu import op_sites

    def work():
        cache = empty_cache(2, 3, 4, 8, 16, dtype=torch.bfloat16, device="cpu")
        return cache.S.add(1.0)

    sites = op_sites(work, device=False)
    assert sites == sorted(sites, key=lambda r: -r["us"]) and all(r["us"] > 0 for r in sites)
    adds = [r for r in sites if r["op"] == "aten::add"]
    assert len(adds) == 1 and adds[0]["calls"] == 1 and adds[0]["shapes"] == "[[2, 3, 4, 8, 16], [], []]"
    here = "tests/test_profile_gpu.py("
    assert adds[0]["site"].startswith(here) and f": work < {here}" in adds[0]["site"]
    fills = {r["shapes"]: r for r in sites if r["op"] == "aten::zero_"}
    assert set(fills) == {"[[2, 3, 4, 8, 16]]", "[[2, 3]]", "[[2, 3, 4]]", "[[2, 3, 8, 16]]", "[[2]]"}
    assert fills["[[2, 3]]"]["calls"] == 3  # m, zz, N
    assert all(r["site"].startswith("dla/ops/state.py(43): empty_cache < ") for r in fills.values())
    assert not any("perf/profile_gpu.py" in r["site"] or "profiler" in r["site"] for r in sites)

    timed = {"total_us": 5.0, "kernels": [{"kernel": "_fwd_kernel", "us": 4.0, "launches": 2, "share": 0.8}],
             "op_sites": sites}
    md = render({"env": {"device": "card", "torch": "t", "triton": "tr"}, "length": 64, "argv": [],
                 "configs": [{"config": "gdn:dla:32", "torch": timed, "ncu": {"error": "skipped"}}]})
    assert "| `aten::add` | [[2, 3, 4, 8, 16], [], []] | " in md and "torch's own kernels by operator" in md
