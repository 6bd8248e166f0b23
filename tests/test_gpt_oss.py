"""gpt-oss pieces against plain references: sink / sliding-window attention (one device, and under
Ulysses at D = 2 and 4, values and gradients incl. the sinks'), the clamped SwiGLU with expert biases,
and the expert-parallel kernel of gpt-oss' biased, clamped experts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mop.ops.attention_variants import attention_piece, reference_variant_attention, variant_attention
from tests.dist_utils import run_distributed
from tests.test_ulysses import B, DH, _positions

TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(hq, hkv, S, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(B, h, S, DH, generator=g) for h in (hq, hkv, hkv, hq))
    return q, k, v, torch.randn(hq, generator=g), w


@pytest.mark.parametrize("sinks,window,docs", [(True, 0, True), (False, 5, True), (True, 5, True), (True, 3, False),
                                               (True, 100, True)])
def test_variant_attention_matches_reference(sinks, window, docs):
    q, k, v, s, w = _inputs(4, 2, 40, seed=window)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s)]
    pos = _positions(40, docs)
    got = variant_attention(*leaves[:3], pos, sinks=leaves[3] if sinks else None, window=window)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, s)]
    ref = reference_variant_attention(*ref_leaves[:3], pos, sinks=ref_leaves[3] if sinks else None, window=window)
    torch.testing.assert_close(got, ref, **TOL)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_window_blocks_and_lower_right_alignment():
    """Small query blocks and queries that start after key 0 (Ulysses' token slots) give the same rows."""
    q, k, v, s, _ = _inputs(4, 2, 40, seed=3)
    full = reference_variant_attention(q, k, v, sinks=s, window=7)
    piece = attention_piece(q[:, :, 25:], k, v, sinks_H=s, window=7, block=4)  # last 15 queries, all keys
    torch.testing.assert_close(piece, full[:, :, 25:], **TOL)


def _ulysses_rank(rank, world, configs):
    from mop.parallel.ulysses import UlyssesAttention

    out = []
    groups = {}
    for cfg in configs:
        D = cfg["D"]
        if D not in groups:
            groups[D] = [dist.new_group(list(range(a, a + D))) for a in range(0, world, D)][rank // D]
        core = UlyssesAttention(groups[D], cfg["hq"], cfg["hkv"], cfg["chunks"])
        q, k, v, s, w = _inputs(cfg["hq"], cfg["hkv"], cfg["S"], cfg["seed"])
        N = cfg["S"] // D
        sl = slice((rank % D) * N, (rank % D + 1) * N)
        q, k, v = (x[:, :, sl].clone().requires_grad_() for x in (q, k, v))
        s = s.clone().requires_grad_()
        o = core(q, k, v, _positions(cfg["S"], True)[:, sl], sinks=s, window=cfg["window"])
        (o * w[:, :, sl]).sum().backward()
        out.append({"UR": (core.ulysses_degree, core.ring_degree), "out": o.detach(), "dq": q.grad, "dk": k.grad,
                    "dv": v.grad, "ds": s.grad})
    return out


ULYSSES = {  # D=2 runs as two sequence groups of the world of 4
    "D2-gqa-chunks2": dict(D=2, hq=8, hkv=2, chunks=2, S=32, window=5, seed=0, UR=(2, 1)),
    "D4-gqa-D>Hkv": dict(D=4, hq=8, hkv=2, chunks=1, S=32, window=7, seed=1, UR=(4, 1)),
    "D4-hq2-U2R2-zigzag": dict(D=4, hq=2, hkv=2, chunks=1, S=32, window=6, seed=2, UR=(2, 2)),
    "D4-full-attention-sinks": dict(D=4, hq=8, hkv=4, chunks=2, S=32, window=0, seed=3, UR=(4, 1)),
}


@pytest.fixture(scope="module")
def ulysses_results():
    per_rank = run_distributed(_ulysses_rank, 4, list(ULYSSES.values()))
    return {name: [r[n] for r in per_rank] for n, name in enumerate(ULYSSES)}


@pytest.mark.parametrize("name", list(ULYSSES))
def test_ulysses_sinks_and_windows_equal_one_device(ulysses_results, name):
    """Outputs and q/k/v gradients assembled along the sequence, and the sinks' gradient summed over
    the group (what FSDP's SUM reduction does), equal the one-device reference."""
    cfg, per_rank = ULYSSES[name], ulysses_results[name]
    q, k, v, s, w = (t.clone().requires_grad_() for t in _inputs(cfg["hq"], cfg["hkv"], cfg["S"], cfg["seed"]))
    ref = reference_variant_attention(q, k, v, _positions(cfg["S"], True), sinks=s, window=cfg["window"])
    (ref * w).sum().backward()
    D = cfg["D"]
    for g0 in range(0, 4, D):
        group = per_rank[g0:g0 + D]
        assert all(r["UR"] == cfg["UR"] for r in group)
        for key, exp in (("out", ref.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            torch.testing.assert_close(torch.cat([r[key] for r in group], dim=2), exp, **TOL, msg=key)
        torch.testing.assert_close(sum(r["ds"] for r in group), s.grad, **TOL)


def test_clamped_swiglu_experts_with_biases_match_a_per_expert_loop():
    from mop.models.moe import GroupedExperts

    torch.manual_seed(0)
    E, H, I, T, K, limit = 4, 8, 6, 10, 2, 0.7
    experts = GroupedExperts(E, H, I, bias=True, swiglu_limit=limit, swiglu_alpha=1.702)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(T, H)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    wts = torch.rand(T, K)
    ref = torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]
            gate = (x[t] @ experts.w1[e] + experts.b1[e]).clamp(max=limit)
            up = (x[t] @ experts.w3[e] + experts.b3[e]).clamp(-limit, limit)
            h = gate * torch.sigmoid(1.702 * gate) * (up + 1)
            ref[t] += wts[t, j] * (h @ experts.w2[e] + experts.b2[e])
    torch.testing.assert_close(experts(x, idx, wts), ref.detach(), **TOL)
    assert F.silu(torch.tensor(1.0)) != 1.0  # (sanity: the clamped form is not plain silu)


def test_expert_parallel_mlp_matches_the_model_experts():
    """The expert-parallel kernel (`expert_mlp` on expert-grouped rows, biases by group counts, the
    clamped activation) computes what the model's GroupedExperts computes."""
    from mop.models.moe import GroupedExperts
    from mop.parallel.experts.dispatch import ExpertActivation, expert_mlp

    torch.manual_seed(0)
    E, H, I, limit = 4, 8, 6, 0.7
    experts = GroupedExperts(E, H, I, bias=True, swiglu_limit=limit)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    counts = torch.tensor([3, 0, 2, 4])
    x = torch.randn(int(counts.sum()), H)
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
    idx, wts = expert_of_row[:, None], torch.ones(x.shape[0], 1)  # one slot per row, weight 1
    want = experts(x, idx, wts)
    got = expert_mlp(x, counts, experts.w1, experts.w3, experts.w2, experts.b1, experts.b3, experts.b2,
                     act=ExpertActivation(limit, 1.702))
    torch.testing.assert_close(got, want, **TOL)
