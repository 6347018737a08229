"""Helpers the tests import (conftest.py holds only fixtures and pytest hooks); the inputs that
verify and the benchmarks share too are in fastddpm.testing."""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm import use_backend  # noqa: F401  (the tests import it from here)


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


class _Recorder(TorchDispatchMode):
    def __init__(self, names):
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recorded_ops():
    """The set of aten op names (e.g. "aminmax") dispatched inside the block."""
    names = set()
    with _Recorder(names):
        yield names


# aten ops that wait for the device: a value read on the host, or an output shape that depends on values
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2",
            "unique_consecutive"}


class _Signature(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        shapes = tuple((tuple(x.shape), x.dtype, x.device.type) for x in outputs if hasattr(x, "shape"))
        self.calls.append((func.overloadpacket.__name__, shapes))
        return out


@contextlib.contextmanager
def recorded_calls():
    """The list of (aten op name, its outputs' (shape, dtype, device type)) dispatched inside the
    block, in order: two runs of a capturable step give the same list, with no op of SYNC_OPS."""
    calls = []
    with _Signature(calls):
        yield calls
