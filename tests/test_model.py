"""Model pieces against naive references; shapes and parameter counts on the meta device."""

import math

import pytest
import torch
import torch.nn.functional as F

from mop.models.config import ModelConfig
from mop.models.layers import apply_rope, rope_cos_sin
from mop.models.moe import GroupedExperts, Router
from mop.models.shapes import SHAPES, get_shape
from mop.models.transformer import Transformer
from mop.ops.attention import causal_attention, reference_attention
from mop.ops.grouped_mm import grouped_mm


def test_grouped_mm_matches_per_expert_loop_with_empty_groups():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 2])
    x = torch.randn(int(counts.sum()), 6, requires_grad=True)
    w = torch.randn(5, 6, 4, requires_grad=True)
    y = grouped_mm(x, w, counts)
    ref, start = [], 0
    for e, c in enumerate(counts.tolist()):
        ref.append(x[start:start + c] @ w[e])
        start += c
    ref = torch.cat(ref)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert gw[1].abs().sum() == 0 and gw[3].abs().sum() == 0  # experts without tokens get zero grads


def _router(score_func="softmax", norm_topk=True, expert_bias=False, aux=0.0, route_scale=1.0):
    cfg = ModelConfig(dim=8, n_experts=6, top_k=2, score_func=score_func, norm_topk=norm_topk,
                      expert_bias=expert_bias, aux_loss_coef=aux, route_scale=route_scale)
    r = Router(cfg)
    torch.manual_seed(1)
    torch.nn.init.normal_(r.gate.weight)
    return r


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_router_topk_and_weights_match_naive(score_func, norm_topk):
    r = _router(score_func, norm_topk, route_scale=2.0)
    x = torch.randn(10, 8)
    idx, w, _ = r(x)
    for t in range(10):
        logits = x[t] @ r.gate.weight.T
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        order = sorted(range(6), key=lambda e: -scores[e].item())[:2]
        assert sorted(idx[t].tolist()) == sorted(order)
        sel = scores[idx[t]]
        if norm_topk:
            sel = sel / sel.sum()
        torch.testing.assert_close(w[t], 2.0 * sel)


def test_router_expert_bias_changes_selection_not_weights():
    r = _router("sigmoid", norm_topk=False, expert_bias=True)
    x = torch.randn(12, 8)
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0]))  # force expert 5 into every top-k
    idx, w, _ = r(x)
    assert (idx == 5).any(dim=1).all()
    scores = (x @ r.gate.weight.T).sigmoid()
    torch.testing.assert_close(w, scores.gather(1, idx))  # weights are the unbiased scores


def test_router_aux_loss_matches_switch_formula():
    r = _router(aux=0.1)
    x = torch.randn(16, 8)
    idx, _, aux = r(x)
    probs = (x @ r.gate.weight.T).softmax(-1)
    f = torch.bincount(idx.flatten(), minlength=6).float() / (16 * 2)
    torch.testing.assert_close(aux, 0.1 * 6 * (f * probs.mean(0)).sum())


def test_grouped_experts_match_per_token_loop():
    torch.manual_seed(0)
    ex = GroupedExperts(4, 6, 5)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(7, 6)
    idx = torch.tensor([[0, 1], [1, 0], [3, 1], [3, 0], [1, 3], [0, 3], [1, 0]])
    w = torch.rand(7, 2)
    y = ex(x, idx, w)
    ref = torch.zeros(7, 6)
    for t in range(7):
        for k in range(2):
            e = idx[t, k]
            h = F.silu(x[t] @ ex.w1[e]) * (x[t] @ ex.w3[e])
            ref[t] += w[t, k] * (h @ ex.w2[e])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_grouped_experts_backward_matches_the_loop_with_no_atomic_scatter():
    """The experts' backward is gathers (slot expansion, combine), never index_select's atomic
    index_add_ (slow in bf16 on CUDA, order-dependent); gradients equal the per-token loop's."""
    torch.manual_seed(0)
    ex = GroupedExperts(4, 6, 5)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(7, 6, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 0], [3, 1], [3, 0], [1, 3], [0, 3], [1, 0]])
    w = torch.rand(7, 2, requires_grad=True)
    y = ex(x, idx, w)
    nodes, stack = set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in nodes:
            nodes.add(type(fn).__name__)
            stack += [n for n, _ in fn.next_functions]
    assert not {n for n in nodes if n.startswith(("IndexSelectBackward", "IndexBackward", "IndexAddBackward"))}
    g = torch.randn(7, 6)
    grads = torch.autograd.grad(y, [x, w, ex.w1, ex.w2], g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.stack([sum(wr[t, k] * ((F.silu(xr[t] @ ex.w1[idx[t, k]]) * (xr[t] @ ex.w3[idx[t, k]])) @ ex.w2[idx[t, k]])
                           for k in range(2)) for t in range(7)])
    for a, b in zip(grads, torch.autograd.grad(ref, [xr, wr, ex.w1, ex.w2], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_attention_with_document_masks_matches_explicit_masked_softmax(hq, hkv):
    torch.manual_seed(0)
    B, S, D = 2, 20, 8
    q = torch.randn(B, hq, S, D, requires_grad=True)
    k = torch.randn(B, hkv, S, D, requires_grad=True)
    v = torch.randn(B, hkv, S, D, requires_grad=True)
    positions = torch.stack([torch.cat([torch.arange(7), torch.arange(9), torch.arange(4)]), torch.arange(S)])
    out = causal_attention(q, k, v, positions)
    ref = reference_attention(q, k, v, positions)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A token of the second document must not see the first: perturb doc 1, doc 2's outputs stay.
    k2 = k.detach().clone()
    k2[0, :, :7] += 5
    out2 = causal_attention(q, k2, v, positions)
    torch.testing.assert_close(out2[0, :, 7:], out[0, :, 7:].detach())


def test_rope_matches_complex_rotation_and_is_relative():
    torch.manual_seed(0)
    D, theta = 8, 10000.0
    x = torch.randn(1, 5, 2, D)
    pos = torch.arange(5)[None]
    y = apply_rope(x, *rope_cos_sin(pos, D, theta))
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    xc = torch.complex(x[..., : D // 2], x[..., D // 2:])
    yc = xc * torch.polar(torch.ones(5, D // 2), pos[0, :, None].float() * inv)[None, :, None, :]
    torch.testing.assert_close(y, torch.cat([yc.real, yc.imag], -1), rtol=1e-5, atol=1e-5)
    # <R(p)q, R(p+d)k> depends only on d.
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def dot(p1, p2):
        a = apply_rope(q, *rope_cos_sin(torch.tensor([[p1]]), D, theta))
        b = apply_rope(k, *rope_cos_sin(torch.tensor([[p2]]), D, theta))
        return (a * b).sum()

    torch.testing.assert_close(dot(3, 7), dot(10, 14), rtol=1e-5, atol=1e-5)


def test_model_init_is_deterministic_and_meta_first():
    cfg = get_shape("debug")
    with torch.device("meta"):
        m1, m2 = Transformer(cfg), Transformer(cfg)
    assert all(p.is_meta for p in m1.parameters())
    for m in (m1, m2):
        m.to_empty(device="cpu")
        m.init_weights(seed=3)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    assert torch.all(m1.layers["0"].attention_norm.weight == 1)
    assert m1.tok_embeddings.weight.std().item() == pytest.approx(cfg.init_std, rel=0.2)
    with torch.device("meta"):
        m3 = Transformer(cfg)
    m3.to_empty(device="cpu")
    m3.init_weights(seed=4)
    assert not torch.equal(m3.tok_embeddings.weight, m1.tok_embeddings.weight)


def test_forward_loss_equals_plain_cross_entropy():
    cfg = get_shape("debug")
    with torch.device("meta"):
        m = Transformer(cfg)
    m.to_empty(device="cpu")
    m.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = torch.randint(0, cfg.vocab_size, (2, 16))
    labels[0, :3] = -100
    positions = torch.arange(16).repeat(2, 1)
    ce, aux = m(tokens, positions, labels)
    hidden = m(tokens, positions)
    ref = F.cross_entropy(hidden.flatten(0, 1) @ m.output.weight.T, labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,total,active,tol", [
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.02),
    ("qwen3-235b-a22b", 235e9, 22e9, 0.02),
])
def test_param_counts_match_published(name, total, active, tol):
    counts = SHAPES[name].param_counts()
    assert counts["total"] == pytest.approx(total, rel=tol)
    assert counts["active"] == pytest.approx(active, rel=tol)


def test_gpt_oss_counts_match_published_without_sinks():
    counts = SHAPES["gpt-oss-20b"].param_counts()
    assert counts["total"] == pytest.approx(20.9e9, rel=0.02)
    # OpenAI's "3.6B active" excludes the input embedding table.
    assert counts["active"] - counts["embedding"] == pytest.approx(3.6e9, rel=0.02)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_meta_model_parameter_count_equals_formula(name):
    with torch.device("meta"):
        m = Transformer(SHAPES[name])
    n = sum(p.numel() for p in m.parameters())
    assert n == SHAPES[name].param_counts()["total"]
    assert all(p.is_meta for p in m.parameters())


def test_flops_formula():
    cfg = SHAPES["qwen3-30b-a3b"]
    c = cfg.param_counts()
    S = 8192
    expected = 6 * (c["active"] - c["embedding"]) + 6 * cfg.n_layers * S * cfg.n_heads * cfg.head_dim
    assert cfg.flops_per_token(S) == expected
    assert math.isclose(cfg.flops_per_token(S) / 1e9, 6 * 3.04 + 6 * 48 * 8192 * 4096 / 1e9, rel_tol=0.02)


def test_document_spans_computed_once_per_forward(monkeypatch):
    """The spans (a host sync) are shared by all layers of a forward, recomputed for new positions."""
    import mop.ops.attention as attn

    calls = []
    real = attn.document_spans
    monkeypatch.setattr(attn, "document_spans", lambda p: calls.append(1) or real(p))
    cfg = get_shape("debug", n_layers=3)
    with torch.device("meta"):
        m = Transformer(cfg)
    m.to_empty(device="cpu")
    m.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    m(tokens, positions)
    assert len(calls) == 1
    m(tokens, positions.clone())
    assert len(calls) == 2


@pytest.mark.parametrize("docs", [False, True])
def test_activation_policies_are_bit_identical_and_run_attention_as_planned(docs, monkeypatch):
    """Every per-block policy mix gives bit-identical loss and gradients to no checkpointing (CPU,
    fp32), and the attention kernel runs forward once per block with "none" and "selective", twice
    with "full"/"offload" (the recompute pass), never a third time in backward."""
    from mop.config import build_config
    from mop.models import attention_core
    from mop.models.transformer import Transformer

    cfg = build_config(None, ["--model.shape=debug", "--model.n_layers=4"]).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)
    if docs:  # packed documents: several fused calls per row
        positions = torch.cat([torch.arange(10), torch.arange(22)]).expand(2, 32)
    calls = []
    real = attention_core.causal_attention
    monkeypatch.setattr(attention_core, "causal_attention", lambda *a: calls.append(1) or real(*a))
    mixes = [["none"] * 4, ["selective"] * 4, ["full"] * 4, ["offload"] * 4,
             ["offload", "selective", "full", "none"]]
    results = []
    for policies in mixes:
        model = Transformer(cfg)
        model.init_weights(0)
        model.block_policies = policies
        calls.clear()
        ce, aux = model(tokens, positions, tokens)
        if "offload" in policies:
            offloaded = [i for i, p in enumerate(policies) if p == "offload"]
            assert sorted(model._stashes) == offloaded
            assert all(s.device_ref is None and s.host is not None for s in model._stashes.values())
        (ce + aux).backward()
        expected = sum(2 if p in ("full", "offload") else 1 for p in policies)
        assert len(calls) == expected, (policies, len(calls))
        assert all(c.core._slots.output is None and c.core._slots.state is None
                   for c in (b.attention for b in model.layers.values()))  # nothing left behind
        results.append((ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _assert_bit_identical(results)


def _assert_bit_identical(results):
    """results: [(loss, {name: grad})] per run; every run equals the first to the bit."""
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for n, g in grads.items():
            assert torch.equal(g, results[0][1][n]), n


def test_parse_policies():
    from mop.models.activation_policy import parse_policies

    assert parse_policies("full", 3) == ["full"] * 3
    assert parse_policies("none*1,selective*1,offload", 4) == ["none", "selective", "offload", "offload"]
    for bad, msg in [("fast", "not one of"), ("full,none", "only the last"), ("full*5", "model has 3"),
                     ("full*x", "integer")]:
        with pytest.raises(ValueError, match=msg):
            parse_policies(bad, 3)


def test_recompute_reuses_the_routers_reduced_statistics():
    """A checkpointed block's recompute reuses the statistics its forward all-reduced (one reduction
    per router per forward, not two), and the aux loss's gradients stay bit-identical to no
    checkpointing. The reducer here doubles the counts (a stand-in for other ranks' tokens), so a
    recompute that reduced its local counts again, or used them unreduced, would change the gradients."""
    from mop.config import build_config
    from mop.models.transformer import Transformer

    cfg = build_config(None, ["--model.shape=debug", "--model.n_layers=3", "--model.aux_loss_coef=0.1"]).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)
    results = []
    for policies in (["none"] * 3, ["full"] * 3, ["selective", "offload", "full"]):
        model = Transformer(cfg)
        model.init_weights(0)
        model.block_policies = policies
        calls = []
        for r in model.routers():
            r.reduce_stats = lambda s, calls=calls: calls.append(1) or s * 2
        ce, aux = model(tokens, positions, tokens)
        (ce + aux).backward()
        assert len(calls) == len(model.routers()), policies  # once per router, in forward only
        results.append((aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _assert_bit_identical(results)


def test_routers_statistics_are_reduced_asynchronously_and_waited_for_after_the_last_block():
    """With a reducer that can start a sum (`start` -> handle.wait()), every router launches its
    all-reduce in its forward and the model waits for them all after its last block (PendingAux),
    instead of one blocking all-reduce per layer. The aux loss and every gradient are bit-identical
    to the blocking reducer's, under every activation policy, and a recompute launches nothing."""
    from mop.config import build_config
    from mop.models.transformer import Transformer

    cfg = build_config(None, ["--model.shape=debug", "--model.n_layers=3", "--model.aux_loss_coef=0.1"]).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)

    class Reducer:  # doubles the counts: a stand-in for the other ranks' tokens
        def __init__(self, log):
            self.log = log

        def __call__(self, s):
            self.log.append("sync")
            return s * 2

        def start(self, s):
            self.log.append("start")
            log = self.log

            class Handle:
                def wait(self):
                    log.append("wait")
                    return s * 2
            return Handle()

    def run(policies, asynchronous):
        model = Transformer(cfg)
        model.init_weights(0)
        model.block_policies = policies
        log = []
        for r in model.routers():
            r.reduce_stats = Reducer(log) if asynchronous else (lambda s, log=log: log.append("sync") or s * 2)
        ce, aux = model(tokens, positions, tokens)
        forward_log = list(log)
        (ce + aux).backward()
        assert log == forward_log  # backward (and its recomputes) reduces nothing
        return aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, forward_log

    n = len(Transformer(cfg).routers())
    ref_aux, ref_grads, ref_log = run(["none"] * 3, asynchronous=False)
    assert ref_log == ["sync"] * n
    for policies in (["none"] * 3, ["full"] * 3, ["selective", "offload", "full"]):
        aux, grads, log = run(policies, asynchronous=True)
        assert log == ["start"] * n + ["wait"] * n, (policies, log)  # every launch before the first wait
        assert torch.equal(aux, ref_aux), policies
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (policies, name)
