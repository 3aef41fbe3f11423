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

from hypothesis import HealthCheck, settings  # noqa: E402

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


# `python tests/parallel.py` runs the suite as several pytest processes that share the test files
# first come, first served: each process walks every collected test in the same order, takes a
# file by creating its directory under --claim-dir (atomic: exactly one process succeeds) when it
# reaches the file's first test, and runs the tests of the files it took. A module's fixtures
# therefore live in one process only, and the split follows the tests' real durations on the
# machine at hand rather than a table of them.
def pytest_addoption(parser):
    parser.addoption("--claim-dir", default=None,
                     help="share the test files with other pytest processes given the same directory")


_claimed: dict[str, bool] = {}


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
    # True: handled here, i.e. another process runs this file's tests and reports them
    return None if _claimed[module] else True
