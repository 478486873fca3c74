"""Every Triton kernel compiles for the GPUs Prophet serves on (A100 sm_80, H100/H200 sm_90), checked
on a machine without one (``kernels.compile_check``: the launches of a workload covering every
kernel variant, recorded under the interpreter, compiled ahead of time to cubins). The interpreter
runs code a GPU compiler rejects; this found two such at its first run (fp8 weights on sm_80, a
variable rebound with another type in the residency kernel)."""

import json
import os
import subprocess
import sys

import types

import pytest
import torch

from prophet_kernels.kernels import compile_check, launch_config

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
    # compiled as Triton's JIT specializes on a GPU: unit strides as constants, 16-divisible
    # pointers and sizes marked (vectorized loads, async copies: the pipelined kernels)
    grouped = [r for r in results if r["kernel"] == "_gate_up_kernel" and r["arch"] == 90]
    assert all(r["constexprs"].get("stride_wh") == 1 and r["attrs"].get("w_ptr") == "D" for r in grouped)
    # the pipelined grouped GEMM's shared memory is at most what launch_config's fitting assumes,
    # num_stages x (x tile + two weight tiles) (Hopper's wgmma tiles take all of it, mma tiles one
    # stage less): the defaults fitted to a GPU's limit launch on it
    sizes = []
    for r in grouped:
        c, st = r["constexprs"], r["options"]["num_stages"]
        if c["EVEN_K"] and not c["SCALE"] and r["signature"]["x_ptr"] in ("*fp16", "*bf16"):
            estimate = st * (c["BM"] * c["BK"] + 2 * c["BK"] * c["BN"]) * 2
            assert r["shared"] <= estimate, r
            sizes.append(r)
    assert sizes
    # registers and spills as ptxas allocated them (cuobjdump): the decode path's GEMV kernels at
    # real models' shapes (K a multiple of the tile: OLMoE, Mixtral, Qwen3) spill at most a few
    # registers' worth (ragged K and read-through fills spill more: PERF_NOTES, "Specialization, shared memory, registers")
    gemv = [r for r in results if r["kernel"].startswith("_gemv") and r["constexprs"]["EVEN_K"]]
    assert gemv and all(0 < r["registers"] <= 255 for r in gemv)
    assert all(r["spilled"] <= 64 for r in gemv), [(r["kernel"], r["spilled"], r["constexprs"]) for r in gemv
                                                  if r["spilled"] > 64]


def test_the_check_reports_a_kernel_that_does_not_compile():
    """The checker can fail: the fp8-typed GEMV launch that sm_90 makes, compiled for sm_80 (which
    has no e4m3 type: why sm_80 gets the bytes variant), is reported with Triton's message."""
    fp8_launch = next(r for r in compile_check.arch_records()
                      if r["kernel"] == "_gemv_gate_up_kernel" and "*fp8e4nv" in r["signature"].values())
    bad = {k: v for k, v in fp8_launch.items() if k not in ("min_arch", "max_arch")}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "prophet_kernels.kernels.compile_check", "--compile", "80"],
                          input=json.dumps([bad]), capture_output=True, text=True, env=env, check=True)
    (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "fp8e4nv not supported" in result["error"]


def test_the_check_reports_a_launch_that_needs_more_shared_memory_than_the_gpu_has():
    """The H100 table's largest grouped tiles (Hopper wgmma tiles) with one more pipeline stage,
    compiled for sm_80 (163 KiB per block): reported, as Triton would refuse the launch there."""
    big = max((r for r in compile_check.arch_records((90,)) if r["kernel"] == "_gate_up_kernel"
               and r.get("min_arch") == 90 and r["signature"]["x_ptr"] == "*fp16" and r["constexprs"]["EVEN_K"]
               and not r["constexprs"]["SCALE"] and r["constexprs"]["BM"] >= 64),  # (wgmma tiles)
              key=lambda r: r["options"]["num_stages"] * r["constexprs"]["BK"] * (r["constexprs"]["BM"] + 2 * r["constexprs"]["BN"]))
    bad = {k: v for k, v in big.items() if k not in ("min_arch", "max_arch")}
    bad["options"] = {**bad["options"], "num_stages": bad["options"]["num_stages"] + 1}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def compile_for(arch, record):
        proc = subprocess.run([sys.executable, "-m", "prophet_kernels.kernels.compile_check", "--compile", str(arch)],
                              input=json.dumps([record]), capture_output=True, text=True, env=env, check=True)
        (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    # as shipped it fits sm_90, at exactly the bound the defaults' fitting assumes (wgmma tiles)
    c, stages = big["constexprs"], big["options"]["num_stages"]
    ok = compile_for(90, big)
    assert "error" not in ok and ok["shared"] == stages * (c["BM"] * c["BK"] + 2 * c["BK"] * c["BN"]) * 2
    result = compile_for(80, bad)
    assert result["shared"] > compile_check.SHARED_LIMIT[80]
    assert "bytes of shared memory, sm_80 allows 166912" in result["error"]


@pytest.mark.parametrize("limit", [101376, 166912, 232448], ids=["sm_86/89", "sm_80", "sm_90"])
def test_default_configs_fit_the_gpus_shared_memory(monkeypatch, limit):
    """Untuned defaults on a GPU are fitted to what one block may have there (found by the check:
    a 120 KiB default would not launch on sm_89 GPUs such as the L40S)."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=limit))
    for T in (1, 4, 16, 64, 256, 1024, 4096, 65536):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cfg = launch_config.default_config(T, 8, 64, torch.device("cuda", 0), dtype)
            for part in ("gate_up", "down"):
                t = cfg[part]
                need = t["num_stages"] * (cfg["block_m"] * t["BK"] + 2 * t["BK"] * t["BN"]) * dtype.itemsize
                assert need <= min(limit, 160 * 1024), (T, dtype, cfg)
