"""Where a command computes: the device, the CPU threads, and under `torchrun` the process group
(gloo on CPU, nccl on CUDA; each rank its own slice of every batch and its own noise)."""
import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def resolve_device(device=None):
    """`device` as a torch.device; None: CUDA if available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_threads(processes_on_this_machine=1):
    """CPU threads per process: the cores but one, shared among this machine's processes.

    OpenMP threads spin-wait for each other; when another process holds one of them, a step
    runs 4-10x slower (measured on 2 cores), while on an idle 2-core machine one thread is only
    1.7x slower than two. Leaving a core free keeps the run's speed whatever else runs.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // processes_on_this_machine)


@contextlib.contextmanager
def cpu_threads(threads=None, processes_on_this_machine=1):
    """torch's CPU threads set to `threads` (None: `default_threads`) inside the block."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads(processes_on_this_machine))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def distributed(device=None, threads=None):
    """The Env of this process: rank, world size and device; a process group when launched by
    torchrun with several processes; on CPU, `threads` threads (None: `default_threads`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            stack.enter_context(cpu_threads(threads, local_world))
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            stack.callback(dist.destroy_process_group)
        yield Env(rank, world_size, device)


def any_rank(flag, device):
    """True on every rank if `flag` is true on any."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values, env):
    """`values` (a tensor) summed across ranks, in place."""
    if env.distributed:
        dist.all_reduce(values)
    return values


def gather(value, env):
    """[the value of every rank] (any picklable object)."""
    if not env.distributed:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(env):
    if env.distributed:
        dist.barrier()
