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


def _cfg(D, hq, hkv, chunks=1, ring=None, docs=True, S=32, UR=None, seed=0):
    return dict(D=D, hq=hq, hkv=hkv, chunks=chunks, ring=ring, docs=docs, S=S, UR=UR, seed=seed)


WORLD = 4
CONFIGS = {  # D=2 runs as two seq groups {0,1}, {2,3} of the world of 4 (group ranks != global ranks)
    "D2-mha": _cfg(2, 4, 4, 1, docs=False, UR=(2, 1)),
    "D2-mha-chunks2-docs": _cfg(2, 4, 4, 2, docs=True, UR=(2, 1), seed=1),
    "D2-gqa-docs": _cfg(2, 8, 2, 1, docs=True, UR=(2, 1), seed=2),
    "D2-gqa-chunks2": _cfg(2, 8, 2, 2, docs=False, UR=(2, 1), seed=3),
    "D2-gqa-chunks4-docs": _cfg(2, 8, 2, 4, docs=True, UR=(2, 1), seed=4),  # KV head resent per chunk
    "D2-one-head-ring": _cfg(2, 1, 1, 1, docs=True, UR=(1, 2), seed=5),  # pure all-gather-KV, zig-zag
    "D2-hq3-ring": _cfg(2, 3, 3, 1, docs=True, UR=(1, 2), seed=6),
    "D4-mha-docs": _cfg(4, 4, 4, 1, docs=True, UR=(4, 1), seed=7),
    "D4-gqa-D>Hkv-docs": _cfg(4, 8, 2, 1, docs=True, UR=(4, 1), seed=8),  # each KV head serves 2 ranks
    "D4-gqa-D>Hkv-chunks2": _cfg(4, 8, 2, 2, docs=False, UR=(4, 1), seed=9),
    "D4-hq2-U2R2-docs": _cfg(4, 2, 2, 1, docs=True, UR=(2, 2), seed=10),  # D > Hq
    "D4-hq6-U2R2-docs": _cfg(4, 6, 6, 1, docs=True, UR=(2, 2), seed=11),  # D does not divide Hq
    "D4-hq6-U2R2-chunks3": _cfg(4, 6, 6, 3, docs=False, UR=(2, 2), seed=12),
    "D4-gqa-hq6-hkv3-U1R4-chunks3": _cfg(4, 6, 3, 3, docs=True, UR=(1, 4), seed=13),  # no U > 1 splits (6, 3)
    "D4-explicit-ring4-chunks2": _cfg(4, 4, 2, 2, ring=4, docs=True, UR=(1, 4), seed=14),
    "D4-ring4-contiguous-slots": _cfg(4, 4, 4, 1, ring=4, docs=True, S=36, UR=(1, 4), seed=15),  # 2R does not divide S
}


@pytest.fixture(scope="module")
def distributed_results():
    """One spawn of 4 gloo ranks runs every config (spawning dominates the cost on CPU)."""
    per_rank = run_distributed(_run_configs, WORLD, list(CONFIGS.values()))
    return {name: [r[n] for r in per_rank] for n, name in enumerate(CONFIGS)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_single_process_attention(distributed_results, name):
    """Output and q/k/v gradients of every rank, assembled, equal causal_attention on the full sequence."""
    cfg, per_rank = CONFIGS[name], distributed_results[name]
    D = cfg["D"]
    q, k, v, pos, w = _inputs(cfg)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    ref = causal_attention(q, k, v, pos if cfg["docs"] else None)
    (ref * w).sum().backward()
    expected = {"out": ref.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for g0 in range(0, WORLD, D):  # each seq group computed the same rows independently
        group = per_rank[g0:g0 + D]
        assert all(r["UR"] == cfg["UR"] for r in group)
        for key, exp in expected.items():
            got = torch.cat([r[key] for r in group], dim=2)
            torch.testing.assert_close(got, exp, **TOL, msg=lambda m: f"{key}: {m}")


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


def _spans_memo_worker(rank: int, world: int):
    from mop.models.shapes import get_shape
    from mop.models.transformer import Transformer
    from mop.parallel.layout import Layout, LayoutSpec
    from mop.parallel.parallelize import apply_sequence_parallel
    from mop.parallel.ulysses_config import SeqParallelConfig

    with torch.device("meta"):
        model = Transformer(get_shape("debug", n_layers=3))
    apply_sequence_parallel(model, Layout.build(LayoutSpec(world, seq=world), torch.device("cpu")),
                            SeqParallelConfig(degree=world, head_chunks=1))
    cores = [block.attention.core for block in model.layers.values()]
    calls = []
    for core in cores:  # count the gathers of positions (each one a host sync)
        real = core._global_spans
        core._global_spans = lambda p, d, real=real: calls.append(1) or real(p, d)
    cfg = model.cfg
    q = torch.randn(1, cfg.n_heads, 4, DH)
    k = v = torch.randn(1, cfg.n_kv_heads, 4, DH)
    positions = torch.arange(4)[None] + 4 * rank
    for core in cores:  # one micro-batch: every layer gets the same positions tensor
        core(q, k, v, positions)
    once = len(calls)
    positions = positions.clone()  # the next micro-batch
    for core in cores:
        core(q, k, v, positions)
    return dict(shared=len({id(c.spans_memo) for c in cores}), once=once, twice=len(calls))


def test_ulysses_layers_share_one_spans_memo():
    """parallelize gives every Ulysses core of a model one spans memo: the positions are gathered
    (a host sync) once per micro-batch, not once per layer; new positions are gathered again."""
    for r in run_distributed(_spans_memo_worker, 2):
        assert r == dict(shared=1, once=1, twice=2)
