"""Fused elementwise kernels of a block: RoPE, SwiGLU and the experts' weighted sum.

Run op by op, these are memory-bound chains that read and write their tensors several times. RoPE on
q and k: a fp32 copy, two halves, four products, a difference, a sum, a concatenation and a cast: about
190 KB of traffic per token per qwen3-30b-a3b block in forward, against about 20 KB for one pass
that reads the 16-bit q/k and writes them rotated. The experts' combine multiplies the K expert
outputs of each token by their weights, writes that, reads it again to sum in fp32, then casts
(~120 KB/token where one pass reads 32 KB). SwiGLU writes silu(gate) and reads it back. Counted with
a dispatch-mode ledger of one block on CPU (bf16, 2,048 tokens); on CUDA, RMSNorm is already fused.

`kernels` chooses per call site, as the model's modules set it (`elementwise_kernels`, from
`training.elementwise_kernels`): "eager" runs the functions below op by op; "fused" compiles them
with torch.compile (inductor; dynamic shapes: token counts vary per micro-batch and per expert group)
into one kernel each way, whose backward inductor derives; "auto" is fused on CUDA, eager elsewhere.
The math is the same functions either way, so the two differ only by rounding inside the fused
kernel (fp32 throughout, one rounding at the end); tests/test_fused_kernels.py checks values and
gradients against eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


_MATH = {"rope": rope_math, "swiglu": swiglu_math, "weighted_sum": weighted_sum_math}
_COMPILED: dict = {}  # a cache, not a setting: each function is compiled once per process


def kernel(name: str, t: torch.Tensor, kernels: str):
    """The function `name` of _MATH, compiled where `kernels` asks for fused kernels on `t`'s device."""
    if kernels == "fused" or (kernels == "auto" and t.is_cuda):
        fn = _COMPILED.get(name)
        if fn is None:
            fn = _COMPILED[name] = torch.compile(_MATH[name], dynamic=True, fullgraph=True)
        return fn
    return _MATH[name]
