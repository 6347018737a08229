"""Ahead-of-time compilation of kernels for CUDA targets, with no GPU: PTX to read.

Compiles at the specialisation the JIT uses for real launches: pointers 16-byte aligned,
integer sizes divisible by 16 (`divisible` names those that are). Under TRITON_INTERPRET=1
(the test suite) @triton.jit gives interpreted functions that cannot be compiled, so
`ptx_reports` compiles in a child process without the interpreter.

A spec is a dict: module, kernel (names to import), signature ({arg: type}), constexprs
({arg: value}), divisible (arg names), num_warps.
"""
import json
import os
import re
import subprocess
import sys

ARCHS = (80, 90)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def ptx_reports(specs):
    """For each spec and arch in ARCHS: {"loads", "stores", "spill_bytes"}; one child process."""
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


def _compile_ptx(spec, arch):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    signature, constexprs = spec["signature"], spec["constexprs"]
    names = list(signature) + [name for name in constexprs if name not in signature]
    full_signature = {name: signature.get(name, "constexpr") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec["divisible"]}
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]})
    return compiled.asm["ptx"]


def _vector_accesses(ptx):
    """(16-byte loads, 16-byte stores): v4 accesses of 32-bit words."""
    loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)", ptx))
    stores = len(re.findall(r"st\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)", ptx))
    return loads, stores


def _spill_bytes(ptx, arch):
    """Spill stores + loads that ptxas reports. (A small stack frame for the slow path of
    sin/cos argument reduction in Box-Muller is not a spill.)"""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}{'a' if arch == 90 else ''}"
        report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull],
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
            per_arch.append({"loads": loads, "stores": stores, "spill_bytes": _spill_bytes(ptx, arch)})
        results.append(per_arch)
    print(json.dumps(results))
