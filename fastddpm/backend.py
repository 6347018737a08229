"""Which implementation runs: the Triton kernels or the PyTorch path (fastddpm.torch_ops).

"auto" (the default): Triton for CUDA tensors, PyTorch for the others.
"triton": the kernels everywhere; CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter).
"torch": PyTorch everywhere ("reference", its name in fastddpm 0.1, is accepted for it).
Float64 inputs run the float64 reference (fastddpm.reference) whatever the backend. The
environment variable FASTDDPM_BACKEND sets the starting value; `use_backend(name)` sets it for a
with-block.
"""
import contextlib
import os

BACKENDS = ("auto", "triton", "torch")
SYNONYMS = {"reference": "torch"}


def set_backend(name):
    global _backend
    name = SYNONYMS.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend():
    return _backend


@contextlib.contextmanager
def use_backend(name):
    """`set_backend(name)` for the body of a with-block; the previous backend is restored after it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# Triton reads it when imported, as fastddpm imports it: read once here too (host time per call).
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Set at import, not on first use: a value that changes after torch.compile traced it recompiles.
set_backend(os.environ.get("FASTDDPM_BACKEND", "auto"))


def use_triton(tensor):
    """True if the op on `tensor` should run the Triton kernel."""
    if _backend == "torch":
        return False
    if tensor.is_cuda:
        return True
    if _backend == "auto":
        return False
    if not _INTERPRETER:
        raise RuntimeError(
            f"backend 'triton' on a {tensor.device.type} tensor needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use set_backend('auto')")
    return True
