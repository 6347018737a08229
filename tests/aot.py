"""Ahead-of-time compilation of kernels for CUDA targets, with no GPU: PTX to read.

Compiles through the JIT's own launch path (`JITFunction.run(..., warmup=True)`) with stand-in
arguments and a stand-in driver naming the target, so the specialisation is the one a real launch
computes, on every Triton 3.2-3.9: pointers 16-byte aligned and integer sizes divisible by 16 where
`divisible` names them, `do_not_specialize` honoured. Under TRITON_INTERPRET=1 (the test suite)
@triton.jit gives interpreted functions that cannot be compiled, so `ptx_reports` compiles in a
child process without the interpreter.

A spec is a dict: module, kernel (names to import), signature ({arg: type}), constexprs
({arg: value}), divisible (arg names), num_warps, and optionally options: more launch keywords,
e.g. {"debug": True, "sanitize_overflow": False} to build the kernel's device asserts.
"""
import json
import os
import re
import subprocess
import sys

ARCHS = (80, 90)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def ptx_reports(specs):
    """For each spec and arch in ARCHS: {"loads", "stores", "spill_bytes", "asserts"}; one child process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], input=json.dumps(specs), capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_fast_ptx(specs, loads, stores):
    """Every spec, for sm_80 and sm_90: at least loads[i] / stores[i] 16-byte accesses, no spills."""
    for spec, reports, want_loads, want_stores in zip(specs, ptx_reports(specs), loads, stores):
        for arch, report in zip(ARCHS, reports):
            where = (spec["kernel"], spec["constexprs"], spec["signature"].get("x0_ptr"), f"sm_{arch}")
            assert report["loads"] >= want_loads and report["stores"] >= want_stores, (where, report)
            assert report["spill_bytes"] == 0, (where, report)


# -- the child process: what differs between Triton versions stays in this section ------------


class _Target:
    """Stands in for the CUDA driver, which needs a GPU: the JIT asks it only for a device (one per
    arch, so each arch has its own kernel cache), a stream and the target. Triton 3.5 builds the
    real driver on `reset_active`, so the child never resets."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


class _Pointer:
    """What the JIT reads of a tensor argument: dtype and address (16-byte aligned or not)."""

    def __init__(self, dtype, address):
        self.dtype, self.address = dtype, address

    def data_ptr(self):
        return self.address


def _argument(kind, divisible):
    """A stand-in the JIT types as `kind` ("*fp32", "i32", "i64", "fp32"), divisible by 16 or not."""
    import torch

    if kind.startswith("*"):
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "i64": torch.int64,
                  "i32": torch.int32}
        return _Pointer(dtypes[kind[1:]], 1 << 20 if divisible else (1 << 20) + 4)
    if kind in ("i32", "i64"):
        return (1 << 32 if kind == "i64" else 0) + (3072 if divisible else 1001)
    if kind == "fp32":
        return 0.5
    raise ValueError(f"no stand-in for argument type {kind}")


def _ptxas(arch):
    """The ptxas Triton itself runs for `arch` (3.9 takes a newer one for sm_90, whose PTX the
    older one rejects): 3.2 `_path_to_binary`, 3.3 `get_ptxas(arch)` a (path, version) pair,
    3.4-3.5 `get_ptxas()`, 3.6+ `get_ptxas(arch)` a tool with a path."""
    import inspect

    from triton.backends.nvidia import compiler

    if not hasattr(compiler, "get_ptxas"):
        return compiler._path_to_binary("ptxas")[0]
    tool = compiler.get_ptxas(arch) if inspect.signature(compiler.get_ptxas).parameters else compiler.get_ptxas()
    return tool[0] if isinstance(tool, tuple) else tool.path


def _compile_ptx(spec, arch):
    import importlib

    from triton.runtime import driver

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    arguments = {name: _argument(kind, name in spec["divisible"]) for name, kind in spec["signature"].items()}
    driver.set_active(_Target(arch))
    compiled = kernel.run(grid=(1,), warmup=True, num_warps=spec["num_warps"], **arguments, **spec["constexprs"],
                          **spec.get("options", {}))
    typed = {name: compiled.src.signature[name] for name in spec["signature"]}
    assert typed == spec["signature"], f"the JIT typed the stand-ins {typed}, not {spec['signature']}"
    return compiled.asm["ptx"]


# -- reading PTX ------------------------------------------------------------------------------


def _vector_accesses(ptx):
    """(16-byte loads, 16-byte stores): v4 accesses of 32-bit words."""
    loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)", ptx))
    stores = len(re.findall(r"st\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)", ptx))
    return loads, stores


def _spill_bytes(ptx, arch):
    """Spill stores + loads that ptxas reports. (A small stack frame for the slow path of
    sin/cos argument reduction in Box-Muller is not a spill.)"""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}{'a' if arch == 90 else ''}"
        report = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert found, report
    return sum(int(a) + int(b) for a, b in found)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    results = []
    for spec in json.loads(sys.stdin.read()):
        per_arch = []
        for arch in ARCHS:
            ptx = _compile_ptx(spec, arch)
            loads, stores = _vector_accesses(ptx)
            per_arch.append({"loads": loads, "stores": stores, "spill_bytes": _spill_bytes(ptx, arch),
                             "asserts": len(re.findall(r"call(?:\.uni)?\s+__assertfail", ptx))})
        results.append(per_arch)
    print(json.dumps(results))
