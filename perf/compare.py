"""GPU regression check (issue #9): a `perf/bench_gpu.py` result against a committed baseline.

    python -m perf.compare NEW BASELINE [--tolerance 0.10]
    python -m perf.compare --write-baseline RESULT BASELINE

`NEW` and `RESULT` are `bench_gpu.json` files; `BASELINE` is e.g. `perf/baselines/h100.json`.
Absolute milliseconds move from card to card and with clocks, so every tracked figure is a
ratio to an anchor measured in the same run, in the same row (the same `T`):

* every time of ours (a row key ending in `_fwd`, `_fwd_bwd` or `_ms` that is not an anchor) ÷
  the fla anchor of its backbone: `fla_gdn_fwd_bwd` (fla Gated DeltaNet) for keys naming `gdn` or
  `delta`, otherwise `fla_ssd_fwd_bwd` (fla SSD); `sdpa_fwd_bwd` where that anchor is absent.
  Anchors are the keys starting with `sdpa_` or `fla_`.
* every peak memory `<name>_peak_mb` ÷ the same row's `single` policy of that backbone (`<name>`
  with its `dla<K>` or `fenwick` replaced by `single`); the `single` peaks themselves, having
  nothing to divide by, in MiB.

Figures are derived from whatever rows and keys the result holds, so rows added to
bench_gpu.py are picked up without a change here. The baseline records each figure's
definition (`T`, numerator key, denominator key) and value, and NEW is read by those
definitions. A figure is worse when its value grew (time or memory): more than `tolerance`
(default 10%) is a failure; so is a baseline figure that NEW cannot produce (row, key or anchor
absent, or an error such as OOM in its place), and a failed verification in NEW (a fast but
wrong kernel is not a valid measurement). Figures in NEW that the baseline lacks are listed and
do not fail. Exit status: 0 pass, 1 regression, 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

TOLERANCE = 0.10
ANCHOR_PREFIXES = ("sdpa_", "fla_")
TIME_SUFFIXES = ("_fwd", "_fwd_bwd", "_ms")
PEAK_SUFFIX = "_peak_mb"


class InputError(ValueError):
    """An argument that is not what it should be; the message names it."""


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _anchor(key: str, row: dict) -> str | None:
    preferred = "fla_gdn_fwd_bwd" if ("gdn" in key or "delta" in key) else "fla_ssd_fwd_bwd"
    for anchor in (preferred, "sdpa_fwd_bwd"):
        if _number(row.get(anchor)):
            return anchor
    return None


def _single_of(name: str) -> str | None:
    """`dla16` → `single`, `gdn_fenwick` → `gdn_single`; None for a name without a policy."""
    swapped = re.sub(r"(dla\d*|fenwick)(?!.*(dla\d*|fenwick))", "single", name)
    return swapped if swapped != name else None


def figure_id(T, num: str, den: str | None) -> str:
    return f"T={T} {num}" + (f" / {den}" if den else "")


def derive(result: dict) -> dict[str, dict]:
    """The tracked figures of a bench_gpu result: `{id: {"T", "num", "den", "value"}}` where
    `value = row[num] / row[den]` (`den` None: `row[num]`)."""
    figures = {}
    for row in result["rows"]:
        T = row.get("T")
        for key, x in row.items():
            if not _number(x) or key.startswith(ANCHOR_PREFIXES):
                continue
            if key.endswith(TIME_SUFFIXES):
                den = _anchor(key, row)
                if den is None:
                    continue
            elif key.endswith(PEAK_SUFFIX):
                single = _single_of(key[: -len(PEAK_SUFFIX)])
                den = single + PEAK_SUFFIX if single and _number(row.get(single + PEAK_SUFFIX)) else None
            else:
                continue  # derived figures (TFLOP/s) and bookkeeping (T, B)
            figures[figure_id(T, key, den)] = {"T": T, "num": key, "den": den,
                                               "value": x / row[den] if den else x}
    return figures


def evaluate(result: dict, definition: dict) -> tuple[float | None, str]:
    """The value of one baseline figure in `result`, or None and why it cannot be had."""
    rows = [r for r in result["rows"] if r.get("T") == definition["T"]]
    if not rows:
        return None, f"no row with T={definition['T']}"
    row = rows[0]
    for key in filter(None, (definition["num"], definition["den"])):
        if not _number(row.get(key)):
            stem = key.rsplit("_fwd", 1)[0].rsplit(PEAK_SUFFIX, 1)[0].rsplit("_ms", 1)[0]
            error = row.get(f"{stem}_error")
            return None, f"{key} {'absent' if key not in row else repr(row[key])}" + (f" ({error})" if error else "")
    den = definition["den"]
    return (row[definition["num"]] / row[den] if den else row[definition["num"]]), ""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def load_result(path: Path, what: str) -> dict:
    data = _load_json(path, what)
    if not isinstance(data.get("rows"), list) or not isinstance(data.get("env"), dict):
        raise InputError(f"{what}: {path} is not a perf/bench_gpu.py result (needs 'env' and 'rows')")
    return data


def load_baseline(path: Path, what: str = "BASELINE") -> dict:
    data = _load_json(path, what)
    if not isinstance(data.get("figures"), dict) or "device" not in data:
        raise InputError(f"{what}: {path} is not a baseline (needs 'device' and 'figures'; write one with "
                         f"python -m perf.compare --write-baseline RESULT {path})")
    return data


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{what}: no such file {path}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{what}: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} holds a {type(data).__name__}, not a JSON object")
    return data


def failed_verifications(result: dict) -> list[str]:
    return [f"{v.get('backbone', 'mamba2')} {v.get('policy')} K={v.get('K')} T={v.get('T')}: errors {v.get('errors')}"
            for v in result.get("verify", []) if not v.get("ok")]


def write_baseline(result_path: Path, baseline_path: Path, tolerance: float = TOLERANCE) -> dict:
    """Baseline from a result: its card, versions and time, and every derived figure."""
    result = load_result(result_path, "RESULT")
    bad = failed_verifications(result)
    if bad:
        raise InputError(f"RESULT: {result_path} failed verification, not a baseline: {bad}")
    figures = derive(result)
    if not figures:
        raise InputError(f"RESULT: {result_path} has no figure to track (no anchor or no timed row)")
    env = result["env"]
    baseline = {"device": env.get("device"), "source": {"file": str(result_path), **env},
                "tolerance": tolerance, "figures": figures}
    Path(baseline_path).parent.mkdir(parents=True, exist_ok=True)
    Path(baseline_path).write_text(json.dumps(baseline, indent=1) + "\n")
    return baseline


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def compare(new: dict, baseline: dict, tolerance: float | None = None) -> tuple[bool, str]:
    """`(passed, report)`: the table of every baseline figure and every new one, a warning when
    the cards differ, and a verdict line."""
    tol = baseline.get("tolerance", TOLERANCE) if tolerance is None else tolerance
    lines = []
    new_device, base_device = new["env"].get("device"), baseline.get("device")
    if new_device != base_device:
        lines.append(f"WARNING: NEW was measured on {new_device}, the baseline on {base_device}; ratios to "
                     "same-run anchors cancel most of the card-to-card difference, not all of it")
    rows, failures, faster = [], 0, 0
    for fid, d in sorted(baseline["figures"].items(), key=lambda kv: (kv[1]["T"], kv[0])):
        value, why = evaluate(new, d)
        if value is None:
            rows.append((fid, _fmt(d["value"]), "—", "—", f"MISSING: {why}"))
            failures += 1
            continue
        change = value / d["value"] - 1
        if change > tol:
            verdict, failures = f"WORSE by more than {tol:.0%}", failures + 1
        elif change < -tol:
            verdict, faster = "better", faster + 1
        else:
            verdict = "ok"
        rows.append((fid, _fmt(d["value"]), _fmt(value), f"{change:+.1%}", verdict))
    derived = derive(new)
    untracked = sorted(set(derived) - set(baseline["figures"]), key=lambda f: (derived[f]["T"], f))
    for fid in untracked:
        rows.append((fid, "—", _fmt(derived[fid]["value"]), "—", "new, not in the baseline"))
    lines.append(_table(("figure (ratio to same-run anchor, or MiB)", "baseline", "new", "change", "verdict"), rows))
    bad = failed_verifications(new)
    for b in bad:
        lines.append(f"FAILED VERIFICATION in NEW: {b}")
    n = len(baseline["figures"])
    passed = failures == 0 and not bad
    verdict = (f"PASS: {n} tracked figures within {tol:.0%} of the baseline" if passed else
               f"FAIL: {failures} of {n} tracked figures worse by more than {tol:.0%} or missing"
               + (f"; {len(bad)} failed verification(s)" if bad else ""))
    if faster:
        verdict += f"; {faster} better by more than {tol:.0%} (refresh the baseline: perf/README.md)"
    if untracked:
        verdict += f"; {len(untracked)} new figure(s) not tracked yet"
    lines.append(verdict)
    return passed, "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = [" | ".join(str(h).ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf.compare", description=__doc__.split("\n\n")[0],
        usage="python -m perf.compare NEW BASELINE [--tolerance T]\n"
              "       python -m perf.compare --write-baseline RESULT BASELINE")
    parser.add_argument("first", metavar="NEW|RESULT", type=Path)
    parser.add_argument("baseline", metavar="BASELINE", type=Path)
    parser.add_argument("--write-baseline", action="store_true",
                        help="write BASELINE from the bench_gpu result RESULT instead of comparing")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"allowed growth of a figure (default: the baseline's, {TOLERANCE:g})")
    args = parser.parse_args(argv)
    try:
        if args.tolerance is not None and not 0 <= args.tolerance < 10:
            raise InputError(f"--tolerance must be a fraction in [0, 10), got {args.tolerance}")
        if args.write_baseline:
            baseline = write_baseline(args.first, args.baseline, TOLERANCE if args.tolerance is None else args.tolerance)
            print(f"wrote {args.baseline}: {len(baseline['figures'])} figures from {args.first} "
                  f"({baseline['device']}, {baseline['source'].get('time')})")
            return 0
        passed, report = compare(load_result(args.first, "NEW"), load_baseline(args.baseline), args.tolerance)
    except InputError as exc:
        print(f"perf.compare: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
