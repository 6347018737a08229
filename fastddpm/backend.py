"""Which implementation runs: the Triton kernels or the float64-capable reference.

"auto" (the default): Triton for CUDA tensors, the reference for CPU tensors.
"triton": the kernels everywhere; CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter).
"reference": pure PyTorch everywhere.
The environment variable FASTDDPM_BACKEND sets the starting value.
"""
import os

BACKENDS = ("auto", "triton", "reference")


def set_backend(name):
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend():
    return _backend


# Set at import, not on first use: a value that changes after torch.compile traced it recompiles.
set_backend(os.environ.get("FASTDDPM_BACKEND", "auto"))


def use_triton(tensor):
    """True if the op on `tensor` should run the Triton kernel."""
    backend = get_backend()
    if backend == "reference":
        return False
    if tensor.device.type == "cuda":
        return True
    if backend == "auto":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"backend 'triton' on a {tensor.device.type} tensor needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use set_backend('auto')")
    return True
