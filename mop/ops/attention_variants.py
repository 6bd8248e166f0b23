"""Attention variants of gpt-oss: attention sinks and sliding windows, as fused SDPA calls.

**Sinks** (a learned logit s_h per head in the softmax denominator, whose value row is zero):

    out_i = sum_j exp(z_ij) v_j / (exp(s_h) + sum_j exp(z_ij)) = softmax-attention_i * sigmoid(lse_i - s_h).

SDPA does not return the log-sum-exp, so the sink enters as one extra key: q' = [q, s_h], every real
key k' = [k, 0], and the sink key is [0, ..., 0, 1/scale] with value 0, placed first. Then
q'.k' = q.k for real keys and s_h for the sink: exactly the softmax above, forward and backward
(autograd reaches s_h through q'), with no score matrix materialised where the kernel is fused. Putting s_h on the query side keeps one sink key per
KV head, so grouped-query K/V are not expanded. On CUDA the augmented head dim is padded with
zeros to a multiple of 8 (zeros change no dot product), and v too (zero columns, cut off after):
measured on an H200 (torch 2.11, cuDNN 9.19, scripts/sdpa_backends_mla.py), flash refuses q/k 72
with v 64 and the memory-efficient kernel runs it at 107 ms (32K tokens, 16 heads, fwd+bwd); with
v padded to 72, flash runs it at 43 ms (cuDNN does not take the lower-right mask).

**Sliding windows** (gpt-oss: 128 tokens; query i sees keys i-W+1 .. i of its own document). A
window is a mask, so it composes with every other mask by AND: document masking (each document is
its own call, positions restart at 0), the causal mask, and Ulysses' token slots (a piece of queries
whose first query is preceded by Lk - Lq keys: the window is taken in global token indices). Queries
run in blocks of `block` rows, each against only the keys its window can reach, so memory and work
are O(S x (block + W)) per head, never S^2.

Both take the lower-right-aligned convention of `mop.parallel.ulysses` (the last query sits on the
last key), which for Lq == Lk is ordinary causal attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from mop.ops.attention import SpansMemo, document_spans, reference_mask

_SPANS = SpansMemo()


def _with_sink_key(q, k, v, sinks_H, scale):
    """Append the sink coordinate to q/k and prepend the sink key (value 0); see the module docstring."""
    B, Hq, Lq, D = q.shape
    pad = 8 if q.is_cuda else 1  # fused CUDA kernels want head dims that are multiples of 8
    sink_col = sinks_H.to(q.dtype).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
    q = torch.cat([q, sink_col, q.new_zeros(B, Hq, Lq, pad - 1)], dim=-1)
    k = F.pad(k, (0, pad))
    sink_key = k.new_zeros(B, k.shape[1], 1, D + pad)
    sink_key[..., D] = 1.0 / scale
    k = torch.cat([sink_key, k], dim=2)
    if q.is_cuda:  # equal head dims: the flash kernel (see the module docstring); the output is cut back
        v = F.pad(v, (0, D + pad - v.shape[-1]))
    v = torch.cat([v.new_zeros(B, v.shape[1], 1, v.shape[-1]), v], dim=2)
    return q, k, v


def _sdpa(q, k, v, mask, scale):
    """SDPA with GQA (K/V expanded on CUDA, where not every kernel takes enable_gqa)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and q.is_cuda:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        rep = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=rep > 1)


def attention_piece(q_BHLD: torch.Tensor, k_BHKD: torch.Tensor, v_BHKD: torch.Tensor, *,
                    sinks_H: torch.Tensor | None = None, window: int = 0, scale: float | None = None,
                    block: int = 1024) -> torch.Tensor:
    """Causal attention of Lq queries over Lk >= Lq keys, the last query on the last key, with optional
    sinks [Hq] and window. Returns [B, Hq, Lq, Dv]."""
    Lq, Lk, D = q_BHLD.shape[2], k_BHKD.shape[2], q_BHLD.shape[-1]
    scale = D**-0.5 if scale is None else scale
    offset = Lk - Lq  # keys before the first query
    if not window or window >= Lk:
        if sinks_H is not None:
            q, k, v = _with_sink_key(q_BHLD, k_BHKD, v_BHKD, sinks_H, scale)
            return _sdpa(q, k, v, causal_lower_right(Lq, Lk + 1), scale)[..., :v_BHKD.shape[-1]]
        return _sdpa(q_BHLD, k_BHKD, v_BHKD, causal_lower_right(Lq, Lk), scale)  # a window longer than the keys
    outs = []
    for q0 in range(0, Lq, block):
        q1 = min(q0 + block, Lq)
        k0, k1 = max(0, offset + q0 - window + 1), offset + q1  # the keys these queries' windows reach
        qi = torch.arange(offset + q0, offset + q1, device=q_BHLD.device)[:, None]
        kj = torch.arange(k0, k1, device=q_BHLD.device)[None, :]
        mask = (kj <= qi) & (qi - kj < window)
        q, k, v = q_BHLD[:, :, q0:q1], k_BHKD[:, :, k0:k1], v_BHKD[:, :, k0:k1]
        if sinks_H is not None:
            q, k, v = _with_sink_key(q, k, v, sinks_H, scale)
            mask = torch.cat([mask.new_ones(q1 - q0, 1), mask], dim=1)  # every query sees the sink
        outs.append(_sdpa(q, k, v, mask, scale)[..., :v_BHKD.shape[-1]])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def variant_attention(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                      positions_BS: torch.Tensor | None = None, *, sinks: torch.Tensor | None = None,
                      window: int = 0, scale: float | None = None) -> torch.Tensor:
    """Causal, document-masked attention with sinks [Hq] and/or a sliding window (single device).

    Same contract as `mop.ops.attention.causal_attention`; each document is its own call."""
    spans = _SPANS.get(positions_BS, lambda: document_spans(positions_BS)) if positions_BS is not None else None
    if spans is None:
        return attention_piece(q_BHSD, k_BHSD, v_BHSD, sinks_H=sinks, window=window, scale=scale)
    rows = []
    for b, row_spans in enumerate(spans):
        parts = [attention_piece(q_BHSD[b:b + 1, :, s:e], k_BHSD[b:b + 1, :, s:e], v_BHSD[b:b + 1, :, s:e],
                                 sinks_H=sinks, window=window, scale=scale) for s, e in row_spans]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def reference_variant_attention(q_BHSD, k_BHSD, v_BHSD, positions_BS=None, *, sinks=None, window=0, scale=None):
    """Explicit masked softmax with the sink column (O(S^2) memory): the test oracle."""
    B, Hq, S, D = q_BHSD.shape
    rep = Hq // k_BHSD.shape[1]
    k, v = k_BHSD.repeat_interleave(rep, dim=1), v_BHSD.repeat_interleave(rep, dim=1)
    scores = (q_BHSD @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    mask = reference_mask(B, S, q_BHSD.device, positions_BS, window)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, Hq, 1, 1).expand(B, Hq, S, 1).to(scores.dtype)], dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., :S]
    return probs @ v
