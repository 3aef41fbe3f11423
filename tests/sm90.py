"""The sm_90 compile tests' runner: kernels through Triton's GPU compiler and ptxas on a machine
without a GPU (the interpreter accepts code that the compiler refuses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dla.testing import PTXAS

ROOT = Path(__file__).resolve().parents[1]


def compile_script(script: str, *args: str, timeout: int = 900) -> str:
    """The stdout of `script` (Python that compiles kernels with `dla.testing.compile_for_sm90`) run
    with `args` in a fresh interpreter outside `TRITON_INTERPRET`, from the repository root (so that
    it imports `perf` as well as `dla`); the test is skipped when this
    triton wheel ships no ptxas, and fails with the script's stderr when it does."""
    if not os.path.exists(PTXAS):
        pytest.skip("this triton wheel ships no ptxas")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
