"""Micro-benchmark of the vocabulary loss: peak memory and fwd+bwd time (not a test).

Compares, for every (V, H, N tokens per rank, P) point:
  plain              F.cross_entropy on materialised N x V logits (OOM is caught and reported)
  plain-compiled     the same under torch.compile (the fp32 copy of the logits fuses away)
  chunked-eager      mop.ops.cross_entropy.chunked_cross_entropy, strip math op by op
  chunked            the same with the fused strip kernels (the default on CUDA)
  ring-weights       vocab_parallel_cross_entropy over a P-rank group, schedule "weights"
  ring-activations   the same, schedule "activations"
Every rank holds its own N tokens; plain/chunked run independently on every rank (no
communication), the ring runs on contiguous P-rank groups. Reported numbers are the maximum over
ranks: time is the mean of `--iters` fwd+bwd passes timed with CUDA events after `--warmup` passes;
memory is the peak allocated during the pass (`peak_gib`, inputs included) and above the inputs
(`extra_gib`).

    torchrun --nproc-per-node 4 -m mop.bench.vocab --vocab 151936,200000 --hidden 2048,7168 \\
        --tokens 8192,32768,65536 --P 1,2,4 --out vocab_bench.json

writes one JSON object per line to --out and a Markdown table next to it (--out with .md). On a
machine without CUDA it runs on CPU with gloo (wall-clock time, no memory figures): a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mop.ops.cross_entropy import chunked_cross_entropy
from mop.parallel.vocab_ring import chunk_sizes, vocab_parallel_cross_entropy

GIB = 2**30
METHODS = ("plain", "plain-compiled", "chunked-eager", "chunked", "ring-weights", "ring-activations")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=_ints, default=[151936, 200000])
    ap.add_argument("--hidden", type=_ints, default=[2048, 7168])
    ap.add_argument("--tokens", type=_ints, default=[8192, 32768, 65536], help="tokens per rank")
    ap.add_argument("--P", type=_ints, default=[1, 2, 4], help="vocabulary-parallel degrees (must divide W)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {METHODS}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-strip-elements", type=int, default=2**28)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="vocab_bench.json")
    args = ap.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; valid: {METHODS}")
    args.methods = args.methods.split(",")
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    return args


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom_type and isinstance(exc, oom_type)) or "out of memory" in str(exc).lower()


class _Timer:
    """CUDA events on GPU (no host sync inside the timed region), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()
        return False

    def ms(self) -> float:
        if self.cuda:
            self.end.synchronize()  # host sync, outside the timed region
            return self.start.elapsed_time(self.end)
        return (self.t1 - self.t0) * 1e3


def _agree(flag: bool, device: torch.device) -> bool:
    """True iff `flag` is True on every rank (so all ranks skip or run a collective case together)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())  # host sync: the decision steers Python control flow


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _fits(estimate_bytes: int, device: torch.device) -> bool:
    """Whether the estimated working set fits in free memory (ring cases: an OOM mid-ring would hang peers)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return estimate_bytes < 0.9 * (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _measure(step, args, device: torch.device) -> dict:
    """Warm up, then time `iters` fwd+bwd passes; returns status, time and memory of this rank."""
    cuda = device.type == "cuda"
    try:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iters):
            with _Timer(device) as timer:
                step()
            times.append(timer)
        ms = sum(t.ms() for t in times) / len(times)
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        return dict(status="ok", time_ms=ms, peak_gib=peak / GIB, extra_gib=(peak - base) / GIB if cuda else 0.0)
    except Exception as exc:  # noqa: BLE001 - only OOM is expected; anything else is re-raised
        if not _is_oom(exc):
            raise
        return dict(status="oom", time_ms=float("nan"), peak_gib=float("nan"), extra_gib=float("nan"))
    finally:
        if cuda:
            torch.cuda.empty_cache()


def _groups(world: int, degrees: list[int], rank: int) -> dict:
    """This rank's contiguous P-group for every P (created collectively, in the same order on all ranks)."""
    mine = {}
    for P in degrees:
        if P < 1 or world % P:
            raise ValueError(f"--P={P} must divide the world size {world}")
        for g in range(world // P):
            grp = dist.new_group(list(range(g * P, (g + 1) * P))) if P > 1 else None
            if rank // P == g:
                mine[P] = grp
    return mine


def _plain_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")


_compiled_plain_loss = torch.compile(_plain_loss, dynamic=False)


def run_point(V: int, H: int, N: int, P: int, method: str, group, args, device, dtype) -> dict:
    """One measurement on every rank; collective in the ring methods."""
    gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    hidden = (torch.randn(N, H, device=device, dtype=dtype, generator=gen) * H**-0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    norm = float(N * dist.get_world_size())
    if not method.startswith("ring"):
        rows, sizes = V, None
    else:
        sizes = chunk_sizes(V, P)
        rows = sizes[dist.get_rank(group) if group is not None else 0]
    weight = (torch.randn(rows, H, device=device, dtype=dtype, generator=gen) * H**-0.5).requires_grad_()

    def step():
        if method == "plain":
            logits = hidden @ weight.t()
            loss = F.cross_entropy(logits.float(), labels, reduction="sum") / norm
        elif method == "plain-compiled":  # what a careful baseline does: the fp32 logits copy fuses away
            loss = _compiled_plain_loss(hidden, weight, labels) / norm
        elif method in ("chunked", "chunked-eager"):
            loss = chunked_cross_entropy(hidden, weight, labels, norm, max_strip_elements=args.max_strip_elements,
                                         kernels="eager" if method == "chunked-eager" else "auto")
        else:
            loss = vocab_parallel_cross_entropy(hidden, weight, labels, norm, vocab_group=group, vocab_size=V,
                                                block_sizes=sizes, schedule=method.removeprefix("ring-"),
                                                max_strip_elements=args.max_strip_elements)
        loss.backward()
        hidden.grad = weight.grad = None

    if method.startswith("ring"):
        esize = hidden.element_size()
        block = max(chunk_sizes(V, P)) * H * esize
        # Weights, next weights, 3 travelling/local grads; tokens of two ranks + their grads; 3 fp32 strips.
        estimate = 5 * block + 4 * N * H * esize + 3 * args.max_strip_elements * 4
        if not _agree(_fits(estimate, device), device):
            return dict(status="skipped", time_ms=float("nan"), peak_gib=float("nan"), extra_gib=float("nan"))
    result = _measure(step, args, device)
    ok = _agree(result["status"] == "ok", device)
    if not ok:
        return dict(status="oom", time_ms=float("nan"), peak_gib=float("nan"), extra_gib=float("nan"))
    result["time_ms"], result["peak_gib"], result["extra_gib"] = _max_over_ranks(
        [result["time_ms"], result["peak_gib"], result["extra_gib"]], device)
    return result


def markdown_table(rows: list[dict]) -> str:
    head = "| V | H | N/rank | P | method | status | fwd+bwd ms | peak GiB | above inputs GiB |\n" \
           "|---:|---:|---:|---:|---|---|---:|---:|---:|\n"
    lines = [f"| {r['vocab']} | {r['hidden']} | {r['tokens']} | {r['P'] if r['P'] else '-'} | {r['method']} | "
             f"{r['status']} | {r['time_ms']:.2f} | {r['peak_gib']:.2f} | {r['extra_gib']:.2f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    groups = _groups(world, args.P, rank)
    rows = []
    out = open(args.out, "w") if rank == 0 else None
    try:
        for V in args.vocab:
            for H in args.hidden:
                for N in args.tokens:
                    points = [(None, m) for m in METHODS if not m.startswith("ring") and m in args.methods]
                    points += [(P, m) for P in args.P for m in ("ring-weights", "ring-activations") if m in args.methods]
                    for P, method in points:
                        res = run_point(V, H, N, P or 1, method, groups.get(P or 1), args, device, dtype)
                        row = dict(vocab=V, hidden=H, tokens=N, P=P, method=method, world=world, dtype=args.dtype,
                                   max_strip_elements=args.max_strip_elements, device=torch.cuda.get_device_name()
                                   if cuda else "cpu", **res)
                        rows.append(row)
                        if out:
                            out.write(json.dumps(row) + "\n")
                            out.flush()
                            print(json.dumps(row), flush=True)
    finally:
        if out:
            out.close()
    if rank == 0:
        table = markdown_table(rows)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table)
        print(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
