"""`tests/parallel.py`, the runner behind `make test`: every test runs once, in one of the
processes, a module's fixtures live in one process, and a failure anywhere fails the run."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULE = '''
import os, time, pytest

@pytest.fixture(scope="module")
def once():
    with open({record!r}, "a") as f:
        f.write(f"fixture {{__name__}} {{os.getpid()}}\\n")

@pytest.mark.parametrize("i", range(3))
def test_case(once, i):
    time.sleep(0.2)  # long enough that the other process usually takes a file meanwhile
    with open({record!r}, "a") as f:
        f.write(f"test {{__name__}} {{i}} {{os.getpid()}}\\n")
    assert not ({fail} and i == 2)
'''


def run(tmp_path: Path, failing: str | None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    record = tmp_path / "record.txt"
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("test_a", "test_b", "test_c", "test_d"):
        (suite / f"{name}.py").write_text(MODULE.format(record=str(record), fail=name == failing))
    done = subprocess.run([sys.executable, "tests/parallel.py", "--processes", "2", "-q", "-p", "no:cacheprovider",
                           str(suite)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done, [line.split() for line in record.read_text().splitlines()]


def test_every_test_runs_once_and_fixtures_stay_in_one_process(tmp_path):
    done, lines = run(tmp_path, failing=None)
    assert done.returncode == 0, done.stdout[-2000:]
    tests = sorted((m, i) for kind, m, i, _ in (x for x in lines if x[0] == "test"))
    assert tests == sorted((m, str(i)) for m in ("test_a", "test_b", "test_c", "test_d") for i in range(3))
    fixtures = {m: pid for kind, m, pid in (x for x in lines if x[0] == "fixture")}
    assert len([x for x in lines if x[0] == "fixture"]) == 4  # one module fixture a file
    assert all(pid == fixtures[m] for kind, m, i, pid in (x for x in lines if x[0] == "test"))
    assert "4 test files in 2 processes, exits [0, 0]" in done.stdout
    # the processes' reports add up to the suite, whichever files each took
    assert sum(int(n) for n in re.findall(r"(\d+) passed", done.stdout)) == 12


def test_a_failure_in_either_process_fails_the_run(tmp_path):
    done, lines = run(tmp_path, failing="test_c")
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "test_c.py::test_case[2]" in done.stdout
    assert len([x for x in lines if x[0] == "test"]) == 12
