"""Bytes each non-GEMM op of one block moves, forward and backward, per token: op by op against fused
elementwise kernels (`mop.ops.fused`), counted on any device (CPU is enough), not timed.

    python -m mop.bench.ledger --shape qwen3-30b-a3b --tokens 2048 --out ledger.json

A Python dispatch mode sees every aten op of one routed-expert block's forward and backward
(`mop.bench.block.build_block`) and adds up the bytes of its tensor inputs and outputs: what an
op-by-op kernel reads and writes, at least. GEMM-class ops (mm, grouped mm, attention) are tallied
apart; views and allocations move nothing. RMSNorm is counted as one kernel each way, as CUDA runs it
(`F.rms_norm` is composite on CPU), and the experts' grouped GEMM as one GEMM each way, as
`torch._grouped_mm` runs there. With fused kernels, each function of `mop.ops.fused` is counted as
one kernel each way: its inputs and outputs once (forward), and the incoming gradient, its inputs
and their gradients (backward): what a fused kernel reads and writes at least. The ratio of the two
totals is `Calibration.fused_elementwise_ratio`.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mop.models.shapes import SHAPES

GEMMS = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product", "_flash_attention", "_efficient_attention",
         "_cudnn_attention")
FREE = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "slice",
        "select", "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "empty", "empty_like",
        "new_empty", "empty_strided", "lift_fresh", "_reshape_alias"}


def _bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree)
               if isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype == torch.bool))


class Ledger(TorchDispatchMode):
    """Bytes by (phase, op) of the ops dispatched while active; `kernel` adds a fused kernel's."""

    def __init__(self):
        super().__init__()
        self.bytes, self.calls = collections.Counter(), collections.Counter()
        self.phase, self.paused = "forward", 0

    def kernel(self, name: str, n_bytes: int) -> None:
        self.bytes[self.phase, name] += n_bytes
        self.calls[self.phase, name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if self.paused or name in FREE:
            return out
        self.kernel(("gemm:" if name.startswith(GEMMS) else "") + name, _bytes((args, kwargs, out)))
        return out


class _OneKernel(torch.autograd.Function):
    """Runs `fn` with the ledger paused and books it as one kernel each way."""

    @staticmethod
    def forward(ctx, ledger, name, fn, *args):
        ledger.paused += 1
        try:
            with torch.enable_grad():
                ins = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
                out = fn(*ins)
        finally:
            ledger.paused -= 1
        ledger.kernel("fused:" + name, _bytes((args, out)))
        ctx.ledger, ctx.name, ctx.ins, ctx.out = ledger, name, ins, out
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        wanted = [a for a in ctx.ins if isinstance(a, torch.Tensor) and a.requires_grad]
        ctx.ledger.paused += 1
        try:
            grads = iter(torch.autograd.grad(ctx.out, wanted, g, allow_unused=True))
        finally:
            ctx.ledger.paused -= 1
        ctx.ledger.kernel("fused:" + ctx.name, _bytes(g) + _bytes([a for a in ctx.ins if isinstance(a, torch.Tensor)])
                          + _bytes(wanted))
        return (None, None, None, *(next(grads) if isinstance(a, torch.Tensor) and a.requires_grad else None
                                    for a in ctx.ins))


class _GroupedGemm(torch.autograd.Function):
    """`grouped_mm` booked as one GEMM each way, as `torch._grouped_mm` runs on CUDA (off CUDA the
    model loops over experts, and each loop's weight-gradient slices would be counted as copies)."""

    @staticmethod
    def forward(ctx, ledger, x_NH, w_EHI, counts_E):
        from mop.ops.grouped_mm import grouped_mm_loop

        ledger.paused += 1
        try:
            out = grouped_mm_loop(x_NH, w_EHI, counts_E)
        finally:
            ledger.paused -= 1
        ledger.kernel("gemm:grouped_mm", _bytes((x_NH, w_EHI, out)))
        ctx.save_for_backward(x_NH, w_EHI, counts_E)
        ctx.ledger = ledger
        return out

    @staticmethod
    def backward(ctx, g_NI):
        x_NH, w_EHI, counts_E = ctx.saved_tensors
        ctx.ledger.paused += 1
        try:
            sizes = counts_E.tolist()
            dx = torch.cat([ge @ w_EHI[e].T for e, ge in enumerate(g_NI.split(sizes))])
            dw = torch.stack([xe.T @ ge for xe, ge in zip(x_NH.split(sizes), g_NI.split(sizes))])
        finally:
            ctx.ledger.paused -= 1
        ctx.ledger.kernel("gemm:grouped_mm", 2 * _bytes((g_NI, x_NH, w_EHI)))
        return None, dx, dw, None


def _booked(ledger: Ledger, name: str, fn, autograd: bool):
    def run(*args):
        if autograd:
            return _OneKernel.apply(ledger, name, fn, *args)
        ledger.paused += 1
        try:
            out = fn(*args)
        finally:
            ledger.paused -= 1
        ledger.kernel("fused:" + name, _bytes((args, out)))
        return out
    return run


def count(shape: str, tokens: int, kernels: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """{(phase, op): bytes per token} of one block's forward and backward under `kernels`."""
    from mop.bench.block import build_block
    from mop.models import layers, moe
    from mop.models.moe import resolve_aux
    from mop.ops import fused

    block, cfg = build_block(shape, torch.device("cpu"), dtype)
    ledger = Ledger()
    saved = (dict(fused._COMPILED), fused.is_fused, moe.is_fused, layers.F.rms_norm, moe.grouped_mm)
    # Functions called inside autograd Functions' own forward/backward need no graph of their own.
    inside = {"gather_sum", "combine", "combine_grads"}
    try:
        for name, fn in fused._MATH.items():  # what `kernel` hands out for "fused": the booked functions
            fused._COMPILED[name] = _booked(ledger, name, fn, autograd=name not in inside)
        fused.is_fused = moe.is_fused = lambda t, k: k == "fused"
        moe.grouped_mm = lambda x, w, c: _GroupedGemm.apply(ledger, x, w, c)
        rms = saved[3]
        layers.F.rms_norm = lambda x, shape_, w, eps: _OneKernel.apply(ledger, "rms_norm", lambda a, b: rms(a, shape_, b, eps),
                                                                         x, w)
        for m in block.modules():
            if hasattr(m, "elementwise_kernels"):
                m.elementwise_kernels = kernels
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, tokens, cfg.dim, generator=gen).to(dtype).requires_grad_()
        g = torch.randn(1, tokens, cfg.dim, generator=gen).to(dtype)
        with ledger:
            y, aux = block(x, torch.arange(tokens)[None])
            resolve_aux(aux)
            ledger.phase = "backward"
            y.backward(g)
    finally:
        fused._COMPILED.clear()
        fused._COMPILED.update(saved[0])
        fused.is_fused, moe.is_fused, layers.F.rms_norm, moe.grouped_mm = saved[1:]
    return {k: v / tokens for k, v in ledger.bytes.items()}


def totals(per_op: dict) -> dict:
    """Per token: non-GEMM bytes forward, backward and together, and the GEMM ops' operand bytes."""
    out = collections.Counter()
    for (phase, op), b in per_op.items():
        out[("gemm_" if op.startswith("gemm:") else "") + phase] += b
    out["non_gemm"] = out["forward"] + out["backward"]
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--top", type=int, default=15, help="ops listed per mode")
    p.add_argument("--out", default=None, help="JSON with every op's bytes per token and the totals")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    result = {}
    for kernels in ("eager", "fused"):
        per_op = count(args.shape, args.tokens, kernels, dtype)
        result[kernels] = {"totals": totals(per_op), "ops": {f"{ph} {op}": b for (ph, op), b in per_op.items()}}
        t = result[kernels]["totals"]
        print(f"{kernels}: non-GEMM {t['non_gemm'] / 1e3:.1f} KB/token (forward {t['forward'] / 1e3:.1f}, "
              f"backward {t['backward'] / 1e3:.1f})")
        for (ph, op), b in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"    {ph:8s} {op:40s} {b / 1e3:8.1f} KB/token")
    ratio = result["fused"]["totals"]["non_gemm"] / result["eager"]["totals"]["non_gemm"]
    result["fused_over_eager"] = ratio
    print(f"fused / eager non-GEMM bytes: {ratio:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "tokens": args.tokens, "dtype": args.dtype,
                                              **result}, indent=1))


if __name__ == "__main__":
    main()
