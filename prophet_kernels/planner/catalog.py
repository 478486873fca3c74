"""Model and GPU catalogue for the capacity planner.

Every model entry is transcribed from its published configuration (the ``source`` address: a
Hugging Face ``config.json``, or the reference code for checkpoints without one) and carries the
total parameter count its authors publish, with where that number comes from. The planner never
uses the published total in its arithmetic: it counts parameters from the architecture
(``memory.count_params``) and the tests hold that count within 2% of the published one.

Layers are described one by one (``Layer``), so hybrids need no special cases: which layers
attend, which hold Mamba mixers, which carry a dense MLP, a routed MoE, or both (Arctic).

Letters: H hidden size, E routed experts per MoE layer, k experts per token, I expert
intermediate size, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------
# Architecture pieces
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GQA:
    """Multi-head attention with grouped KV heads (MHA when kv_heads == heads)."""

    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (per-head RMSNorm, Qwen3) | "full" (over all heads, OLMoE)
    output_gate: bool = False  # q_proj also gives a sigmoid gate per query element (Qwen3-Next's gated attention)


@dataclass(frozen=True)
class MLA:
    """DeepSeek multi-head latent attention; the KV cache holds the latent and the RoPE key."""

    heads: int
    q_lora_rank: int | None  # None: plain q projection (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MoA:
    """JetMoE mixture of attention heads: per-expert q and o projections, shared k/v projection."""

    experts: int
    top_k: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Mamba:
    """Mamba-1 mixer (Jamba): in/out projections, depthwise conv, selective-scan parameters."""

    d_state: int
    d_conv: int
    expand: int
    dt_rank: int
    conv_bias: bool = True
    proj_bias: bool = False
    inner_norms: bool = True  # Jamba's dt/B/C RMSNorms


@dataclass(frozen=True)
class GatedDeltaNet:
    """Gated DeltaNet linear attention (Qwen3-Next): q, k, v, z from one projection, a causal depthwise
    conv over q, k, v, a per-head decay and step (b, a), a gated RMSNorm; a fixed recurrent state per
    sequence (value heads x key dim x value dim) instead of KV per token."""

    key_heads: int
    value_heads: int
    key_dim: int  # per head
    value_dim: int  # per head
    conv: int  # conv kernel size

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


@dataclass(frozen=True)
class MoE:
    """Routed experts of one MoE layer, plus optional always-on shared experts."""

    experts: int  # E
    top_k: int  # k
    intermediate: int  # I of one routed expert
    gated: bool = True  # gate, up, down (SwiGLU/GEGLU); False: up, down (Switch, relu)
    shared_intermediate: int = 0  # total intermediate size of the shared expert(s), 0 if none
    shared_gate: bool = False  # Qwen MoE: a sigmoid gate Linear(H, 1) on the shared expert
    router_bias: int = 0  # extra router parameters per layer (DeepSeek-V3 correction bias: E)
    expert_bias: bool = False  # biases on each routed expert's projections (gpt-oss)


@dataclass(frozen=True)
class Layer:
    mixer: str  # "attn" | "mamba" | "linear" (GatedDeltaNet)
    ffn: str  # "dense" | "moe" | "moe+dense" (Arctic: MoE plus a residual dense MLP)
    cross_attn: bool = False  # encoder-decoder: decoder layers attend to the encoder
    cached: bool = True  # holds KV cache (decoder-side attention); encoder layers do not
    window: int | None = None  # at most this many tokens of KV per sequence: sliding-window attention (gpt-oss)
    # or chunked local attention (Llama 4: a token attends within its chunk of this many)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    source: str  # where the architecture numbers come from
    published_total: float  # total parameters as published (not used in arithmetic)
    published_source: str
    hidden: int
    vocab: int
    tied_embeddings: bool
    max_context: int
    attention: GQA | MLA | MoA
    layers: tuple[Layer, ...]
    moe: MoE
    dense_intermediate: int = 0  # dense MLP intermediate size (layers with ffn "dense"/"moe+dense")
    dense_gated: bool = True
    mamba: Mamba | None = None
    linear_attn: GatedDeltaNet | None = None  # the mixer of "linear" layers
    norm: str = "rms"  # "rms" (H params), "ln" (LayerNorm with bias, 2H), "ln_nobias" (H)
    lm_head_bias: bool = False
    mlp_bias: bool = False  # biases on MLP/expert projections (Phi-3.5-MoE has none; JetMoE has one per block)
    extra_params: int = 0  # small pieces not covered above, each explained in the entry
    sliding_window: int | None = None  # applies to every attention layer when set
    encoder_decoder: bool = False
    notes: str = ""
    pp_stage: tuple[int, int] = (0, 1)  # (stage, stages): a pipeline stage's part (planner.memory.stage_spec)
    native_dtype: str = "bf16"  # the weight dtype of the published checkpoint (what `prophet plan --layouts` counts)

    @property
    def moe_layers(self) -> int:
        return sum(1 for layer in self.layers if "moe" in layer.ffn)

    @property
    def family(self) -> str:
        return self.name.split("-")[0]


def _decoder(n: int, moe_at=lambda i: True, attn_at=lambda i: True, dense_too=False,
             window_at=lambda i: None, other_mixer: str = "mamba") -> tuple[Layer, ...]:
    out = []
    for i in range(n):
        ffn = ("moe+dense" if dense_too else "moe") if moe_at(i) else "dense"
        out.append(Layer("attn" if attn_at(i) else other_mixer, ffn, window=window_at(i)))
    return tuple(out)


def _encoder_decoder(n_enc: int, n_dec: int, sparse_step: int) -> tuple[Layer, ...]:
    # Switch/T5X: every `sparse_step`-th MLP sublayer is an MoE sublayer (layers 1, 3, 5, ...).
    def ffn(i: int) -> str:
        return "moe" if i % sparse_step == sparse_step - 1 else "dense"

    enc = [Layer("attn", ffn(i), cached=False) for i in range(n_enc)]
    dec = [Layer("attn", ffn(i), cross_attn=True) for i in range(n_dec)]
    return tuple(enc + dec)


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

_MODELS: list[ModelSpec] = [
    ModelSpec(
        name="OLMoE-1B-7B", hf_id="allenai/OLMoE-1B-7B-0924", source=_hf("allenai/OLMoE-1B-7B-0924"),
        published_total=6.92e9, published_source="model card: 6.9B total, 1.3B active; transformers on the meta device: 6,919,161,856",
        hidden=2048, vocab=50304, tied_embeddings=False, max_context=4096,
        attention=GQA(heads=16, kv_heads=16, head_dim=128, qk_norm="full"),
        layers=_decoder(16), moe=MoE(experts=64, top_k=8, intermediate=1024),
    ),
    ModelSpec(
        name="Mixtral-8x7B", hf_id="mistralai/Mixtral-8x7B-v0.1", source=_hf("mistralai/Mixtral-8x7B-v0.1"),
        published_total=46.7e9, published_source="Mistral AI announcement: 46.7B total, 12.9B active",
        hidden=4096, vocab=32000, tied_embeddings=False, max_context=32768,
        attention=GQA(heads=32, kv_heads=8, head_dim=128),
        layers=_decoder(32), moe=MoE(experts=8, top_k=2, intermediate=14336),
    ),
    ModelSpec(
        name="Mixtral-8x22B", hf_id="mistralai/Mixtral-8x22B-v0.1", source=_hf("mistralai/Mixtral-8x22B-v0.1"),
        published_total=141e9, published_source="Mistral AI announcement: 141B total, 39B active",
        hidden=6144, vocab=32000, tied_embeddings=False, max_context=65536,
        attention=GQA(heads=48, kv_heads=8, head_dim=128),
        layers=_decoder(56), moe=MoE(experts=8, top_k=2, intermediate=16384),
    ),
    ModelSpec(
        name="DeepSeek-MoE-16B", hf_id="deepseek-ai/deepseek-moe-16b-base", source=_hf("deepseek-ai/deepseek-moe-16b-base"),
        published_total=16.4e9, published_source="DeepSeekMoE paper (arXiv:2401.06066): 16.4B total",
        hidden=2048, vocab=102400, tied_embeddings=False, max_context=4096,
        attention=GQA(heads=16, kv_heads=16, head_dim=128),
        layers=_decoder(28, moe_at=lambda i: i >= 1),  # first_k_dense_replace = 1
        moe=MoE(experts=64, top_k=6, intermediate=1408, shared_intermediate=2 * 1408),
        dense_intermediate=10944,
    ),
    ModelSpec(
        name="DeepSeek-V2", hf_id="deepseek-ai/DeepSeek-V2", source=_hf("deepseek-ai/DeepSeek-V2"),
        published_total=236e9, published_source="DeepSeek-V2 paper (arXiv:2405.04434): 236B total, 21B active",
        hidden=5120, vocab=102400, tied_embeddings=False, max_context=163840,
        attention=MLA(heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
        layers=_decoder(60, moe_at=lambda i: i >= 1),
        moe=MoE(experts=160, top_k=6, intermediate=1536, shared_intermediate=2 * 1536),
        dense_intermediate=12288,
    ),
    ModelSpec(
        name="DeepSeek-V2-Lite", hf_id="deepseek-ai/DeepSeek-V2-Lite", source=_hf("deepseek-ai/DeepSeek-V2-Lite"),
        published_total=15.7e9, published_source="model card: 15.7B total, 2.4B active",
        hidden=2048, vocab=102400, tied_embeddings=False, max_context=163840,
        attention=MLA(heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
        layers=_decoder(27, moe_at=lambda i: i >= 1),
        moe=MoE(experts=64, top_k=6, intermediate=1408, shared_intermediate=2 * 1408),
        dense_intermediate=10944,
    ),
    ModelSpec(
        name="DeepSeek-V3", hf_id="deepseek-ai/DeepSeek-V3", source=_hf("deepseek-ai/DeepSeek-V3"),
        published_total=671e9, published_source="DeepSeek-V3 README: 671B main model (+14B multi-token-prediction module, not served here)",
        hidden=7168, vocab=129280, tied_embeddings=False, max_context=163840,
        attention=MLA(heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
        layers=_decoder(61, moe_at=lambda i: i >= 3),  # first_k_dense_replace = 3
        moe=MoE(experts=256, top_k=8, intermediate=2048, shared_intermediate=2048, router_bias=256),
        dense_intermediate=18432,
        native_dtype="fp8",  # README_WEIGHTS.md: e4m3 weights, 128 x 128 block scales (quant_method fp8)
    ),
    ModelSpec(
        name="Kimi-K2", hf_id="moonshotai/Kimi-K2-Instruct", source=_hf("moonshotai/Kimi-K2-Instruct"),
        published_total=1.0e12, published_source="model card: 1T total, 32B active (a one-significant-figure total)",
        hidden=7168, vocab=163840, tied_embeddings=False, max_context=131072,
        attention=MLA(heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
        layers=_decoder(61, moe_at=lambda i: i >= 1),
        moe=MoE(experts=384, top_k=8, intermediate=2048, shared_intermediate=2048, router_bias=384),
        dense_intermediate=18432,
        notes="DeepSeek-V3 architecture with 384 experts and 64 heads.",
        native_dtype="fp8",  # released with native FP8 weights (vLLM's Kimi-K2 recipe: --quantization fp8)
    ),
    ModelSpec(
        name="GLM-4.5", hf_id="zai-org/GLM-4.5", source=_hf("zai-org/GLM-4.5"),
        published_total=355e9, published_source="model card / transformers Glm4Moe docs: 355B total, 32B active",
        hidden=5120, vocab=151552, tied_embeddings=False, max_context=131072,
        attention=GQA(heads=96, kv_heads=8, head_dim=128, qkv_bias=True, qk_norm="head"),
        layers=_decoder(92, moe_at=lambda i: i >= 3),  # first_k_dense_replace = 3
        moe=MoE(experts=160, top_k=8, intermediate=1536, shared_intermediate=1536, router_bias=160),
        dense_intermediate=12288,
        notes="Its multi-token-prediction layer (num_nextn_predict_layers 1) is not served here.",
    ),
    ModelSpec(
        name="GLM-4.5-Air", hf_id="zai-org/GLM-4.5-Air", source=_hf("zai-org/GLM-4.5-Air"),
        published_total=106e9, published_source="model card / transformers Glm4Moe docs: 106B total, 12B active",
        hidden=4096, vocab=151552, tied_embeddings=False, max_context=131072,
        attention=GQA(heads=96, kv_heads=8, head_dim=128, qkv_bias=True),  # use_qk_norm false
        layers=_decoder(46, moe_at=lambda i: i >= 1),  # first_k_dense_replace = 1
        moe=MoE(experts=128, top_k=8, intermediate=1408, shared_intermediate=1408, router_bias=128),
        dense_intermediate=10944,
        notes="Its multi-token-prediction layer is not served here.",
    ),
    ModelSpec(
        name="gpt-oss-120b", hf_id="openai/gpt-oss-120b", source=_hf("openai/gpt-oss-120b"),
        published_total=116.83e9, published_source="gpt-oss model card (OpenAI, 2025-08): 116.83B total, 5.13B active",
        hidden=2880, vocab=201088, tied_embeddings=False, max_context=131072,
        attention=GQA(heads=64, kv_heads=8, head_dim=64, qkv_bias=True, o_bias=True),
        layers=_decoder(36, window_at=lambda i: 128 if i % 2 == 0 else None),  # sliding 128 / full, alternating
        moe=MoE(experts=128, top_k=4, intermediate=2880, router_bias=128, expert_bias=True),
        extra_params=36 * 64,  # one attention sink per head per layer
        native_dtype="int4",  # MXFP4 experts (4.25 bits a weight: e2m1 + a ue8 scale per 32), counted as int4
        notes="Attention sinks, alternating sliding-window layers, MXFP4 experts with biases.",
    ),
    ModelSpec(
        name="gpt-oss-20b", hf_id="openai/gpt-oss-20b", source=_hf("openai/gpt-oss-20b"),
        published_total=20.91e9, published_source="gpt-oss model card (OpenAI, 2025-08): 20.91B total, 3.61B active",
        hidden=2880, vocab=201088, tied_embeddings=False, max_context=131072,
        attention=GQA(heads=64, kv_heads=8, head_dim=64, qkv_bias=True, o_bias=True),
        layers=_decoder(24, window_at=lambda i: 128 if i % 2 == 0 else None),
        moe=MoE(experts=32, top_k=4, intermediate=2880, router_bias=32, expert_bias=True),
        extra_params=24 * 64,
        native_dtype="int4",
        notes="Attention sinks, alternating sliding-window layers, MXFP4 experts with biases.",
    ),
    ModelSpec(
        name="Qwen3-Next-80B-A3B", hf_id="Qwen/Qwen3-Next-80B-A3B-Instruct", source=_hf("Qwen/Qwen3-Next-80B-A3B-Instruct"),
        published_total=80e9, published_source="model card: 80B total, 3B active; transformers on the meta device: 79,674,391,296",
        hidden=2048, vocab=151936, tied_embeddings=False, max_context=262144,
        attention=GQA(heads=16, kv_heads=2, head_dim=256, qk_norm="head", output_gate=True),
        # full_attention_interval 4: layers 3, 7, ..., 47 attend; the other 36 are Gated DeltaNet
        layers=_decoder(48, attn_at=lambda i: i % 4 == 3, other_mixer="linear"),
        moe=MoE(experts=512, top_k=10, intermediate=512, shared_intermediate=512, shared_gate=True),
        linear_attn=GatedDeltaNet(key_heads=16, value_heads=32, key_dim=128, value_dim=128, conv=4),
        notes="Hybrid: 12 gated-attention layers hold KV; 36 Gated DeltaNet layers hold a fixed state per sequence. "
              "Its multi-token-prediction layer is not served here.",
    ),
    ModelSpec(
        name="Llama-4-Scout", hf_id="meta-llama/Llama-4-Scout-17B-16E-Instruct",
        source=_hf("meta-llama/Llama-4-Scout-17B-16E-Instruct") + " (text_config)",
        published_total=109e9, published_source="model card: 109B total, 17B active (with its vision encoder, not counted "
        "here); transformers on the meta device (Llama4ForCausalLM, the text model): 107,769,861,120",
        hidden=5120, vocab=202048, tied_embeddings=False, max_context=10485760,
        attention=GQA(heads=40, kv_heads=8, head_dim=128),  # use_qk_norm: an L2 norm without weights
        # attention_chunk_size 8192 on the RoPE layers; every 4th layer (NoPE) attends to the whole context
        layers=_decoder(48, window_at=lambda i: None if i % 4 == 3 else 8192),
        moe=MoE(experts=16, top_k=1, intermediate=8192, shared_intermediate=8192),  # interleave_moe_layer_step 1
        notes="Top-1 sigmoid routing that scales the expert's input; chunked local attention (8,192) on 3 of 4 layers.",
    ),
    ModelSpec(
        name="DBRX", hf_id="databricks/dbrx-base", source=_hf("databricks/dbrx-base"),
        published_total=132e9, published_source="Databricks model card: 132B total, 36B active",
        hidden=6144, vocab=100352, tied_embeddings=False, max_context=32768,
        attention=GQA(heads=48, kv_heads=8, head_dim=128),
        layers=_decoder(40), moe=MoE(experts=16, top_k=4, intermediate=10752),
        norm="ln_nobias",
    ),
    ModelSpec(
        name="Grok-1", hf_id="xai-org/grok-1", source="https://github.com/xai-org/grok-1/blob/main/run.py",
        published_total=314e9, published_source="xAI release: 314B parameters",
        hidden=6144, vocab=131072, tied_embeddings=True, max_context=8192,
        attention=GQA(heads=48, kv_heads=8, head_dim=128),
        layers=_decoder(64),
        # widening_factor 8: ffn = int(8 * 6144) * 2 // 3 = 32768 (rounded to a multiple of 8)
        moe=MoE(experts=8, top_k=2, intermediate=32768),
        extra_params=64 * 2 * 6144,  # Grok-1 has four RMSNorms per layer (pre/post attention and MLP)
        notes="Embedding matrix is reused for the output logits (InOutEmbed).",
    ),
    ModelSpec(
        name="Arctic", hf_id="Snowflake/snowflake-arctic-base", source=_hf("Snowflake/snowflake-arctic-base"),
        published_total=480e9, published_source="Snowflake model card: 10B dense + 128x3.66B MoE = 480B total, 17B active",
        hidden=7168, vocab=32000, tied_embeddings=False, max_context=4096,
        attention=GQA(heads=56, kv_heads=8, head_dim=128),
        layers=_decoder(35, dense_too=True),  # parallel_attn_mlp_res: residual dense MLP beside each MoE
        moe=MoE(experts=128, top_k=2, intermediate=4864),
        dense_intermediate=4864,
        extra_params=35 * 7168,  # the residual MLP's own pre-norm in every layer
    ),
    ModelSpec(
        name="Switch-Base-128", hf_id="google/switch-base-128",
        source="https://github.com/google/flaxformer/blob/main/flaxformer/t5x/configs/moe/models/switch_base.gin",
        published_total=7.4e9, published_source="Switch Transformers paper (arXiv:2101.03961) / model card: 7.4B",
        hidden=768, vocab=32128, tied_embeddings=True, max_context=2048,
        attention=GQA(heads=12, kv_heads=12, head_dim=64),
        layers=_encoder_decoder(12, 12, 2), moe=MoE(experts=128, top_k=1, intermediate=3072, gated=False),
        dense_intermediate=3072, dense_gated=False, norm="ln_nobias", encoder_decoder=True,
        extra_params=2 * 32 * 12,  # relative position bias tables (32 buckets x heads) in encoder and decoder
        notes="Encoder-decoder (T5); relu experts; 6+6 sparse layers.",
    ),
    ModelSpec(
        name="Switch-Large-128", hf_id="google/switch-large-128",
        source="https://github.com/google/flaxformer/blob/main/flaxformer/t5x/configs/moe/models/switch_large.gin",
        published_total=26.3e9, published_source="Switch Transformers paper (arXiv:2101.03961): 26.3B",
        hidden=1024, vocab=32128, tied_embeddings=True, max_context=2048,
        attention=GQA(heads=16, kv_heads=16, head_dim=64),
        layers=_encoder_decoder(24, 24, 2), moe=MoE(experts=128, top_k=1, intermediate=4096, gated=False),
        dense_intermediate=4096, dense_gated=False, norm="ln_nobias", encoder_decoder=True,
        extra_params=2 * 32 * 16,
        notes="Encoder-decoder (T5); relu experts; 12+12 sparse layers.",
    ),
    ModelSpec(
        name="Switch-XXL-128", hf_id="google/switch-xxl-128",
        source="https://github.com/google/flaxformer/blob/main/flaxformer/t5x/configs/moe/models/switch_xxl.gin",
        published_total=395e9, published_source="Switch Transformers paper (arXiv:2101.03961): 395B",
        hidden=4096, vocab=32128, tied_embeddings=False, max_context=2048,
        attention=GQA(heads=64, kv_heads=64, head_dim=64),
        layers=_encoder_decoder(24, 24, 2), moe=MoE(experts=128, top_k=1, intermediate=10240, gated=True),
        dense_intermediate=10240, dense_gated=True, norm="ln_nobias", encoder_decoder=True,
        extra_params=2 * 32 * 64,
        notes="Encoder-decoder (T5); GEGLU experts; separate output layer; 12+12 sparse layers.",
    ),
    ModelSpec(
        name="Jamba-1.5-Large", hf_id="ai21labs/AI21-Jamba-1.5-Large", source=_hf("ai21labs/AI21-Jamba-1.5-Large"),
        published_total=398e9, published_source="Jamba-1.5 paper (arXiv:2408.12570): 398B total, 94B active",
        hidden=8192, vocab=65536, tied_embeddings=False, max_context=262144,
        attention=GQA(heads=64, kv_heads=8, head_dim=128),
        # attn_layer_period 8 / offset 4; expert_layer_period 2 / offset 1
        layers=_decoder(72, moe_at=lambda i: i % 2 == 1, attn_at=lambda i: i % 8 == 4),
        moe=MoE(experts=16, top_k=2, intermediate=24576),
        dense_intermediate=24576,
        mamba=Mamba(d_state=16, d_conv=4, expand=2, dt_rank=512),
        notes="Hybrid: 9 attention layers hold KV; 63 Mamba layers hold a fixed state per sequence.",
    ),
    ModelSpec(
        name="Qwen1.5-MoE-A2.7B", hf_id="Qwen/Qwen1.5-MoE-A2.7B", source=_hf("Qwen/Qwen1.5-MoE-A2.7B"),
        published_total=14.3e9, published_source="Qwen blog (Qwen1.5-MoE): 14.3B total, 2.7B active",
        hidden=2048, vocab=151936, tied_embeddings=False, max_context=8192,
        attention=GQA(heads=16, kv_heads=16, head_dim=128, qkv_bias=True),
        layers=_decoder(24),
        moe=MoE(experts=60, top_k=4, intermediate=1408, shared_intermediate=5632, shared_gate=True),
    ),
    ModelSpec(
        name="Qwen2-57B-A14B", hf_id="Qwen/Qwen2-57B-A14B", source=_hf("Qwen/Qwen2-57B-A14B"),
        published_total=57.4e9, published_source="Qwen2 technical report (arXiv:2407.10671): 57B total, 14B active; model card 57.4B",
        hidden=3584, vocab=151936, tied_embeddings=False, max_context=32768,
        attention=GQA(heads=28, kv_heads=4, head_dim=128, qkv_bias=True),
        layers=_decoder(28),
        moe=MoE(experts=64, top_k=8, intermediate=2560, shared_intermediate=20480, shared_gate=True),
    ),
    ModelSpec(
        name="Qwen3-30B-A3B", hf_id="Qwen/Qwen3-30B-A3B", source=_hf("Qwen/Qwen3-30B-A3B"),
        published_total=30.5e9, published_source="model card: 30.5B total, 3.3B active",
        hidden=2048, vocab=151936, tied_embeddings=False, max_context=40960,
        attention=GQA(heads=32, kv_heads=4, head_dim=128, qk_norm="head"),
        layers=_decoder(48), moe=MoE(experts=128, top_k=8, intermediate=768),
    ),
    ModelSpec(
        name="Qwen3-235B-A22B", hf_id="Qwen/Qwen3-235B-A22B", source=_hf("Qwen/Qwen3-235B-A22B"),
        published_total=235e9, published_source="model card: 235B total, 22B active",
        hidden=4096, vocab=151936, tied_embeddings=False, max_context=40960,
        attention=GQA(heads=64, kv_heads=4, head_dim=128, qk_norm="head"),
        layers=_decoder(94), moe=MoE(experts=128, top_k=8, intermediate=1536),
    ),
    ModelSpec(
        name="Phi-3.5-MoE", hf_id="microsoft/Phi-3.5-MoE-instruct", source=_hf("microsoft/Phi-3.5-MoE-instruct"),
        published_total=41.9e9, published_source="model card: 16x3.8B, 41.9B total, 6.6B active",
        hidden=4096, vocab=32064, tied_embeddings=False, max_context=131072,
        attention=GQA(heads=32, kv_heads=8, head_dim=128, qkv_bias=True, o_bias=True),
        layers=_decoder(32), moe=MoE(experts=16, top_k=2, intermediate=6400),
        norm="ln", lm_head_bias=True,
    ),
    ModelSpec(
        name="GRIN-MoE", hf_id="microsoft/GRIN-MoE", source=_hf("microsoft/GRIN-MoE"),
        published_total=41.9e9, published_source="model card: 16x3.8B, 41.9B total, 6.6B active",
        hidden=4096, vocab=32064, tied_embeddings=False, max_context=4096,
        attention=GQA(heads=32, kv_heads=8, head_dim=128, qkv_bias=True, o_bias=True),
        layers=_decoder(32), moe=MoE(experts=16, top_k=2, intermediate=6400),
        norm="ln", lm_head_bias=True,
        notes="Same architecture as Phi-3.5-MoE, trained with SparseMixer-v2.",
    ),
    ModelSpec(
        name="JetMoE-8B", hf_id="jetmoe/jetmoe-8b", source=_hf("jetmoe/jetmoe-8b"),
        published_total=8.0e9, published_source="model card / JetMoE report (arXiv:2404.07413): '8B parameters in total' (rounded)",
        hidden=2048, vocab=32000, tied_embeddings=True, max_context=4096,
        attention=MoA(experts=8, top_k=2, kv_heads=16, head_dim=128),
        layers=_decoder(24), moe=MoE(experts=8, top_k=2, intermediate=5632),
        mlp_bias=True,
        notes="Attention is itself a mixture of 8 head-experts (MoA); Prophet pages only the MLP experts.",
    ),
]

MODELS: dict[str, ModelSpec] = {m.name: m for m in _MODELS}

# Seed spellings and common aliases -> catalogue name (lower-case keys).
_ALIASES = {
    "olmoe": "OLMoE-1B-7B", "olmoe-1b-7b-0924": "OLMoE-1B-7B", "mixtral": "Mixtral-8x7B",
    "deepseek-moe": "DeepSeek-MoE-16B", "deepseek-moe-16b-base": "DeepSeek-MoE-16B",
    "dbrx-132b": "DBRX", "grok": "Grok-1", "grok-1-314b": "Grok-1", "snowflake-arctic-480b": "Arctic",
    "snowflake-arctic": "Arctic", "switch-base": "Switch-Base-128", "switch-large": "Switch-Large-128",
    "switch-xxl": "Switch-XXL-128", "jamba": "Jamba-1.5-Large", "qwen1.5-moe": "Qwen1.5-MoE-A2.7B",
    "qwen2-moe-57b": "Qwen2-57B-A14B", "qwen2-57b": "Qwen2-57B-A14B", "qwen3-235b": "Qwen3-235B-A22B",
    "qwen3-30b": "Qwen3-30B-A3B", "phi-3.5-moe-instruct": "Phi-3.5-MoE", "jetmoe": "JetMoE-8B",
    "kimi-k2-instruct": "Kimi-K2", "glm-4.5-air": "GLM-4.5-Air", "gpt-oss": "gpt-oss-120b", "deepseek-v3-671b": "DeepSeek-V3", "deepseek-v2-236b": "DeepSeek-V2",
    "qwen3-next": "Qwen3-Next-80B-A3B", "llama-4-scout": "Llama-4-Scout", "llama-4-scout-17b-16e": "Llama-4-Scout",
}
for _m in _MODELS:
    _ALIASES[_m.name.lower()] = _m.name
    _ALIASES[_m.hf_id.lower()] = _m.name
    _ALIASES[_m.hf_id.split("/")[1].lower()] = _m.name


def get_model(name: str) -> ModelSpec:
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


# ----------------------------------------------------------------------------------------------
# GPUs
# ----------------------------------------------------------------------------------------------

GiB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int  # as the CUDA driver reports total memory where measured, else nominal
    memory_source: str
    hbm_gbps: float  # vendor peak memory bandwidth, GB/s (for context in reports)
    aliases: tuple[str, ...] = field(default=())
    bf16_tflops: float = 0.0  # vendor peak dense 16-bit tensor TFLOP/s (fp16 on the V100; fp32 accumulate)


_GPUS = [
    GPUSpec("V100-32GB", 32 * GiB, "nominal 32 GiB HBM2 (NVIDIA datasheet)", 900, ("v100",), 125.0),
    GPUSpec("A100-40GB", 40 * GiB, "nominal 40 GiB HBM2 (NVIDIA datasheet)", 1555, ("a100-40",), 312.0),
    GPUSpec("A100-80GB", 80 * GiB, "nominal 80 GiB HBM2e (NVIDIA datasheet)", 2039, ("a100", "a100-80"), 312.0),
    GPUSpec("H100-80GB", 80 * GiB, "nominal 80 GiB HBM3 (NVIDIA datasheet, SXM)", 3350, ("h100",), 989.4),
    GPUSpec("H200-141GB", 141 * 10**9, "nominal 141 GB HBM3e (NVIDIA datasheet)", 4800, ("h200",), 989.4),
    GPUSpec("L40S-48GB", 48 * GiB, "nominal 48 GiB GDDR6 (NVIDIA datasheet)", 864, ("l40s",), 362.0),
    GPUSpec("RTX4090-24GB", 24 * GiB, "nominal 24 GiB GDDR6X (NVIDIA datasheet)", 1008, ("4090", "rtx4090", "rtx-4090-24gb"),
            165.2),
]
GPUS: dict[str, GPUSpec] = {g.name: g for g in _GPUS}


def get_gpu(name: str) -> GPUSpec:
    key = name.strip().lower()
    for g in _GPUS:
        if key == g.name.lower() or key in g.aliases:
            return g
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
