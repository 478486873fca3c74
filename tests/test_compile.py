"""Every Triton kernel compiles for the GPUs Prophet serves on (A100 sm_80, H100/H200 sm_90), checked
on a machine without one (``kernels.compile_check``: the launches of a workload covering every
kernel variant, recorded under the interpreter, compiled ahead of time to cubins). The interpreter
runs code a GPU compiler rejects; this found two such at its first run (fp8 weights on sm_80, a
variable rebound with another type in the residency kernel)."""

import json
import os
import subprocess
import sys

import pytest

from prophet_kernels.kernels import compile_check

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches under the Triton interpreter (a GPU compiles them itself)")


def test_every_kernel_variant_compiles_for_a100_and_h100():
    lines = []
    results = compile_check.check(progress=lines.append)
    failed = [r for r in results if "error" in r]
    assert not failed, compile_check.summary(failed)
    compiled = {(r["kernel"], r["arch"]) for r in results}
    kernels = {"_gemv_gate_up_kernel", "_gemv_down_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel",
               "_residency_kernel", "_fill_kernel", "_route_plan_fused_kernel", "_route_count_kernel"}
    assert {(k, a) for k in kernels for a in compile_check.ARCHS} <= compiled
    # the variants each GPU launches: fp8 weights as fp8 on sm_90, as bytes on sm_80; PDL only on sm_90
    sigs = {a: [r for r in results if r["arch"] == a and r["kernel"] == "_gemv_down_kernel"] for a in (80, 90)}
    assert any(r["signature"]["w_ptr"] == "*fp8e4nv" for r in sigs[90])
    assert not any(r["signature"]["w_ptr"] == "*fp8e4nv" for r in sigs[80])
    assert any(r["signature"]["w_ptr"] == "*u8" and r["constexprs"]["FP8_BITS"] for r in sigs[80])
    assert any(r["constexprs"]["PDL"] == 2 for r in sigs[90]) and not any(r["constexprs"]["PDL"] for r in sigs[80])
    assert all(any(r["constexprs"].get("READ") for r in sigs[a]) for a in (80, 90))  # read-through fills
    assert any(r["signature"]["x_ptr"] == "*bf16" for a in (80, 90) for r in results
               if r["arch"] == a and r["kernel"] == "_gate_up_kernel")


def test_the_check_reports_a_kernel_that_does_not_compile():
    """The checker can fail: the fp8-typed GEMV launch that sm_90 makes, compiled for sm_80 (which
    has no e4m3 type: why sm_80 gets the bytes variant), is reported with Triton's message."""
    fp8_launch = next(r for r in compile_check.arch_records()
                      if r["kernel"] == "_gemv_gate_up_kernel" and r.get("min_arch") == 89)
    bad = {k: v for k, v in fp8_launch.items() if k != "min_arch"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "prophet_kernels.kernels.compile_check", "--compile", "80"],
                          input=json.dumps([bad]), capture_output=True, text=True, env=env, check=True)
    (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "fp8e4nv not supported" in result["error"]
