"""tests/aot.py itself: a spec's launch options reach the compiler on every Triton version.

A debug build (`debug=True`) keeps a kernel's `tl.device_assert`; Triton's integer-overflow checks,
which debug also turns on, go with `sanitize_overflow=False`.
"""
import triton
import triton.language as tl

from aot import ptx_reports


@triton.jit
def checked_gather_kernel(t_ptr, x_ptr, out_ptr, T, BLOCK: tl.constexpr):
    t = tl.load(t_ptr)
    tl.device_assert((t >= 0) & (t < T), "t out of range")
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + t * BLOCK + offs))  # t * BLOCK: an int32 multiply to check


def test_debug_builds_keep_device_asserts_without_overflow_checks():
    spec = dict(module="test_aot", kernel="checked_gather_kernel", num_warps=4,
                signature={"t_ptr": "*i32", "x_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32"},
                constexprs={"BLOCK": 512}, divisible=["x_ptr", "out_ptr"])
    plain, debug, sanitized = ptx_reports([spec, {**spec, "options": {"debug": True, "sanitize_overflow": False}},
                                           {**spec, "options": {"debug": True}}])
    for plain_arch, debug_arch, sanitized_arch in zip(plain, debug, sanitized):  # sm_80, sm_90
        assert plain_arch["asserts"] == 0
        assert debug_arch["asserts"] >= 1
        assert sanitized_arch["asserts"] > debug_arch["asserts"]
        assert plain_arch["loads"] == debug_arch["loads"] == 1  # 4 float32 a thread: one 16-byte load
