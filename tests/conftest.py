import os
import tempfile

import torch

# A fresh Inductor cache per test session: its FX-graph cache key does not cover the custom ops'
# fake rules, so graphs cached by an older checkout could hide a changed rule.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dla-inductor-"))

# Without a GPU, Triton kernels run through the interpreter; it must be on before any kernel
# module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from dla.testing import no_dead_overflow_checks  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True, scope="session")
def _interpreter_skips_dead_checks():
    """The interpreter's integer-overflow checks are built and thrown away (`dla.testing`);
    the suite's interpreted launches skip them."""
    with no_dead_overflow_checks():
        yield
