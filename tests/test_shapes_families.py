"""The named shapes of the model families have their published sizes, counted on the meta device."""

from __future__ import annotations

import pytest
import torch
import transformers

from mop.models.shapes import get_shape
from mop.models.transformer import Transformer

# shape: (published total, published active without the input embedding table, relative tolerance)
PUBLISHED = {
    "deepseek-v3": (671e9, 37e9, 0.02),  # model card: 671B (+14B MTP, not modelled), 37B activated
    "kimi-k2": (1.026e12, 32e9, 0.02),  # by its config (= transformers' count below); card: "1T", "32B"
    "gpt-oss-120b": (116.83e9, 5.13e9, 0.002),  # model card table: 116.83B total, 5.13B active
    "gpt-oss-20b": (20.91e9, 3.61e9, 0.002),  # 20.91B total, 3.61B active
    "mop-120b": (120e9, None, 0.03),  # MOP.md section 4 scales
    "mop-600b": (600e9, None, 0.03),
    "mop-1t": (1000e9, None, 0.03),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_family_shapes_have_their_published_sizes(name):
    cfg = get_shape(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = cfg.param_counts()
    assert sum(p.numel() for p in model.parameters()) == counts["total"]  # the formula is the model
    total, active, tol = PUBLISHED[name]
    assert counts["total"] == pytest.approx(total, rel=tol)
    if active is not None:
        assert counts["active"] - counts["embedding"] == pytest.approx(active, rel=tol)


@pytest.mark.parametrize("name,hf_config", [
    ("deepseek-v3", transformers.DeepseekV3Config()),
    ("kimi-k2", transformers.DeepseekV3Config(vocab_size=163840, num_attention_heads=64, num_key_value_heads=64,
                                              n_routed_experts=384, n_group=1, topk_group=1, first_k_dense_replace=1)),
    ("gpt-oss-120b", transformers.GptOssConfig()),
])
def test_family_shapes_count_what_transformers_counts(name, hf_config):
    """The same architecture built by transformers on meta has exactly mop's parameter count."""
    model_cls = transformers.GptOssForCausalLM if name.startswith("gpt-oss") else transformers.DeepseekV3ForCausalLM
    with torch.device("meta"):
        reference = model_cls(hf_config)
    assert sum(p.numel() for p in reference.parameters()) == get_shape(name).param_counts()["total"]


def test_mla_and_window_flops():
    """MFU's attention term uses (Dqk + Dv) per head and caps windowed layers at the window."""
    mla = get_shape("deepseek-v3")
    no_attn = mla.flops_per_token(0)
    assert mla.flops_per_token(4096) - no_attn == pytest.approx(6 * 61 * 2048 * 128 * (192 + 128))
    oss = get_shape("gpt-oss-120b")
    full_layers = sum(1 for i in range(36) if not oss.layer_window(i))
    attn = oss.flops_per_token(4096) - oss.flops_per_token(0)
    assert attn == pytest.approx(6 * 64 * 128 * (full_layers * 2048 + (36 - full_layers) * 128))
