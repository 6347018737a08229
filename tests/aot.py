"""Ahead-of-time compilation of a kernel for a CUDA target, with no GPU: PTX to read.

Compiles at the specialisation the JIT uses for real launches: pointers 16-byte aligned,
integer sizes divisible by 16 (`divisible` names those that are).
"""
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

ARCHS = (80, 90)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def compile_ptx(kernel, signature, constexprs, divisible, arch, num_warps=4):
    """PTX of `kernel` for sm_`arch`. signature: {arg: type}; constexprs: {arg: value}."""
    names = list(signature) + [name for name in constexprs if name not in signature]
    full_signature = {name: signature.get(name, "constexpr") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def vector_accesses(ptx):
    """(16-byte loads, 16-byte stores) in the PTX: v4 of 32-bit words."""
    loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)", ptx))
    stores = len(re.findall(r"st\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)", ptx))
    return loads, stores


def spill_bytes(ptx, arch):
    """Bytes of register spill stores + loads that ptxas reports for the PTX.

    (The PTX may hold a small local array for the slow path of sin/cos argument
    reduction in Box-Muller: a stack frame, not a spill.)
    """
    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses for this arch
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", path,
                                 "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert found, report
    return sum(int(a) + int(b) for a, b in found)
