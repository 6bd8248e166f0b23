"""Named model shapes: the CPU default `tiny` and the real shapes the benchmarks use."""

from __future__ import annotations

from dataclasses import replace

from mop.models.config import ModelConfig

SHAPES: dict[str, ModelConfig] = {
    # Trains on the bundled byte-level corpus on CPU in about a minute.
    "tiny": ModelConfig(shape="tiny", vocab_size=258, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                        n_experts=8, top_k=2, expert_dim=128, n_shared_experts=1, n_dense_layers=1, dense_dim=256,
                        aux_loss_coef=0.01, rope_theta=10000.0),
    # Smallest shape used by unit tests (fast in multi-process CPU tests).
    "debug": ModelConfig(shape="debug", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                         n_experts=8, top_k=2, expert_dim=16, n_dense_layers=0),
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
    # gpt-oss-20b widths (published: 20.9B total, 3.6B active); attention sinks, sliding windows and
    # the clamped SwiGLU are not modelled, so totals differ slightly.
    "gpt-oss-20b": ModelConfig(shape="gpt-oss-20b", vocab_size=201088, dim=2880, n_layers=24, n_heads=64,
                               n_kv_heads=8, head_dim=64, qk_norm=False, attn_bias=True, rope_theta=150000.0,
                               n_experts=32, top_k=4, expert_dim=2880, norm_topk=True),
}


def get_shape(name: str, **overrides) -> ModelConfig:
    """A copy of the named shape with `overrides` applied (validated).

    `hf:PATH` takes the shape from a Hugging Face checkpoint directory's config.json (mop.hf).
    """
    if name.startswith("hf:"):
        from mop.hf import load_hf_config

        return replace(load_hf_config(name[3:]), shape=name, **overrides)
    if name not in SHAPES:
        raise ValueError(f"model.shape: unknown shape {name!r}; known shapes: {sorted(SHAPES)}, or hf:PATH")
    return replace(SHAPES[name], **overrides)
