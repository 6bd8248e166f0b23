"""Exact cross-entropy of a vocabulary split into P blocks over a P-rank ring (the MoP paper, §3.4).

Every rank of the vocabulary group keeps its own tokens and owns one contiguous block of the
vocabulary (block sizes follow `torch.chunk`: ceil(V/P) rows each, the last ones shorter or empty).
The loss is assembled from per-block partial results with a per-token running state
(max, sum-exp, target logit) in P rounds around the ring, so the largest transient is one
token-chunk x block strip (`mop.ops.cross_entropy`), never N x V.

Two schedules move different things round the ring (send to the previous rank, receive from the next):

* "weights": tokens stay; at round r rank p holds block (p + r) % P and folds its strip into its own
  tokens' state. Backward re-runs the ring: the block's weight gradient travels with (one round
  behind) its weights and takes one extra hop to end at its owner; grad_hidden accumulates locally.
* "activations": blocks stay; at round r rank p holds the hidden states and labels of rank (p + r) % P
  and folds its own block into their travelling state; one extra hop brings the states home.
  Backward symmetric: grad_hidden travels with the tokens, the block's gradient accumulates locally.

Both overlap communication with the block GEMM: round r+1's hidden/weights are posted (one
`batch_isend_irecv`) before round r computes, and the travelling state/gradient of round r-1 is
received while round r computes its own partial, then merged (the merge is associative).
"auto" picks the schedule that moves fewer bytes per hop: activations when max_q N_q < max block
size (N*H against H*V/P), weights otherwise.

Why the ring still recomputes its strips in backward. On one block (P = 1) the loss forms the
logit gradients during forward: a strip spans the whole vocabulary, so its log-sum-exp is final at
once and softmax - onehot is known while the strip is live (3 GEMMs per strip: logits, dX, dW).
In the ring a token's log-sum-exp is final only after the last of the P blocks has been folded in,
so every strip's gradient needs its logits a second time: either kept (N x V in all, what the ring
exists to avoid), or recomputed, in backward (now) or in a second pass of the ring in forward (a
"two-pass ring": log-sum-exp first, then gradients). The second pass costs the same 4 GEMMs per
strip and the same ring traffic as the recompute in backward, and would hold the gradients from
forward to backward instead of producing them when needed: it does not pay, so it is not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mop.distributed import all_gather_into
from mop.ops.cross_entropy import (
    block_backward,
    block_stats,
    check_loss_kernels,
    grad_coef,
    math_dtype,
    merge_stats,
    stats_lse,
    token_chunk,
    token_losses,
)
from mop.parallel.vocab_config import SCHEDULES  # one list, shared with the configuration

# One tag per logical stream so gloo matches messages of one batch unambiguously (NCCL ignores tags
# and matches in posting order, which is the same on both sides).
_TAG_WEIGHT, _TAG_GRAD, _TAG_HIDDEN, _TAG_LABEL, _TAG_STATE, _TAG_AUX = 1, 2, 3, 4, 5, 6


def chunk_sizes(n: int, parts: int) -> list[int]:
    """Sizes of `torch.chunk(range(n), parts)` padded with empty parts to exactly `parts` entries."""
    if parts < 1:
        raise ValueError(f"number of parts must be >= 1, got {parts}")
    c = -(-n // parts)
    return [max(0, min(c, n - i * c)) for i in range(parts)]


def offsets_of(sizes: list[int]) -> list[int]:
    """Start of each block given the block sizes."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


class Ring:
    """Point-to-point neighbours of this rank in `group`: sends go to rank-1, receives come from rank+1."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.send_peer = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self.recv_peer = dist.get_global_rank(group, (self.rank + 1) % self.size)

    def start(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> list:
        """Post all sends and receives of one round as one batch; return the requests to wait on.

        Empty tensors are skipped: both ends know the size, so they skip the same messages.
        """
        ops = [dist.P2POp(dist.isend, t, self.send_peer, self.group, tag) for tag, t in sends if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self.recv_peer, self.group, tag) for tag, t in recvs if t.numel()]
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(works: list) -> None:
        # On CUDA this only makes the current stream wait for NCCL's; gloo blocks the host.
        for w in works:
            w.wait()


@dataclass
class RingPlan:
    """Everything the ring needs besides the tensors; built once per call by `make_ring_plan`."""

    ring: Ring | None  # None when P == 1
    rank: int
    size: int
    block_offsets: list[int]
    block_sizes: list[int]
    token_counts: list[int] | None  # N of every rank of the group; needed by "activations"
    schedule: str  # "weights" or "activations" (resolved)
    chunk: int
    ignore_index: int
    kernels: str  # the strip math, one of mop.ops.cross_entropy.LOSS_KERNELS


def resolve_schedule(schedule: str, max_tokens: int, block_sizes: list[int]) -> str:
    """The schedule that moves fewer bytes per hop (ties go to "weights")."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule != "auto":
        return schedule
    return "activations" if max_tokens < max(block_sizes) else "weights"


def make_ring_plan(n_tokens: int, device: torch.device, *, vocab_group, vocab_size: int, block_sizes,
                   schedule: str = "auto", ignore_index: int = -100, max_strip_elements: int = 2**28,
                   local_block_rows: int | None = None, kernels: str = "auto") -> RingPlan:
    """Validate the options and resolve the schedule (one tiny all-gather of N unless schedule="weights")."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_loss_kernels(kernels)
    size = 1 if vocab_group is None else dist.get_world_size(vocab_group)
    rank = 0 if vocab_group is None else dist.get_rank(vocab_group)
    block_sizes = [int(b) for b in block_sizes]
    if len(block_sizes) != size or sum(block_sizes) != vocab_size or min(block_sizes) < 0:
        raise ValueError(f"block_sizes must be {size} non-negative sizes summing to vocab_size={vocab_size} "
                         f"(torch.chunk semantics: {chunk_sizes(vocab_size, size)}), got {block_sizes}")
    if local_block_rows is not None and local_block_rows != block_sizes[rank]:
        raise ValueError(f"weight_block_local has {local_block_rows} rows but block_sizes[{rank}] = "
                         f"{block_sizes[rank]}")
    chunk = token_chunk(max(block_sizes), max_strip_elements)
    token_counts = None
    if size > 1 and schedule != "weights":
        # Tiny all-gather of every rank's N; .tolist() is a host sync (buffer sizes must be known).
        mine = torch.tensor([n_tokens], dtype=torch.int64, device=device)
        everyone = torch.empty(size, dtype=torch.int64, device=device)
        all_gather_into(everyone, mine, group=vocab_group)
        token_counts = everyone.tolist()
    elif size == 1:
        token_counts = [n_tokens]
    resolved = resolve_schedule(schedule, max(token_counts) if token_counts else n_tokens, block_sizes)
    return RingPlan(ring=Ring(vocab_group) if size > 1 else None, rank=rank, size=size,
                    block_offsets=offsets_of(block_sizes), block_sizes=block_sizes, token_counts=token_counts,
                    schedule=resolved, chunk=chunk, ignore_index=ignore_index, kernels=kernels)


# -- forward ------------------------------------------------------------------------------------------

def _forward_move_weights(h_NH, w_vH, labels_N, plan: RingPlan):
    P, p, H = plan.size, plan.rank, h_NH.shape[1]
    state, w_cur = None, w_vH
    for r in range(P):
        b = (p + r) % P
        works, w_next = [], None
        if r < P - 1:
            w_next = w_vH.new_empty(plan.block_sizes[(b + 1) % P], H)
            works = plan.ring.start([(_TAG_WEIGHT, w_cur)], [(_TAG_WEIGHT, w_next)])
        part = block_stats(h_NH, w_cur, labels_N, plan.block_offsets[b], plan.chunk, plan.ignore_index, plan.kernels)
        state = part if state is None else merge_stats(state, part)
        Ring.wait(works)
        w_cur = w_next
    return stats_lse(state), state[2]


def _forward_move_activations(h_NH, w_vH, labels_N, plan: RingPlan):
    P, p, H = plan.size, plan.rank, h_NH.shape[1]
    counts, dtype = plan.token_counts, math_dtype(h_NH.dtype)
    h_cur, lab_cur, state_out = h_NH, labels_N, None
    for r in range(P):
        q = (p + r) % P  # whose tokens this rank holds in round r
        sends, recvs, h_next, lab_next, state_in = [], [], None, None, None
        if r < P - 1:
            h_next = h_NH.new_empty(counts[(q + 1) % P], H)
            lab_next = labels_N.new_empty(counts[(q + 1) % P])
            sends += [(_TAG_HIDDEN, h_cur), (_TAG_LABEL, lab_cur)]
            recvs += [(_TAG_HIDDEN, h_next), (_TAG_LABEL, lab_next)]
        if r >= 1:
            # The state of tokens q, folded over the blocks of the ranks they visited before.
            state_in = torch.empty(3, counts[q], dtype=dtype, device=h_NH.device)
            sends.append((_TAG_STATE, state_out))
            recvs.append((_TAG_STATE, state_in))
        works = plan.ring.start(sends, recvs) if plan.ring else []
        part = block_stats(h_cur, w_vH, lab_cur, plan.block_offsets[p], plan.chunk, plan.ignore_index, plan.kernels)
        Ring.wait(works)
        if state_in is not None:
            part = merge_stats(tuple(state_in.unbind(0)), part)
        state_out = torch.stack(part)
        h_cur, lab_cur = h_next, lab_next
    if P > 1:  # the extra hop: the last state belongs to rank p-1, ours comes from p+1
        own = torch.empty(3, counts[p], dtype=dtype, device=h_NH.device)
        Ring.wait(plan.ring.start([(_TAG_STATE, state_out)], [(_TAG_STATE, own)]))
        state_out = own
    m, s, t = state_out.unbind(0)
    return stats_lse((m, s, t)), t


def ring_forward(h_NH: torch.Tensor, w_vH: torch.Tensor, labels_N: torch.Tensor, plan: RingPlan):
    """Per-token (lse_N, target_logit_N) of this rank's tokens over the whole vocabulary."""
    if plan.schedule == "weights":
        return _forward_move_weights(h_NH, w_vH.contiguous(), labels_N, plan)
    return _forward_move_activations(h_NH.contiguous(), w_vH, labels_N.contiguous(), plan)


# -- backward -----------------------------------------------------------------------------------------

def _backward_move_weights(h_NH, w_vH, labels_N, lse_N, coef_N, plan: RingPlan):
    P, p, H = plan.size, plan.rank, h_NH.shape[1]
    grad_h = torch.zeros_like(h_NH)
    w_cur, gw_out = w_vH, None
    for r in range(P):
        b = (p + r) % P
        sends, recvs, w_next, gw_in = [], [], None, None
        if r < P - 1:
            w_next = w_vH.new_empty(plan.block_sizes[(b + 1) % P], H)
            sends.append((_TAG_WEIGHT, w_cur))
            recvs.append((_TAG_WEIGHT, w_next))
        if r >= 1:
            # Block b's gradient so far, from rank p+1 which held block b in round r-1.
            gw_in = w_vH.new_empty(plan.block_sizes[b], H)
            sends.append((_TAG_GRAD, gw_out))
            recvs.append((_TAG_GRAD, gw_in))
        works = plan.ring.start(sends, recvs) if plan.ring else []
        gw = torch.zeros_like(w_cur)
        block_backward(h_NH, w_cur, labels_N, plan.block_offsets[b], lse_N, coef_N, plan.chunk, plan.ignore_index,
                       grad_h, gw, plan.kernels)
        Ring.wait(works)
        if gw_in is not None:
            gw += gw_in
        gw_out, w_cur = gw, w_next
    if P > 1:  # the extra hop: gw_out is block p-1's complete gradient; ours comes from p+1
        own = w_vH.new_empty(plan.block_sizes[p], H)
        Ring.wait(plan.ring.start([(_TAG_GRAD, gw_out)], [(_TAG_GRAD, own)]))
        gw_out = own
    return grad_h, gw_out


def _backward_move_activations(h_NH, w_vH, labels_N, lse_N, coef_N, plan: RingPlan):
    P, p, H = plan.size, plan.rank, h_NH.shape[1]
    counts = plan.token_counts
    grad_w = torch.zeros_like(w_vH)
    aux_cur = torch.stack([lse_N, coef_N])  # travels with the tokens: [lse; d loss / d token loss]
    h_cur, lab_cur, gh_out = h_NH, labels_N, None
    for r in range(P):
        q = (p + r) % P
        sends, recvs, h_next, lab_next, aux_next, gh_in = [], [], None, None, None, None
        if r < P - 1:
            nq = (q + 1) % P
            h_next = h_NH.new_empty(counts[nq], H)
            lab_next = labels_N.new_empty(counts[nq])
            aux_next = aux_cur.new_empty(2, counts[nq])
            sends += [(_TAG_HIDDEN, h_cur), (_TAG_LABEL, lab_cur), (_TAG_AUX, aux_cur)]
            recvs += [(_TAG_HIDDEN, h_next), (_TAG_LABEL, lab_next), (_TAG_AUX, aux_next)]
        if r >= 1:
            gh_in = h_NH.new_empty(counts[q], H)
            sends.append((_TAG_GRAD, gh_out))
            recvs.append((_TAG_GRAD, gh_in))
        works = plan.ring.start(sends, recvs) if plan.ring else []
        gh = torch.zeros_like(h_cur)
        block_backward(h_cur, w_vH, lab_cur, plan.block_offsets[p], aux_cur[0], aux_cur[1], plan.chunk,
                       plan.ignore_index, gh, grad_w, plan.kernels)
        Ring.wait(works)
        if gh_in is not None:
            gh += gh_in
        gh_out, h_cur, lab_cur, aux_cur = gh, h_next, lab_next, aux_next
    if P > 1:  # the extra hop: gh_out belongs to rank p-1's tokens; ours comes from p+1
        own = h_NH.new_empty(counts[p], H)
        Ring.wait(plan.ring.start([(_TAG_GRAD, gh_out)], [(_TAG_GRAD, own)]))
        gh_out = own
    return gh_out, grad_w


def ring_backward(h_NH, w_vH, labels_N, lse_N, coef_N, plan: RingPlan):
    """(grad_hidden_NH, grad_weight_block_vH) for per-token loss coefficients `coef_N`."""
    if plan.schedule == "weights":
        return _backward_move_weights(h_NH, w_vH.contiguous(), labels_N, lse_N, coef_N, plan)
    return _backward_move_activations(h_NH.contiguous(), w_vH, labels_N.contiguous(), lse_N.contiguous(),
                                      coef_N.contiguous(), plan)


def ring_loss(lse_N, tgt_N, labels_N, normalizer, plan: RingPlan) -> torch.Tensor:
    """This rank's loss: sum of its tokens' CE / normalizer."""
    return token_losses(lse_N, tgt_N, labels_N, plan.ignore_index).sum() / normalizer


class _RingCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of the ring: saves hidden, the local weight, labels and the N-float lse.

    With `shards` (a `VocabBlockShards`), the local weight is this rank's piece of its block: the
    block is gathered before each pass and freed after it, and its gradient reduce-scattered back
    into the piece; without, the local weight is the whole block.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_local, labels_N, normalizer, plan, shards):
        block_vH = weight_local if shards is None else shards.gather(weight_local)
        lse_N, tgt_N = ring_forward(hidden_NH, block_vH, labels_N, plan)
        del block_vH  # only the local weight stays saved; backward gathers again
        ctx.save_for_backward(hidden_NH, weight_local, labels_N, lse_N)
        ctx.plan, ctx.normalizer, ctx.shards = plan, normalizer, shards
        return ring_loss(lse_N, tgt_N, labels_N, normalizer, plan)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_NH, weight_local, labels_N, lse_N = ctx.saved_tensors
        shards = ctx.shards
        block_vH = weight_local if shards is None else shards.gather(weight_local)
        coef_N = grad_coef(grad_loss, ctx.normalizer, labels_N, ctx.plan.ignore_index)
        grad_h, grad_block = ring_backward(hidden_NH, block_vH, labels_N, lse_N, coef_N, ctx.plan)
        del block_vH
        grad_w = grad_block if shards is None else shards.reduce_scatter(grad_block)
        return grad_h, grad_w, None, None, None, None


def ring_cross_entropy(hidden_NH, weight_local, labels_N, normalizer, plan: RingPlan, shards=None) -> torch.Tensor:
    """This rank's loss over the ring of `plan`, with autograd to `hidden_NH` and `weight_local`.

    `shards`: how `weight_local` (a piece of this rank's block) is gathered into the block and its
    gradient scattered back (`mop.parallel.vocab.VocabBlockShards`); None when it is the block.
    """
    return _RingCrossEntropy.apply(hidden_NH, weight_local, labels_N, normalizer, plan, shards)


def check_loss_inputs(hidden_NH: torch.Tensor, labels_N: torch.Tensor, normalizer, hidden_dim: int) -> None:
    """ValueError on shapes that do not fit [N, H] hidden states, [N] labels and a scalar normalizer."""
    if hidden_NH.dim() != 2 or hidden_NH.shape[1] != hidden_dim:
        raise ValueError(f"hidden must be [N, H={hidden_dim}], got {tuple(hidden_NH.shape)}")
    if labels_N.shape != hidden_NH.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden_NH.shape[0]}], got {tuple(labels_N.shape)}")
    if isinstance(normalizer, torch.Tensor) and normalizer.dim() != 0:
        raise ValueError(f"normalizer must be a float or a 0-dim tensor, got shape {tuple(normalizer.shape)}")


def vocab_parallel_cross_entropy(hidden_NH: torch.Tensor, weight_block_local: torch.Tensor, labels_N: torch.Tensor,
                                 normalizer, *, vocab_group, vocab_size: int, block_sizes, schedule: str = "auto",
                                 ignore_index: int = -100, max_strip_elements: int = 2**28,
                                 kernels: str = "auto") -> torch.Tensor:
    """This rank's share of the exact CE loss with the vocabulary split over `vocab_group` (P ranks).

    hidden_NH / labels_N: this rank's own tokens (N may differ between ranks). weight_block_local:
    rows [offset_p, offset_p + block_sizes[p]) of the [V, H] weight, p = rank in `vocab_group`
    (None means P = 1). Returns sum over own target tokens of CE / normalizer, so
    the sum over ranks is the global loss; gradients flow to `hidden_NH` and `weight_block_local`
    (the block's gradient from ALL ranks' tokens). Collective: every rank of the group must call it.
    """
    check_loss_inputs(hidden_NH, labels_N, normalizer, weight_block_local.shape[-1])
    if weight_block_local.dim() != 2:
        raise ValueError(f"weight_block_local must be [V/P, H], got {tuple(weight_block_local.shape)}")
    plan = make_ring_plan(hidden_NH.shape[0], hidden_NH.device, vocab_group=vocab_group, vocab_size=vocab_size,
                          block_sizes=block_sizes, schedule=schedule, ignore_index=ignore_index,
                          max_strip_elements=max_strip_elements, local_block_rows=weight_block_local.shape[0],
                          kernels=kernels)
    return ring_cross_entropy(hidden_NH, weight_block_local, labels_N, normalizer, plan)
