"""The skew knob: bias routing towards a few hot experts so a chosen share of top-k slots go to them.

How: the hot experts are experts 0..top_k-1 (so under contiguous expert placement they all live on
the first EP rank, the worst case for plain EP). Each router gets `use_expert_bias = True` and
`expert_bias[hot] = b`; the bias only changes which experts are *selected* (the combine weights
stay the router's scores), exactly like DeepSeek-V3's balancing bias. `b` is calibrated per layer
by bisection on the router inputs of one no-grad forward of a short prefix of a real batch, so
that about a fraction `skew` of the top-k slots go to the hot experts; the per-layer biases are
averaged over ranks so every rank routes the same way. Calibration sees unbiased inputs for
every layer at once, so the achieved share is approximate: the benchmark reports the imbalance it
actually observed. The bias update rate is set to 0 for shapes without their own balancing bias.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _hot_fraction(scores_TE: torch.Tensor, bias: float, hot: torch.Tensor, top_k: int) -> float:
    select_TE = scores_TE.clone()
    select_TE[:, hot] += bias
    idx_TK = select_TE.topk(top_k, dim=-1).indices
    return float(torch.isin(idx_TK, hot).float().mean())  # host sync: calibration only


def calibrate_bias(scores_TE: torch.Tensor, hot: torch.Tensor, top_k: int, skew: float, iters: int = 30) -> float:
    """Smallest selection bias (bisection in [0, 2]) giving about `skew` of the top-k slots to `hot`."""
    lo, hi = 0.0, 2.0  # scores are probabilities: a bias of 2 always selects the hot experts
    if _hot_fraction(scores_TE, lo, hot, top_k) >= skew:
        return 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _hot_fraction(scores_TE, mid, hot, top_k) < skew:
            lo = mid
        else:
            hi = mid
    return hi


@torch.no_grad()
def apply_skew(model, skew: float, tokens_BS: torch.Tensor, positions_BS: torch.Tensor,
               max_tokens: int = 2048) -> list[float]:
    """Bias every router of `model` so about `skew` of its top-k slots go to experts 0..top_k-1.

    Collective when torch.distributed is initialised (every rank must call it). Returns the biases.
    """
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"--skew must be in [0, 1], got {skew}")
    routers = model.routers()
    if skew == 0.0 or not routers:
        return [0.0] * len(routers)
    biases: dict[int, float] = {}

    def hook(i, router):
        def capture(module, args):
            x_TH = args[0]
            logits_TE = x_TH.float() @ module.gate.weight.float().t()  # full weight inside the FSDP unit
            if isinstance(logits_TE, DTensor):
                logits_TE = logits_TE.full_tensor()
            scores_TE = logits_TE.softmax(-1) if module.score_func == "softmax" else logits_TE.sigmoid()
            if module.use_expert_bias:
                scores_TE = scores_TE + module.expert_bias
            hot = torch.arange(module.top_k, device=scores_TE.device)
            biases[i] = calibrate_bias(scores_TE, hot, module.top_k, skew)
        return router.register_forward_pre_hook(capture)

    handles = [hook(i, r) for i, r in enumerate(routers)]
    try:
        n = min(tokens_BS.shape[1], max_tokens)
        model(tokens_BS[:1, :n], positions_BS[:1, :n])
    finally:
        for h in handles:
            h.remove()
    device = routers[0].expert_bias.device
    b_L = torch.tensor([biases[i] for i in range(len(routers))], device=device, dtype=torch.float32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(b_L)
        b_L /= dist.get_world_size()
    if not any(r.use_expert_bias for r in routers):
        model.cfg.expert_bias_rate = 0.0  # keep the skew: nothing may balance it away
    for router, b in zip(routers, b_L):
        router.use_expert_bias = True
        router.expert_bias[: router.top_k] += b
    return b_L.tolist()
