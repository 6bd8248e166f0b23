"""Grouped GEMM over token groups sorted by expert.

`grouped_mm(x_TH, w_EHI, tokens_per_expert_E)` multiplies each contiguous block of rows of
`x_TH` (the rows routed to expert e, in expert order) by `w_EHI[e]`. On Hopper GPUs with bf16
this is one `torch._grouped_mm` call; elsewhere (CPU, fp32, older GPUs) an exact per-expert loop.
Both are dropless: groups may be empty and have any size.
"""

from __future__ import annotations

import torch

def _native_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs (forward and backward) for these operands.

    Only the CUDA kernel is used: on CPU (torch 2.13) the op's backward fails, so the loop is exact
    and fast enough there. The CUDA kernel is bf16-only, needs sm90+, and 16-byte aligned strides.
    """
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return (x.shape[-1] * x.element_size()) % 16 == 0 and (w.shape[-1] * w.element_size()) % 16 == 0


def grouped_mm_loop(x_TH: torch.Tensor, w_EHI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Reference / fallback: one matmul per expert. Syncs the host once (`.tolist()`)."""
    counts = tokens_per_expert_E.tolist()  # host sync: split sizes must be Python ints
    outs = [xe @ w_EHI[e] for e, xe in enumerate(torch.split(x_TH, counts, dim=0))]
    if not outs:
        return x_TH.new_zeros(0, w_EHI.shape[-1])
    return torch.cat(outs, dim=0)


def grouped_mm(x_TH: torch.Tensor, w_EHI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Rows of `x_TH` grouped by expert (counts `tokens_per_expert_E`) times `w_EHI[e]` -> [T, I].

    `sum(tokens_per_expert_E)` must equal T. Autograd flows through both paths.
    """
    if x_TH.shape[0] == 0:
        return x_TH.new_zeros(0, w_EHI.shape[-1]) + 0 * w_EHI.sum()
    if _native_supported(x_TH, w_EHI):
        offs = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
        return torch._grouped_mm(x_TH, w_EHI, offs=offs)
    return grouped_mm_loop(x_TH, w_EHI, tokens_per_expert_E)
