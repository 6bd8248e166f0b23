"""MLA and the family options: validation messages, the padded-v path Ulysses takes, the position check."""

from __future__ import annotations

import pytest
import torch

from mop.models.mla import MultiHeadLatentAttention
from mop.models.shapes import get_shape
from mop.ops.attention import causal_attention


@pytest.mark.parametrize("overrides,needle", [
    (dict(attention="mla", n_kv_heads=2), "model.n_kv_heads: MLA computes one key/value head per query head"),
    (dict(attention="mla", n_kv_heads=4, kv_lora_rank=0), "model.kv_lora_rank: must be >= 1"),
    (dict(attention="mla", n_kv_heads=4, kv_lora_rank=8, qk_rope_head_dim=3), "model.qk_rope_head_dim"),
    (dict(attention="latent"), "model.attention: 'latent' is not one of"),
    (dict(n_groups=3), "model.n_groups: must divide n_experts=8"),
    (dict(n_groups=4, topk_groups=5), "model.topk_groups"),
    (dict(rope_scaling="yarn"), "YaRN needs rope_factor > 0 and rope_original_max_len >= 1"),
    (dict(sliding_window_layers="odd"), "model.sliding_window_layers"),
])
def test_family_options_are_validated(overrides, needle):
    with pytest.raises(ValueError) as e:
        get_shape("debug", **overrides)
    assert needle in str(e.value)


class _PlainCore(torch.nn.Module):
    """A core that is not the local AttentionCore (as Ulysses is not): MLA then pads v."""

    def forward(self, q, k, v, positions):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1]  # equal head dims, as Ulysses' exchange needs
        return causal_attention(q, k, v, positions)


def test_padded_v_path_equals_the_local_path():
    """v zero-padded to the q/k head dim (Ulysses' path) gives the same output and gradients as dv != dqk."""
    cfg = get_shape("debug-mla")
    torch.manual_seed(0)
    local = MultiHeadLatentAttention(cfg)
    for p in local.parameters():
        torch.nn.init.normal_(p, std=0.3)
    padded = MultiHeadLatentAttention(cfg)
    padded.load_state_dict(local.state_dict())
    padded.core = _PlainCore()
    x = torch.randn(2, 24, cfg.dim)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    a, b = local(x, pos), padded(x, pos)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), q in zip(local.named_parameters(), padded.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_positions_past_max_seq_len_warn_once():
    from mop.models.transformer import Transformer

    model = Transformer(get_shape("debug-mla", max_seq_len=16))
    model.init_weights(0)
    tokens = torch.zeros(1, 32, dtype=torch.long)
    with pytest.warns(UserWarning, match="past model.max_seq_len=16"):
        model(tokens, torch.arange(32)[None])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(tokens, torch.arange(32)[None])  # checked once: no second host sync, no second warning
