"""Causal self-attention over packed sequences, with document masking, through fused SDPA.

Packed sequences carry per-document positions: a document starts wherever `positions == 0`.
Attention never crosses a document boundary. Instead of an S x S mask (which would forbid the
fused kernels and cost O(S^2) memory), each document runs as its own causal SDPA call on its
contiguous slice ("varlen by loop"); a row with a single document is one call. On CUDA the
cuDNN backend is preferred (about twice the flash backend on H200), then flash, then
memory-efficient; the math backend is the CPU path.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = None
    sdpa_kernel = None


def _backend_context(device: torch.device):
    if device.type != "cuda" or sdpa_kernel is None:
        return contextlib.nullcontext()
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # older torch without set_priority
        return sdpa_kernel(backends)


def document_spans(positions_BS: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) spans of documents; None when every row is one document.

    Host sync (`.tolist()` / `.any()`): attention kernels take Python slice bounds.
    """
    starts_BS = positions_BS == 0
    starts_BS[:, 0] = False
    if not bool(starts_BS.any()):  # host sync
        return None
    S = positions_BS.shape[1]
    spans = []
    for row in starts_BS:
        cuts = [0] + row.nonzero().flatten().tolist() + [S]  # host sync
        spans.append([(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a])
    return spans


class SpansMemo:
    """The value computed for the last `positions` tensor seen, reused while it is the same object.

    Every layer receives the same positions tensor of a micro-batch (and recomputation in backward
    passes it again), so its document spans (a host sync) are computed once per micro-batch instead
    of once per layer: each avoided sync lets the CPU keep queueing GPU work ahead.
    """

    def __init__(self):
        self._ref = None
        self._version = None
        self._key = None
        self._value = None

    def get(self, positions: torch.Tensor, compute, key=None):
        if (self._ref is not None and self._ref() is positions and positions._version == self._version
                and self._key == key):
            return self._value
        value = compute()
        self._ref, self._version, self._key, self._value = weakref.ref(positions), positions._version, key, value
        return value


_SPANS = SpansMemo()


def _sdpa_causal(q, k, v, scale):
    """q [B,Hq,S,D], k/v [B,Hkv,S,D] -> [B,Hq,S,D], causal, GQA by head groups."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        if q.device.type == "cuda":
            # The fused CUDA kernels do not all take enable_gqa; expanding K/V costs a copy of
            # this chunk's K/V only (Ulysses head-chunking keeps that small).
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def causal_attention(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    positions_BS: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention that does not cross document boundaries (documents start at position 0).

    Shapes: q [B, Hq, S, D]; k, v [B, Hkv, S, D] with Hq a multiple of Hkv. Returns [B, Hq, S, D].
    """
    spans = _SPANS.get(positions_BS, lambda: document_spans(positions_BS)) if positions_BS is not None else None
    with _backend_context(q_BHSD.device):
        if spans is None:
            return _sdpa_causal(q_BHSD, k_BHSD, v_BHSD, scale)
        rows = []
        for b, row_spans in enumerate(spans):
            parts = [
                _sdpa_causal(q_BHSD[b : b + 1, :, s:e], k_BHSD[b : b + 1, :, s:e], v_BHSD[b : b + 1, :, s:e], scale)
                for s, e in row_spans
            ]
            rows.append(torch.cat(parts, dim=2))
        return torch.cat(rows, dim=0)


def reference_attention(q_BHSD, k_BHSD, v_BHSD, positions_BS=None, scale=None) -> torch.Tensor:
    """Explicit masked softmax (O(S^2) memory): the test oracle for `causal_attention`."""
    B, Hq, S, D = q_BHSD.shape
    rep = Hq // k_BHSD.shape[1]
    k = k_BHSD.repeat_interleave(rep, dim=1)
    v = v_BHSD.repeat_interleave(rep, dim=1)
    scale = D**-0.5 if scale is None else scale
    scores = (q_BHSD @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~reference_mask(B, S, q_BHSD.device, positions_BS)[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def reference_mask(B: int, S: int, device, positions_BS=None, window: int = 0) -> torch.Tensor:
    """Explicit [B, S, S] mask of the test oracles: causal, within a document (documents start at
    position 0), and within `window` keys of the query when `window` > 0."""
    idx = torch.arange(S, device=device)
    mask = (idx[None, :] <= idx[:, None])[None].expand(B, S, S)
    if window:
        mask = mask & (idx[:, None] - idx[None, :] < window)
    if positions_BS is not None:
        starts = (positions_BS == 0).clone()
        starts[:, 0] = True
        doc_BS = torch.cumsum(starts.long(), dim=1)
        mask = mask & (doc_BS[:, :, None] == doc_BS[:, None, :])
    return mask
