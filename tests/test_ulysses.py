"""Ulysses / all-gather-KV attention over D gloo ranks equals single-process causal attention.

Every config runs on the spawned ranks (one spawn per world size, to stay fast); the parent process
assembles each rank's local output and q/k/v gradients along the sequence and compares them, fp32,
with `causal_attention` on the full sequence (values and gradients).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mop.ops.attention import causal_attention, reference_attention
from mop.parallel.ulysses import UlyssesAttention, query_slots, ulysses_factorization
from tests.dist_utils import run_distributed

B, DH = 2, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def _positions(S: int, docs: bool) -> torch.Tensor:
    """Per-document positions; documents cross rank boundaries, start on one, and include length 1."""
    if not docs:
        return torch.arange(S).repeat(B, 1)
    rows = []
    for starts in ([0, 5, S // 2, S // 2 + 3, S - 5], [0, 1, S // 3 + 1, S - 8]):
        pos, t = torch.empty(S, dtype=torch.long), torch.arange(S)
        for a, b in zip(starts, starts[1:] + [S]):
            pos[a:b] = t[a:b] - a
        rows.append(pos)
    return torch.stack(rows)


def _inputs(cfg: dict):
    """Deterministic full-sequence q, k, v, positions and output weights for a config."""
    g = torch.Generator().manual_seed(cfg["seed"])
    S = cfg["S"]
    q = torch.randn(B, cfg["hq"], S, DH, generator=g)
    k = torch.randn(B, cfg["hkv"], S, DH, generator=g)
    v = torch.randn(B, cfg["hkv"], S, DH, generator=g)
    w = torch.randn(B, cfg["hq"], S, DH, generator=g)
    return q, k, v, _positions(S, cfg["docs"]), w


def _run_configs(rank: int, world: int, configs: list[dict]):
    results = []
    groups = {}
    for cfg in configs:
        D = cfg["D"]
        if D not in groups:  # every rank creates every group, in the same order
            made = [dist.new_group(list(range(s, s + D))) for s in range(0, world, D)]
            groups[D] = made[rank // D]
        core = UlyssesAttention(groups[D], cfg["hq"], cfg["hkv"], cfg["chunks"], cfg["ring"])
        q, k, v, pos, w = _inputs(cfg)
        N = cfg["S"] // D
        sl = slice((rank % D) * N, (rank % D + 1) * N)
        q, k, v = (x[:, :, sl].clone().requires_grad_() for x in (q, k, v))
        out = core(q, k, v, pos[:, sl] if cfg["docs"] else None)
        (out * w[:, :, sl]).sum().backward()
        results.append({"UR": (core.ulysses_degree, core.ring_degree), "out": out.detach(),
                        "dq": q.grad, "dk": k.grad, "dv": v.grad})
    return results


def _check(world: int, configs: list[dict]) -> None:
    per_rank = run_distributed(_run_configs, world, configs)
    for n, cfg in enumerate(configs):
        D = cfg["D"]
        q, k, v, pos, w = _inputs(cfg)
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        ref = causal_attention(q, k, v, pos if cfg["docs"] else None)
        (ref * w).sum().backward()
        expected = {"out": ref.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        for g0 in range(0, world, D):  # each seq group computed the same rows independently
            mine = per_rank[g0:g0 + D]
            assert mine[0][n]["UR"] == cfg["UR"], cfg
            for key, exp in expected.items():
                got = torch.cat([r[n][key] for r in mine], dim=2)
                torch.testing.assert_close(got, exp, **TOL, msg=lambda m: f"{key} {cfg}: {m}")


def _cfg(D, hq, hkv, chunks=1, ring=None, docs=True, S=32, UR=None, seed=0):
    return dict(D=D, hq=hq, hkv=hkv, chunks=chunks, ring=ring, docs=docs, S=S, UR=UR, seed=seed)


def test_ulysses_world2_mha_gqa_chunks_docs():
    """D=2: MHA and GQA, head_chunks 1 and 2, with and without documents crossing the boundary."""
    _check(2, [
        _cfg(2, 4, 4, 1, docs=False, UR=(2, 1)),
        _cfg(2, 4, 4, 2, docs=True, UR=(2, 1), seed=1),
        _cfg(2, 8, 2, 1, docs=True, UR=(2, 1), seed=2),
        _cfg(2, 8, 2, 2, docs=False, UR=(2, 1), seed=3),
        _cfg(2, 8, 2, 4, docs=True, UR=(2, 1), seed=4),  # 1 q head per chunk: KV head resent per chunk
        _cfg(2, 1, 1, 1, docs=True, UR=(1, 2), seed=5),  # one head: pure all-gather-KV, zig-zag
    ])


def test_ulysses_world4_gqa_ring_fallback_and_subgroups():
    """D=4 (and two D=2 groups in a world of 4): GQA with D > Hkv, and the U x R fallback."""
    _check(4, [
        _cfg(4, 4, 4, 1, docs=True, UR=(4, 1)),
        _cfg(4, 8, 2, 1, docs=True, UR=(4, 1), seed=1),  # D > Hkv: each KV head serves 2 ranks
        _cfg(4, 8, 2, 2, docs=False, UR=(4, 1), seed=2),
        _cfg(4, 2, 2, 1, docs=True, UR=(2, 2), seed=3),  # D > Hq
        _cfg(4, 6, 6, 1, docs=True, UR=(2, 2), seed=4),  # D does not divide Hq: U=2, R=2
        _cfg(4, 6, 6, 3, docs=False, UR=(2, 2), seed=5),
        _cfg(4, 6, 3, 3, docs=True, UR=(1, 4), seed=6),  # no U > 1 splits (6, 3): all-gather-KV over 4
        _cfg(4, 4, 2, 2, ring=4, docs=True, UR=(1, 4), seed=7),  # explicit ring degree
        _cfg(4, 4, 4, 1, ring=4, docs=True, S=36, UR=(1, 4), seed=8),  # 2R does not divide S: contiguous slots
        _cfg(2, 8, 2, 2, docs=True, UR=(2, 1), seed=9),  # seq groups {0,1} and {2,3}
        _cfg(2, 3, 3, 1, docs=True, UR=(1, 2), seed=10),
    ])


def test_factorization_choices():
    assert ulysses_factorization(8, 8, 2) == (8, 1)  # KV heads replicated, pure Ulysses
    assert ulysses_factorization(8, 4, 4) == (4, 2)
    assert ulysses_factorization(64, 32, 8) == (32, 2)
    assert ulysses_factorization(4, 6, 3) == (1, 4)
    assert ulysses_factorization(4, 6, 6, head_chunks=3) == (2, 2)


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(seq_degree=4, n_heads=6, n_kv_heads=6, ring_degree=1), r"Ulysses degrees that work: \[1, 2, 3, 6\]"),
        (dict(seq_degree=4, n_heads=8, n_kv_heads=2, ring_degree=3), r"ring_degree=3 must divide .* \[1, 2, 4\]"),
        (dict(seq_degree=4, n_heads=8, n_kv_heads=2, head_chunks=3), r"head_chunks=3 .* valid: \[1, 2\]"),
        (dict(seq_degree=2, n_heads=12, n_kv_heads=4, head_chunks=3), r"head_chunks=3 .* valid: \[1, 2, 6\]"),
        (dict(seq_degree=2, n_heads=6, n_kv_heads=4), r"multiple of n_kv_heads=4"),
        (dict(seq_degree=2, n_heads=4, n_kv_heads=4, head_chunks=0), r"head_chunks=0 must be >= 1"),
    ],
)
def test_invalid_configs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        ulysses_factorization(**args)


def test_zigzag_slots_balance_causal_work():
    """Zig-zag token slots partition the sequence and give every slot the same causal work."""
    S, R = 64, 4
    slots = query_slots(S, R)
    covered = sorted(t for slot in slots for a, b in slot for t in range(a, b))
    assert covered == list(range(S))
    work = [sum(t + 1 for a, b in slot for t in range(a, b)) for slot in slots]
    assert len(set(work)) == 1, work


def test_lower_right_pieces_match_reference():
    """Single-process check of the slot attention (zig-zag query ranges over a key prefix)."""
    from mop.parallel.ulysses import slot_attention
    from mop.ops.attention import document_spans

    g = torch.Generator().manual_seed(0)
    S = 32
    q, k, v = (torch.randn(B, h, S, DH, generator=g) for h in (4, 2, 2))
    pos = _positions(S, True)
    ref = reference_attention(q, k, v, pos)
    for slot in query_slots(S, 2):
        idx = torch.cat([torch.arange(a, b) for a, b in slot])
        end = slot[-1][1]
        got = slot_attention(q[:, :, idx], k[:, :, :end], v[:, :, :end], slot, document_spans(pos))
        torch.testing.assert_close(got, ref[:, :, idx], **TOL)
