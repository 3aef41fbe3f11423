"""perf/sweep.py's host side: a configuration's row (its measurements, or the error that stopped it)
and the rows written as JSON and as a markdown table (the sweeps themselves run only on a card)."""

from __future__ import annotations

import json

import pytest
import torch

import perf.sweep_drift_gpu
import perf.sweep_readout_gpu
import perf.sweep_wy_gpu
from dla.testing import relative_error
from perf.sweep import measured, write_sweep


def test_rows_are_written_as_json_and_a_table_with_error_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test card")
    rows = [{"warps": 8, "ms": 1.25}, {"warps": 4, "error": "CompilationError('out of resources')"}]

    def cells(r: dict) -> list[str]:
        return [str(r["warps"]), f"{r['ms']:.2f}" if "error" not in r else r["error"][:20]]

    write_sweep(tmp_path, "sweep_x", "X launch bounds", "T = 64", ["warps", "ms"], rows, cells)
    data = json.loads((tmp_path / "sweep_x.json").read_text())
    assert data["rows"] == rows and data["env"]["device"] == "Test card"
    lines = (tmp_path / "sweep_x.md").read_text().splitlines()
    assert lines[0].startswith("X launch bounds on Test card, torch ") and lines[0].endswith(", T = 64")
    assert lines[2:] == ["| warps | ms |", "|---|---|", "| 8 | 1.25 |", "| 4 | CompilationError('ou |"]
    assert capsys.readouterr().out.splitlines() == lines


def test_a_failing_configuration_is_a_row_with_its_error(capsys):
    def fine(row):
        row["ms"] = 0.5

    def fails(row):
        raise RuntimeError("out of resources: shared memory")

    assert measured({"warps": 8}, fine) == {"warps": 8, "ms": 0.5}
    row = measured({"warps": 16}, fails)
    assert row["warps"] == 16 and "out of resources" in row["error"] and "ms" not in row
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [{"warps": 8, "ms": 0.5}, row]


def test_the_sweeps_are_built_on_it():
    for sweep in (perf.sweep_drift_gpu, perf.sweep_readout_gpu, perf.sweep_wy_gpu):
        assert sweep.write_sweep is write_sweep and sweep.measured is measured
        assert sweep.relative_error is relative_error


def test_the_readout_sweep_sets_a_kernels_launch_options_for_the_block_only():
    import dla.ops.readout.objects_delta_triton as kernels
    import perf.sweep_readout_gpu as sweep

    assert set(sweep.CANDIDATES) == set(kernels.LAUNCH)  # every kernel swept, none renamed away
    shipped = {name: dict(options) for name, options in kernels.LAUNCH.items()}
    with sweep.launch_options("_ut_bwd_kernel", {"num_warps": 2}):
        assert kernels.LAUNCH["_ut_bwd_kernel"] == {"num_warps": 2}
        assert {n: o for n, o in kernels.LAUNCH.items() if n != "_ut_bwd_kernel"} == {
            n: o for n, o in shipped.items() if n != "_ut_bwd_kernel"}
    assert kernels.LAUNCH == shipped
    with pytest.raises(RuntimeError), sweep.launch_options("_readout_kernel", {"num_warps": 4}):
        raise RuntimeError("a configuration that fails to compile")
    assert kernels.LAUNCH == shipped
    with pytest.raises(KeyError, match="_no_such_kernel"), sweep.launch_options("_no_such_kernel", {}):
        pass
