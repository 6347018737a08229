"""Fixtures and pytest hooks only: the helpers the tests import are in helpers.py."""
import os

# Triton's interpreter runs every kernel on the CPU; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastddpm import NoiseSchedule, use_backend  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: tests that run torch.compile with Inductor (slow on CPU)")


@pytest.fixture(autouse=True)
def one_thread():
    """The suite's tensors are tiny: a second thread only adds contention (and on a busy machine,
    spinning OpenMP threads make each op hundreds of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def schedule():
    """Ho et al.'s linear schedule over T = 1000 steps, unless a module defines its own."""
    return NoiseSchedule.linear(1000)


@pytest.fixture
def triton_backend():
    with use_backend("triton"):
        yield


@pytest.fixture
def reference_backend():
    with use_backend("reference"):
        yield
