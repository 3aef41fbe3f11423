"""What the launch-bound sweeps (`perf/sweep_*_gpu.py`) share: their command line, a row per
configuration (its relative errors and timings, or the error that stopped it), and the rows written as JSON
and as a markdown table under the card's name and versions."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import triton


def arguments(default_length: int) -> argparse.Namespace:
    """`--out DIR` (created) and `--length T`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length", type=int, default=default_length)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def measured(row: dict, measure: Callable[[dict], None]) -> dict:
    """`row` once `measure(row)` has added its checks and timings, or its "error" when the
    configuration does not compile or run (a row, not a crash); printed as JSON."""
    try:
        measure(row)
    except Exception as exc:  # noqa: BLE001 - any failure of one configuration is that row's result
        row["error"] = repr(exc)[:300]
    print(json.dumps(row), flush=True)
    return row


def write_sweep(out: Path, name: str, what: str, setting: str, columns: list[str], rows: list[dict],
                cells: Callable[[dict], list[str]]) -> None:
    """`out/name.json` ({env, rows}) and `out/name.md`: "WHAT on DEVICE, torch …, triton …, SETTING",
    then a table of `columns` with `cells(row)` per row; the markdown printed too."""
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    (out / f"{name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [f"{what} on {env['device']}, torch {env['torch']}, triton {env['triton']}, {setting}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
