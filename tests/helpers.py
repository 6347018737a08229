"""Helpers the tests import (conftest.py holds only fixtures and pytest hooks)."""
import contextlib

from torch.utils._python_dispatch import TorchDispatchMode


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
