"""ExpertParallelExperts vs a single-device reference: values, gradients, weights after AdamW steps.

One spawn per world size runs every (layout, dispatcher, routing) case, to keep the file fast.
Ranks hold different token counts (T = 64 - 8 * rank), so pipelined ranks also run empty chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.dist_utils import run_distributed

E, H, I, K = 8, 16, 8, 2
STEPS = 3

# (name, cfg overrides, expect LLEP spilling in the first step: True / False / None = don't care)
VARIANTS = [
    ("alltoall", {"dispatcher": "alltoall"}),
    ("llep", {"dispatcher": "llep", "llep_min_chunk": 4}),
    ("llep_plain", {"dispatcher": "llep", "llep_min_chunk": 4, "llep_imbalance_threshold": 100.0}),
    ("pipelined_k1", {"dispatcher": "llep_pipelined", "llep_min_chunk": 4, "chunk_tokens": 4096}),
    ("pipelined_k4", {"dispatcher": "llep_pipelined", "llep_min_chunk": 2, "chunk_tokens": 16}),
]
ROUTINGS = ["balanced", "skewed", "empty_experts"]


class SingleDeviceExperts(nn.Module):
    """Local reference: sort by expert, one matmul per expert, weighted combine."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(E, H, I, device=device))
        self.w3 = nn.Parameter(torch.empty(E, H, I, device=device))
        self.w2 = nn.Parameter(torch.empty(E, I, H, device=device))

    def forward(self, x_TH, topk_idx_TK, topk_weight_TK):
        T, k = topk_idx_TK.shape
        flat = topk_idx_TK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        xs = x_TH[order // k]
        outs = []
        for e, xe in enumerate(torch.split(xs, torch.bincount(flat, minlength=E).tolist())):
            outs.append((F.silu(xe @ self.w1[e]) * (xe @ self.w3[e])) @ self.w2[e])
        ys = torch.cat(outs)
        y_copies = torch.empty_like(ys).index_copy(0, order, ys).view(T, k, -1)
        return (y_copies * topk_weight_TK.unsqueeze(-1)).float().sum(1).to(x_TH.dtype)


def _routing(kind: str, T: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "balanced":  # exactly uniform over experts: imbalance 1.0, LLEP must not spill
        return (torch.arange(T * K) % E).view(T, K)
    scores = torch.rand(T, E, generator=gen)
    if kind == "skewed":  # most tokens pick experts 0 and 1 (both homed on expert-group rank 0)
        scores[:, 0] += 10.0 * (torch.rand(T, generator=gen) < 0.9)
        scores[:, 1] += 5.0 * (torch.rand(T, generator=gen) < 0.8)
    else:  # experts 2, 5, 6, 7 never chosen
        scores[:, [2, 5, 6, 7]] = -1.0
    return scores.topk(K, dim=1).indices


def _data(world: int, routing: str, step: int):
    gen = torch.Generator().manual_seed(1000 * step + 7)
    out = []
    for r in range(world):
        T = 64 - 8 * r
        x = torch.randn(T, H, generator=gen)
        idx = _routing(routing, T, gen)
        w = torch.softmax(torch.randn(T, K, generator=gen), dim=1)
        gy = torch.randn(T, H, generator=gen)
        out.append((x, idx, w, gy))
    return out


def _full_weights():
    gen = torch.Generator().manual_seed(0)
    return {"w1": 0.3 * torch.randn(E, H, I, generator=gen), "w3": 0.3 * torch.randn(E, H, I, generator=gen),
            "w2": 0.3 * torch.randn(E, I, H, generator=gen)}


def _parallel_experts(layout, cfg):
    """ExpertParallelExperts built on meta, materialised, and loaded with this rank's shards of `_full_weights()`."""
    from torch.distributed.tensor import distribute_tensor

    from mop.parallel.experts import ExpertParallelExperts

    mod = ExpertParallelExperts.from_module(SingleDeviceExperts(device="meta"), layout, cfg)
    assert mod.w1.device.type == "meta"
    mod.to_empty(device="cpu")
    full = _full_weights()
    with torch.no_grad():
        for n, p in mod.named_parameters():
            p.to_local().copy_(distribute_tensor(full[n], p.device_mesh, p.placements, src_data_rank=None).to_local())
    return mod


def _reference(world: int, routing: str):
    ref = SingleDeviceExperts()
    with torch.no_grad():
        for n, t in _full_weights().items():
            getattr(ref, n).copy_(t)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    first = None
    for step in range(STEPS):
        per_rank, loss = [], 0.0
        for x, idx, w, gy in _data(world, routing, step):
            x, w = x.requires_grad_(), w.requires_grad_()
            y = ref(x, idx, w)
            loss = loss + (y * gy).sum()
            per_rank.append((y, x, w))
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = {"y": [y.detach() for y, _, _ in per_rank], "dx": [x.grad for _, x, _ in per_rank],
                     "dw": [w.grad for _, _, w in per_rank],
                     "grads": {n: p.grad.clone() for n, p in ref.named_parameters()}}
        opt.step()
    first["final"] = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return first


def _worker(rank: int, world: int, eps: list[int]):
    from mop.parallel.layout import Layout, LayoutSpec

    results = {}
    for ep in eps:
        layout = Layout.build(LayoutSpec(world, expert=ep), torch.device("cpu"))
        for name, cfg in VARIANTS:
            for routing in ROUTINGS:
                mod = _parallel_experts(layout, cfg)
                opt = torch.optim.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1)
                res = {"local_numel": sum(p.to_local().numel() for p in mod.parameters()),
                       "placements": {n: tuple(p.placements) for n, p in mod.named_parameters()}}
                for step in range(STEPS):
                    x, idx, w, gy = _data(world, routing, step)[rank]
                    x, w = x.requires_grad_(), w.requires_grad_()
                    y = mod(x, idx, w)
                    opt.zero_grad()
                    (y * gy).sum().backward()
                    if step == 0:
                        res.update(y=y.detach(), dx=x.grad, dw=w.grad,
                                   grads={n: p.grad.full_tensor() for n, p in mod.named_parameters()},
                                   n_llep=mod.dispatcher.n_llep_plans, n_plain=mod.dispatcher.n_plain_plans)
                    opt.step()
                res["final"] = {n: p.detach().full_tensor() for n, p in mod.named_parameters()}
                results[(ep, name, routing)] = res
    return results


def _check(world: int, eps: list[int]):
    outs = run_distributed(_worker, world, eps)
    refs = {routing: _reference(world, routing) for routing in ROUTINGS}
    tol = dict(atol=2e-5, rtol=2e-5)
    for ep in eps:
        for name, _ in VARIANTS:
            for routing in ROUTINGS:
                ref = refs[routing]
                ctx = f"W={world} Ep={ep} {name} {routing}"
                for rank, out in enumerate(outs):
                    res = out[(ep, name, routing)]
                    assert res["local_numel"] == 3 * E * H * I // world, ctx
                    torch.testing.assert_close(res["y"], ref["y"][rank], **tol, msg=f"y {ctx} rank {rank}")
                    torch.testing.assert_close(res["dx"], ref["dx"][rank], **tol, msg=f"dx {ctx} rank {rank}")
                    torch.testing.assert_close(res["dw"], ref["dw"][rank], **tol, msg=f"dw {ctx} rank {rank}")
                    for n in ("w1", "w3", "w2"):
                        torch.testing.assert_close(res["grads"][n], ref["grads"][n], **tol, msg=f"d{n} {ctx}")
                        torch.testing.assert_close(res["final"][n], ref["final"][n], **tol, msg=f"{n} {ctx}")
                    spilled = res["n_llep"] > 0
                    if name == "alltoall" or name == "llep_plain" or routing == "balanced":
                        assert not spilled, f"{ctx}: LLEP spilled where plain EP was expected"
                    elif routing == "skewed":
                        assert spilled, f"{ctx}: skewed routing should take the LLEP path"
                    if name == "pipelined_k4":
                        group = range(rank // ep * ep, rank // ep * ep + ep)
                        n_chunks = -(-max(64 - 8 * r for r in group) // 16)  # largest rank's T / chunk_tokens
                        assert res["n_llep"] + res["n_plain"] == n_chunks, ctx


def test_placements_and_meta_build():
    """Params are DTensors of the full shapes on the expert mesh, experts over "expert", I over "expert_shard"."""
    outs = run_distributed(_placement_worker, 2)
    for out in outs:
        assert out["shapes"] == {"w1": (E, H, I), "w3": (E, H, I), "w2": (E, I, H)}
        assert out["names"] == ("expert_shard", "expert")
        assert out["placements"]["w1"] == "(Shard(dim=2), Shard(dim=0))"
        assert out["placements"]["w2"] == "(Shard(dim=1), Shard(dim=0))"
        assert out["local"]["w1"] == (E // 2, H, I)


def _placement_worker(rank: int, world: int):
    from mop.parallel.experts import ExpertParallelExperts
    from mop.parallel.layout import Layout, LayoutSpec

    layout = Layout.build(LayoutSpec(world, expert=2), torch.device("cpu"))
    mod = ExpertParallelExperts.from_module(SingleDeviceExperts(device="meta"), layout, {"dispatcher": "llep"})
    mod.to_empty(device="cpu")
    return {"shapes": {n: tuple(p.shape) for n, p in mod.named_parameters()},
            "names": tuple(mod.w1.device_mesh.mesh_dim_names),
            "placements": {n: str(tuple(p.placements)) for n, p in mod.named_parameters()},
            "local": {n: tuple(p.to_local().shape) for n, p in mod.named_parameters()}}


def test_ep1_experts_are_sharded_as_dense_unless_a_chunked_dispatcher_bounds_their_memory():
    """Ep=1 leaves the model's experts to FSDP (sharded over W like dense weights, no dispatcher);
    llep_pipelined keeps the expert module for its chunks; Ep=2 always dispatches."""
    outs = run_distributed(_sharded_as_dense_worker, 2)
    for out in outs:
        assert out == {"alltoall@1": (True, "GroupedExperts"), "llep@1": (True, "GroupedExperts"),
                       "llep_pipelined@1": (False, "ExpertParallelExperts"), "alltoall@2": (False, "ExpertParallelExperts")}


def _sharded_as_dense_worker(rank: int, world: int):
    from mop.config import build_config
    from mop.models.transformer import Transformer
    from mop.parallel.layout import Layout
    from mop.parallel.parallelize import experts_sharded_as_dense, parallelize

    out = {}
    for disp, ep in (("alltoall", 1), ("llep", 1), ("llep_pipelined", 1), ("alltoall", 2)):
        job = build_config(None, ["--model.shape=tiny", f"--parallel.experts.degree={ep}",
                            f"--parallel.experts.dispatcher={disp}", "--training.device=cpu"])
        layout = Layout.build(job.parallel.layout_spec(world), torch.device("cpu"))
        with torch.device("meta"):
            model = Transformer(job.model)
        parallelize(model, layout, job.parallel)
        experts = next(b.moe.experts for b in model.layers.values() if b.is_moe)
        out[f"{disp}@{ep}"] = (experts_sharded_as_dense(layout, job.parallel.experts), type(experts).__name__)
    return out


def test_bad_config_rejected():
    from mop.parallel.experts import ExpertParallelConfig

    with pytest.raises(ValueError, match="dispatcher"):
        ExpertParallelConfig(dispatcher="deepep")
    with pytest.raises(ValueError, match="llep_alpha"):
        ExpertParallelConfig(llep_alpha=0.5)
    with pytest.raises(ValueError, match="max_chunks"):
        ExpertParallelConfig(max_chunks=0)


def test_world2_ep2():
    _check(2, [2])


def test_world4_ep2_and_ep4():
    _check(4, [2, 4])


def _checkpoint_worker(rank: int, world: int):
    """One step through a checkpointed block `x + experts(tanh(x))`, with and without checkpointing."""
    from mop.models.activation_policy import checkpoint_block
    from mop.parallel.layout import Layout, LayoutSpec

    layout = Layout.build(LayoutSpec(world, expert=2), torch.device("cpu"))
    x0, idx, w, gy = _data(world, "skewed", 0)[rank]
    out = {}
    for name, cfg in VARIANTS:
        mod = _parallel_experts(layout, cfg)
        calls = []
        compute = mod.dispatcher.compute
        mod.dispatcher.compute = lambda *a, **k: calls.append(1) or compute(*a, **k)

        def block(x):
            return x + mod(torch.tanh(x), idx, w)  # tanh saves its output: backward needs the recompute

        for ckpt in (False, True):
            calls.clear()
            x = x0.clone().requires_grad_()
            y = checkpoint_block(block, x) if ckpt else block(x)
            n_forward = len(calls)
            (y * gy).sum().backward()
            out[(name, ckpt)] = {"y": y.detach(), "dx": x.grad, "forward_calls": n_forward,
                                 "calls": len(calls), "dw1": mod.w1.grad.full_tensor()}
            mod.zero_grad()
    return out


def test_checkpointed_block_runs_experts_twice_and_matches():
    """Inside a checkpointed block the expert layer is its own checkpoint: the block's recompute pass
    skips it, so its GEMMs run once in forward and once in backward (never 3x), with equal results;
    without checkpointing, keep-mode dispatchers compute once and pipelined ones twice."""
    for rank_out in run_distributed(_checkpoint_worker, 2):
        for name, _ in VARIANTS:
            plain, ckpt = rank_out[(name, False)], rank_out[(name, True)]
            chunks = plain["forward_calls"]
            assert chunks >= 1
            assert ckpt["forward_calls"] == chunks, name
            assert ckpt["calls"] == 2 * chunks, f"{name}: {ckpt['calls']} computes for {chunks} chunks"
            assert plain["calls"] == (2 * chunks if name.startswith("pipelined") else chunks), name
            for k in ("y", "dx", "dw1"):
                torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-6, msg=f"{k} {name}")


def test_permute_rows_matches_index_select():
    """permute_rows: index_select's values, and the inverse gather as the exact gradient."""
    from mop.models.moe import permute_rows
    from mop.parallel.experts.dispatch import _inverse

    gen = torch.Generator().manual_seed(3)
    for n, dtype in ((37, torch.float32), (37, torch.bfloat16), (0, torch.float32)):
        perm = torch.randperm(n, generator=gen)
        x = torch.randn(n, 5, generator=gen).to(dtype)
        g = torch.randn(n, 5, generator=gen).to(dtype)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = permute_rows(a, perm, _inverse(perm)), b.index_select(0, perm)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


MP_K = 3  # more than 2 copies per token: the dispatch backward sums each token's K copies


def _mp_data(world: int):
    """Rank 1 routes no tokens at all (T = 0)."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for r in range(world):
        T = 0 if r == 1 else 40
        idx = torch.rand(T, E, generator=gen).topk(MP_K, dim=1).indices
        out.append((torch.randn(T, H, generator=gen), idx, torch.softmax(torch.randn(T, MP_K, generator=gen), 1),
                    torch.randn(T, H, generator=gen)))
    return out


def _graph_names(fn) -> set[str]:
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(nf for nf, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


def _mixed_precision_worker(rank: int, world: int):
    """fp32 and bf16 compute (param_dtype) with fp32 shards, top-3, a rank without tokens, +/- checkpointing."""
    from mop.models.activation_policy import checkpoint_block
    from mop.parallel.layout import Layout, LayoutSpec

    data = _mp_data(world)
    ref = SingleDeviceExperts()
    with torch.no_grad():
        for n, t in _full_weights().items():
            getattr(ref, n).copy_(t)
    ref_out = []
    for x, idx, w, gy in data:
        if not len(x):  # the reference cannot take T = 0
            ref_out.append((x, x, w))
            continue
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        (ref(x, idx, w) * gy).sum().backward()
        ref_out.append((ref(x, idx, w).detach(), x.grad, w.grad))
    out = {"ref": ref_out[rank], "ref_grads": {n: p.grad for n, p in ref.named_parameters()}}
    x0, idx, w0, gy = data[rank]
    for ep in (1, 2):  # Ep=1: the shards are all-gathered (in the compute dtype) over both ranks
        layout = Layout.build(LayoutSpec(world, expert=ep), torch.device("cpu"))
        for name, cfg in (VARIANTS[0], VARIANTS[4]):
            mod = _parallel_experts(layout, cfg)
            for dtype in (torch.float32, torch.bfloat16):
                mod.param_dtype = None if dtype == torch.float32 else dtype
                for ckpt in (False, True):
                    x, w = x0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_()
                    y = checkpoint_block(mod, x, idx, w) if ckpt else mod(x, idx, w)
                    names = _graph_names(y.grad_fn)
                    (y.float() * gy).sum().backward()
                    out[(ep, name, dtype, ckpt)] = {
                        "y": y.detach(), "dx": x.grad, "dw": w.grad, "names": names,
                        "grads": {n: p.grad.full_tensor() for n, p in mod.named_parameters()}}
                    mod.zero_grad()
    return out


def test_mixed_precision_topk3_and_empty_rank():
    """The cast to param_dtype happens inside the layer Function: no cast node in the graph, fp32 grads
    for the fp32 shards, same results with and without checkpointing; fp32 matches the reference."""
    for rank, out in enumerate(run_distributed(_mixed_precision_worker, 2)):
        ry, rdx, rdw = out["ref"]
        for key, res in out.items():
            if key in ("ref", "ref_grads"):
                continue
            ep, name, dtype, ckpt = key
            ctx = f"rank {rank} Ep={ep} {name} {dtype} ckpt={ckpt}"
            assert not any("ToCopy" in n for n in res["names"]), f"{ctx}: {res['names']}"
            assert res["y"].dtype == res["dx"].dtype == res["dw"].dtype == dtype, ctx
            assert all(g.dtype == torch.float32 for g in res["grads"].values()), ctx
            tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
            for k, r in (("y", ry), ("dx", rdx), ("dw", rdw)):
                torch.testing.assert_close(res[k].float(), r, **tol, msg=f"{k} {ctx}")
            for n, g in res["grads"].items():
                torch.testing.assert_close(g, out["ref_grads"][n], **tol, msg=f"d{n} {ctx}")
            if ckpt:
                plain = out[(ep, name, dtype, False)]
                for k in ("y", "dx", "dw"):
                    assert torch.equal(res[k], plain[k]), f"{k} {ctx}"
                for n, g in res["grads"].items():
                    assert torch.equal(g, plain["grads"][n]), f"d{n} {ctx}"
