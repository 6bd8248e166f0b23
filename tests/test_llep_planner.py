"""The pure LLEP planner: coverage, capacity, chunk sizes, home-first, lambda path, determinism."""

from __future__ import annotations

import math
import random

import pytest

from mop.parallel.experts.planner import plain_plan, plan_llep, split_by_source


def _check_cover(plan, loads):
    """Every token of every expert assigned exactly once, slices contiguous and in order."""
    assert len(plan.slices) == len(loads)
    for e, (sl, n) in enumerate(zip(plan.slices, loads)):
        pos = 0
        for r, a, b in sl:
            assert a == pos and b > a, (e, sl)
            pos = b
        assert pos == n, (e, sl, n)
    per_rank = [0] * len(plan.rank_loads)
    for sl in plan.slices:
        for r, a, b in sl:
            per_rank[r] += b - a
    assert tuple(per_rank) == plan.rank_loads


def _random_loads(seed, n_experts, skew):
    rng = random.Random(seed)
    loads = [rng.randint(0, 300) for _ in range(n_experts)]
    for e in rng.sample(range(n_experts), 2):
        loads[e] += skew
    return loads


@pytest.mark.parametrize("seed", range(20))
def test_cover_capacity_chunks_on_random_skewed_loads(seed):
    n_ranks, epr, m = 4, 4, 64
    loads = _random_loads(seed, n_ranks * epr, skew=3000)
    plan = plan_llep(loads, n_ranks, epr, alpha=1.1, min_chunk=m, imbalance_threshold=1.3)
    assert not plan.balanced
    _check_cover(plan, loads)
    assert plan.capacity == math.ceil(1.1 * sum(loads) / n_ranks)
    # Capacity holds except when room was fragmented below m: then the overflow is < m.
    assert max(plan.rank_loads) < plan.capacity + m
    for sl in plan.slices:
        for r, a, b in sl[1:-1]:  # every spilled chunk but an expert's last is >= m
            if r != sl[0][0]:
                assert b - a >= m


def test_capacity_respected_when_room_is_not_fragmented():
    loads = [4000, 0, 0, 0, 100, 100, 100, 100]  # 4 ranks x 2 experts, rank 0 hot
    plan = plan_llep(loads, 4, 2, alpha=1.1, min_chunk=16, imbalance_threshold=1.3)
    _check_cover(plan, loads)
    assert max(plan.rank_loads) <= plan.capacity


def test_home_first_and_spill_to_least_loaded():
    # Rank 0 owns experts 0,1 with 1000 + 200 tokens; the others own 100 each.
    loads = [1000, 200, 100, 100, 100, 100, 100, 100]
    plan = plan_llep(loads, 4, 2, alpha=1.0, min_chunk=10, imbalance_threshold=1.3)
    cap = plan.capacity  # ceil(1800 / 4) = 450
    assert cap == 450
    # Expert 0 is visited first; rank 0 must still take its expert 1 (200), so it keeps only 250 of expert 0.
    assert plan.slices[0][0] == (0, 0, 250)
    assert plan.slices[1] == ((0, 0, 200),)
    assert all(r != 0 for r, _, _ in plan.slices[0][1:])
    assert plan.rank_loads == (450, 450, 450, 450)
    assert plan.transfers() == [(0, 1), (0, 2), (0, 3)]


def test_lambda_path():
    loads = [120, 100, 100, 100, 100, 100, 100, 100]  # imbalance 220 / (820 / 4) = 1.073
    plan = plan_llep(loads, 4, 2, imbalance_threshold=1.3, min_chunk=1)
    assert plan.balanced and plan.transfers() == []
    assert plan.slices[0] == ((0, 0, 120),)
    assert plan.imbalance == pytest.approx(220 * 4 / 820)
    spill = plan_llep(loads, 4, 2, imbalance_threshold=1.05, min_chunk=1)
    assert not spill.balanced
    _check_cover(spill, loads)


def test_deterministic_and_tie_break():
    loads = _random_loads(3, 16, skew=2000)
    a = plan_llep(loads, 4, 4, min_chunk=32)
    b = plan_llep(list(loads), 4, 4, min_chunk=32)
    assert a == b
    ties = [500, 500, 0, 0, 0, 0, 0, 0]
    assert plan_llep(ties, 4, 2, min_chunk=1) == plan_llep(ties, 4, 2, min_chunk=1)


def test_empty_experts_and_no_tokens():
    plan = plan_llep([0] * 8, 4, 2)
    assert plan.balanced and all(sl == () for sl in plan.slices) and plan.rank_loads == (0, 0, 0, 0)
    loads = [0, 900, 0, 0, 0, 10, 0, 0]
    plan = plan_llep(loads, 4, 2, min_chunk=8)
    _check_cover(plan, loads)
    assert plan.slices[0] == () and plan.slices[2] == ()


def test_one_expert_takes_all_tokens():
    loads = [0, 0, 0, 4096, 0, 0, 0, 0]
    plan = plan_llep(loads, 4, 2, alpha=1.0, min_chunk=1024, imbalance_threshold=1.3)
    _check_cover(plan, loads)
    assert plan.rank_loads == (1024, 1024, 1024, 1024)
    assert plan.slices[3][0] == (1, 0, 1024)  # home rank keeps its share first
    # min_chunk larger than a fair share: chunks stay >= m, the last one may be smaller.
    plan = plan_llep(loads, 4, 2, alpha=1.0, min_chunk=1500, imbalance_threshold=1.3)
    _check_cover(plan, loads)
    sizes = [b - a for _, a, b in plan.slices[3]]
    assert sizes[0] == 1024 and all(n >= 1500 for n in sizes[1:-1]) and len(sizes) >= 3


def test_plain_plan_keeps_everything_home():
    loads = [5000, 1, 2, 3]
    plan = plain_plan(loads, 2, 2)
    assert plan.balanced and plan.slices[0] == ((0, 0, 5000),) and plan.rank_loads == (5001, 5)


def test_split_by_source_partitions_each_source():
    rng = random.Random(0)
    counts_SE = [[rng.randint(0, 200) for _ in range(8)] for _ in range(4)]
    counts_SE[2][0] += 3000
    loads = [sum(c) for c in zip(*counts_SE)]
    plan = plan_llep(loads, 4, 2, min_chunk=50)
    pieces = split_by_source(plan, counts_SE)
    for s in range(4):
        for e in range(8):
            mine = sorted((off, n) for ps, pe, _, off, n in pieces if (ps, pe) == (s, e))
            pos = 0
            for off, n in mine:
                assert off == pos and n > 0
                pos += n
            assert pos == counts_SE[s][e]
    for r in range(4):
        assert sum(n for _, _, d, _, n in pieces if d == r) == plan.rank_loads[r]


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0.9}, "alpha"), ({"min_chunk": 0}, "min_chunk"), ({"imbalance_threshold": 0}, "imbalance_threshold"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_llep([1, 2, 3, 4], 2, 2, **kwargs)
    with pytest.raises(ValueError, match="experts_per_rank"):
        plan_llep([1, 2, 3], 2, 2)
