"""Streaming a safetensors checkpoint's routed experts into the host store
(``HostExpertStore.from_safetensors``): FP8 checkpoints as people publish them, served with their own
scales (DeepSeek-V3 / Qwen3 FP8 ``weight_scale_inv`` blocks; compressed-tensors ``weight_scale`` per
output channel or per tensor), and 16/32-bit checkpoints quantized to fp8 as they are loaded, equal
bit for bit to quantizing the same weights in memory. Bad checkpoints: an error that names the
tensor and the problem (issue 28)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from prophet_kernels.kernels.fp8 import FP8, dequantize_fp8, quantize_fp8
from prophet_kernels.memory.store import HostExpertStore

L, E, H, I = 2, 3, 40, 32  # H = 40: the last 16-column block of a gate/up row is ragged


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(L, E, 2 * I, H, generator=g) * (0.1 + torch.rand(L, E, 2 * I, 1, generator=g))
    w2 = torch.randn(L, E, H, I, generator=g) * (0.1 + torch.rand(L, E, H, 1, generator=g))
    return w13, w2


def fp8_checkpoint(w13, w2, scales: str, block_shape=None, naming="olmoe"):
    """Quantize each matrix on its own, as a checkpoint does: ``scales`` "inv" (``weight_scale_inv``
    blocks), "channel" (``weight_scale`` [N, 1] in bf16) or "tensor" (one ``weight_scale``). Returns
    the tensors and, per (layer, expert, part), the dequantized matrix."""
    parts = {"olmoe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
             "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                         "block_sparse_moe.experts.{e}.w2")}[naming]
    tensors, dequant = {}, {}
    for l in range(L):
        for e in range(E):
            for part, w in zip(parts, (w13[l, e, :I], w13[l, e, I:], w2[l, e])):
                name = f"model.layers.{l}.{part.format(e=e)}"
                if scales == "inv":
                    q, s = quantize_fp8(w, block_shape)
                    tensors[name + ".weight_scale_inv"] = s
                elif scales == "channel":
                    q, s = quantize_fp8(w)
                    s = s.to(torch.bfloat16).float()  # compressed-tensors may store bf16 scales
                    q = (w / s[:, None]).clamp(-448, 448).to(FP8)
                    tensors[name + ".weight_scale"] = s.to(torch.bfloat16)[:, None]
                else:
                    s = w.abs().amax() / 448
                    q = (w / s).to(FP8)
                    tensors[name + ".weight_scale"] = s.reshape(())
                    tensors[name + ".input_scale"] = torch.tensor(0.5)  # ignored: 16-bit activations
                tensors[name + ".weight"] = q
                dequant[(l, e, part.split(".")[-1])] = q.float() * (
                    s if s.dim() == 0 else s[:, None] if scales != "inv" else
                    s.repeat_interleave(block_shape[0], 0)[: w.shape[0]].repeat_interleave(block_shape[1], 1)[:, : w.shape[1]])
    tensors["model.layers.0.mlp.gate.weight"] = torch.randn(E, H)  # not an expert: ignored
    return tensors, dequant


def store_dequantized(store, l):
    """The store's layer ``l`` dequantized: (w13 [E, 2I, H], w2 [E, H, I]) fp32."""
    bs = store.block_shape
    return dequantize_fp8(store.w13[l], store.w13_scale[l], bs), dequantize_fp8(store.w2[l], store.w2_scale[l], bs)


@pytest.mark.parametrize("scales,block_shape,naming", [
    ("inv", (16, 16), "olmoe"), ("inv", (16, 32), "mixtral"), ("channel", None, "olmoe"), ("tensor", None, "mixtral")])
def test_fp8_checkpoint_is_served_with_its_own_scales(tmp_path, scales, block_shape, naming):
    w13, w2 = weights()
    tensors, dequant = fp8_checkpoint(w13, w2, scales, block_shape, naming)
    half = {k: v for k, v in tensors.items() if ".layers.0." in k}  # two shards
    save_file(half, tmp_path / "a.safetensors")
    save_file({k: v for k, v in tensors.items() if k not in half}, tmp_path / "b.safetensors")
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    # the store's block_shape is the checkpoint's (asked for here; 128 x 128 by default)
    store = HostExpertStore.from_safetensors(paths, pin=False, progress=False, block_shape=block_shape)
    assert store.dtype == FP8 and store.block_shape == block_shape
    assert all(b is not None for b in store.blocks)  # weights and scales in one block: one copy per expert
    for l in range(L):
        d13, d2 = store_dequantized(store, l)
        for e in range(E):
            gate, up, down = (dequant[(l, e, p)] for p in (("gate_proj", "up_proj", "down_proj") if naming == "olmoe"
                                                         else ("w1", "w3", "w2")))
            # no requantization: the same fp8 bytes and scales, so the same dequantized weights exactly
            assert torch.equal(d13[e, :I], gate) and torch.equal(d13[e, I:], up) and torch.equal(d2[e], down)
    # and close to the weights they quantize (e4m3: 3 mantissa bits)
    d13, _ = store_dequantized(store, 1)
    assert (d13 - w13[1]).abs().max() <= 0.07 * w13[1].abs().max()


@pytest.mark.parametrize("block_shape", [None, (16, 16)], ids=["per-channel", "block16"])
def test_quantized_as_loaded_equals_quantized_in_memory(tmp_path, block_shape):
    w13, w2 = weights(1)
    tensors = {}
    for l in range(L):
        for e in range(E):
            p = f"model.layers.{l}.mlp.experts.{e}."
            tensors[p + "gate_proj.weight"] = w13[l, e, :I].to(torch.bfloat16)
            tensors[p + "up_proj.weight"] = w13[l, e, I:].to(torch.bfloat16)
            tensors[p + "down_proj.weight"] = w2[l, e].to(torch.bfloat16)
    save_file(tensors, tmp_path / "bf16.safetensors")
    loaded = HostExpertStore.from_safetensors(tmp_path / "bf16.safetensors", pin=False, progress=False,
                                              expert_dtype="fp8", block_shape=block_shape)
    in_memory = HostExpertStore.from_tensors(w13.to(torch.bfloat16), w2.to(torch.bfloat16), pin=False,
                                             expert_dtype="fp8", block_shape=block_shape)
    assert loaded.dtype == FP8 and loaded.block_shape == block_shape
    assert loaded.expert_bytes == in_memory.expert_bytes
    for l in range(L):  # the same fp8 bytes and the same scales
        for a, b in ((loaded.w13, in_memory.w13), (loaded.w2, in_memory.w2), (loaded.w13_scale, in_memory.w13_scale),
                     (loaded.w2_scale, in_memory.w2_scale)):
            assert torch.equal(a[l].view(torch.uint8), b[l].view(torch.uint8))
    plain = HostExpertStore.from_safetensors(tmp_path / "bf16.safetensors", pin=False, progress=False)
    assert plain.dtype == torch.bfloat16 and torch.equal(plain.w13[1], w13[1].to(torch.bfloat16))


def _broken(tensors, how):
    t = dict(tensors)
    name = "model.layers.1.mlp.experts.2.up_proj"
    if how == "no scale":
        del t[name + ".weight_scale_inv"]
    elif how == "scale shape":
        t[name + ".weight_scale_inv"] = torch.ones(3, 3)
    elif how == "two scale kinds":
        t[name + ".weight_scale"] = torch.ones(I, 1)
    elif how == "weight dtype":
        t[name + ".weight"] = t[name + ".weight"].float()
    elif how == "weight shape":
        t[name + ".weight"] = t[name + ".weight"][:, :-1].contiguous()
    elif how == "no weight":
        del t[name + ".weight"]
    return t


MESSAGES = {"no scale": "has no weight_scale_inv", "scale shape": "does not match blocks of",
            "two scale kinds": "one kind of scales", "weight dtype": "expected torch.float8_e4m3fn",
            "weight shape": "expected torch.float8_e4m3fn", "no weight": "checkpoint lacks expert tensors"}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(sorted(MESSAGES)))
def test_a_bad_fp8_checkpoint_names_the_problem(tmp_path, how):
    w13, w2 = weights(2)
    tensors, _ = fp8_checkpoint(w13, w2, "inv", (16, 16))
    save_file(_broken(tensors, how), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=MESSAGES[how]) as err:
        HostExpertStore.from_safetensors(tmp_path / "bad.safetensors", pin=False, progress=False, block_shape=(16, 16))
    assert "layer 1" in str(err.value)


def test_checkpoint_refusals(tmp_path):
    w13, w2 = weights(3)
    blocks16, _ = fp8_checkpoint(w13, w2, "inv", (16, 16))
    save_file(blocks16, tmp_path / "blocks16.safetensors")
    # the default 128 x 128 blocks do not match this checkpoint's 16 x 16 scales: say so
    with pytest.raises(ValueError, match="pass the checkpoint's block_shape"):
        HostExpertStore.from_safetensors(tmp_path / "blocks16.safetensors", pin=False, progress=False)
    # 64-row blocks straddle gate and up (I = 32) in the fused w13
    tensors, _ = fp8_checkpoint(w13, w2, "inv", (64, 16))
    save_file(tensors, tmp_path / "blocks64.safetensors")
    with pytest.raises(ValueError, match="intermediate size 32 is not a multiple"):
        HostExpertStore.from_safetensors(tmp_path / "blocks64.safetensors", pin=False, progress=False,
                                         block_shape=(64, 16))
    with pytest.raises(ValueError, match="expert_dtype must be None"):
        HostExpertStore.from_safetensors(tmp_path / "blocks16.safetensors", pin=False, progress=False,
                                         expert_dtype="int8")
    with pytest.raises(ValueError, match="group_size goes with expert_dtype='int4'"):
        HostExpertStore.from_safetensors(tmp_path / "blocks16.safetensors", pin=False, progress=False, group_size=32)
    # one layer fp8, the other bf16: one store holds one format
    mixed = {k: (v.float().to(torch.bfloat16) if ".layers.1." in k and k.endswith(".weight") else v)
             for k, v in blocks16.items() if not (".layers.1." in k and "scale" in k)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(ValueError, match="differ in expert dtype"):
        HostExpertStore.from_safetensors(tmp_path / "mixed.safetensors", pin=False, progress=False,
                                         block_shape=(16, 16))
