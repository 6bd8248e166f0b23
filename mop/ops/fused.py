"""Fused elementwise kernels of a block: RoPE, SwiGLU, and the experts' slot gathers and weighted sum.

Run op by op, these are memory-bound chains that read and write their tensors several times: RoPE
on q and k is a fp32 copy, two halves, four products, a difference, a sum, a concatenation and a
cast; the experts' combine gathers the K outputs of each token back from expert order, multiplies
them by their weights, writes that, reads it again to sum in fp32, then casts; in backward the K
slot gradients of each token are gathered, written, and read again to be summed; SwiGLU writes
silu(gate) and reads it back. Counted for one qwen3-30b-a3b block (`python -m mop.bench.ledger`,
2,048 tokens, bf16, RMSNorm one kernel either way), the non-GEMM traffic is 1.66 MB per token op
by op and 0.64 MB fused, forward and backward.

`kernels` chooses per call site, as the model's modules set it (`elementwise_kernels`, from
`training.elementwise_kernels`): "eager" runs the functions below op by op; "fused" compiles them
with torch.compile (inductor; dynamic shapes: token counts vary per micro-batch and per expert group)
into one kernel each way, whose backward inductor derives; "auto" is fused on CUDA, eager elsewhere.
`mop plan` models both (`Step.elementwise_kernels`: SwiGLU keeps one tensor fewer; the memory-bound
time scales by `Calibration.fused_elementwise_ratio`, the ratio of the bytes counted above, 0.38).
The math is the same functions either way, so the two differ only by rounding inside the fused
kernel (fp32 throughout, one rounding at the end); tests/test_fused_kernels.py checks values and
gradients against eager.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

ELEMENTWISE_KERNELS = ("auto", "fused", "eager")


def check_kernels(kernels: str) -> None:
    """ValueError unless `kernels` is one of ELEMENTWISE_KERNELS."""
    if kernels not in ELEMENTWISE_KERNELS:
        raise ValueError(f"elementwise kernels must be one of {', '.join(map(repr, ELEMENTWISE_KERNELS))}, "
                         f"got {kernels!r}")


def rope_math(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) by fp32 cos/sin [B, S, D/2] ("rotate half"), in fp32,
    cast back to x's dtype."""
    x1, x2 = x_BSHD.float().chunk(2, dim=-1)
    cos, sin = cos_BSD[:, :, None, :], sin_BSD[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BSHD.dtype)


def swiglu_math(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0, alpha: float = 1.702) -> torch.Tensor:
    """silu(gate) * up; with `limit` > 0 gpt-oss' clamped form:
    gate' = min(gate, limit), up' = clamp(up, -limit, limit), gate' * sigmoid(alpha * gate') * (up' + 1)."""
    if not limit:
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def weighted_sum_math(y_TKH: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """sum_k w[t,k] * y[t,k,:]: the product in y's dtype, the sum in fp32, the result in y's dtype."""
    # sum(dtype=fp32) accumulates in fp32 inside the reduction (CUDA reads bf16 directly), where
    # .float().sum() would first write the T x K x H products out in fp32.
    return (y_TKH * w_TK.to(y_TKH.dtype).unsqueeze(-1)).sum(1, dtype=torch.float32).to(y_TKH.dtype)


def gather_sum_math(g_NH: torch.Tensor, index_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """sum over k of g[index[t * K + k]] in fp32, in g's dtype: the K slot gradients of each token
    gathered from expert order and summed (the backward of copying each token to its K slots)."""
    return g_NH.index_select(0, index_N).view(-1, top_k, g_NH.shape[-1]).sum(1, dtype=torch.float32).to(g_NH.dtype)


def combine_math(y_NH: torch.Tensor, inv_order_N: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """sum_k w[t,k] * y[inv_order[t * K + k]]: expert outputs gathered back to (t, k) order and
    weighted in one pass (`weighted_sum_math` of the gathered rows)."""
    T, K = w_TK.shape
    return weighted_sum_math(y_NH.index_select(0, inv_order_N).view(T, K, y_NH.shape[-1]), w_TK)


def combine_grads_math(g_TH: torch.Tensor, y_NH: torch.Tensor, inv_order_N: torch.Tensor, order_N: torch.Tensor,
                       w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `combine_math`, as autograd computes them op by op: row i of dy (slot
    order[i] = t * K + k) is g[t] * w[t,k] in y's dtype; dw[t,k] = sum_h g[t,h] * y[slot (t,k), h],
    accumulated in fp32, rounded to y's dtype, then to w's. Both are gathers, no scatter."""
    T, K = w_TK.shape
    w_y = w_TK.to(y_NH.dtype)
    dy_NH = g_TH.index_select(0, order_N // K) * w_y.reshape(-1).index_select(0, order_N).unsqueeze(-1)
    y_TKH = y_NH.index_select(0, inv_order_N).view(T, K, y_NH.shape[-1])
    dw_TK = (y_TKH * g_TH.unsqueeze(1)).sum(-1, dtype=torch.float32).to(y_NH.dtype).to(w_TK.dtype)
    return dy_NH, dw_TK


_MATH = {"rope": rope_math, "swiglu": swiglu_math, "weighted_sum": weighted_sum_math, "gather_sum": gather_sum_math,
         "combine": combine_math, "combine_grads": combine_grads_math}
_COMPILED: dict = {}  # a cache, not a setting: each function is compiled once per process


def is_fused(t: torch.Tensor, kernels: str) -> bool:
    """Whether `kernels` means fused kernels for tensors on `t`'s device. Never under a Python
    dispatch mode (a memory or FLOP counter, a fake-tensor trace) or a torch-function mode (a
    `with torch.device(...)` block, context parallelism's attention patching): torch.compile does not
    trace through the first and may not through the second, so the op-by-op math runs there instead."""
    if not (kernels == "fused" or (kernels == "auto" and t.is_cuda)):
        return False
    if _get_current_dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled():
        return True
    # Said once per call site (the default warnings filter): a run that asked for fused kernels and
    # gets none should know.
    warnings.warn("mop: fused elementwise kernels step aside under a dispatch or torch-function mode "
                  "(op by op there)", stacklevel=2)
    return False


def kernel(name: str, t: torch.Tensor, kernels: str):
    """The function `name` of _MATH, compiled where `kernels` asks for fused kernels on `t`'s device."""
    if is_fused(t, kernels):
        fn = _COMPILED.get(name)
        if fn is None:
            fn = _COMPILED[name] = torch.compile(_MATH[name], dynamic=True, fullgraph=True)
        return fn
    return _MATH[name]
