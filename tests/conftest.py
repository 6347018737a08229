import contextlib
import os

# Triton's interpreter runs every kernel on the CPU; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastddpm  # noqa: E402


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


@contextlib.contextmanager
def use_backend(name):
    """Run the ops on `name` ("triton": the interpreter on CPU), then restore the backend."""
    previous = fastddpm.get_backend()
    fastddpm.set_backend(name)
    try:
        yield
    finally:
        fastddpm.set_backend(previous)


@pytest.fixture
def triton_backend():
    with use_backend("triton"):
        yield


@pytest.fixture
def reference_backend():
    with use_backend("reference"):
        yield


def relative_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


# Triton's interpreter truncates float32 -> bfloat16 (numpy has no bfloat16) where the GPU rounds
# to nearest, so interpreted bfloat16 outputs can differ from torch's rounding by one ulp.
BF16_ULP = 2.0 ** -7

# Per-dtype tolerances for outputs rounded once to the dtype (math in float32).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# Shapes every elementwise kernel is tested on: odd sizes, batch 1, 3-D and 4-D.
SHAPES = [(2, 3, 5, 7), (1, 4, 8, 8), (3, 2, 9, 11), (2, 6, 17), (4, 3, 16, 16)]


def make_layout(x, layout):
    """x in the given memory layout: 'contiguous', 'channels_last' or 'strided' (a non-dense view)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    if layout == "strided":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x
