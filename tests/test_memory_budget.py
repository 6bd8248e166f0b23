"""Memory buys time: the per-block activation policy choice (mop.memory_budget), pure and deterministic."""

import pytest

from mop import memory_budget as mb
from mop.models.shapes import get_shape

GIB = 2**30


def _costs(seq_len: int, tokens: int, seq_degree: int = 2):
    # Bytes per token per block of qwen3-30b-a3b-like widths, roughly as measured: a full checkpoint
    # keeps the block input (+ output), selective adds attention's q, k, v, output, lse and a copy of
    # the output, none keeps every intermediate incl. routed expert activations.
    per_token = {"offload": 0, "full": 8e3, "selective": 34e3, "none": 130e3}
    kept = {p: b * tokens for p, b in per_token.items()}
    secs = mb.recompute_seconds(get_shape("qwen3-30b-a3b"), seq_len, seq_degree, tokens)
    return mb.BlockCosts(kept, secs)


def test_recompute_estimate_orders_policies_and_grows_with_context():
    m = get_shape("qwen3-30b-a3b")
    short = mb.recompute_seconds(m, 8192, 1, 8192)
    long = mb.recompute_seconds(m, 131072, 2, 65536)
    for s in (short, long):
        assert s["none"] == 0 < s["selective"] < s["full"] < s["offload"]
    # At 128K attention dominates: selective saves most of full's recomputation; at 8K it does not.
    assert long["selective"] / long["full"] < 0.2 < short["selective"] / short["full"]


def test_choice_fits_the_budget_and_is_deterministic():
    costs = _costs(131072, 65536)
    for budget in (0, 5 * GIB, 30 * GIB, 60 * GIB, 200 * GIB, 10_000 * GIB):
        a = mb.choose_policies(24, costs, budget)
        assert a == mb.choose_policies(24, costs, budget)  # same budget, same choice
        used = mb.policies_bytes(a, costs.kept_bytes)
        assert used <= max(budget, 0) or set(a) == {"offload"}
    assert set(mb.choose_policies(24, costs, 0)) == {"offload"}
    assert set(mb.choose_policies(24, costs, 10_000 * GIB)) == {"none"}


def test_long_context_spends_memory_on_attention_first():
    """At 128K, avoiding attention's recomputation (selective) is worth far more per byte than
    keeping everything: with room for selective everywhere but not for "none", every block is
    selective; a smaller budget makes the remaining blocks full, then offload."""
    costs = _costs(131072, 65536)
    sel_all = 24 * costs.kept_bytes["selective"]
    assert mb.choose_policies(24, costs, sel_all) == ["selective"] * 24
    half = mb.choose_policies(24, costs, sel_all / 2)
    assert half.count("selective") >= 10 and "none" not in half
    assert mb.describe(half).startswith("selective*")


def test_more_budget_never_means_more_recomputation():
    costs = _costs(32768, 32768, seq_degree=1)
    prev = None
    for gib in range(0, 400, 10):
        p = mb.choose_policies(24, costs, gib * GIB)
        secs = sum(costs.recompute_seconds[x] for x in p)
        if prev is not None:
            assert secs <= prev + 1e-12
        prev = secs


def test_describe_round_trips_through_parse():
    from mop.models.checkpointing import parse_policies

    p = ["selective"] * 3 + ["full"] * 2 + ["offload"]
    assert mb.describe(p) == "selective*3,full*2,offload*1"
    assert parse_policies(mb.describe(p), 6) == p


def test_probe_pattern_and_marks():
    assert mb.probe_pattern(4) is None
    pattern = mb.probe_pattern(8)
    assert pattern == ["full", "none", "selective", "full", "full", "full", "full", "full"]
    # allocator readings before each block: block i keeps (marks[i+1] - marks[i])
    marks = [100, 110, 150, 170, 180, 190, 200, 210]
    kept = mb.kept_from_marks(pattern, marks)
    assert kept == {"none": 40.0, "selective": 20.0, "full": 10.0, "offload": 0.0}


@pytest.mark.parametrize("allowed", [("full", "none"), ("offload", "full", "selective")])
def test_allowed_policies_are_respected(allowed):
    costs = _costs(65536, 65536)
    for gib in (0, 20, 80, 1000):
        assert set(mb.choose_policies(12, costs, gib * GIB, allowed=allowed)) <= set(allowed)
