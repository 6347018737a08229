"""Triton kernels of fastddpm, installed as fastddpm.kernels: one file per op, each holding
the kernel, its launcher and its torch.library registration."""
from . import q_sample  # noqa: F401
