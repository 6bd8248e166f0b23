"""Attention over the D ranks of a sequence group: Ulysses, head-chunked, past the head count.

Layout in (fixed by the data loader): group rank i holds tokens [i*N, (i+1)*N) of every row, S = D*N,
at full width (all heads). Attention needs, for each query, every earlier key of its document.

Design (the MoP paper, §3.2). D is factored as U x R. Group rank i = r*U + u is "head slot" u and
"token slot" r:

* Heads (Ulysses over U): head slot u owns 1/U of the query heads and the KV heads those need. When
  U exceeds the KV-head count, each KV head is sent to the U/Hkv head slots that share it (the
  minimum replication: one KV head per rank).
* Tokens (all-gather-KV over R, when U alone cannot divide the heads): the R ranks of one head slot
  split its queries and each receives the keys/values of ALL earlier tokens. The query split is
  zig-zag for causal load balance: S is cut into 2R equal chunks and token slot r takes chunks r and
  2R-1-r, so every slot scores the same number of (query, key) pairs. The loader's placement is
  contiguous, so the permutation happens inside this exchange, at no extra cost. When 2R does not
  divide S the slots are contiguous (still exact, less balanced).

ONE `all_to_all_single` over the D-group moves everything: Q to (its head slot, its token slot),
K/V to its head slot at every token slot that needs them (keys [0, last query of the slot]). With
R = 1 this is exactly Ulysses; with U = 1 it is all-gather-KV context parallelism. A second
all-to-all (the transpose) brings the output back to the token owners.

Memory and passes: heads run in `head_chunks` chunks, so the exchange buffers are live one chunk
at a time. `UlyssesKernel` plugs into `mop.models.attention_core.AttentionFunction`: when a
backward will follow, each chunk's exchanged q, k, v, output and log-sum-exp are kept (as many
elements as the local q, k, v plus the output: the layout changes, not the size), and backward
moves only the output gradient in and dq, dk, dv out, without recomputing attention or
re-exchanging q, k, v. In a fully checkpointed block's forward nothing is kept; its recompute
pass keeps the state for the backward that follows right after. On CUDA,
the all-to-all of chunk c+1 is issued asynchronously before chunk c's attention (NCCL runs it on its
own stream; `work.wait()` only orders streams), so communication overlaps compute with no host
sync. Document masks: positions are all-gathered (S ints per row) and turned into document spans
once per call (one host sync, as in `causal_attention`); every (query range, document) piece is a
fused SDPA call: aligned pieces through `causal_attention`, pieces whose queries start after their
first key through lower-right-aligned causal SDPA (no mask is materialised on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from mop.models.attention_core import AttentionFunction, AttentionSlots, attention_graph, state_backward
from mop.ops.attention import SpansMemo, causal_attention, document_spans
from mop.ops.attention_variants import variant_attention
from mop.parallel.layout import divisors

Ranges = list[tuple[int, int]]


# ---------------------------------------------------------------------------------------------
# Factorisation D = U x R and validation (pure functions, testable without process groups)
# ---------------------------------------------------------------------------------------------
def _ulysses_splits_heads(u: int, n_heads: int, n_kv_heads: int) -> bool:
    """Whether U ranks can split the heads: U | Hq, and U | Hkv or Hkv | U (KV heads replicated)."""
    return n_heads % u == 0 and (n_kv_heads % u == 0 or u % n_kv_heads == 0)


def _chunk_valid(u: int, n_heads: int, n_kv_heads: int, chunks: int) -> bool:
    """Whether each rank's Hq/U query heads split into `chunks` chunks that each map to whole KV heads."""
    per_rank = n_heads // u
    if per_rank % chunks:
        return False
    per_chunk, group = per_rank // chunks, n_heads // n_kv_heads
    return per_chunk % group == 0 or group % per_chunk == 0


def ulysses_factorization(
    seq_degree: int, n_heads: int, n_kv_heads: int, head_chunks: int = 1, ring_degree: int | None = None
) -> tuple[int, int]:
    """Validate the configuration and return (U, R): Ulysses degree over heads, ring degree over tokens.

    `ring_degree=None` picks the smallest R for which U = D/R splits the heads (R = 1: pure Ulysses).
    Raises ValueError naming the option and the values that would work.
    """
    D = seq_degree
    if D < 1:
        raise ValueError(f"seq group size D must be >= 1, got {D}")
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(
            f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads} (GQA groups)"
        )
    if head_chunks < 1:
        raise ValueError(f"head_chunks={head_chunks} must be >= 1")
    if ring_degree is None:
        ring_degree = next(r for r in divisors(D) if _ulysses_splits_heads(D // r, n_heads, n_kv_heads))
    else:
        if ring_degree < 1 or D % ring_degree:
            raise ValueError(f"ring_degree={ring_degree} must divide the seq group size D={D}; valid: {divisors(D)}")
        U = D // ring_degree
        if not _ulysses_splits_heads(U, n_heads, n_kv_heads):
            good_r = [r for r in divisors(D) if _ulysses_splits_heads(D // r, n_heads, n_kv_heads)]
            good_u = [u for u in divisors(n_heads) if _ulysses_splits_heads(u, n_heads, n_kv_heads)]
            raise ValueError(
                f"Ulysses cannot split n_heads={n_heads}, n_kv_heads={n_kv_heads} over U=D/ring_degree="
                f"{D}/{ring_degree}={U} ranks: U must divide n_heads and divide or be a multiple of "
                f"n_kv_heads. Ulysses degrees that work: {good_u}; for D={D} use ring_degree in {good_r}, "
                f"or ring_degree=None to choose automatically"
            )
    U = D // ring_degree
    if not _chunk_valid(U, n_heads, n_kv_heads, head_chunks):
        good = [c for c in divisors(n_heads // U) if _chunk_valid(U, n_heads, n_kv_heads, c)]
        raise ValueError(
            f"head_chunks={head_chunks} must divide the per-rank query heads n_heads/U={n_heads}/{U}="
            f"{n_heads // U} into chunks of whole GQA groups (or of parts of one group); valid: {good}"
        )
    return U, ring_degree


# ---------------------------------------------------------------------------------------------
# Token routing: which token ranges go where (static for given D, U, R, N)
# ---------------------------------------------------------------------------------------------
def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


def query_slots(seq_len: int, ring_degree: int) -> list[Ranges]:
    """Global query ranges of each token slot: zig-zag (chunks r and 2R-1-r of 2R) when 2R | S."""
    R = ring_degree
    if R == 1:
        return [[(0, seq_len)]]
    if seq_len % (2 * R):
        c = seq_len // R  # R | S always (S = D*N and R | D)
        return [[(r * c, (r + 1) * c)] for r in range(R)]
    c = seq_len // (2 * R)
    return [_merge([(r * c, (r + 1) * c), ((2 * R - 1 - r) * c, (2 * R - r) * c)]) for r in range(R)]


def _intersect(buffer_ranges: Ranges, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Pieces (global_start, global_end, offset_in_buffer) of a buffer's ranges inside [lo, hi)."""
    out, off = [], 0
    for a, b in buffer_ranges:
        s, e = max(a, lo), min(b, hi)
        if e > s:
            out.append((s, e, off + s - a))
        off += b - a
    return out


@dataclass(frozen=True)
class _TokenPlan:
    """One rank's side of a token exchange: its local ranges sent to each rank, and where each
    source's tokens land in its own receive buffer (both in increasing token order)."""

    send: list[Ranges]  # [dest] -> local (start, end) token ranges of this rank
    recv: list[Ranges]  # [source] -> (start, end) offsets in this rank's buffer
    length: int  # tokens in this rank's buffer

    @staticmethod
    def build(buffers: list[Ranges], me: int, n_local: int) -> "_TokenPlan":
        D = len(buffers)
        send = [[(s - me * n_local, e - me * n_local) for s, e, _ in _intersect(buffers[j], me * n_local, (me + 1) * n_local)]
                for j in range(D)]
        recv = [[(o, o + e - s) for s, e, o in _intersect(buffers[me], i * n_local, (i + 1) * n_local)] for i in range(D)]
        return _TokenPlan(send, recv, sum(b - a for a, b in buffers[me]))


@dataclass(frozen=True)
class _Route:
    """A tensor's exchange: head range (start, count) per destination rank plus the token plan."""

    heads: list[tuple[int, int]]
    plan: _TokenPlan


class _Pending:
    """An all-to-all in flight; `finish()` waits (a stream wait on CUDA, no host sync) and unpacks."""

    def __init__(self, work, send_1d: torch.Tensor, recv_1d: torch.Tensor, unpack):
        # Holding send_1d until the wait keeps the allocator from handing its memory to the compute
        # stream while the communication stream may still read it.
        self.work, self.send_1d, self.recv_1d, self.unpack = work, send_1d, recv_1d, unpack

    def finish(self):
        if self.work is not None:
            self.work.wait()
        self.send_1d = None
        return self.unpack(self.recv_1d)


def _exchange(send_pieces: list[list[torch.Tensor]], recv_counts: list[int], like: torch.Tensor, group, unpack) -> _Pending:
    """Start one all_to_all_single of per-destination piece lists; async on CUDA (overlap), sync on CPU."""
    send_counts = [sum(p.numel() for p in pieces) for pieces in send_pieces]
    flat = [p.reshape(-1) for pieces in send_pieces for p in pieces]
    send_1d = torch.cat(flat) if flat else like.new_empty(0)
    recv_1d = like.new_empty(sum(recv_counts))
    work = dist.all_to_all_single(recv_1d, send_1d, recv_counts, send_counts, group=group, async_op=like.is_cuda)
    return _Pending(work if like.is_cuda else None, send_1d, recv_1d, unpack)


def gather_heads(items: list[tuple[torch.Tensor, _Route]], me: int, group) -> _Pending:
    """Start moving each [B, H, N, Dh] tensor to its routed (head range, token buffer) layout.

    `finish()` returns, per item, this rank's buffer [B, h, L, Dh] (tokens in increasing order)."""
    D = len(items[0][1].heads)
    B, Dh = items[0][0].shape[0], items[0][0].shape[-1]
    send = [[x[:, h0:h0 + nh, s:e] for x, rt in items for h0, nh in [rt.heads[j]] for s, e in rt.plan.send[j]]
            for j in range(D)]
    recv_counts = [sum(B * rt.heads[me][1] * (e - s) * Dh for _, rt in items for s, e in rt.plan.recv[i]) for i in range(D)]

    def unpack(recv_1d):
        outs = [recv_1d.new_empty(B, rt.heads[me][1], rt.plan.length, Dh) for _, rt in items]
        ptr = 0
        for i in range(D):
            for out, (_, rt) in zip(outs, items):
                for s, e in rt.plan.recv[i]:
                    n = B * out.shape[1] * (e - s) * Dh
                    out[:, :, s:e] = recv_1d[ptr:ptr + n].view(B, out.shape[1], e - s, Dh)
                    ptr += n
        return outs

    return _exchange(send, recv_counts, items[0][0], group, unpack)


def scatter_heads(items: list[tuple[torch.Tensor, _Route, torch.Tensor, bool]], me: int, group) -> _Pending:
    """Start the transpose of `gather_heads`: send each buffer [B, h, L, Dh] back to the token owners.

    Items are (buffer, route, target [B, H, N, Dh], accumulate). `finish()` writes into the targets,
    adding when `accumulate` (K/V gradients: several ranks hold copies of the same keys)."""
    D = len(items[0][1].heads)
    B, Dh = items[0][0].shape[0], items[0][0].shape[-1]
    send = [[y[:, :, s:e] for y, rt, _, _ in items for s, e in rt.plan.recv[i]] for i in range(D)]
    recv_counts = [sum(B * rt.heads[j][1] * (e - s) * Dh for _, rt, _, _ in items for s, e in rt.plan.send[j]) for j in range(D)]

    def unpack(recv_1d):
        ptr = 0
        for j in range(D):
            for _, rt, target, accumulate in items:
                h0, nh = rt.heads[j]
                for s, e in rt.plan.send[j]:
                    n = B * nh * (e - s) * Dh
                    piece = recv_1d[ptr:ptr + n].view(B, nh, e - s, Dh)
                    if accumulate:
                        target[:, h0:h0 + nh, s:e] += piece
                    else:
                        target[:, h0:h0 + nh, s:e] = piece
                    ptr += n

    return _exchange(send, recv_counts, items[0][0], group, unpack)


# ---------------------------------------------------------------------------------------------
# Attention of one token slot's queries against keys [0, end)
# ---------------------------------------------------------------------------------------------
def _causal_piece(q_BHLD: torch.Tensor, k_BHKD: torch.Tensor, v_BHKD: torch.Tensor) -> torch.Tensor:
    """Causal attention with the LAST query aligned to the LAST key (queries start after key 0)."""
    Lq, Lk = q_BHLD.shape[2], k_BHKD.shape[2]
    if Lq == Lk:
        return causal_attention(q_BHLD, k_BHKD, v_BHKD)
    rep = q_BHLD.shape[1] // k_BHKD.shape[1]
    if rep > 1:  # this chunk's K/V only; the lower-right kernels do not all take enable_gqa
        k_BHKD, v_BHKD = k_BHKD.repeat_interleave(rep, dim=1), v_BHKD.repeat_interleave(rep, dim=1)
    # On CUDA this dispatches to the flash / memory-efficient kernels with bottom-right causal
    # alignment; only the CPU math path materialises the (Lq, Lk) mask.
    return F.scaled_dot_product_attention(q_BHLD, k_BHKD, v_BHKD, attn_mask=causal_lower_right(Lq, Lk))


def slot_attention(
    q_BHLD: torch.Tensor,
    k_BHKD: torch.Tensor,
    v_BHKD: torch.Tensor,
    slot: Ranges,
    spans: list[Ranges] | None,
    piece=_causal_piece,
) -> torch.Tensor:
    """Attention of a token slot's queries (global ranges `slot`, concatenated) over keys [0, K).

    `spans`: per row, the document [start, end) spans of the full sequence (None: one document).
    `piece(q, k, v)`: the attention of one lower-right-aligned piece (sinks and windows plug in here:
    mop.parallel.ulysses_variants)."""
    offsets = [0]
    for a, b in slot:
        offsets.append(offsets[-1] + b - a)
    if spans is None:
        parts = [
            piece(q_BHLD[:, :, o:o + b - a], k_BHKD[:, :, :b], v_BHKD[:, :, :b])
            for (a, b), o in zip(slot, offsets)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    rows = []
    for row, row_spans in enumerate(spans):
        q, k, v = q_BHLD[row:row + 1], k_BHKD[row:row + 1], v_BHKD[row:row + 1]
        parts = []
        for (a, b), o in zip(slot, offsets):
            for s, e in row_spans:
                qs, qe = max(s, a), min(e, b)
                if qe > qs:  # document [s, e) has queries in [a, b): its keys are [s, qe)
                    parts.append(piece(q[:, :, o + qs - a:o + qe - a], k[:, :, s:qe], v[:, :, s:qe]))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


# ---------------------------------------------------------------------------------------------
# The head-chunked exchange + attention, forward and hand-written backward
# ---------------------------------------------------------------------------------------------
class _UlyssesPlan:
    """Static routing for one (D, U, R, head_chunks, N): per chunk, the Q and K/V routes."""

    def __init__(self, me: int, D: int, U: int, R: int, n_heads: int, n_kv_heads: int, chunks: int, n_local: int):
        S, group = D * n_local, n_heads // n_kv_heads
        slots = query_slots(S, R)
        self.slot = slots[me // U]
        q_plan = _TokenPlan.build([slots[j // U] for j in range(D)], me, n_local)
        kv_plan = _TokenPlan.build([[(0, slots[j // U][-1][1])] for j in range(D)], me, n_local)
        per_chunk = n_heads // U // chunks
        kv_per_chunk = max(1, per_chunk // group)
        self.q_routes, self.kv_routes = [], []
        for c in range(chunks):
            q0 = [(j % U) * (n_heads // U) + c * per_chunk for j in range(D)]
            self.q_routes.append(_Route([(h, per_chunk) for h in q0], q_plan))
            self.kv_routes.append(_Route([(h // group, kv_per_chunk) for h in q0], kv_plan))


class UlyssesKernel:
    """Head-chunked Ulysses / all-gather-KV attention, as an `AttentionFunction` kernel.

    `forward_with_state` keeps, per head chunk, the exchanged q, k, v and the chunk's attention graph
    (output and log-sum-exp): backward then moves only the output gradient in and dq, dk, dv out,
    and never recomputes attention. `forward` keeps nothing (a fully checkpointed block's forward
    pass; the recompute pass builds the state).
    """

    def __init__(self, plan: _UlyssesPlan, spans, me: int, group):
        self.plan, self.spans, self.me, self.group = plan, spans, me, group

    def _run(self, q_BHND, k_BHND, v_BHND, keep: bool):
        plan, me, group = self.plan, self.me, self.group
        out_BHND = torch.empty_like(q_BHND)
        states = []
        C = len(plan.q_routes)

        def start(c):
            return gather_heads([(q_BHND, plan.q_routes[c]), (k_BHND, plan.kv_routes[c]),
                                 (v_BHND, plan.kv_routes[c])], me, group)

        pending, returning = start(0), None
        for c in range(C):
            q, k, v = pending.finish()
            pending = start(c + 1) if c + 1 < C else None  # overlaps chunk c's attention on CUDA
            if keep:
                o, state = attention_graph(slot_attention, q, k, v, plan.slot, self.spans)
                states.append(state)
            else:
                o = slot_attention(q, k, v, plan.slot, self.spans)
            del q, k, v
            if returning is not None:
                returning.finish()
            returning = scatter_heads([(o, plan.q_routes[c], out_BHND, False)], me, group)
        returning.finish()
        return out_BHND, states

    def forward(self, q_BHND, k_BHND, v_BHND, positions=None):
        return self._run(q_BHND, k_BHND, v_BHND, keep=False)[0]

    def forward_with_state(self, q_BHND, k_BHND, v_BHND, positions=None):
        out, states = self._run(q_BHND, k_BHND, v_BHND, keep=True)
        shapes = (q_BHND.shape, k_BHND.shape, q_BHND.dtype, k_BHND.dtype)
        return out, (states, shapes)

    def backward(self, state, dout_BHND):
        states, (q_shape, kv_shape, q_dtype, kv_dtype) = state
        plan, me, group = self.plan, self.me, self.group
        dout_BHND = dout_BHND.to(q_dtype).contiguous()
        dq_BHND = dout_BHND.new_empty(q_shape)
        # K/V gradients sum over token slots and replicated heads: accumulate in fp32.
        dk_BHND = torch.zeros(kv_shape, dtype=torch.float32, device=dout_BHND.device)
        dv_BHND = torch.zeros(kv_shape, dtype=torch.float32, device=dout_BHND.device)
        C = len(plan.q_routes)

        def start(c):
            return gather_heads([(dout_BHND, plan.q_routes[c])], me, group)

        pending, returning = start(0), None
        for c in range(C):
            (do,) = pending.finish()
            pending = start(c + 1) if c + 1 < C else None
            dq, dk, dv = state_backward(states[c], do)
            states[c] = None  # free this chunk's graph now
            del do
            if returning is not None:
                returning.finish()
            returning = scatter_heads(
                [(dq, plan.q_routes[c], dq_BHND, False), (dk, plan.kv_routes[c], dk_BHND, True),
                 (dv, plan.kv_routes[c], dv_BHND, True)], me, group)
        returning.finish()
        return dq_BHND, dk_BHND.to(kv_dtype), dv_BHND.to(kv_dtype)


class UlyssesAttention(nn.Module):
    """Attention core over a sequence group: `forward(q, k, v, positions) -> out`, on local tokens.

    Args:
        seq_group: process group of the D ranks holding consecutive N-token chunks of the same rows.
        n_heads, n_kv_heads: query / key-value head counts (GQA when different).
        head_chunks: process each rank's heads in this many chunks (bounds the live full-sequence
            buffers to 1/head_chunks; overlaps the next chunk's all-to-all on CUDA).
        ring_degree: R in D = U x R (all-gather-KV over R ranks, Ulysses over U); None: the smallest
            R for which U splits the heads (R = 1, pure Ulysses, whenever possible).
        spans_memo: the document spans of the last positions tensor seen. Layers share one positions
            tensor per micro-batch, so the layers of one model share one memo (`parallelize` passes
            it): the positions are gathered and cut into documents (a host sync) once per
            micro-batch, not once per layer. None: a memo of this module's own.
    """

    def __init__(self, seq_group, n_heads: int, n_kv_heads: int, head_chunks: int = 1, ring_degree: int | None = None,
                 spans_memo: SpansMemo | None = None):
        super().__init__()
        self.spans_memo = SpansMemo() if spans_memo is None else spans_memo
        self.seq_group = seq_group
        self.seq_degree = dist.get_world_size(seq_group)
        self.seq_rank = dist.get_rank(seq_group)
        self.n_heads, self.n_kv_heads, self.head_chunks = n_heads, n_kv_heads, head_chunks
        self.ulysses_degree, self.ring_degree = ulysses_factorization(
            self.seq_degree, n_heads, n_kv_heads, head_chunks, ring_degree
        )
        self._plans: dict[int, _UlyssesPlan] = {}
        self._slots = AttentionSlots()  # hand-over between checkpoint passes (mop.models.attention_core)

    def extra_repr(self) -> str:
        return (f"D={self.seq_degree}, U={self.ulysses_degree}, R={self.ring_degree}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, head_chunks={self.head_chunks}")

    def _plan(self, n_local: int) -> _UlyssesPlan:
        if n_local not in self._plans:
            self._plans[n_local] = _UlyssesPlan(self.seq_rank, self.seq_degree, self.ulysses_degree, self.ring_degree,
                                                self.n_heads, self.n_kv_heads, self.head_chunks, n_local)
        return self._plans[n_local]

    def _global_spans(self, positions_BN: torch.Tensor, device: torch.device) -> list[Ranges] | None:
        """All-gather the per-document positions (S ints per row) and cut documents (one host sync)."""
        positions_BN = positions_BN.to(device).contiguous()
        parts = [torch.empty_like(positions_BN) for _ in range(self.seq_degree)]
        dist.all_gather(parts, positions_BN, group=self.seq_group)
        return document_spans(torch.cat(parts, dim=1))

    def forward(self, q_BHND: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor,
                positions_BN: torch.Tensor | None = None, *, sinks: torch.Tensor | None = None,
                window: int = 0) -> torch.Tensor:
        """q [B, Hq, N, Dh], k/v [B, Hkv, N, Dh] for this rank's N tokens -> out [B, Hq, N, Dh].

        `sinks` [Hq] / `window` (gpt-oss): mop.parallel.ulysses_variants."""
        B, Hq, N, Dh = q_BHND.shape
        if Hq != self.n_heads or k_BHND.shape != (B, self.n_kv_heads, N, Dh) or v_BHND.shape != k_BHND.shape:
            raise ValueError(
                f"expected q [B, {self.n_heads}, N, Dh] and k, v [B, {self.n_kv_heads}, N, Dh]; got "
                f"{tuple(q_BHND.shape)}, {tuple(k_BHND.shape)}, {tuple(v_BHND.shape)}"
            )
        if not (q_BHND.dtype == k_BHND.dtype == v_BHND.dtype):
            raise ValueError(f"q, k, v must share a dtype; got {q_BHND.dtype}, {k_BHND.dtype}, {v_BHND.dtype}")
        variant = sinks is not None or window > 0
        if self.seq_degree == 1:
            if variant:
                return variant_attention(q_BHND, k_BHND, v_BHND, positions_BN, sinks=sinks, window=window)
            return causal_attention(q_BHND, k_BHND, v_BHND, positions_BN)
        spans = None if positions_BN is None else self.spans_memo.get(
            positions_BN, lambda: self._global_spans(positions_BN, q_BHND.device), key=id(self.seq_group))
        if variant:
            from mop.parallel.ulysses_variants import UlyssesVariantFunction

            return UlyssesVariantFunction.apply(q_BHND, k_BHND, v_BHND, sinks, self._plan(N), spans, self.seq_rank,
                                                self.seq_group, window)
        kernel = UlyssesKernel(self._plan(N), spans, self.seq_rank, self.seq_group)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHND, k_BHND, v_BHND))):
            return kernel.forward(q_BHND, k_BHND, v_BHND)
        return AttentionFunction.apply(q_BHND, k_BHND, v_BHND, positions_BN, kernel, self._slots)
