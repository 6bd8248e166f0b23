"""Benchmark HostAdamW engines on one GPU: update throughput, copy bandwidth, memory, and correctness.

    python -m mop.bench.host_adamw --numel 1e9 --engine cpu,gpu_stream

For each engine it builds bf16 parameters on the GPU (split into `--tensors` tensors, like layers),
fixed bf16 gradients, runs `--warmup` + `--steps` full updates, and prints one JSON line with
params/s, the effective host<->device GB/s of the update, the raw pinned-copy GB/s of the link,
peak device memory, and the error against a device fp32 torch.optim.AdamW fed the same gradients.
Stated tolerance: the fp32 master is within atol 1e-5 of the fp32 reference, and every bf16
parameter equals master.to(bf16), so |param - ref| <= 2^-8 |ref| + 2e-5 (bf16 rounding of a master
within 1e-5); the JSON reports the worst excess over 2^-8 |ref| as `bf16_excess`.
Not a test: it needs a CUDA GPU and, at 1e9 parameters, about 20 GB of GPU and 16 GB of host memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from mop.optim import ENGINES, HostAdamW
from mop.optim.registry import engine_class

MASTER_ATOL = 1e-5
BF16_RTOL = 2.0**-8  # unit roundoff of bf16 (8 significant bits)


def link_bandwidth(numel: int, device: torch.device) -> dict:
    """Raw H2D and D2H GB/s of one pinned fp32 buffer of `numel` elements."""
    host = torch.empty(numel, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(numel, dtype=torch.float32, device=device)
    out = {}
    for name, dst, src in (("h2d_raw_GBps", dev, host), ("d2h_raw_GBps", host, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)  # host sync: timing boundary
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        out[name] = round(3 * host.nbytes / (time.perf_counter() - t0) / 1e9, 2)
    return out


def make_params(numel: int, tensors: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """`tensors` bf16 parameters (2-D, like weight matrices) with `numel` elements in total."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
    return [
        torch.nn.Parameter((torch.randn(n, generator=gen, device=device) * 0.02).to(torch.bfloat16).view(1, n))
        for n in sizes
    ]


def run_engine(engine: str, args, device: torch.device) -> dict:
    params = make_params(args.numel, args.tensors, device, seed=0)
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [(torch.randn(p.shape, generator=gen, device=device) * 1e-3).to(torch.bfloat16) for p in params]
    # Reference: fp32 AdamW on the device, fed the same (bf16) gradients.
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = args.warmup + args.steps
    for _ in range(steps):
        for r, g in zip(ref, grads):
            r.grad = g.float()
        ref_opt.step()
    ref_values = [r.detach() for r in ref]
    del ref_opt, ref
    gc.collect()
    torch.cuda.empty_cache()

    before = torch.cuda.memory_allocated(device)
    opt = HostAdamW(
        params,
        lr=args.lr,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        engine=engine,
        device_fraction=args.device_fraction,
        bucket_numel=args.bucket_numel,
    )
    for p, g in zip(params, grads):
        p.grad = g
    for _ in range(args.warmup):
        opt.step()
    torch.cuda.synchronize(device)  # host sync: timing boundary
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step()
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) - before

    cls = engine_class(engine)
    offloaded = args.numel - round((1.0 if cls.device_resident else args.device_fraction) * args.numel)
    per_direction = cls.link_bytes_per_bf16_param * offloaded  # bytes each way per step
    state = opt.state_dict()["state"]
    master_err, bf16_ok, bf16_excess = 0.0, True, 0.0
    for i, (p, r) in enumerate(zip(params, ref_values)):
        master = state[i]["master"].to(device)
        master_err = max(master_err, (master - r).abs().max().item())  # host sync, after timing
        bf16_ok &= bool(torch.equal(p.detach(), master.to(torch.bfloat16)))
        bf16_excess = max(bf16_excess, ((p.detach().float() - r).abs() - BF16_RTOL * r.abs()).max().item())
    result = {
        "engine": engine,
        "numel": args.numel,
        "device_fraction": args.device_fraction,
        "bucket_numel": args.bucket_numel,
        "cpu_threads": opt.cpu_threads,
        "step_s": round(seconds, 4),
        "params_per_s": round(args.numel / seconds, 1),
        "h2d_GBps": round(per_direction / seconds / 1e9, 2),
        "d2h_GBps": round(per_direction / seconds / 1e9, 2),
        "peak_device_GiB": round(peak / 2**30, 3),
        "optimizer_device_GiB": round(opt.device_memory_bytes() / 2**30, 3),
        "optimizer_host_GiB": round(opt.host_memory_bytes() / 2**30, 3),
        "master_max_abs_err": master_err,
        "bf16_equals_master": bf16_ok,
        "bf16_excess": bf16_excess,
        "ok": master_err <= MASTER_ATOL and bf16_ok and bf16_excess <= 2 * MASTER_ATOL,
    }
    del opt, state, params, grads, ref_values
    gc.collect()
    torch.cuda.empty_cache()
    return result


def check_cuda_paths(engine: str, device: torch.device) -> dict:
    """Small fp32 model on the GPU: async API, backward-hook grad offload, device clip tensor, split
    device/host state and a state_dict round trip, against torch.optim.AdamW with clipped grads."""

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.LayerNorm(96), torch.nn.Linear(96, 32)).to(device)
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.ndim == 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return model, groups

    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    xs = [torch.randn(16, 64, device=device, generator=torch.Generator(device=device).manual_seed(i)) for i in range(5)]
    ref, ref_groups = build(0)
    ref_opt = torch.optim.AdamW(ref_groups, **kw)
    model, groups = build(0)
    opt = HostAdamW(groups, engine=engine, device_fraction=0.5, bucket_numel=1000, **kw)
    for p in model.parameters():  # as a trainer would: offload each grad as soon as it is final
        p.register_post_accumulate_grad_hook(lambda p: opt.offload_grads_async([p]))
    for step, x in enumerate(xs):
        if step == 3:  # checkpoint round trip into a fresh optimizer mid-run
            saved = {k: v for k, v in opt.state_dict().items()}
            saved["state"] = {i: {k: t.clone() for k, t in e.items()} for i, e in saved["state"].items()}
            opt = HostAdamW(groups, engine=engine, device_fraction=0.5, bucket_numel=1000, **kw)
            opt.load_state_dict(saved)
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        clip = torch.clamp(0.5 / (norm + 1e-6), max=1.0)  # stays on the device: no host sync
        for p in ref.parameters():
            p.grad.mul_(clip)
        ref_opt.step()
        opt.step_async(clip)
        for p in model.parameters():
            opt.wait_params([p])
        opt.synchronize()
    err = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    return {"check": engine, "max_abs_err_vs_torch_adamw": err, "ok": err <= MASTER_ATOL}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and print one JSON line per engine (plus one for the raw link bandwidth)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=1e9, help="total parameters (e.g. 1e9)")
    parser.add_argument("--engine", default="cpu,gpu_stream", help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--tensors", type=int, default=16, help="how many parameter tensors to split numel into")
    parser.add_argument("--bucket-numel", type=int, default=2**25)
    parser.add_argument("--device-fraction", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    args.numel = int(args.numel)
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            raise ValueError(f"--engine: {e!r} is not one of {', '.join(ENGINES)}")
    if not torch.cuda.is_available():
        raise SystemExit("mop.bench.host_adamw needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    print(
        json.dumps({"link": torch.cuda.get_device_name(device), **link_bandwidth(min(args.numel, 2**28), device)}),
        flush=True,
    )
    failed = []
    for engine in engines:
        result = check_cuda_paths(engine, device)
        print(json.dumps(result), flush=True)
        if not result["ok"]:
            failed.append(engine)
    for engine in engines:
        result = run_engine(engine, args, device)
        print(json.dumps(result), flush=True)
        if not result["ok"]:
            failed.append(engine)
    if failed:
        raise SystemExit(f"mop.bench.host_adamw: result outside the stated tolerance for {failed}")


if __name__ == "__main__":
    main()
