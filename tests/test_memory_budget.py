"""Memory buys time: the per-block activation policy choice (mop.memory_budget), pure and deterministic."""

import pytest

from mop import memory_budget as mb
from mop.models.shapes import get_shape

GIB = 2**30


def _costs(seq_len: int, tokens: int):
    # Bytes per token per block of qwen3-30b-a3b-like widths, roughly as measured: a full checkpoint
    # keeps the block input (+ output), selective adds attention's q, k, v, output, lse and a copy of
    # the output, none keeps every intermediate incl. routed expert activations.
    per_token = {"offload": 0, "full": 8e3, "selective": 34e3, "none": 130e3}
    kept = {p: b * tokens for p, b in per_token.items()}
    secs = mb.recompute_seconds(get_shape("qwen3-30b-a3b"), seq_len, tokens)
    return mb.BlockCosts(kept, secs)


def test_recompute_estimate_orders_policies_and_grows_with_context():
    m = get_shape("qwen3-30b-a3b")
    short = mb.recompute_seconds(m, 8192, 8192)
    long = mb.recompute_seconds(m, 131072, 65536)
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
    costs = _costs(32768, 32768)
    prev = None
    for gib in range(0, 400, 10):
        p = mb.choose_policies(24, costs, gib * GIB)
        secs = sum(costs.recompute_seconds[x] for x in p)
        if prev is not None:
            assert secs <= prev + 1e-12
        prev = secs


def test_describe_round_trips_through_parse():
    from mop.models.activation_policy import parse_policies

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


class FakeProbe:
    """A device of `total` bytes: state `state`, each block keeps `true_kept[policy]` (the allocator
    readings show `seen_kept`, e.g. less than the truth), backward needs `transient` more, and "none"
    needs `none_spike` extra while it runs (what made the real 256K probe run out of memory)."""

    def __init__(self, total, state, true_kept, transient, seen_kept=None, none_spike=0.0):
        self.total, self.state, self.true_kept, self.transient = total, state, true_kept, transient
        self.seen_kept = seen_kept or true_kept
        self.none_spike = none_spike
        self.calls: list[tuple] = []

    def _oom_if(self, need):
        if need > self.total:
            import torch

            raise torch.OutOfMemoryError(f"fake: {need} > {self.total}")

    def pattern_marks(self, policies, fraction=1.0):
        self.calls.append(("marks", tuple(policies), fraction))
        marks, used = [], self.state
        for p in policies:
            marks.append(used)
            self._oom_if(used + fraction * (self.none_spike if p == "none" else 0.0))
            used += fraction * self.seen_kept[p]
        return marks

    def micro_batch_peak(self, policies, fraction=1.0):
        self.calls.append(("peak", tuple(policies), fraction))
        spike = self.none_spike if "none" in policies else 0.0
        # Activations and the transient grow with the tokens; the state (weights, gradients) does not.
        need = self.state + fraction * (sum(self.true_kept[p] for p in policies) + self.transient + spike)
        self._oom_if(need)
        return need

    def agree_max(self, values):
        return list(values)

    def recover(self):
        self.calls.append(("recover",))


KEPT = {"offload": 0.0, "full": 1.0 * GIB, "selective": 4.0 * GIB, "none": 16.0 * GIB}
RECOMPUTE = {"none": 0.0, "selective": 0.05, "full": 0.5, "offload": 0.51}


def test_plan_measures_chooses_and_verifies():
    probe = FakeProbe(total=140 * GIB, state=60 * GIB, true_kept=KEPT, transient=10 * GIB)
    plan = mb.plan_activation_policies(probe, 12, RECOMPUTE, cap=126 * GIB)
    assert plan.peak_bytes is not None and plan.peak_bytes <= 126 * GIB
    assert plan.kept_bytes == KEPT and plan.base_bytes == pytest.approx(70 * GIB)
    assert plan.policies.count("selective") >= 10  # attention first: 12 x 4 GiB do not all fit beside "none"
    assert plan == mb.plan_activation_policies(
        FakeProbe(total=140 * GIB, state=60 * GIB, true_kept=KEPT, transient=10 * GIB), 12, RECOMPUTE, 126 * GIB)


def test_plan_survives_a_probe_that_runs_out_of_memory():
    """The pattern's block kept whole does not fit (call B at 256K): choose without "none", no crash."""
    probe = FakeProbe(total=140 * GIB, state=60 * GIB, true_kept=KEPT, transient=10 * GIB, none_spike=100 * GIB)
    plan = mb.plan_activation_policies(probe, 12, RECOMPUTE, cap=126 * GIB)
    assert "none" not in plan.policies and plan.peak_bytes is not None
    assert ("recover",) in probe.calls and any("kept whole" in n for n in plan.notes)


def test_plan_shrinks_when_the_measurement_underestimates():
    """The allocator readings miss half of what selective keeps: the first choice peaks above the
    cap (or runs out of memory), the budget shrinks, and the verified choice fits."""
    seen = dict(KEPT, selective=2.0 * GIB)
    probe = FakeProbe(total=140 * GIB, state=60 * GIB, true_kept=KEPT, transient=10 * GIB, seen_kept=seen)
    plan = mb.plan_activation_policies(probe, 12, RECOMPUTE, cap=126 * GIB)
    assert plan.peak_bytes is not None and plan.peak_bytes <= 126 * GIB
    assert len([c for c in probe.calls if c[0] == "peak"]) >= 3  # pattern, a rejected choice, the verified one
    assert plan.notes


def test_plan_falls_back_to_offload_when_nothing_verifies():
    probe = FakeProbe(total=75 * GIB, state=70 * GIB, true_kept=KEPT, transient=10 * GIB)
    plan = mb.plan_activation_policies(probe, 12, RECOMPUTE, cap=74 * GIB)
    assert plan.policies == ["offload"] * 12 and plan.peak_bytes is None


def test_shrunk_probe_extrapolates_and_costs_one_full_micro_batch():
    """At long context the measuring passes run on 1/8 and 1/4 of the tokens: the same choice as a
    full-length probe, and only the verification runs at full length."""
    full = FakeProbe(total=140 * GIB, state=60 * GIB, true_kept=KEPT, transient=10 * GIB)
    short = FakeProbe(total=140 * GIB, state=60 * GIB, true_kept=KEPT, transient=10 * GIB)
    a = mb.plan_activation_policies(full, 12, RECOMPUTE, cap=126 * GIB)
    b = mb.plan_activation_policies(short, 12, RECOMPUTE, cap=126 * GIB, shrink=8)
    assert a.policies == b.policies and b.kept_bytes == pytest.approx(a.kept_bytes)
    assert b.base_bytes == pytest.approx(a.base_bytes)
    assert [c[2] for c in short.calls if c[0] in ("peak", "marks")] == [1 / 8, 1 / 8, 2 / 8, 1.0]
    assert mb.probe_shrink(65536) == 8 and mb.probe_shrink(16384) == 4 and mb.probe_shrink(8192) == 1


# -- the host optimizer competes for the same memory -------------------------------------------------

STATE_8K = 87 * GIB  # 12 B/param of a rank's 7.8 B parameters (24 layers of qwen3-30b-a3b over 2 ranks)


def _rival(seq_len, tokens, state=STATE_8K, overlap=True):
    fwd = 24 * mb.recompute_seconds(get_shape("qwen3-30b-a3b"), seq_len, tokens)["full"]
    return mb.optimizer_rival("gpu_stream", state, fwd, overlap)


def test_short_context_gives_the_optimizer_its_memory_first():
    """At 8K a block recomputes in milliseconds while streaming the state costs ~1 s per step
    (measured: the 8K profile of session 4): the optimizer's valuable bytes are reserved before any
    block keeps more than it must, and the rest still buys the cheapest recomputation."""
    costs = _costs(8192, 8192)
    budget = 94 * GIB
    rival = _rival(8192, 8192)
    assert rival.valuable_bytes > 0.95 * STATE_8K  # a forward of ~0.1 s hides almost none of it
    policies, reserve = mb.split_memory(24, costs, budget, optimizer=rival)
    assert reserve == pytest.approx(rival.valuable_bytes)
    assert mb.policies_bytes(policies, costs.kept_bytes) + reserve <= budget
    alone = mb.choose_policies(24, costs, budget)  # without the rival the activations take it all
    assert set(alone) == {"none"} and policies.count("none") < 12
    assert mb.split_memory(24, costs, budget, optimizer=rival) == (policies, reserve)  # deterministic


def test_long_context_keeps_activations_first_when_the_update_hides():
    """At 128K the update hides behind a multi-second forward: nothing is reserved, and the choice
    is the activation-only one."""
    costs = _costs(131072, 65536)
    rival = _rival(131072, 65536)
    assert rival.valuable_bytes < 0.5 * STATE_8K
    budget = 24 * costs.kept_bytes["selective"]
    policies, reserve = mb.split_memory(24, costs, budget, optimizer=rival)
    # Attention's recomputation is worth more per byte than streaming the state: selective first.
    assert policies.count("selective") >= 20 and reserve <= budget - mb.policies_bytes(policies, costs.kept_bytes)


def test_accumulation_makes_recomputation_worth_more_than_the_update():
    """With 64 micro-batches per step a block's recomputation recurs 64 times, the update once."""
    costs = _costs(8192, 8192)
    budget = 94 * GIB
    rival = _rival(8192, 8192)
    _, reserve_1 = mb.split_memory(24, costs, budget, optimizer=rival, accum=1)
    policies_64, reserve_64 = mb.split_memory(24, costs, budget, optimizer=rival, accum=64)
    assert reserve_64 < reserve_1
    assert mb.policies_bytes(policies_64, costs.kept_bytes) > 24 * costs.kept_bytes["selective"]


def test_a_device_resident_engine_claims_nothing():
    assert mb.optimizer_rival("device", 10 * GIB, forward_seconds=0.1, overlap=True).valuable_bytes == 0.0


def test_no_overlap_makes_every_state_byte_valuable():
    rival = mb.optimizer_rival("cpu", 10 * GIB, forward_seconds=5.0, overlap=False)
    assert rival.valuable_bytes == 10 * GIB
    assert mb.optimizer_rival("cpu", 10 * GIB, forward_seconds=5.0, overlap=True).valuable_bytes == 0.0


def test_plan_verifies_against_the_cap_less_the_optimizer_share():
    probe = FakeProbe(total=140 * GIB, state=40 * GIB, true_kept=KEPT, transient=10 * GIB)
    rival = mb.OptimizerRival(seconds_per_byte=1.0, valuable_bytes=50 * GIB)  # worth more than any block
    plan = mb.plan_activation_policies(probe, 12, RECOMPUTE, cap=126 * GIB, optimizer=rival)
    assert plan.optimizer_bytes == pytest.approx(50 * GIB)
    assert plan.peak_bytes is not None and plan.peak_bytes <= 126 * GIB - plan.optimizer_bytes
