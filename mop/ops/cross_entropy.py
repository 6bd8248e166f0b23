"""Memory-lean cross-entropy of a linear output projection: never builds the N x V logits.

The loss of hidden states `h_NH` against an output projection `w_VH` is computed strip by strip:
a strip is the logits of a chunk of tokens against a contiguous block of the vocabulary. Each strip
is folded into a per-token running state (max, sum of exp, target logit) with an online
log-sum-exp and freed. On one vocabulary block (`chunked_cross_entropy`) a strip spans every column
of its tokens, so forward also forms the logit gradients and multiplies them into `grad_h` and
`grad_w` (three GEMMs per strip, nothing recomputed); in the vocabulary-parallel ring the
log-sum-exp is final only after the last block, so backward recomputes each strip.

The pure helpers (`block_stats`, `merge_stats`, `block_logit_grad`, `token_chunk`) are shared with the
vocabulary-parallel ring loss in `mop.parallel.vocab_ring`. Numerics: the strip matmul runs in the
input dtype (bf16 on GPU, fp32 accumulation inside the GEMM) and everything after it (max, exp,
sums, log, gradients of the logits) in fp32; logit gradients are cast back to the input dtype for
the two backward GEMMs, and weight-gradient partial sums accumulate in the weight dtype (as an
FSDP reduce-scatter would).

Labels are not range-checked (that would be a host sync): a label outside [0, V) that is not
`ignore_index` contributes no target logit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (max_N, sumexp_N, target_N), in math_dtype


def token_chunk(n_vocab: int, max_strip_elements: int, chunk_tokens: int | None = None) -> int:
    """Tokens per strip so that a strip of `n_vocab` columns holds at most `max_strip_elements`."""
    if max_strip_elements < 1:
        raise ValueError(f"max_strip_elements must be a positive number of elements, got {max_strip_elements}")
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive number of tokens or None, got {chunk_tokens}")
        return chunk_tokens
    return max(1, max_strip_elements // max(n_vocab, 1))


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the softmax math: fp32 for 16-bit inputs, else the input dtype (fp32, or fp64 in tests)."""
    return torch.promote_types(dtype, torch.float32)


def _strip_logits(h_nH: torch.Tensor, w_vH: torch.Tensor) -> torch.Tensor:
    """Logits of a token chunk against a vocabulary block [n, v]: matmul in the input dtype, result in fp32."""
    return (h_nH @ w_vH.t()).to(math_dtype(h_nH.dtype))


def _local_targets(labels_n: torch.Tensor, offset: int, n_vocab: int, ignore_index: int):
    """Label positions inside the block [offset, offset + n_vocab): (index clamped to 0, in-block mask)."""
    local_n = labels_n - offset
    in_block_n = (local_n >= 0) & (local_n < n_vocab) & (labels_n != ignore_index)
    return torch.where(in_block_n, local_n, torch.zeros_like(local_n)), in_block_n


def empty_stats(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Stats:
    """The neutral running state: max -inf, sum 0, target 0."""
    return (torch.full((n,), float("-inf"), device=device, dtype=dtype), torch.zeros(n, device=device, dtype=dtype),
            torch.zeros(n, device=device, dtype=dtype))


# -- strip kernels -----------------------------------------------------------------------------------
# The per-strip softmax math is memory-bound: run op by op, it reads and writes the fp32 strip about
# nine times (cast, max, subtract, exp, sum; and in backward cast, subtract, exp, scale, cast), which
# on an H200 costs more than the strip's GEMM. On CUDA the two functions below are compiled by
# torch.compile (inductor) into fused kernels that read the 16-bit logits once or twice and, in
# backward, write the 16-bit gradient strip directly. Elsewhere (CPU, tests) they run op by op (the
# one-block loss) or the in-place eager code is used (the ring); tests check all give the same numbers.
# Which one runs is the `kernels` argument of every loss, set per head (`OutputHead.loss_kernels`).

LOSS_KERNELS = ("auto", "fused", "eager")  # "auto": fused on CUDA, eager elsewhere; "fused": on any device


def check_loss_kernels(kernels: str) -> None:
    """ValueError unless `kernels` is one of LOSS_KERNELS."""
    if kernels not in LOSS_KERNELS:
        raise ValueError(f"loss kernels mode must be 'auto', 'fused' or 'eager', got {kernels!r}")


def _use_fused(t: torch.Tensor, kernels: str) -> bool:
    return kernels == "fused" or (kernels == "auto" and t.is_cuda)


def strip_stats_math(logits_nv: torch.Tensor, idx_n: torch.Tensor, in_block_n: torch.Tensor, dtype: torch.dtype):
    """(max, sum of exp(logit - max), target logit or 0) per row of a strip, in `dtype` (functional form)."""
    x = logits_nv.to(dtype)
    m = x.amax(dim=1)
    s = torch.exp(x - m.unsqueeze(1)).sum(dim=1)
    tgt = x.gather(1, idx_n.unsqueeze(1)).squeeze(1)
    return m, s, torch.where(in_block_n, tgt, torch.zeros_like(tgt))


def strip_grad_math(logits_nv: torch.Tensor, lse_n: torch.Tensor, scale_n: torch.Tensor, minus_c_n: torch.Tensor,
                    idx_n: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """exp(logit - lse) * scale, plus -c at the target column, in `out_dtype` (functional form)."""
    p = torch.exp(logits_nv.to(lse_n.dtype) - lse_n.unsqueeze(1)) * scale_n.unsqueeze(1)
    cols = torch.arange(p.shape[1], device=p.device)
    p = p + torch.where(cols.unsqueeze(0) == idx_n.unsqueeze(1), minus_c_n.unsqueeze(1), torch.zeros_like(p))
    return p.to(out_dtype)


_MATH = {"stats": strip_stats_math, "grad": strip_grad_math}


def _kernel(name: str, t: torch.Tensor, kernels: str):
    """The functional strip math `name` ("stats" or "grad"): compiled where fused kernels are on, else eager."""
    return _compiled(name) if _use_fused(t, kernels) else _MATH[name]


_COMPILED: dict = {}  # a cache, not a setting: each strip function is compiled once per process


def _compiled(name: str):
    fn = _COMPILED.get(name)
    if fn is None:
        # dynamic: strips differ in rows (last chunk) and columns (vocabulary blocks) without recompiling.
        fn = _COMPILED[name] = torch.compile(_MATH[name], dynamic=True, fullgraph=True)
    return fn


def block_stats(h_NH: torch.Tensor, w_vH: torch.Tensor, labels_N: torch.Tensor, offset: int, chunk: int,
                ignore_index: int = -100, kernels: str = "auto") -> Stats:
    """Per-token (max, sum-exp relative to max, target logit) of `h_NH` against the block `w_vH`.

    `w_vH` holds vocabulary rows [offset, offset + v). Only one strip of `chunk` tokens is live.
    """
    n, v = h_NH.shape[0], w_vH.shape[0]
    dtype = math_dtype(h_NH.dtype)
    if v == 0 or n == 0:
        return empty_stats(n, h_NH.device, dtype)
    max_N, sum_N, tgt_N = (torch.empty(n, device=h_NH.device, dtype=dtype) for _ in range(3))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        idx_n, in_block_n = _local_targets(labels_N[s:e], offset, v, ignore_index)
        if _use_fused(h_NH, kernels):
            max_N[s:e], sum_N[s:e], tgt_N[s:e] = _compiled("stats")(h_NH[s:e] @ w_vH.t(), idx_n, in_block_n, dtype)
            continue
        logits_nv = _strip_logits(h_NH[s:e], w_vH)
        tgt = logits_nv.gather(1, idx_n.unsqueeze(1)).squeeze(1)
        tgt_N[s:e] = torch.where(in_block_n, tgt, torch.zeros_like(tgt))
        m = logits_nv.amax(dim=1)
        max_N[s:e] = m
        sum_N[s:e] = logits_nv.sub_(m.unsqueeze(1)).exp_().sum(dim=1)  # in place: one strip live
    return max_N, sum_N, tgt_N


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Online log-sum-exp: the state of the union of two disjoint vocabulary ranges."""
    m = torch.maximum(a[0], b[0])
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both ranges empty: avoid (-inf) - (-inf)
    s = a[1] * torch.exp(a[0] - m_safe) + b[1] * torch.exp(b[0] - m_safe)
    return m, s, a[2] + b[2]


def stats_lse(stats: Stats) -> torch.Tensor:
    """Per-token log-sum-exp over the whole vocabulary from a complete running state."""
    return stats[0] + torch.log(stats[1])


def token_losses(lse_N: torch.Tensor, tgt_N: torch.Tensor, labels_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-token CE in fp32; zero for ignored tokens."""
    loss_N = lse_N - tgt_N
    return torch.where(labels_N != ignore_index, loss_N, torch.zeros_like(loss_N))


def grad_coef(grad_loss: torch.Tensor, normalizer, labels_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """d(loss)/d(per-token loss) in fp32: grad_loss / normalizer on target tokens, 0 elsewhere."""
    g = grad_loss.to(math_dtype(grad_loss.dtype)) / normalizer
    return torch.where(labels_N != ignore_index, g.expand(labels_N.shape), torch.zeros_like(g))


def block_logit_grad(h_nH: torch.Tensor, w_vH: torch.Tensor, labels_n: torch.Tensor, offset: int,
                     lse_n: torch.Tensor, coef_n: torch.Tensor, ignore_index: int,
                     kernels: str = "auto") -> torch.Tensor:
    """Recomputed strip of d(loss)/d(logits) for a token chunk and a vocabulary block, in the input dtype.

    For a token with coefficient c: c * (softmax - onehot(label)).
    """
    v = w_vH.shape[0]
    idx_n, in_block_n = _local_targets(labels_n, offset, v, ignore_index)
    minus_c = torch.where(in_block_n, -coef_n, torch.zeros_like(coef_n))
    if _use_fused(h_nH, kernels):
        return _compiled("grad")(h_nH @ w_vH.t(), lse_n, coef_n, minus_c, idx_n, h_nH.dtype)
    p_nv = _strip_logits(h_nH, w_vH).sub_(lse_n.unsqueeze(1)).exp_()
    p_nv.mul_(coef_n.unsqueeze(1))
    # scatter_add, not boolean indexing: no host sync for the number of in-block targets.
    p_nv.scatter_add_(1, idx_n.unsqueeze(1), minus_c.unsqueeze(1))
    return p_nv.to(h_nH.dtype)


def block_backward(h_NH: torch.Tensor, w_vH: torch.Tensor, labels_N: torch.Tensor, offset: int,
                   lse_N: torch.Tensor, coef_N: torch.Tensor, chunk: int, ignore_index: int,
                   grad_h_NH: torch.Tensor, grad_w_vH: torch.Tensor, kernels: str = "auto") -> None:
    """Add one vocabulary block's contribution to `grad_h_NH` and `grad_w_vH` (in place), strip by strip."""
    n, v = h_NH.shape[0], w_vH.shape[0]
    if v == 0 or n == 0:
        return
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        g_nv = block_logit_grad(h_NH[s:e], w_vH, labels_N[s:e], offset, lse_N[s:e], coef_N[s:e], ignore_index,
                                kernels)
        grad_h_NH[s:e].addmm_(g_nv, w_vH)
        grad_w_vH.addmm_(g_nv.t(), h_NH[s:e])


def _check_inputs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor) -> None:
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden_NH.shape)} and "
                         f"{tuple(weight_VH.shape)}")
    if labels_N.shape != hidden_NH.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden_NH.shape[0]}], got {tuple(labels_N.shape)}")


def _loss_and_grads(hidden_NH, weight_VH, labels_N, normalizer, ignore_index, chunk, need_h, need_w, kernels):
    """Loss and, in the same pass, its gradients for an upstream gradient of 1 (strips span all of V).

    Each strip holds every vocabulary column of its tokens, so its log-sum-exp is final as soon as
    the strip is computed: the logit gradient is formed right away and multiplied into grad_h and
    grad_w. Three GEMMs per strip instead of four (no recomputation in backward), and only 16-bit
    strips live on GPUs. Backward then only scales by the upstream gradient.
    """
    n, v = hidden_NH.shape[0], weight_VH.shape[0]
    dtype = math_dtype(hidden_NH.dtype)
    lse_N = torch.empty(n, device=hidden_NH.device, dtype=dtype)
    tgt_N = torch.empty(n, device=hidden_NH.device, dtype=dtype)
    grad_h = torch.empty_like(hidden_NH) if need_h else None
    grad_w = torch.zeros_like(weight_VH) if need_w else None
    coef_N = grad_coef(torch.ones((), device=hidden_NH.device, dtype=dtype), normalizer, labels_N, ignore_index)
    stats_fn, grad_fn = _kernel("stats", hidden_NH, kernels), _kernel("grad", hidden_NH, kernels)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h_nH = hidden_NH[s:e]
        logits_nv = h_nH @ weight_VH.t()  # input dtype; the kernels upcast
        idx_n, in_block_n = _local_targets(labels_N[s:e], 0, v, ignore_index)
        m, sumexp, tgt_N[s:e] = stats_fn(logits_nv, idx_n, in_block_n, dtype)
        lse_n = lse_N[s:e] = m + torch.log(sumexp)
        c_n = coef_N[s:e]
        g_nv = grad_fn(logits_nv, lse_n, c_n, torch.where(in_block_n, -c_n, torch.zeros_like(c_n)), idx_n,
                       hidden_NH.dtype)
        del logits_nv
        if need_h:
            torch.mm(g_nv, weight_VH, out=grad_h[s:e])
        if need_w:
            grad_w.addmm_(g_nv.t(), h_nH)
    loss = token_losses(lse_N, tgt_N, labels_N, ignore_index).sum() / normalizer
    return loss, grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of per-token CE / normalizer, with the gradients computed during forward."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, labels_N, normalizer, ignore_index, chunk, kernels):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):  # inference: statistics only
            stats = block_stats(hidden_NH, weight_VH, labels_N, 0, chunk, ignore_index, kernels)
            return token_losses(stats_lse(stats), stats[2], labels_N, ignore_index).sum() / normalizer
        loss, grad_h, grad_w = _loss_and_grads(hidden_NH, weight_VH, labels_N, normalizer, ignore_index, chunk,
                                               need_h, need_w, kernels)
        ctx.grads = (grad_h, grad_w)  # not saved tensors: they are outputs of this computation, not inputs
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # The strips were formed for an upstream gradient of 1; the loss is linear in them.
        # In place: no second copy of a V x H gradient (and exact when grad_loss is 1, as in training).
        g = grad_loss.to(math_dtype(grad_loss.dtype))
        for t in (grad_h, grad_w):
            if t is not None:
                t.mul_(g)
        return grad_h, grad_w, None, None, None, None, None


def chunked_cross_entropy(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor, normalizer,
                          *, ignore_index: int = -100, chunk_tokens: int | None = None,
                          max_strip_elements: int = 2**28, kernels: str = "auto") -> torch.Tensor:
    """Sum over non-ignored tokens of CE(hidden @ weight.T, label), divided by `normalizer`.

    Exact, with autograd to `hidden_NH` and `weight_VH`, without materialising the N x V logits in
    forward or backward: strips of `chunk_tokens` tokens (default: as many as fit in
    `max_strip_elements` fp32 logits) are computed, folded and freed. `normalizer` is a float or a
    0-dim tensor (the number of target tokens of the global batch). `kernels`: the strip math, one
    of LOSS_KERNELS.
    """
    _check_inputs(hidden_NH, weight_VH, labels_N)
    check_loss_kernels(kernels)
    if isinstance(normalizer, torch.Tensor) and normalizer.dim() != 0:
        raise ValueError(f"normalizer must be a float or a 0-dim tensor, got shape {tuple(normalizer.shape)}")
    chunk = token_chunk(weight_VH.shape[0], max_strip_elements, chunk_tokens)
    return _ChunkedCrossEntropy.apply(hidden_NH, weight_VH, labels_N, normalizer, ignore_index, chunk, kernels)


class OutputHead(nn.Module):
    """Output projection + loss: `forward(hidden_NH, labels_N, normalizer) -> loss`.

    loss = sum over tokens with label != -100 of CE(hidden @ weight.T, label), divided by
    `normalizer`; computed by `chunked_cross_entropy`, never building N x V logits.
    """

    max_strip_elements: int = 2**28  # fp32 logits per strip (tests set fewer to exercise many strips)
    loss_kernels: str = "auto"  # one of LOSS_KERNELS; the trainer sets `training.loss_kernels`

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        if dim < 1 or vocab_size < 1:
            raise ValueError(f"OutputHead needs dim >= 1 and vocab_size >= 1, got dim={dim}, vocab_size={vocab_size}")
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, hidden_NH: torch.Tensor, labels_N: torch.Tensor, normalizer) -> torch.Tensor:
        return chunked_cross_entropy(hidden_NH, self.weight, labels_N, normalizer,
                                     max_strip_elements=self.max_strip_elements, kernels=self.loss_kernels)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, vocab_size={self.weight.shape[0]}"
