"""The test suite as one pytest process per core, sharing the test files first come, first served:
`make test` runs

    python tests/parallel.py [--processes N] PYTEST_ARGS...

from the repository root. Every process collects the same tests and walks them in the same order;
on reaching a file's first test it takes the file by creating a directory named after it under a
shared claims directory (atomic: exactly one process succeeds), and it runs only the tests of the
files it took (this module, loaded into each process as a pytest plugin, `-p tests.parallel`). A
module's fixtures therefore live in one process, and the split follows the tests' real durations
on the machine at hand rather than a table of them. The Triton interpreter and most CPU tests keep
one core busy, so on the two-core CI machine two processes take about half the time of one.

Each process gets an equal share of the cores as intra-op threads and its own `--basetemp`; its
report is printed in full once all have ended, one after another. The exit status is the first
non-zero one among them (0 if none).
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

# --------------------------------------------------------------------------------------------
# The pytest plugin: each process runs the files it claims
# --------------------------------------------------------------------------------------------

_claimed: dict[str, bool] = {}


def pytest_addoption(parser):
    parser.addoption("--claim-dir", default=None,
                     help="share the test files with the other pytest processes given this directory")


def pytest_runtest_protocol(item, nextitem):
    claims = item.config.getoption("claim_dir")
    if claims is None:
        return None
    module = item.nodeid.split("::", 1)[0]
    if module not in _claimed:
        try:
            os.mkdir(os.path.join(claims, module.replace("/", "__")))
            _claimed[module] = True
        except FileExistsError:
            _claimed[module] = False
    # True: handled, i.e. another process runs this file's tests and reports them
    return None if _claimed[module] else True


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


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
        cmd = [sys.executable, "-m", "pytest", "-p", "tests.parallel", "-o", "console_output_style=classic",
               *pytest_args, f"--claim-dir={claims}", f"--basetemp={work / f'tmp{i}'}"]
        runs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for i, (proc, log) in enumerate(runs):
        codes.append(proc.wait())
        log.seek(0)
        print(f"==== test process {i + 1} of {args.processes}: exit {codes[-1]}", flush=True)
        sys.stdout.write(log.read())
        log.close()
    print(f"==== {len(list(claims.iterdir()))} test files in {args.processes} processes, exits {codes}, "
          f"{time.monotonic() - start:.0f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
