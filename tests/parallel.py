"""The test suite as one pytest process per core, sharing the test files first come, first served
(`--claim-dir`, tests/conftest.py): `make test` runs

    python tests/parallel.py [--processes N] PYTEST_ARGS...

Each process runs the files it took and prints pytest's usual report, shown here in full once all
have ended, one after another; the exit status is the first non-zero one of theirs (0 if none).
The Triton interpreter and most CPU tests keep one core busy, so on the two-core CI machine two
processes take about half the time of one. Each process gets one intra-op thread (cores shared
out, not oversubscribed) and its own `--basetemp`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args, pytest_args = parser.parse_known_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    work = Path(tempfile.mkdtemp(prefix="dla-tests-"))
    claims = work / "claims"
    claims.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.processes))}
    start = time.monotonic()
    runs = []
    for i in range(args.processes):
        log = open(work / f"process{i}.log", "w+")
        # classic output: pytest's progress counts every collected test, most run by another process
        cmd = [sys.executable, "-m", "pytest", "-o", "console_output_style=classic", *pytest_args,
               f"--claim-dir={claims}", f"--basetemp={work / f'tmp{i}'}"]
        runs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for i, (proc, log) in enumerate(runs):
        codes.append(proc.wait())
        log.seek(0)
        print(f"==== test process {i + 1} of {args.processes}: exit {codes[-1]}", flush=True)
        sys.stdout.write(log.read())
        log.close()
    taken = sorted(p.name.replace("__", "/") for p in claims.iterdir())
    print(f"==== {len(taken)} test files in {args.processes} processes, exits {codes}, "
          f"{time.monotonic() - start:.0f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
