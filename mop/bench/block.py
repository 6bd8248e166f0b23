"""One transformer block of a named shape on one device, forward + backward, under each elementwise
kernels mode (`training.elementwise_kernels`: op by op or torch.compile'd, mop.ops.fused), not a test.

    python -m mop.bench.block --shape qwen3-30b-a3b --tokens 8192,32768 --kernels eager,fused \
        --policies none,selective --out block.json

The block is the model's own (`mop.models.transformer.Block`, a routed-expert layer: GQA with RoPE,
the router, GroupedExperts) in bf16 on one GPU (fp32 on CPU), on `tokens` tokens as one sequence:
what one rank runs per block at Ep = 1, D = 1. Per case it reports fwd+bwd milliseconds (CUDA events,
warm-up excluded, median of `--iters`), the peak memory above what the block's weights hold, and how
far the output and the input's gradient are from the first mode's (same weights, same input): the
fused kernels round once where op-by-op rounds each intermediate. Results go to --out as JSON lines
as each case finishes, and a Markdown table to --out with suffix .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mop.models.shapes import SHAPES, get_shape


def build_block(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A routed-expert block of `shape` with seeded weights (the model's init), on `device` in `dtype`."""
    from mop.models.transformer import Block

    cfg = get_shape(shape, n_layers=max(2, get_shape(shape).n_dense_layers + 1))
    with torch.device("meta"):
        block = Block(cfg, cfg.n_dense_layers)  # the first routed-expert layer; only it is materialised
    block = block.to(dtype)  # on the meta device: a kimi-k2 block is 34 GB in bf16, twice that in fp32
    block.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.init_std)
        for b in block.buffers():
            b.zero_()
    return block, cfg


def run_case(shape: str, tokens: int, kernels: str, policy: str, iters: int, device: torch.device) -> dict:
    """Time fwd+bwd of one block; returns the metrics and the output / input gradient (for comparison)."""
    from mop.models.activation_policy import checkpoint_block
    from mop.models.moe import resolve_aux

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block, cfg = build_block(shape, device, dtype)
    for m in block.modules():
        if hasattr(m, "elementwise_kernels"):
            m.elementwise_kernels = kernels
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, tokens, cfg.dim, generator=gen).to(device, dtype).requires_grad_()
    positions = torch.arange(tokens, device=device)[None]
    g = torch.randn(1, tokens, cfg.dim, generator=gen).to(device, dtype)

    def step():
        x.grad = None
        for p in block.parameters():
            p.grad = None
        if policy == "none":
            y, aux = block(x, positions)
        else:  # as the model runs a block under "selective" / "full"
            y, aux = checkpoint_block(block, x, positions, keep_attention=policy == "selective")
        (y * g).sum().backward()
        resolve_aux(aux)
        return y

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    y = step()  # the first call compiles (fused) and selects kernels
    sync()
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            y = step()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    return {"shape": shape, "tokens": tokens, "kernels": kernels, "policy": policy, "ms": statistics.median(times),
            "first_call_s": first_s, "peak_above_weights_gib": peak,
            "y": y.detach().float().cpu(), "dx": x.grad.detach().float().cpu()}


def table(rows: list[dict]) -> str:
    lines = ["| shape | tokens | policy | kernels | fwd+bwd ms | vs first mode | peak above weights GiB | "
             "max abs diff y / dx vs first mode | first call s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_above_weights_gib"] is None else f"{r['peak_above_weights_gib']:.2f}"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['policy']} | {r['kernels']} | {r['ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {peak} | {r['diff_y']:.2e} / {r['diff_dx']:.2e} | {r['first_call_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--tokens", default="8192", help="comma-separated token counts")
    p.add_argument("--kernels", default="eager,fused", help="comma-separated elementwise kernels modes")
    p.add_argument("--policies", default="none", help="comma-separated block policies (none, selective, full)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench_block.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.write_text("")
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for policy in args.policies.split(","):
            first = None
            for kernels in args.kernels.split(","):
                try:
                    r = run_case(args.shape, tokens, kernels, policy, args.iters, device)
                except torch.OutOfMemoryError as e:
                    print(f"{tokens} {policy} {kernels}: OOM ({str(e)[:120]})", flush=True)
                    continue
                first = first or r
                r["speedup"] = first["ms"] / r["ms"]
                r["diff_y"] = float((r["y"] - first["y"]).abs().max())
                r["diff_dx"] = float((r["dx"] - first["dx"]).abs().max())
                row = {k: v for k, v in r.items() if k not in ("y", "dx")}
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out.with_suffix(".md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
