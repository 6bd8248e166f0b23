"""Vocabulary: chunked CE, the P-rank ring loss and the vocab-parallel head / embedding vs single-process references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mop.ops.cross_entropy import OutputHead, chunked_cross_entropy
from mop.parallel.vocab_ring import chunk_sizes, offsets_of, resolve_schedule, vocab_parallel_cross_entropy
from tests.dist_utils import run_distributed

TOL = dict(atol=1e-5, rtol=1e-5)


def reference_loss(hidden_NH, weight_VH, labels_N, normalizer):
    """Plain PyTorch on materialised logits: the ground truth."""
    logits = hidden_NH @ weight_VH.t()
    return F.cross_entropy(logits, labels_N, reduction="sum", ignore_index=-100) / normalizer


def make_labels(n, V, gen, mask_every=4):
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::mask_every] = -100
    return labels


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (outputs of every dispatched op)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


# -- single device ------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_strip_elements", [2**28, 40])
def test_chunked_cross_entropy_matches_reference(max_strip_elements):
    gen = torch.Generator().manual_seed(0)
    N, H, V = 29, 8, 37
    h = torch.randn(N, H, generator=gen, requires_grad=True)
    w = torch.randn(V, H, generator=gen, requires_grad=True)
    labels = make_labels(N, V, gen)
    norm = torch.tensor(float((labels != -100).sum() + 3))
    loss = chunked_cross_entropy(h, w, labels, norm, max_strip_elements=max_strip_elements)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = reference_loss(h, w, labels, norm)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(gh, rh, **TOL)
    torch.testing.assert_close(gw, rw, **TOL)


def test_chunked_cross_entropy_chunk_tokens_and_all_ignored():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(10, 4, generator=gen, requires_grad=True)
    w = torch.randn(7, 4, generator=gen, requires_grad=True)
    labels = make_labels(10, 7, gen, mask_every=3)
    loss = chunked_cross_entropy(h, w, labels, 5.0, chunk_tokens=3)
    torch.testing.assert_close(loss, reference_loss(h, w, labels, 5.0), **TOL)
    ignored = torch.full((10,), -100)
    loss0 = chunked_cross_entropy(h, w, ignored, 5.0)
    loss0.backward()
    assert loss0.item() == 0.0 and h.grad.abs().max().item() == 0.0 and w.grad.abs().max().item() == 0.0


def test_chunked_cross_entropy_bad_options():
    h, w, labels = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_strip_elements"):
        chunked_cross_entropy(h, w, labels, 1.0, max_strip_elements=0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(h, w, labels, 1.0, chunk_tokens=0)
    with pytest.raises(ValueError, match="weight"):
        chunked_cross_entropy(h, torch.zeros(5, 3), labels, 1.0)


def test_chunked_cross_entropy_bf16_close_to_fp32():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(16, 8, generator=gen)
    w = torch.randn(37, 8, generator=gen)
    labels = make_labels(16, 37, gen)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = chunked_cross_entropy(hb, wb, labels, 12.0, max_strip_elements=64)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    hr, wr = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    reference_loss(hr, wr, labels, 12.0).backward()
    torch.testing.assert_close(loss, reference_loss(hr, wr, labels, 12.0), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(hb.grad.float(), hr.grad, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strip_kernels_functional_form_equals_in_place(dtype):
    """The functional strip math (what torch.compile fuses on CUDA) equals the in-place eager path."""
    from mop.ops import cross_entropy as ce

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(40, 8, generator=gen).to(dtype)
    w = torch.randn(50, 8, generator=gen).to(dtype)
    labels = torch.randint(-10, 70, (40,), generator=gen)  # some outside the block [20, 70)
    labels[::5] = -100
    mdt = ce.math_dtype(dtype)
    m, s, t = ce.block_stats(h, w, labels, 20, chunk=16)
    idx, in_block = ce._local_targets(labels, 20, 50, -100)
    fm, fs, ft = ce.strip_stats_math(h @ w.t(), idx, in_block, mdt)
    for a, b in ((m, fm), (s, fs), (t, ft)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    lse = ce.stats_lse((m, s, t))
    coef = torch.rand(40, generator=gen)
    g = ce.block_logit_grad(h, w, labels, 20, lse, coef, -100)
    minus_c = torch.where(in_block, -coef, torch.zeros_like(coef))
    fg = ce.strip_grad_math(h @ w.t(), lse, coef, minus_c, idx, dtype)
    assert fg.dtype == dtype
    torch.testing.assert_close(g.float(), fg.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)


def test_compiled_strip_kernels_match_reference():
    """`loss_kernels="fused"` (torch.compile; the CUDA default) is exact to fp32 rounding."""
    import shutil

    gen = torch.Generator().manual_seed(4)
    h = torch.randn(33, 8, generator=gen, requires_grad=True)
    w = torch.randn(45, 8, generator=gen, requires_grad=True)
    labels = make_labels(33, 45, gen)
    with pytest.raises(ValueError, match="loss kernels"):
        chunked_cross_entropy(h, w, labels, 29.0, kernels="triton")
    if not any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang")):
        pytest.skip("torch.compile on CPU needs a C compiler")
    loss = chunked_cross_entropy(h, w, labels, 29.0, chunk_tokens=10, kernels="fused")
    loss.backward()
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference_loss(hr, wr, labels, 29.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(h.grad, hr.grad, **TOL)
    torch.testing.assert_close(w.grad, wr.grad, **TOL)


def test_output_head_module():
    with torch.device("meta"):
        meta = OutputHead(8, 37)
    head = meta.to_empty(device="cpu")
    head.max_strip_elements = 50  # several strips
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head.weight.copy_(torch.randn(37, 8, generator=gen))
    h = torch.randn(20, 8, generator=gen, requires_grad=True)
    labels = make_labels(20, 37, gen)
    loss = head(h, labels, 15.0)
    loss.backward()
    w = head.weight.detach().clone().requires_grad_()
    hr = h.detach().clone().requires_grad_()
    ref = reference_loss(hr, w, labels, 15.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(h.grad, hr.grad, **TOL)
    torch.testing.assert_close(head.weight.grad, w.grad, **TOL)


def test_chunked_cross_entropy_never_builds_full_logits():
    gen = torch.Generator().manual_seed(4)
    N, H, V, strip = 64, 8, 256, 512
    h = torch.randn(N, H, generator=gen, requires_grad=True)
    w = torch.randn(V, H, generator=gen, requires_grad=True)
    labels = make_labels(N, V, gen)
    with LargestTensor() as tracker:
        chunked_cross_entropy(h, w, labels, 1.0, max_strip_elements=strip).backward()
    assert tracker.largest <= max(strip, N * H, V * H), (tracker.largest, tracker.op)
    with LargestTensor() as control:  # the tracker does see a materialised N x V loss
        reference_loss(h, w, labels, 1.0).backward()
    assert control.largest >= N * V


def test_vocab_parallel_cross_entropy_p1_and_schedule_choice():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(12, 6, generator=gen, requires_grad=True)
    w = torch.randn(37, 6, generator=gen, requires_grad=True)
    labels = make_labels(12, 37, gen)
    for schedule in ("weights", "activations", "auto"):
        loss = vocab_parallel_cross_entropy(h, w, labels, 9.0, vocab_group=None, vocab_size=37, block_sizes=[37],
                                            schedule=schedule, max_strip_elements=40)
        gh, gw = torch.autograd.grad(loss, (h, w))
        ref = reference_loss(h, w, labels, 9.0)
        rh, rw = torch.autograd.grad(ref, (h, w))
        torch.testing.assert_close(loss, ref, **TOL)
        torch.testing.assert_close(gh, rh, **TOL)
        torch.testing.assert_close(gw, rw, **TOL)
    assert resolve_schedule("auto", 100, [1000, 999]) == "activations"
    assert resolve_schedule("auto", 1000, [1000, 999]) == "weights"
    assert chunk_sizes(37, 4) == [10, 10, 10, 7] and chunk_sizes(5, 4) == [2, 2, 1, 0]
    with pytest.raises(ValueError, match="schedule"):
        vocab_parallel_cross_entropy(h, w, labels, 1.0, vocab_group=None, vocab_size=37, block_sizes=[37],
                                     schedule="tensor")
    with pytest.raises(ValueError, match="block_sizes"):
        vocab_parallel_cross_entropy(h, w, labels, 1.0, vocab_group=None, vocab_size=37, block_sizes=[30])


# -- the ring, on P ranks -------------------------------------------------------------------------------

def _global_problem(world, V, H, token_counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=gen)
    hs = [torch.randn(n, H, generator=gen) for n in token_counts]
    labels = [make_labels(n, V, gen, mask_every=3) for n in token_counts]
    return w, hs, labels


def _ring_worker(rank, world, V, H, token_counts, cases):
    """For each (P, schedule): every P-group computes its ranks' losses; compare with a local reference."""
    out = []
    groups = {}
    for P in sorted({c[0] for c in cases}):
        for g in range(world // P):  # every rank creates every group, in the same order
            grp = dist.new_group(list(range(g * P, (g + 1) * P)))
            if rank // P == g:
                groups[P] = grp
    w, hs, labels = _global_problem(world, V, H, token_counts)
    for P, schedule in cases:
        p, g0 = rank % P, (rank // P) * P
        sizes = chunk_sizes(V, P)
        off = offsets_of(sizes)[p]
        norm = torch.tensor(float(sum(int((lab != -100).sum()) for lab in labels[g0:g0 + P]) + 1))
        h = hs[rank].clone().requires_grad_()
        w_block = w[off:off + sizes[p]].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(h, w_block, labels[rank], norm, vocab_group=groups[P], vocab_size=V,
                                            block_sizes=sizes, schedule=schedule, max_strip_elements=3 * max(sizes))
        loss.backward()
        # Reference: the whole group's tokens on one device against the full weight.
        hr = torch.cat(hs[g0:g0 + P]).requires_grad_()
        wr = w.clone().requires_grad_()
        ref_mine = reference_loss(hr[sum(token_counts[g0:rank]):][: token_counts[rank]], wr, labels[rank], norm)
        ref_all = reference_loss(hr, wr, torch.cat(labels[g0:g0 + P]), norm)
        ref_all.backward()
        start = sum(token_counts[g0:rank])
        out.append(dict(case=(P, schedule), loss=(loss.detach(), ref_mine.detach()),
                        grad_h=(h.grad, hr.grad[start:start + token_counts[rank]]),
                        grad_w=(w_block.grad, wr.grad[off:off + sizes[p]])))
    return out


def _check_ring_results(results):
    for rank_results in results:
        for r in rank_results:
            for key in ("loss", "grad_h", "grad_w"):
                got, ref = r[key]
                torch.testing.assert_close(got, ref, **TOL, msg=lambda m, r=r, key=key: f"{r['case']} {key}: {m}")


# Spawning ranks costs seconds, so each world size is spawned once per module and the tests below
# check different parts of its results.

def _two_rank_worker(rank, world):
    cases = [(2, "weights"), (2, "activations"), (2, "auto"), (1, "weights")]
    return dict(ring=_ring_worker(rank, world, 37, 6, [9, 14], cases), memory=_memory_worker(rank, world, *MEMORY_CASE))


def _four_rank_worker(rank, world):
    # V = 37 over 4 blocks (10, 10, 10, 7); one rank has no tokens at all.
    cases = [(4, "weights"), (4, "activations"), (4, "auto"), (2, "activations")]
    return dict(ring=_ring_worker(rank, world, 37, 6, [7, 0, 11, 4], cases),
                modules={case: _modules_worker(rank, world, 37, 6, *case) for case in MODULE_CASES})


@pytest.fixture(scope="module")
def two_rank_results():
    return run_distributed(_two_rank_worker, 2)


@pytest.fixture(scope="module")
def four_rank_results():
    return run_distributed(_four_rank_worker, 4)


def test_ring_cross_entropy_two_ranks(two_rank_results):
    _check_ring_results([r["ring"] for r in two_rank_results])


def test_ring_cross_entropy_four_ranks_uneven_tokens(four_rank_results):
    _check_ring_results([r["ring"] for r in four_rank_results])


def _memory_worker(rank, world, N, H, V, strip):
    gen = torch.Generator().manual_seed(rank)
    sizes = chunk_sizes(V, world)
    results = {}
    for schedule in ("weights", "activations"):
        h = torch.randn(N, H, generator=gen, requires_grad=True)
        w = torch.randn(sizes[rank], H, generator=gen, requires_grad=True)
        labels = make_labels(N, V, gen)
        with LargestTensor() as tracker:
            vocab_parallel_cross_entropy(h, w, labels, 1.0, vocab_group=dist.group.WORLD, vocab_size=V,
                                         block_sizes=sizes, schedule=schedule, max_strip_elements=strip).backward()
        results[schedule] = (tracker.largest, str(tracker.op))
    return results


MEMORY_CASE = (64, 8, 256, 512)  # N, H, V, max_strip_elements


def test_ring_cross_entropy_never_builds_full_logits(two_rank_results):
    N, H, V, strip = MEMORY_CASE
    for rank_results in (r["memory"] for r in two_rank_results):
        for schedule, (largest, op) in rank_results.items():
            assert largest < N * V // 2 * 2, (schedule, largest, op)
            assert largest <= max(strip, N * H, V // 2 * H, 3 * N), (schedule, largest, op)


# -- the modules: W = 4 ranks, P = 4, 2 (vocab-shard groups of 2) and 1 ---------------------------------

def _init_from_full(param, full):
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())


def _modules_worker(rank, world, V, H, P, tied):
    from mop.parallel.layout import Layout, LayoutSpec
    from mop.parallel.vocab import VocabParallelEmbedding, VocabParallelOutputHead

    layout = Layout.build(LayoutSpec(world, vocab=P), torch.device("cpu"))
    gen = torch.Generator().manual_seed(11)
    w_out, w_emb = torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)
    seq = [3 + r for r in range(world)]  # different token counts per rank
    tokens = [torch.randint(0, V, (2, s), generator=gen) for s in seq]
    labels = [make_labels(2 * s, V, gen, mask_every=3) for s in seq]
    mix = [torch.randn(2, s, H, generator=gen) for s in seq]  # stands in for the model between the two
    norm = float(sum(int((lab != -100).sum()) for lab in labels))
    lr = 0.5

    # Single-process reference: all ranks' tokens, full weights.
    ref_emb, ref_head = nn.Embedding(V, H), OutputHead(H, V)
    ref_head.max_strip_elements = 64
    with torch.no_grad():
        ref_emb.weight.copy_(w_emb)
        ref_head.weight.copy_(w_out)
    if tied:
        ref_head.weight = ref_emb.weight
    ref_losses = [ref_head((ref_emb(t) * m).view(-1, H), lab, norm) for t, m, lab in zip(tokens, mix, labels)]
    sum(ref_losses).backward()
    ref_params = [ref_emb.weight] + ([] if tied else [ref_head.weight])
    ref_grads = [p.grad.clone() for p in ref_params]
    torch.optim.SGD(ref_params, lr=lr).step()

    # The vocab-parallel modules, built from meta-device originals.
    with torch.device("meta"):
        meta_emb, meta_head = nn.Embedding(V, H), OutputHead(H, V)
    emb = VocabParallelEmbedding.from_module(meta_emb, layout).to_empty(device="cpu")
    head = VocabParallelOutputHead.from_module(meta_head, layout, schedule="auto",
                                               weight=emb.weight if tied else None)
    head.to_empty(device="cpu")
    assert emb.shards.mesh is head.shards.mesh is layout.vocab_mesh  # the layout's mesh: one set of groups
    head.max_strip_elements = 64  # several strips per block
    if tied:
        head.weight = emb.weight  # to_empty re-creates parameters; tie again before init (as a model would)
    _init_from_full(emb.weight, w_emb)
    if not tied:
        _init_from_full(head.weight, w_out)
    x = emb(tokens[rank]) * mix[rank]
    loss = head(x.view(-1, H), labels[rank], norm)
    loss.backward()
    params = [emb.weight] + ([] if tied else [head.weight])
    grads = [p.grad.full_tensor() for p in params]
    placements_ok = all(tuple(p.grad.placements) == tuple(p.placements) for p in params)
    torch.optim.SGD(params, lr=lr).step()
    return dict(loss=(loss.detach(), ref_losses[rank].detach()),
                grads=list(zip(grads, ref_grads)),
                weights=[(p.full_tensor().detach(), r.detach()) for p, r in zip(params, ref_params)],
                placements_ok=placements_ok, local_rows=emb.weight.to_local().shape[0])


MODULE_CASES = [(4, False), (2, False), (2, True), (1, False)]  # (P, tied embeddings) on W = 4


@pytest.mark.parametrize("P,tied", MODULE_CASES)
def test_vocab_parallel_modules_match_single_process(P, tied, four_rank_results):
    V, W = 37, 4
    results = [r["modules"][(P, tied)] for r in four_rank_results]
    for r in results:
        torch.testing.assert_close(r["loss"][0], r["loss"][1], **TOL)
        for got, ref in r["grads"]:
            torch.testing.assert_close(got, ref, **TOL)
        for got, ref in r["weights"]:
            torch.testing.assert_close(got, ref, **TOL)
        assert r["placements_ok"]
    # At rest each rank holds about V/W rows (torch.chunk of torch.chunk), all rows exactly once.
    assert sum(r["local_rows"] for r in results) == V
    assert max(r["local_rows"] for r in results) <= -(-(-(-V // P)) // (W // P))
