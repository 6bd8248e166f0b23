"""Least-Loaded Expert Parallelism (LLEP) planner: pure host-side functions, no communication.

Every rank of an expert group calls `plan_llep` with the same all-reduced per-expert loads and so
computes the same plan. A plan assigns each expert's tokens, viewed in one global order (source
rank 0's tokens of that expert first, then source rank 1's, ...), to ranks as contiguous slices.
`split_by_source` then tells every source rank how many of ITS tokens of each expert go where.

Algorithm (the MoP paper, §3.3): capacity = ceil(alpha * total / n_ranks). When the home-assignment
imbalance max/mean is below `imbalance_threshold`, plain EP is used (every expert on its home
rank). Otherwise experts are visited from most to least loaded (ties: lower expert id first); an
expert keeps as many tokens on its home rank as fits (a rank is judged by what it was already
assigned plus the home load it still has to take), and the excess is spilled to the other ranks
with the lowest such effective load, in chunks of at least `min_chunk` tokens (the last chunk of
an expert may be smaller). If no other rank has room for a valid chunk (room fragmented into
pieces smaller than `min_chunk`), the least-loaded other rank takes a chunk of
min(remaining, min_chunk) anyway: the only way a rank can exceed capacity, by less than
`min_chunk` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Slice = tuple[int, int, int]  # (rank, start, end) in an expert's global token order


@dataclass(frozen=True)
class LlepPlan:
    """Which rank computes which slice of each expert's tokens.

    `slices[e]` lists (rank, start, end), ordered by start, covering [0, loads[e]) exactly once;
    empty for an expert without tokens. `balanced` is True when the imbalance was under the
    threshold and plain EP was used (no spilling). `rank_loads[r]` is the number of tokens rank r
    computes; `capacity` the per-rank target.
    """

    slices: tuple[tuple[Slice, ...], ...]
    rank_loads: tuple[int, ...]
    capacity: int
    imbalance: float
    balanced: bool
    experts_per_rank: int

    def home(self, expert: int) -> int:
        """The rank that owns `expert`'s weights."""
        return expert // self.experts_per_rank

    def transfers(self) -> list[tuple[int, int]]:
        """(expert, helper rank) pairs whose weights must be sent from the home rank; sorted."""
        pairs = {(e, r) for e, sl in enumerate(self.slices) for r, a, b in sl if b > a and r != self.home(e)}
        return sorted(pairs)


def _validate(loads: list[int], n_ranks: int, experts_per_rank: int, alpha: float, min_chunk: int,
              imbalance_threshold: float) -> None:
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    if experts_per_rank < 1:
        raise ValueError(f"experts_per_rank must be >= 1, got {experts_per_rank}")
    if len(loads) != n_ranks * experts_per_rank:
        raise ValueError(f"loads_per_expert has {len(loads)} entries; expected n_ranks * experts_per_rank = "
                         f"{n_ranks * experts_per_rank}")
    if any(n < 0 for n in loads):
        raise ValueError("loads_per_expert must be non-negative token counts")
    if not alpha >= 1.0:
        raise ValueError(f"llep alpha (capacity factor) must be >= 1.0 so the ranks can hold all tokens, got {alpha}")
    if min_chunk < 1:
        raise ValueError(f"llep min_chunk must be >= 1 token, got {min_chunk}")
    if not imbalance_threshold > 0:
        raise ValueError(f"llep imbalance_threshold (lambda) must be > 0, got {imbalance_threshold}")


def plan_llep(loads_per_expert: list[int], n_ranks: int, experts_per_rank: int, alpha: float = 1.1,
              min_chunk: int = 1024, imbalance_threshold: float = 1.3) -> LlepPlan:
    """Deterministic LLEP plan from global per-expert token counts (see the module docstring)."""
    loads = [int(n) for n in loads_per_expert]
    _validate(loads, n_ranks, experts_per_rank, alpha, min_chunk, imbalance_threshold)
    n_experts = len(loads)
    home_of = [e // experts_per_rank for e in range(n_experts)]
    home_load = [sum(loads[r * experts_per_rank:(r + 1) * experts_per_rank]) for r in range(n_ranks)]
    total = sum(loads)
    imbalance = max(home_load) * n_ranks / total if total else 1.0
    capacity = math.ceil(alpha * total / n_ranks)

    if imbalance < imbalance_threshold or n_ranks == 1:
        slices = tuple(((home_of[e], 0, n),) if n else () for e, n in enumerate(loads))
        return LlepPlan(slices, tuple(home_load), capacity, imbalance, True, experts_per_rank)

    assigned = [0] * n_ranks
    pending = list(home_load)  # home load each rank still has to take
    out: list[tuple[Slice, ...]] = [()] * n_experts
    for e in sorted(range(n_experts), key=lambda x: (-loads[x], x)):
        n = loads[e]
        if n == 0:
            continue
        h = home_of[e]
        pending[h] -= n
        room_home = capacity - assigned[h] - pending[h]
        take = min(n, max(room_home, 0))
        sl: list[Slice] = []
        if take:
            sl.append((h, 0, take))
            assigned[h] += take
        start = take
        while start < n:
            remaining = n - start
            others = sorted((assigned[r] + pending[r], r) for r in range(n_ranks) if r != h)
            chosen = None
            for eff, r in others:
                chunk = min(remaining, capacity - eff)
                if chunk > 0 and (chunk >= min_chunk or chunk == remaining):
                    chosen = (r, chunk)
                    break
            if chosen is None:  # room is fragmented: overflow the least-loaded helper by < min_chunk
                chosen = (others[0][1], min(remaining, min_chunk))
            r, chunk = chosen
            sl.append((r, start, start + chunk))
            assigned[r] += chunk
            start += chunk
        out[e] = tuple(sl)
    return LlepPlan(tuple(out), tuple(assigned), capacity, imbalance, False, experts_per_rank)


def plain_plan(loads_per_expert: list[int], n_ranks: int, experts_per_rank: int) -> LlepPlan:
    """Plain expert parallelism as an `LlepPlan`: every expert's tokens on its home rank."""
    return plan_llep(loads_per_expert, n_ranks, experts_per_rank, imbalance_threshold=math.inf)


def split_by_source(plan: LlepPlan, counts_SE: list[list[int]]) -> list[tuple[int, int, int, int, int]]:
    """Pieces (src, expert, dst, offset, n): `n` of src's tokens of `expert`, starting at `offset`
    within src's tokens of that expert, are computed on rank `dst`.

    `counts_SE[s][e]` are the per-source counts whose column sums are the plan's loads; the
    expert's global order is source 0's tokens, then source 1's, and so on.
    """
    pieces = []
    for e, sl in enumerate(plan.slices):
        lo = 0
        for s, row in enumerate(counts_SE):
            hi = lo + row[e]
            for r, a, b in sl:
                a2, b2 = max(a, lo), min(b, hi)
                if b2 > a2:
                    pieces.append((s, e, r, a2 - lo, b2 - a2))
            lo = hi
        if lo != sum(b - a for _, a, b in sl):
            raise ValueError(f"per-source counts of expert {e} sum to {lo}, but the plan covers "
                             f"{sum(b - a for _, a, b in sl)} tokens")
    return pieces
