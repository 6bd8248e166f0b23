"""Token dispatchers: plan -> dispatch -> compute -> combine, behind one small interface.

A dispatcher's `plan()` exchanges per-expert token counts over the expert group, syncs the host
once (`.tolist()`) and returns a `LayerPlan`: for each chunk of this rank's tokens a `Route`
(who sends which token copies where, and how the received rows are grouped by expert), plus the
expert weights to move point to point. `dispatch`, `compute` and `combine` are the per-chunk
stages; `mop.parallel.experts.pipeline` runs them in a fixed order inside one autograd Function.

* `AllToAllDispatcher` ("alltoall"): plain EP, every token copy to its expert's home rank.
* `LlepDispatcher` ("llep"): least-loaded EP, spilled slices of hot experts go to helper ranks.
* `PipelinedLlepDispatcher` ("llep_pipelined"): tokens in K chunks, one LLEP plan per chunk, all
  made from ONE all-gather of per-chunk counts (so one host sync per layer); each chunk is balanced
  on its own, which is what the per-chunk overlap needs. Weights of every expert spilled in any
  chunk are sent once per layer.
A DeepEP-style dispatcher would subclass `TokenDispatcher` and override `dispatch` / `combine`;
`mop.parallel.experts.registry.DISPATCHERS` is where every dispatcher is found by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mop.models.moe import combine_slots, expert_activation, expert_counts, permute_rows
from mop.ops.grouped_mm import grouped_mm
from mop.parallel.experts.comm import all_to_all
from mop.parallel.experts.planner import LlepPlan, plan_llep, split_by_source


@dataclass
class Route:
    """How one chunk of this rank's token copies travels. Host lists are split sizes; tensors live on device."""

    n_tokens: int
    send_splits: list[int]            # rows sent to each expert-group rank
    recv_splits: list[int]            # rows received from each expert-group rank
    send_copy_idx: torch.Tensor       # [n_send] flat copy index (t * k + j) of each sent row
    send_token_idx: torch.Tensor      # [n_send] token index of each sent row
    send_inv: torch.Tensor            # [T * k] sent row of each copy
    group_idx: torch.Tensor           # [n_recv] received row of each expert-grouped row
    group_inv: torch.Tensor           # [n_recv] grouped row of each received row
    home_counts: torch.Tensor         # [E_local] rows per home expert (grouped order)
    foreign_counts: torch.Tensor      # [n_foreign] rows per foreign (spilled-in) expert
    n_home_rows: int


@dataclass
class LayerPlan:
    """Routes of every chunk plus the weight moves of one layer call."""

    bounds: list[tuple[int, int]]     # token range [t0, t1) of each chunk
    routes: list[Route]
    transfers: list[tuple[int, int]]  # (expert, helper) pairs, sorted; weights go home -> helper
    foreign: list[int]                # experts this rank computes without owning them
    plans: list[LlepPlan] = field(default_factory=list)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: the H2D copy does not wait for the GPU queue
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _segments(starts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """Concatenation of arange(start, start + length) over the segments, built on device."""
    total = sum(lengths)
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    offs = [0]
    for n in lengths[:-1]:
        offs.append(offs[-1] + n)
    shift = _to_device([s - o for s, o in zip(starts, offs)], device)
    # output_size avoids the host sync repeat_interleave would otherwise need.
    return torch.repeat_interleave(shift, _to_device(lengths, device), output_size=total) + torch.arange(
        total, device=device)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def build_route(sort_idx: torch.Tensor, local_counts: list[int], send_pieces: list[tuple[int, int, int, int]],
                recv_pieces: list[tuple[int, int, int, int]], me: int, n_ranks: int, experts_per_rank: int,
                foreign: list[int], top_k: int) -> Route:
    """Route of one chunk.

    `sort_idx` orders this chunk's copies by expert (stable); `local_counts[e]` copies per expert.
    `send_pieces` (expert, dst, offset, n): n of our copies of expert (from offset within them) go to dst.
    `recv_pieces` (src, expert, offset, n): what we receive. Senders order rows by (dst, expert,
    offset), so receivers see, per source, rows ordered by (expert, offset).
    """
    device = sort_idx.device
    local_start = [0]
    for n in local_counts[:-1]:
        local_start.append(local_start[-1] + n)
    send_pieces = sorted(send_pieces, key=lambda p: (p[1], p[0], p[2]))
    send_splits = [0] * n_ranks
    for e, dst, _, n in send_pieces:
        send_splits[dst] += n
    seg = _segments([local_start[e] + off for e, _, off, _ in send_pieces], [p[3] for p in send_pieces], device)
    send_copy_idx = sort_idx.index_select(0, seg)

    recv_pieces = sorted(recv_pieces, key=lambda p: (p[0], p[1], p[2]))
    recv_splits = [0] * n_ranks
    recv_start, pos = {}, 0
    for s, e, off, n in recv_pieces:
        recv_splits[s] += n
        recv_start[(s, e, off)] = pos
        pos += n
    order = list(range(me * experts_per_rank, (me + 1) * experts_per_rank)) + foreign
    by_expert: dict[int, list[tuple[int, int, int, int]]] = {e: [] for e in order}
    for p in recv_pieces:
        by_expert[p[1]].append(p)
    starts, lengths, counts = [], [], []
    for e in order:
        c = 0
        for s, _, off, n in sorted(by_expert[e]):
            starts.append(recv_start[(s, e, off)])
            lengths.append(n)
            c += n
        counts.append(c)
    group_idx = _segments(starts, lengths, device)
    counts_t = _to_device(counts, device)
    return Route(
        n_tokens=sort_idx.numel() // top_k, send_splits=send_splits, recv_splits=recv_splits,
        send_copy_idx=send_copy_idx, send_token_idx=torch.div(send_copy_idx, top_k, rounding_mode="floor"),
        send_inv=_inverse(send_copy_idx), group_idx=group_idx, group_inv=_inverse(group_idx),
        home_counts=counts_t[:experts_per_rank], foreign_counts=counts_t[experts_per_rank:],
        n_home_rows=sum(counts[:experts_per_rank]),
    )


@dataclass(frozen=True)
class ExpertActivation:
    """The experts' gated activation: SwiGLU, or gpt-oss' clamped form when `swiglu_limit` > 0."""

    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702
    kernels: str = "eager"  # op by op or fused (mop.ops.fused), as the replaced experts module had it


def expert_mlp(x_NH: torch.Tensor, counts_E: torch.Tensor, w1_EHI, w3_EHI, w2_EIH, b1_EI=None, b3_EI=None,
               b2_EH=None, act: ExpertActivation | None = None) -> torch.Tensor:
    """SwiGLU of rows grouped by expert: act(x @ w1[e] + b1[e], x @ w3[e] + b3[e]) @ w2[e] + b2[e].

    Biases (gpt-oss) are optional; a row's expert comes from the group counts, expanded on the
    device with a known output size (no host sync)."""
    act = act or ExpertActivation()
    gate_NI, up_NI = grouped_mm(x_NH, w1_EHI, counts_E), grouped_mm(x_NH, w3_EHI, counts_E)
    expert_N = None
    if b1_EI is not None:
        expert_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=x_NH.device), counts_E,
                                           output_size=x_NH.shape[0])
        gate_NI, up_NI = gate_NI + b1_EI[expert_N], up_NI + b3_EI[expert_N]
    y_NH = grouped_mm(expert_activation(gate_NI, up_NI, act.swiglu_limit, act.swiglu_alpha, act.kernels), w2_EIH,
                      counts_E)
    return y_NH if expert_N is None else y_NH + b2_EH[expert_N]


class TokenDispatcher(ABC):
    """Interface: `plan` once per layer call, then per chunk `dispatch` -> `compute` -> `combine`.

    `recompute` tells the layer Function to keep nothing per chunk between forward and backward
    (recompute dispatch and GEMMs in backward) instead of keeping the expert graph.
    """

    recompute = False
    # Whether the dispatcher bounds the layer's routed activations by working in chunks: the reason
    # to keep it at Ep = 1, where it has no tokens to move (mop.parallel.parallelize.apply_expert_parallel).
    bounds_memory = False

    def __init__(self, n_experts: int, group):
        self.n_experts, self.group = n_experts, group
        self.n_ranks = dist.get_world_size(group)
        self.me = dist.get_rank(group)
        self.experts_per_rank = n_experts // self.n_ranks
        self.n_llep_plans = 0   # chunk plans that spilled (LLEP path taken)
        self.n_plain_plans = 0  # chunk plans that kept every expert home (lambda / plain EP path)

    @classmethod
    def from_config(cls, cfg, n_experts: int, group) -> "TokenDispatcher":
        """The dispatcher for an `ExpertParallelConfig` over the expert group `group`."""
        return cls(n_experts, group)

    @abstractmethod
    def plan(self, topk_idx_TK: torch.Tensor) -> LayerPlan:
        """Exchange counts over the expert group and build this rank's routes (one host sync)."""

    def dispatch(self, x_TH: torch.Tensor, route: Route, async_op: bool = False):
        """Send each token copy to the rank that computes it; returns (received rows, work)."""
        return all_to_all(x_TH.index_select(0, route.send_token_idx), route.recv_splits, route.send_splits,
                          self.group, async_op)

    def compute(self, recv_NH: torch.Tensor, route: Route, home_w: list, foreign_w: list,
                act: ExpertActivation | None = None) -> torch.Tensor:
        """Expert GEMMs on received rows (home experts, then spilled-in ones); returns rows in receive order.

        `home_w` / `foreign_w`: [w1, w3, w2] or, with biases, [w1, w3, w2, b1, b3, b2] (`expert_mlp`)."""
        x_NH = permute_rows(recv_NH, route.group_idx, route.group_inv)
        if not foreign_w[0].shape[0]:  # every row is a home row; a slice would cost a zero-fill in backward
            y_NH = expert_mlp(x_NH, route.home_counts, *home_w, act=act)
        else:
            x_home, x_foreign = x_NH.split([route.n_home_rows, x_NH.shape[0] - route.n_home_rows])
            y_NH = torch.cat([expert_mlp(x_home, route.home_counts, *home_w, act=act),
                              expert_mlp(x_foreign, route.foreign_counts, *foreign_w, act=act)])
        return permute_rows(y_NH, route.group_inv, route.group_idx)

    def send_back(self, y_NH: torch.Tensor, route: Route, async_op: bool = False):
        """Return computed rows to their source ranks; returns (rows in send order, work)."""
        return all_to_all(y_NH, route.send_splits, route.recv_splits, self.group, async_op)

    def combine(self, y_send_NH: torch.Tensor, route: Route, topk_weight_TK: torch.Tensor,
                kernels: str = "eager") -> torch.Tensor:
        """y_t = sum_k w[t,k] * y_{t,k}: product in the input dtype, sum over k in fp32 (`kernels`:
        op by op or one fused gather-and-weight pass, mop.ops.fused)."""
        return combine_slots(y_send_NH, route.send_inv, route.send_copy_idx, topk_weight_TK, kernels)

    def _count_plan(self, plan: LlepPlan) -> None:
        if plan.balanced:
            self.n_plain_plans += 1
        else:
            self.n_llep_plans += 1


def _sorted_counts(idx_TK: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.argsort(idx_TK.reshape(-1), stable=True), expert_counts(idx_TK, n_experts)


class AllToAllDispatcher(TokenDispatcher):
    """Plain EP: sort by expert, exchange counts (one all_to_all), variable all-to-all of tokens."""

    def plan(self, topk_idx_TK: torch.Tensor) -> LayerPlan:
        sort_idx, counts_E = _sorted_counts(topk_idx_TK, self.n_experts)
        recv_counts = torch.empty_like(counts_E)  # [src, local expert] counts for our experts
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        host = torch.cat([counts_E, recv_counts]).tolist()  # host sync: split sizes must be ints
        local, rc = host[:self.n_experts], host[self.n_experts:]
        epr, me = self.experts_per_rank, self.me
        send = [(e, e // epr, 0, n) for e, n in enumerate(local) if n]
        recv = [(s, me * epr + j, 0, rc[s * epr + j]) for s in range(self.n_ranks) for j in range(epr)
                if rc[s * epr + j]]
        route = build_route(sort_idx, local, send, recv, me, self.n_ranks, epr, [], topk_idx_TK.shape[1])
        self.n_plain_plans += 1
        return LayerPlan([(0, topk_idx_TK.shape[0])], [route], [], [])


class LlepDispatcher(TokenDispatcher):
    """Least-loaded EP; with `max_chunks > 1` and `recompute` the pipelined variant (`PipelinedLlepDispatcher`)."""

    def __init__(self, n_experts: int, group, alpha: float = 1.1, min_chunk: int = 1024,
                 imbalance_threshold: float = 1.3, chunk_tokens: int = 16384, max_chunks: int = 1,
                 recompute: bool = False):
        super().__init__(n_experts, group)
        self.alpha, self.min_chunk, self.imbalance_threshold = alpha, min_chunk, imbalance_threshold
        self.chunk_tokens, self.max_chunks, self.recompute = chunk_tokens, max_chunks, recompute

    @classmethod
    def from_config(cls, cfg, n_experts: int, group) -> "LlepDispatcher":
        """One LLEP plan per layer call (`max_chunks=1`), the expert graph kept for backward."""
        return cls(n_experts, group, alpha=cfg.llep_alpha, min_chunk=cfg.llep_min_chunk,
                   imbalance_threshold=cfg.llep_imbalance_threshold, chunk_tokens=cfg.chunk_tokens, max_chunks=1)

    def plan(self, topk_idx_TK: torch.Tensor) -> LayerPlan:
        T, E, Kmax = topk_idx_TK.shape[0], self.n_experts, self.max_chunks
        k_local = min(math.ceil(T / self.chunk_tokens), Kmax) if T else 0
        bounds = [(c * T // k_local, (c + 1) * T // k_local) for c in range(k_local)]
        sorts, counts = [], torch.zeros(Kmax * E + 1, dtype=torch.int64, device=topk_idx_TK.device)
        for c, (t0, t1) in enumerate(bounds):
            sort_idx, counts_E = _sorted_counts(topk_idx_TK[t0:t1], E)
            sorts.append(sort_idx)
            counts[c * E:(c + 1) * E] = counts_E
        counts[-1] = k_local
        gathered = [torch.empty_like(counts) for _ in range(self.n_ranks)]
        dist.all_gather(gathered, counts, group=self.group)
        host = torch.stack(gathered).tolist()  # the one host sync of the layer
        n_chunks = max(max(row[-1] for row in host), 1)  # every rank runs the same number of rounds
        while len(bounds) < n_chunks:  # ranks with fewer (or no) tokens run empty chunks
            bounds.append((T, T))
            sorts.append(torch.zeros(0, dtype=torch.int64, device=topk_idx_TK.device))

        plans, pieces = [], []
        for c in range(n_chunks):
            counts_SE = [row[c * E:(c + 1) * E] for row in host]
            loads = [sum(col) for col in zip(*counts_SE)]
            plan = plan_llep(loads, self.n_ranks, self.experts_per_rank, self.alpha, self.min_chunk,
                             self.imbalance_threshold)
            self._count_plan(plan)
            plans.append(plan)
            pieces.append((counts_SE, split_by_source(plan, counts_SE)))
        transfers = sorted({t for p in plans for t in p.transfers()})
        foreign = sorted({e for e, h in transfers if h == self.me})
        routes = []
        for c in range(n_chunks):
            counts_SE, ps = pieces[c]
            send = [(e, d, off, n) for s, e, d, off, n in ps if s == self.me]
            recv = [(s, e, off, n) for s, e, d, off, n in ps if d == self.me]
            routes.append(build_route(sorts[c], counts_SE[self.me], send, recv, self.me, self.n_ranks,
                                      self.experts_per_rank, foreign, topk_idx_TK.shape[1]))
        return LayerPlan(bounds, routes, transfers, foreign, plans)


class PipelinedLlepDispatcher(LlepDispatcher):
    """LLEP in up to `max_chunks` chunks of `chunk_tokens`, each recomputed in backward (about one
    chunk of routed activations live at a time)."""

    bounds_memory = True

    @classmethod
    def from_config(cls, cfg, n_experts: int, group) -> "PipelinedLlepDispatcher":
        """Chunks of `cfg.chunk_tokens`, at most `cfg.max_chunks`, recomputed in backward."""
        return cls(n_experts, group, alpha=cfg.llep_alpha, min_chunk=cfg.llep_min_chunk,
                   imbalance_threshold=cfg.llep_imbalance_threshold, chunk_tokens=cfg.chunk_tokens,
                   max_chunks=cfg.max_chunks, recompute=True)


__all__ = ["AllToAllDispatcher", "LayerPlan", "LlepDispatcher", "PipelinedLlepDispatcher", "Route", "TokenDispatcher",
           "build_route", "expert_mlp", "ExpertActivation", "permute_rows"]
