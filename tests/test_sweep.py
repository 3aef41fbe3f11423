"""perf/sweep.py's host side: a configuration's row (its measurements, or the error that stopped it)
and the rows written as JSON and as a markdown table (the sweeps themselves run only on a card)."""

from __future__ import annotations

import json

import torch

import perf.sweep_drift_gpu
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
    for sweep in (perf.sweep_drift_gpu, perf.sweep_wy_gpu):
        assert sweep.write_sweep is write_sweep and sweep.measured is measured
        assert sweep.relative_error is relative_error
