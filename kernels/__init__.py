"""Triton kernels of fastddpm, installed as fastddpm.kernels: one file per op, each holding
the kernel, its launcher and its torch.library registration (importing registers the op)."""
from . import hybrid, loss, posterior, q_sample, solvers, vlb  # noqa: F401
