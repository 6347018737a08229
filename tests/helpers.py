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
