"""The attention core of layers with attention sinks and/or a sliding window (gpt-oss).

`Attention` hands these to its core as keyword-only extras, `core(q, k, v, positions, sinks=...,
window=...)`, so the Ulysses core that `parallelize()` swaps in receives them too. Locally the math is
`mop.ops.attention_variants.variant_attention` (fused SDPA calls, plain autograd: a checkpointed block
recomputes it like any other op); without extras this is the ordinary core.
"""

from __future__ import annotations

import torch

from mop.models.layers import AttentionCore
from mop.ops.attention_variants import variant_attention


class VariantAttentionCore(AttentionCore):
    """`AttentionCore` that also takes `sinks` [Hq] (learned logits) and `window` (tokens, 0: none)."""

    def forward(self, q_BHSD, k_BHSD, v_BHSD, positions_BS, *, sinks: torch.Tensor | None = None, window: int = 0):
        if sinks is None and not window:
            return super().forward(q_BHSD, k_BHSD, v_BHSD, positions_BS)
        return variant_attention(q_BHSD, k_BHSD, v_BHSD, positions_BS, sinks=sinks, window=window)
