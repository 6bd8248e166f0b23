"""GPU micro-benchmark of the expert layer: alltoall vs llep vs llep_pipelined (not a test).

    torchrun --nproc-per-node 4 -m mop.bench.experts --shape qwen3-30b-a3b \
        --tokens 16384,65536,131072 --skew 0,0.3,0.5,0.8,0.95 --out bench_experts.json

Each rank routes `tokens` tokens (top-k) through one `ExpertParallelExperts` layer in bf16; a
fraction `skew` of the top-k slots is sent to a few hot experts (all homed on expert-group rank 0),
the rest uniformly. Per case it reports fwd+bwd time (CUDA events, warm-up excluded, mean over
iterations, max over ranks) and peak allocated memory (max over ranks; also the part above the
memory held before the step). Results are appended as JSON lines to --out as each case finishes
(so a crash keeps what was measured) and a Markdown table is written to --out with suffix .md.
OOM is caught per case; an OOM while peers wait inside a collective cannot be recovered from, so
the process group gets a finite timeout (--timeout) and the job then ends with partial results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mop.models.shapes import SHAPES, get_shape
from mop.parallel.experts import DISPATCHERS


def skewed_routing(n_tokens: int, n_experts: int, top_k: int, skew: float, n_hot: int, gen: torch.Generator,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids and weights with about `skew` of the slots on experts 0..n_hot-1 (distinct per token)."""
    scores = torch.rand(n_tokens, n_experts, generator=gen)
    hot_slots = torch.binomial(torch.full((n_tokens,), float(top_k)), torch.full((n_tokens,), float(skew)),
                               generator=gen).clamp(max=n_hot)
    order = torch.rand(n_tokens, n_hot, generator=gen).argsort(1).argsort(1)  # random ranking of hot experts
    scores[:, :n_hot] += 2.0 * (order < hot_slots.unsqueeze(1))
    idx = scores.topk(top_k, dim=1).indices
    weight = torch.softmax(torch.randn(n_tokens, top_k, generator=gen), dim=1)
    return idx.to(device), weight.to(device)


def run_case(layout, shape, dispatcher: str, n_tokens: int, skew: float, args, device) -> dict:
    """Time fwd+bwd of one layer configuration on this rank; returns local metrics (may raise OOM)."""
    from mop.models.activation_policy import checkpoint_block
    from mop.models.moe import GroupedExperts
    from mop.parallel.experts import ExpertParallelExperts

    cfg = dict(dispatcher=dispatcher, llep_alpha=args.alpha, llep_min_chunk=args.min_chunk,
               llep_imbalance_threshold=args.imbalance_threshold, chunk_tokens=args.chunk_tokens,
               max_chunks=args.max_chunks)
    with torch.device("meta"):  # the model's own experts module, for its shapes only
        meta = GroupedExperts(shape.n_experts, shape.dim, shape.expert_dim).to(torch.bfloat16)
    mod = ExpertParallelExperts.from_module(meta, layout, cfg)
    mod.to_empty(device=device)
    gen = torch.Generator().manual_seed(1234 + dist.get_rank())
    with torch.no_grad():
        for p in mod.parameters():
            p.to_local().normal_(0.0, 0.02)
    n_hot = args.hot_experts or shape.top_k  # >= top_k hot experts so any skew up to 1 is reachable
    idx, weight = skewed_routing(n_tokens, shape.n_experts, shape.top_k, skew, n_hot, gen, device)
    x = torch.randn(n_tokens, shape.dim, generator=gen).to(device, torch.bfloat16).requires_grad_()
    gy = torch.randn(n_tokens, shape.dim, generator=gen).to(device, torch.bfloat16)
    weight.requires_grad_()

    def layer(x_):
        return x_ + mod(x_, idx, weight)  # the block's residual add around the layer

    def step():
        # --checkpointed: as in training with activation checkpointing, where every dispatcher
        # recomputes its GEMMs in backward and the block's recompute pass skips the layer.
        y = checkpoint_block(layer, x) if args.checkpointed else layer(x)
        y.backward(gy)
        x.grad = weight.grad = None
        for p in mod.parameters():
            p.grad = None

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n_llep0 = mod.dispatcher.n_llep_plans
    n_all0 = n_llep0 + mod.dispatcher.n_plain_plans
    start.record()
    for _ in range(args.iters):
        step()
    end.record()
    torch.cuda.synchronize()
    n_plans = mod.dispatcher.n_llep_plans + mod.dispatcher.n_plain_plans - n_all0
    return {"ms": start.elapsed_time(end) / args.iters,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "step_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
            "llep_fraction": (mod.dispatcher.n_llep_plans - n_llep0) / max(n_plans, 1)}


def _reduce_max(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()  # host sync: fine in a benchmark, outside the timed region


def markdown(rows: list[dict]) -> str:
    """Markdown table: one line per (tokens, skew), ms and peak GiB per dispatcher."""
    lines = ["| tokens/rank | skew | " + " | ".join(f"{d} ms | {d} peak GiB" for d in DISPATCHERS) + " |",
             "|---|---|" + "---|---|" * len(DISPATCHERS)]
    keys = sorted({(r["tokens"], r["skew"]) for r in rows})
    for tok, skew in keys:
        cells = []
        for d in DISPATCHERS:
            r = next((r for r in rows if (r["tokens"], r["skew"], r["dispatcher"]) == (tok, skew, d)), None)
            if r is None:
                cells += ["-", "-"]
            elif r["oom"]:
                cells += ["OOM", "OOM"]
            else:
                cells += [f"{r['ms']:.1f}", f"{r['peak_gib']:.2f}"]
        lines.append(f"| {tok} | {skew} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(n for n, s in SHAPES.items() if s.n_experts > 1),
                    default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="16384,65536,131072", help="tokens per rank, comma-separated")
    ap.add_argument("--skew", default="0,0.3,0.5,0.8,0.95", help="fractions of top-k slots to hot experts")
    ap.add_argument("--dispatchers", default=",".join(DISPATCHERS))
    ap.add_argument("--ep", type=int, default=0, help="expert-parallel degree (default: world size)")
    ap.add_argument("--hot-experts", type=int, default=0, help="number of hot experts (default: top-k)")
    ap.add_argument("--alpha", type=float, default=1.1)
    ap.add_argument("--min-chunk", type=int, default=1024)
    ap.add_argument("--imbalance-threshold", type=float, default=1.3)
    ap.add_argument("--chunk-tokens", type=int, default=16384)
    ap.add_argument("--max-chunks", type=int, default=10)
    ap.add_argument("--checkpointed", action="store_true",
                    help="run the layer inside an activation-checkpointed block, as training with AC does")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=600, help="process-group timeout, seconds")
    ap.add_argument("--out", required=True, help="JSON-lines output file (a .md table is written next to it)")
    args = ap.parse_args(argv)

    from mop.parallel.layout import Layout, LayoutSpec

    if not torch.cuda.is_available():
        raise SystemExit("bench needs CUDA GPUs; run it under torchrun on a GPU machine")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", timeout=timedelta(seconds=args.timeout), device_id=device)
    world = dist.get_world_size()
    shape = get_shape(args.shape)
    layout = Layout.build(LayoutSpec(world, expert=args.ep or world), device)
    dispatchers = [d for d in args.dispatchers.split(",") if d]
    for d in dispatchers:
        if d not in DISPATCHERS:
            raise SystemExit(f"--dispatchers: {d!r} is not one of {list(DISPATCHERS)}")
    rows = []
    for n_tokens in [int(t) for t in args.tokens.split(",")]:
        for skew in [float(s) for s in args.skew.split(",")]:
            for d in dispatchers:
                row = {"shape": args.shape, "world": world, "ep": layout.spec.expert, "tokens": n_tokens,
                       "skew": skew, "dispatcher": d, "checkpointed": args.checkpointed}
                try:
                    local = run_case(layout, shape, d, n_tokens, skew, args, device)
                    oom = 0.0
                except torch.cuda.OutOfMemoryError:
                    local, oom = {"ms": 0.0, "peak_gib": 0.0, "step_peak_gib": 0.0, "llep_fraction": 0.0}, 1.0
                gc.collect()
                torch.cuda.empty_cache()
                vals = _reduce_max([local["ms"], local["peak_gib"], local["step_peak_gib"], local["llep_fraction"],
                                    oom], device)
                row.update(ms=vals[0], peak_gib=vals[1], step_peak_gib=vals[2], llep_fraction=vals[3],
                           oom=bool(vals[4]))
                rows.append(row)
                if dist.get_rank() == 0:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        table = markdown(rows)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table)
        print(table, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
