"""Named model shapes: the CPU default `tiny` and the real shapes the benchmarks use."""

from __future__ import annotations

from dataclasses import replace

from mop.models.config import ModelConfig



def _mla(name: str, **fields) -> ModelConfig:
    """DeepSeek-V3 / Kimi-K2 family: MLA (q LoRA 1536, KV latent 512, RoPE 64 + nope 128, v 128), sigmoid
    router with selection bias, one shared expert, H 7168, experts of width 2048, top-8, YaRN."""
    if "rope_factor" in fields:
        fields.update(rope_scaling="yarn", rope_original_max_len=4096, rope_mscale=1.0, rope_mscale_all_dim=1.0)
    return ModelConfig(shape=name, dim=7168, n_kv_heads=fields["n_heads"], head_dim=192, qk_norm=False,
                       attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128,
                       rope_interleave=True, top_k=8, expert_dim=2048, n_shared_experts=1, score_func="sigmoid",
                       norm_topk=True, expert_bias=True, dense_dim=18432, **fields)


def _gpt_oss(name: str, **fields) -> ModelConfig:
    """gpt-oss family: GQA 64/8 x 64 with biases and sinks, windows of 128 on every other layer, YaRN x32,
    experts of width 2880 top-4 with biases and the clamped SwiGLU."""
    return ModelConfig(shape=name, vocab_size=201088, dim=2880, n_heads=64, n_kv_heads=8, head_dim=64, qk_norm=False,
                       attn_bias=True, rope_theta=150000.0, rope_scaling="yarn", rope_factor=32.0,
                       rope_original_max_len=4096, rope_truncate=False, max_seq_len=131072, norm_eps=1e-5,
                       attn_sinks=True, sliding_window=128, top_k=4, expert_dim=2880, norm_topk=True, moe_bias=True,
                       swiglu_limit=7.0, **fields)


SHAPES: dict[str, ModelConfig] = {
    # Trains on the bundled byte-level corpus on CPU in about a minute.
    "tiny": ModelConfig(shape="tiny", vocab_size=258, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                        n_experts=8, top_k=2, expert_dim=128, n_shared_experts=1, n_dense_layers=1, dense_dim=256,
                        aux_loss_coef=0.01, rope_theta=10000.0),
    # Smallest shape used by unit tests (fast in multi-process CPU tests).
    "debug": ModelConfig(shape="debug", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                         n_experts=8, top_k=2, expert_dim=16, n_dense_layers=0),
    # `debug` with the DeepSeek-V3 / Kimi-K2 features: MLA (v head dim != q/k), YaRN with mscale,
    # group-limited sigmoid routing, a shared expert, a dense first layer.
    "debug-mla": ModelConfig(shape="debug-mla", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=4,
                             head_dim=12, qk_norm=False, attention="mla", q_lora_rank=16, kv_lora_rank=16,
                             qk_rope_head_dim=4, v_head_dim=8, rope_interleave=True, rope_scaling="yarn",
                             rope_factor=4.0, rope_original_max_len=16, rope_mscale=1.0, rope_mscale_all_dim=0.8,
                             n_experts=8, top_k=2, expert_dim=16, n_shared_experts=1, score_func="sigmoid",
                             route_scale=2.5, expert_bias=True, n_groups=4, topk_groups=2, n_dense_layers=1,
                             dense_dim=32),
    # `debug` with gpt-oss attention: sinks, a window of 5 on even layers, biases, YaRN (plain
    # SwiGLU experts: the expert-parallel kernels do not take gpt-oss' biased, clamped experts yet).
    "debug-gpt-oss": ModelConfig(shape="debug-gpt-oss", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 head_dim=8, qk_norm=False, attn_bias=True, attn_sinks=True, sliding_window=5,
                                 rope_scaling="yarn", rope_factor=8.0, rope_original_max_len=16, n_experts=8,
                                 top_k=2, expert_dim=16),
    # Qwen3-30B-A3B (published: 30.5B total, 3.3B active).
    "qwen3-30b-a3b": ModelConfig(shape="qwen3-30b-a3b", vocab_size=151936, dim=2048, n_layers=48, n_heads=32,
                                 n_kv_heads=4, head_dim=128, qk_norm=True, rope_theta=1e6, norm_eps=1e-6,
                                 n_experts=128, top_k=8, expert_dim=768, norm_topk=True, aux_loss_coef=0.001),
    # Qwen3-235B-A22B (published: 235B total, 22B active).
    "qwen3-235b-a22b": ModelConfig(shape="qwen3-235b-a22b", vocab_size=151936, dim=4096, n_layers=94, n_heads=64,
                                   n_kv_heads=4, head_dim=128, qk_norm=True, rope_theta=1e6, n_experts=128, top_k=8,
                                   expert_dim=1536, norm_topk=True, aux_loss_coef=0.001),
    # DeepSeek-V3 widths with GQA in place of MLA (so totals differ from the published 671B).
    "deepseek-v3-gqa": ModelConfig(shape="deepseek-v3-gqa", vocab_size=129280, dim=7168, n_layers=61, n_heads=128,
                                   n_kv_heads=8, head_dim=128, qk_norm=False, rope_theta=10000.0, n_experts=256,
                                   top_k=8, expert_dim=2048, n_shared_experts=1, score_func="sigmoid",
                                   norm_topk=True, route_scale=2.5, expert_bias=True, n_dense_layers=3,
                                   dense_dim=18432),
    # A few layers of Kimi-K2 widths (H 7168, 384 experts top-8, width 2048, 64 heads, V ~160K-200K).
    "kimi-k2-slice": ModelConfig(shape="kimi-k2-slice", vocab_size=163840, dim=7168, n_layers=4, n_heads=64,
                                 n_kv_heads=8, head_dim=128, qk_norm=False, rope_theta=50000.0, n_experts=384,
                                 top_k=8, expert_dim=2048, n_shared_experts=1, score_func="sigmoid", norm_topk=True,
                                 route_scale=2.827, expert_bias=True, n_dense_layers=1, dense_dim=18432),
    # gpt-oss-20b (published: 20.91B total, 3.61B active without the input embedding).
    "gpt-oss-20b": _gpt_oss("gpt-oss-20b", n_layers=24, n_experts=32),
    # gpt-oss-120b (published: 116.83B total, 5.13B active without the input embedding).
    "gpt-oss-120b": _gpt_oss("gpt-oss-120b", n_layers=36, n_experts=128),
    # DeepSeek-V3 (published: 671B without the 14B multi-token-prediction module, 37B active).
    "deepseek-v3": _mla("deepseek-v3", vocab_size=129280, n_layers=61, n_heads=128, rope_theta=10000.0,
                        n_experts=256, route_scale=2.5, n_groups=8, topk_groups=4, n_dense_layers=3, rope_factor=40.0,
                        max_seq_len=163840),
    # Kimi-K2 (1.026T total, 32.9B active by its config: transformers counts the same; the model card
    # rounds to "1T total, 32B active").
    "kimi-k2": _mla("kimi-k2", vocab_size=163840, n_layers=61, n_heads=64, rope_theta=50000.0, n_experts=384,
                    route_scale=2.827, n_dense_layers=1, rope_factor=32.0, rope_beta_fast=1.0, max_seq_len=131072),
    # The MoP paper's scales (MOP.md section 4): Kimi-K2-like (MLA with 64 heads, H 7168, 384 experts
    # top-8 of width 2048, one dense layer first) with V ~200K; layer counts are those whose totals
    # come closest to the nominal sizes (122.8B, 600.4B, 992.8B).
    "mop-120b": _mla("mop-120b", vocab_size=200064, n_layers=8, n_heads=64, rope_theta=50000.0, n_experts=384,
                     route_scale=2.827, n_dense_layers=1),
    "mop-600b": _mla("mop-600b", vocab_size=200064, n_layers=36, n_heads=64, rope_theta=50000.0, n_experts=384,
                     route_scale=2.827, n_dense_layers=1),
    "mop-1t": _mla("mop-1t", vocab_size=200064, n_layers=59, n_heads=64, rope_theta=50000.0, n_experts=384,
                   route_scale=2.827, n_dense_layers=1),
}


def get_shape(name: str, **overrides) -> ModelConfig:
    """A copy of the named shape with `overrides` applied (validated). (`hf:PATH` shapes are read by
    `mop.config.resolve_shape`, which knows the Hugging Face adapters; models import nothing above them.)"""
    if name not in SHAPES:
        raise ValueError(f"model.shape: unknown shape {name!r}; known shapes: {sorted(SHAPES)}, or hf:PATH")
    return replace(SHAPES[name], **overrides)
