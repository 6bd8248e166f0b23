"""Micro-benchmarks behind `mop plan calibrate`: kernel rates, memory and link bandwidths of this machine.

Measured: bf16 GEMM by size (torch.matmul), expert grouped GEMM by rows per expert
(`mop.ops.grouped_mm`: torch._grouped_mm on Hopper), causal SDPA by sequence length (forward, and backward/forward), device memory
bandwidth (a copy), pinned host<->device copies, host AdamW (params/s), and, when launched under
torchrun with more than one rank, all-gather and all-to-all bus bandwidth (torch.distributed).
Each rate curve rate(w) = peak * w / (w + half) is fitted by least squares on 1/rate = 1/peak +
(half/peak) / w. On CPU everything runs in fp32 at small sizes: a fallback for tests, not a result.

What a training step gets of these rates is not a micro-benchmark: the in-step efficiencies
(`Calibration.in_step`, fitted by `mop plan fit`), the grouped GEMM's half rate, the memory factors
and the fitted overheads (`elementwise_factor`, `layer_overhead_s`, expert and strip factors,
allocator slack) are carried over from the shipped calibration of the same device type
(`with_base_in_step`; H200's when there is none), which fitted them to measured training steps, so
that a fresh calibration predicts steps, not micro-benchmarks. `mop plan fit` refits them once this
machine's steps are measured.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from mop.plan.calibration import CALIBRATION_DIR, EFFICIENCIES, Calibration, for_device


REPS = {"n": 5}  # timed repetitions per measurement; `calibrate(quick=True)` lowers it


def _timeit(fn, device: torch.device, reps: int | None = None) -> float:
    """Median seconds of `fn()` after one warm-up (CUDA: synchronised around each call)."""
    reps = reps or REPS["n"]
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host sync: timing only
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fit_saturating(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(peak, half) of rate = peak * w / (w + half) from (w, rate) points (least squares on 1/rate vs 1/w)."""
    xs = [1.0 / w for w, _ in points]
    ys = [1.0 / r for _, r in points]
    n = len(points)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    inter = my - slope * mx
    if inter <= 0:  # no saturation visible in the range: the best rate is the peak
        return max(r for _, r in points), 0.0
    return 1.0 / inter, max(slope / inter, 0.0)


def gemm_points(device, dtype, sizes) -> list[tuple[float, float]]:
    out = []
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        t = _timeit(lambda: torch.matmul(a, b), device)
        out.append((2.0 * n**3, 2.0 * n**3 / t))
    return out


def grouped_points(device, dtype, experts: int, H: int, I: int, rows_list) -> list[tuple[float, float]]:
    """Rate of an expert SwiGLU-sized grouped GEMM [E*r, H] x [E, H, I] by rows per expert r."""
    from mop.ops.grouped_mm import grouped_mm  # the training kernel: _grouped_mm on sm90+ bf16, else a loop

    out = []
    w = torch.randn(experts, H, I, device=device, dtype=dtype)
    for r in rows_list:
        x = torch.randn(experts * r, H, device=device, dtype=dtype)
        counts = torch.full((experts,), r, device=device, dtype=torch.int64)
        t = _timeit(lambda: grouped_mm(x, w, counts), device)
        out.append((r, 2.0 * experts * r * H * I / t))
    return out


def attention_points(device, dtype, heads: int, head_dim: int, seqs) -> tuple[list, float]:
    """Causal SDPA forward rate by sequence length (causal FLOPs 2*S^2*H*Dh) and the backward/forward ratio."""
    from mop.ops.attention import causal_attention  # the training path: cuDNN first on CUDA

    out, ratio = [], 2.5
    for s in seqs:
        q, k, v = (torch.randn(1, heads, s, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        fwd = _timeit(lambda: causal_attention(q, k, v), device)
        dout = torch.randn(1, heads, s, head_dim, device=device, dtype=dtype)

        def fwd_bwd():
            o = causal_attention(q, k, v)
            torch.autograd.grad(o, (q, k, v), dout)

        both = _timeit(fwd_bwd, device)
        out.append((s, 2.0 * s * s * heads * head_dim / fwd))
        ratio = max(both / fwd - 1.0, 1.0)  # the longest sequence's ratio is kept
    return out, ratio


def copy_bandwidth(device, numel: int) -> float:
    x = torch.empty(numel, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    t = _timeit(lambda: y.copy_(x), device)
    return 2 * 4 * numel / t  # read + write


def host_link_bandwidth(device, numel: int) -> float:
    """Pinned host -> device bytes/s (CPU: a host memcpy)."""
    pinned = device.type == "cuda"
    h = torch.empty(numel, dtype=torch.float32, pin_memory=pinned)
    d = torch.empty(numel, dtype=torch.float32, device=device)
    t = _timeit(lambda: d.copy_(h, non_blocking=pinned), device)
    return 4 * numel / t


def host_adamw_rate(numel: int) -> tuple[float, int]:
    """(parameters per second, threads) of the trainer's host AdamW update over fp32 state.

    The trainer's cpu engine runs `adamw_flat_` on slices of a bucket in a `HostThreadPool` (one
    intra-op thread per worker) and casts the new weights to bf16 there; this times the same work
    with the same thread count, `HostAdamW`'s own default (the host's cores over its local ranks).
    Not torch's intra-op setting: torchrun sets OMP_NUM_THREADS=1, under which session 6's
    calibration measured one thread per rank (0.17 Gparam/s, against 2.2 per node measured by the
    engine itself).
    """
    from mop.optim import HostAdamW
    from mop.optim.buckets import AdamWHyper, HostThreadPool, adamw_flat_

    threads = HostAdamW([torch.nn.Parameter(torch.zeros(1))], engine="cpu").cpu_threads  # the trainer's default
    pool = HostThreadPool(threads)
    master, exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel), torch.zeros(numel)
    grad = (torch.randn(numel) * 1e-3).to(torch.bfloat16)
    weight = torch.empty(numel, dtype=torch.bfloat16)
    hyper = AdamWHyper(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

    def update_slice(start: int, end: int) -> None:
        adamw_flat_(master[start:end], exp_avg[start:end], exp_avg_sq[start:end], grad[start:end], hyper, 1, None)
        weight[start:end].copy_(master[start:end])

    tasks = [lambda a=a, b=b: update_slice(a, b) for a, b in pool.slices(0, numel)]
    try:
        t = _timeit(lambda: pool.run(tasks), torch.device("cpu"))
    finally:
        pool.shutdown()
    return numel / t, threads


def collective_bandwidths(device, numel: int) -> tuple[float, float] | None:
    """(all-gather, all-to-all) bus bytes/s per rank when torch.distributed runs with > 1 rank, else None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    w = dist.get_world_size()
    x = torch.randn(numel, device=device, dtype=torch.bfloat16)
    out = torch.empty(numel * w, device=device, dtype=torch.bfloat16)
    t_ag = _timeit(lambda: dist.all_gather_into_tensor(out, x), device)
    y = torch.randn(numel * w, device=device, dtype=torch.bfloat16)
    z = torch.empty_like(y)
    t_a2a = _timeit(lambda: dist.all_to_all_single(z, y), device)
    bus = 2 * numel * (w - 1)  # bytes each rank sends/receives
    return bus / t_ag, 2 * numel * w * (w - 1) / w / t_a2a


# Constants fitted as seconds of measured steps but stored as bytes moved at `hbm_bw`: on the same
# device type a new `hbm_bw` rescales them, so that they keep the seconds they were fitted to.
HBM_FITTED = ("elementwise_factor", "device_adam_bytes", "device_master_update_bytes")


def with_base_in_step(measured: Calibration, base: Calibration, log=lambda *a: None) -> Calibration:
    """`measured` with `base`'s in-step constants: its efficiencies, its grouped GEMM half rate and,
    where `base` is of the same device type, its `HBM_FITTED` constants at the measured bandwidth.

    The grouped GEMM's half rate is kept from `base` because the micro-benchmark's is not what a
    step sees: it times one call of 32 experts, synchronised, where a step runs 64-128 local experts
    back to back. (Session 6 measured half at 718 rows per expert; the step profiles took the same
    time at 512 rows x 128 experts and 1024 x 64, and ran at 416 TFLOP/s at 2048 rows: half at 32.)
    """
    same_type = base.device_name.lower() in measured.device_name.lower()
    changes = {name: getattr(base, name) for name, _ in EFFICIENCIES.values()}
    changes["expert_half_rows"] = base.expert_half_rows
    notes = dict(measured.notes)
    notes["expert_half_rows"] = (f"{base.name}'s (see mop.plan.microbench.with_base_in_step); the micro-benchmark "
                                 f"measured {measured.expert_half_rows:.0f} rows per expert in one synchronised call")
    if same_type and base.hbm_bw > 0:
        for name in HBM_FITTED:
            changes[name] = round(getattr(base, name) * measured.hbm_bw / base.hbm_bw, 3)
        notes["hbm_fitted"] = (f"{', '.join(HBM_FITTED)}: {base.name}'s, fitted as seconds at {base.hbm_bw / 1e12:.3f} "
                               f"TB/s, rescaled to the measured {measured.hbm_bw / 1e12:.3f} TB/s")
    fitted = base.fit.get("fitted", {}) if base.fit else {}
    fit = dict(carried_over=base.name, fitted=dict(fitted), points=len(base.fit.get("points", [])) if base.fit else 0,
               refit="mop plan fit --calibration THIS_FILE (with this machine's measured bench results)")
    factors = ", ".join(f"{t} {f:.3g}" for t, f in base.efficiencies().items())
    log(f"in-step constants carried over from {base.name} ({base.device_name}"
        + ("" if same_type else f", not this {measured.device_name}: a guess until this machine's steps are measured")
        + (f"; fitted on {fit['points']} measured steps" if fit["points"] else "; never fitted")
        + f"): efficiencies {factors}; grouped GEMM half rate "
        f"{base.expert_half_rows:.0f} rows/expert (measured here: {measured.expert_half_rows:.0f})"
        + ("; the fitted byte constants rescaled to this memory bandwidth" if same_type else "")
        + ". Refit them with `mop plan fit --calibration <this file>` once bench results of this machine exist.")
    return dataclasses.replace(measured, **changes, notes=notes, fit=fit)


def calibrate(device: str = "auto", name: str | None = None, out=None, quick: bool = False, base: str | None = None,
              log=lambda *a: None) -> tuple[Calibration, object]:
    """Run the micro-benchmarks, write the calibration file, return (calibration, path).

    `base`: the calibration whose in-step constants are carried over (`with_base_in_step`); by
    default the shipped one of this device type.
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        dev_name, dev_bytes = props.name, float(props.total_memory)
    else:
        dev_name = "cpu"
        dev_bytes = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    cal = Calibration.load(base) if base else for_device(dev_name)
    small = quick or not cuda
    REPS["n"] = 2 if quick else 5
    gemm = fit_saturating(gemm_points(dev, dtype, (64, 128, 256) if quick else (1024, 2048, 4096, 8192)
                                      if cuda else (128, 256, 512)))
    log(f"gemm: peak {gemm[0] / 1e12:.2f} TFLOP/s, half at {gemm[1]:.3g} FLOPs")
    E, H, I = (4, 128, 64) if small else (32, 2048, 768)
    grouped = fit_saturating(grouped_points(dev, dtype, E, H, I, (16, 64, 256) if small else (128, 512, 2048, 8192)))
    log(f"grouped gemm: peak {grouped[0] / 1e12:.2f} TFLOP/s, half at {grouped[1]:.0f} rows/expert")
    pts, ratio = attention_points(dev, dtype, 4 if small else 32, 64 if small else 128,
                                  (128, 256, 512) if small else (2048, 8192, 16384))
    attn = fit_saturating(pts)
    log(f"attention: peak {attn[0] / 1e12:.2f} TFLOP/s, half at S={attn[1]:.0f}, backward/forward {ratio:.2f}")
    numel = 2**20 if small else 2**28
    hbm = copy_bandwidth(dev, numel)
    h2d = host_link_bandwidth(dev, numel)
    adam, threads = host_adamw_rate(2**18 if small else 2**26)
    log(f"memory {hbm / 1e9:.0f} GB/s, host link {h2d / 1e9:.1f} GB/s, host AdamW {adam / 1e9:.2f} Gparam/s "
        f"on {threads} threads (the trainer's)")
    fields = dict(name=name or ("cpu" if not cuda else dev_name.split()[-1].lower()), device_name=dev_name,
                  device_bytes=dev_bytes, gemm_flops=gemm[0], gemm_half=gemm[1], expert_flops=grouped[0],
                  expert_half_rows=grouped[1], attn_flops=attn[0], attn_half_seq=attn[1], attn_bwd_ratio=ratio,
                  hbm_bw=hbm, h2d_bw=h2d, host_adam_cpu=adam,
                  host_adam_stream=h2d / 14.0)  # gpu_stream moves ~14 B/param each way, overlapped (H200 fit)
    coll = collective_bandwidths(dev, 2**20 if small else 2**26)
    if coll is not None:
        # Every rank measured at once: the host link and cores were shared by the node's GPUs, so the
        # per-rank numbers are a node's total divided by its GPUs.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        fields.update(intra_bw=coll[0], alltoall_bw=coll[1], h2d_bw=cal.h2d_bw, h2d_node_bw=h2d * local,
                      h2d_node_gpus=local, host_adam_cpu=adam * local, host_adam_stream=cal.host_adam_stream)
        log(f"all-gather {coll[0] / 1e9:.0f} GB/s, all-to-all {coll[1] / 1e9:.0f} GB/s (bus, per rank); "
            f"host link {h2d * local / 1e9:.0f} GB/s per node with {local} GPUs copying")
    # The base's notes on what this calibration measured afresh no longer apply.
    measured = dataclasses.replace(cal, **fields, notes={k: v for k, v in cal.notes.items() if k not in fields})
    cal = with_base_in_step(measured, cal, log)
    if str(out) == os.devnull:  # a non-zero rank under torchrun: measured, not written
        return cal, out
    path = cal.save(out or CALIBRATION_DIR / f"{cal.name}.json")
    return cal, path
