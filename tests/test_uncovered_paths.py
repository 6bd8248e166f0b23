"""Paths that mutations went through unnoticed: weight-decay grouping, the online log-sum-exp at large
logits, and the empty-range guard of `merge_stats`."""

import torch
import torch.nn.functional as F

from mop.config import build_config
from mop.distributed import ProcessInfo
from mop.ops.cross_entropy import block_stats, chunked_cross_entropy, empty_stats, merge_stats, stats_lse
from mop.trainer import Trainer


def test_norms_and_biases_do_not_decay(tmp_path):
    """One AdamW step with zero gradients moves weights by weight decay alone: matrices shrink, vectors stay."""
    job = build_config(overrides=["--model.shape=debug", "--model.attn_bias=true", "--data.dataset=synthetic",
                                  "--training.device=cpu", "--optimizer.lr=0.1", "--optimizer.weight_decay=0.5",
                                  "--training.warmup_steps=0", f"--logging.run_dir={tmp_path}"])
    trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    params = dict(trainer.model.named_parameters())
    vectors = [n for n, p in params.items() if p.ndim < 2]
    assert any("norm" in n for n in vectors) and any("bias" in n for n in vectors)
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    for n, p in params.items():
        expected = before[n] if p.ndim < 2 else before[n] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), expected, msg=lambda m: f"{n}: {m}")


def _large_logit_problem(scale=200.0):
    torch.manual_seed(0)
    n, v, h = 6, 50, 8
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64)
    logits = hidden @ weight.t()
    hidden = hidden * (scale / logits.abs().max())  # the largest |logit| is `scale`
    labels = torch.randint(0, v, (n,))
    return hidden.float(), weight.float(), labels


def test_online_log_sum_exp_is_exact_at_logit_200():
    """exp(200) overflows fp32: the running state must subtract the max before exponentiating."""
    hidden, weight, labels = _large_logit_problem()
    logits = (hidden.double() @ weight.double().t())
    assert logits.abs().max() > 199
    # Two vocabulary blocks merged online, as the vocabulary-parallel ring does.
    a = block_stats(hidden, weight[:20], labels, offset=0, chunk=4)
    b = block_stats(hidden, weight[20:], labels, offset=20, chunk=4)
    lse = stats_lse(merge_stats(a, b))
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=1), rtol=1e-5, atol=1e-4)
    # The whole loss and its gradients against fp64 PyTorch.
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), labels, reduction="sum").div(labels.numel()).backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_cross_entropy(h, w, labels, float(labels.numel()), chunk_tokens=4)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_merge_stats_of_empty_ranges_is_neutral():
    """Two empty ranges (max -inf each) must merge to an empty range, not NaN: (-inf) - (-inf) is NaN."""
    n = 3
    empty = merge_stats(empty_stats(n, torch.device("cpu")), empty_stats(n, torch.device("cpu")))
    assert torch.isneginf(empty[0]).all() and torch.equal(empty[1], torch.zeros(n))
    real = (torch.tensor([1.0, 250.0, -3.0]), torch.tensor([2.0, 1.5, 1.0]), torch.tensor([0.5, 0.0, 1.0]))
    for merged in (merge_stats(empty, real), merge_stats(real, empty)):
        for got, want in zip(merged, real):
            torch.testing.assert_close(got, want)
