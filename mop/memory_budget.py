"""How the device memory left after weights and gradients is spent: memory buys time.

Before step 1 (`training.activation_checkpoint = "auto"`), the trainer decides what the memory that
the model state leaves free holds. Two uses compete for it:

- activations kept, so blocks are not recomputed: each block moves up the ladder
  offload -> full -> selective -> none (mop.models.activation_policy);
- the host optimizer's device-resident share of its state (`optimizer.device_fraction`): every
  byte of fp32 state kept on the device is a byte the update does not stream over PCIe (or update
  on the host) each step.

They are ranked by the seconds each byte saves per optimizer step (`split_memory`). Which wins
depends on the context: at 128K a block's attention costs ~0.1 s to recompute and the update hides
behind a multi-second forward, so activations come first; at 8K a block recomputes in ~3 ms while
streaming the state costs ~1 s per step that no forward hides (measured on 2 x H200, 24 layers:
`bench/results/2026-11-29-session4-2xh200`), so the optimizer comes first.

What each policy keeps per block is MEASURED, not modelled: `probe_block_bytes` runs one forward
with a pattern of policies over the blocks and reads the allocator between blocks (CUDA). The
recomputation each upgrade avoids is estimated from FLOPs (`recompute_seconds`), the optimizer's
cost per byte from the measured link and host-update rates (`optimizer_rival`). `split_memory` is a
pure function of those numbers and the budget, so the choice is deterministic for a given memory
budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

LADDER = ("offload", "full", "selective", "none")  # least to most device memory


@dataclass(frozen=True)
class BlockCosts:
    """Per MoE block: bytes each policy keeps alive from forward to backward, and the forward
    seconds each policy re-runs in backward (relative values suffice)."""

    kept_bytes: dict[str, float]
    recompute_seconds: dict[str, float]


def recompute_seconds(model_cfg, seq_len: int, tokens_per_rank: int, *,
                      attention_flops: float = 550e12, gemm_flops: float = 600e12,
                      pipelined_experts: bool = False) -> dict[str, float]:
    """Forward seconds a block re-runs in backward under each policy (FLOP estimate, per rank).

    full/offload recompute attention plus the dense projections; selective only the projections;
    none nothing. Experts are their own checkpoint under any block checkpoint (one extra expert
    forward); with the pipelined dispatcher they recompute in every policy, so they cancel out.
    `offload` costs a little more than `full` (host copies that mostly overlap): 2% here, which
    only orders the two.
    """
    m = model_cfg
    # Causal attention forward per rank: QK^T and AV, 2*S*Hq*Dh each per query, halved, N queries
    # (under Ulysses a rank runs all S queries of Hq/D heads: the same work for N = S/D).
    attn = 2.0 * tokens_per_rank * seq_len * m.n_heads * m.head_dim
    attn_s = attn / attention_flops
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    dense_params = m.dim * (2 * q + 2 * kv) + m.dim * m.n_experts + 3 * m.dim * m.shared_dim
    expert_params = 0 if pipelined_experts else m.top_k * 3 * m.dim * m.expert_dim
    dense_s = 2.0 * tokens_per_rank * dense_params / gemm_flops
    expert_s = 2.0 * tokens_per_rank * expert_params / gemm_flops
    full = attn_s + dense_s + expert_s
    return {"none": 0.0, "selective": dense_s + expert_s, "full": full, "offload": 1.02 * full}


@dataclass(frozen=True)
class OptimizerRival:
    """The host optimizer's claim on the same memory. Each byte of its state kept on the device saves
    `seconds_per_byte` of update time per optimizer step, but only the first `valuable_bytes` count:
    beyond them the rest of the update hides behind the next forward anyway."""

    seconds_per_byte: float
    valuable_bytes: float


def optimizer_rival(engine: str, state_bytes: float, forward_seconds: float, overlap: bool) -> OptimizerRival:
    """The rival of the host optimizer engine registered as `engine` (mop.optim.registry), with
    `state_bytes` of offloadable state per rank; each byte costs the engine's measured
    `host_state_seconds_per_byte`.

    With the update overlapped (`optimizer.overlap_update`), the first `forward_seconds` of it run
    behind the next step's forward: the bytes beyond `state_bytes - forward_seconds / s_per_byte`
    buy nothing on the device.
    """
    from mop.optim.registry import engine_class  # lazily: this module's pure part needs no torch

    per_byte = engine_class(engine).host_state_seconds_per_byte
    if per_byte <= 0:  # an engine that keeps its state on the device: nothing to buy back
        return OptimizerRival(0.0, 0.0)
    hidden = forward_seconds / per_byte if overlap else 0.0
    return OptimizerRival(per_byte, max(0.0, state_bytes - hidden))


def split_memory(n_blocks: int, costs: BlockCosts, budget_bytes: float, allowed: tuple[str, ...] = LADDER,
                 optimizer: OptimizerRival | None = None, accum: int = 1) -> tuple[list[str], float]:
    """Per-block policies and the optimizer's reserved bytes that together fit `budget_bytes`, saving
    the most seconds per optimizer step.

    Greedy by seconds saved per extra byte over every block's possible upgrades (any jump up the
    ladder, so a cheap-but-useless step never blocks a valuable one behind it); a block's saving
    recurs in each of the `accum` micro-batches of a step, the optimizer's once per step. The
    optimizer's value per byte is flat up to its `valuable_bytes`, so: first every upgrade worth more
    per byte than the optimizer, then the optimizer's valuable bytes, then the remaining upgrades.
    Ties go to the lower block index. Every block starts at the cheapest allowed policy; if even that
    exceeds the budget the result is still that policy everywhere (the caller reports it).
    """
    ladder = [p for p in LADDER if p in allowed]
    kept, secs = costs.kept_bytes, costs.recompute_seconds
    level = [0] * n_blocks
    used = n_blocks * kept[ladder[0]]

    def upgrade(limit: float, min_density: float) -> None:
        nonlocal used
        while True:
            best = None
            for i in range(n_blocks):
                cur = ladder[level[i]]
                for j in range(level[i] + 1, len(ladder)):
                    nxt = ladder[j]
                    extra = max(kept[nxt] - kept[cur], 1.0)
                    saved = (secs[cur] - secs[nxt]) * accum
                    if saved <= 0 or used + extra > limit or saved / extra <= min_density:
                        continue
                    key = (saved / extra, -i, j)
                    if best is None or key > best[0]:
                        best = (key, i, j, extra)
            if best is None:
                return
            _, i, j, extra = best
            level[i] = j
            used += extra

    reserve = 0.0
    if optimizer is not None and optimizer.valuable_bytes > 0:
        upgrade(budget_bytes, optimizer.seconds_per_byte)
        reserve = max(0.0, min(optimizer.valuable_bytes, budget_bytes - used))
    upgrade(budget_bytes - reserve, 0.0)
    return [ladder[k] for k in level], reserve


def choose_policies(n_blocks: int, costs: BlockCosts, budget_bytes: float,
                    allowed: tuple[str, ...] = LADDER) -> list[str]:
    """Per-block policies whose kept bytes fit `budget_bytes`, avoiding the most recomputation
    (`split_memory` with nothing competing for the memory)."""
    return split_memory(n_blocks, costs, budget_bytes, allowed)[0]


def policies_bytes(policies: list[str], kept_bytes: dict[str, float]) -> float:
    """Bytes the given per-block policies keep alive between forward and backward."""
    return sum(kept_bytes[p] for p in policies)


def describe(policies: list[str]) -> str:
    """Compact "selective*12,full*12" form of a per-block list (what `parse_policies` reads)."""
    out, prev, count = [], None, 0
    for p in policies + [None]:
        if p == prev:
            count += 1
            continue
        if prev is not None:
            out.append(f"{prev}*{count}")
        prev, count = p, 1
    return ",".join(out)


PROBED = ("none", "selective", "full")  # "offload" keeps its block input on the host: ~0 device bytes


def probe_pattern(n_blocks: int) -> list[str] | None:
    """Policies for one measuring forward: "none", "selective" and "full" each on an interior block
    (block 0 and the last block see the embedding / final norm and the prefetch edge, so they are
    not measured); None when the model has too few blocks (fewer than 5)."""
    if n_blocks < 2 + len(PROBED):
        return None
    return ["full"] + list(PROBED) + ["full"] * (n_blocks - 1 - len(PROBED))


def kept_from_marks(pattern: list[str], marks: list[float]) -> dict[str, float]:
    """Bytes each probed policy keeps: allocator reading before block i+1 minus before block i.

    `marks[i]` is `torch.cuda.memory_allocated()` as block i starts its forward (after FSDP's
    all-gather, so the gathered weights cancel between consecutive blocks). "offload" is 0: its one
    kept tensor lives in host memory (the two in flight in backward belong to the transient working
    set, which the caller measures with a full step).
    """
    kept = {p: max(0.0, float(marks[i + 1] - marks[i])) for i, p in enumerate(pattern) if 0 < i < len(pattern) - 1}
    out = {p: kept.get(p, float("inf")) for p in PROBED}  # a policy the pattern left out is never chosen
    out["offload"] = 0.0
    return out


class Probe(Protocol):
    """What `plan_activation_policies` needs from a training run (the trainer's CUDA probe; a fake in tests).

    Every method runs the same on all ranks (collectives inside); `agree_max` returns the element-wise
    maximum over ranks so that every rank chooses the same policies. A method that runs out of device
    memory raises `torch.OutOfMemoryError`; `recover` frees what it left behind.
    """

    def pattern_marks(self, policies: list[str], fraction: float = 1.0) -> list[float]:
        """One forward (no backward) under `policies` on `fraction` of each rank's tokens: allocated
        bytes as each block starts."""
        ...

    def micro_batch_peak(self, policies: list[str], fraction: float = 1.0) -> float:
        """Peak allocated bytes of one training micro-batch (forward and backward, no update) on
        `fraction` of each rank's tokens."""
        ...

    def agree_max(self, values: list[float]) -> list[float]: ...

    def recover(self) -> None: ...


@dataclass
class ActivationPlan:
    """The outcome of `plan_activation_policies`: the policies, what was measured, and the story."""

    policies: list[str]
    kept_bytes: dict[str, float]
    base_bytes: float | None
    peak_bytes: float | None  # verified peak of a micro-batch under `policies` (None: not verified)
    notes: list[str]
    optimizer_bytes: float = 0.0  # kept free for the host optimizer's device share (`split_memory`)


_FINITE_MAX = 2.0**62  # "never chosen" travels through a float64 all-reduce as this


def plan_activation_policies(probe: Probe, n_blocks: int, recompute: dict[str, float], cap: float,
                             tries: int = 3, margin: float = 0.95, shrink: int = 1,
                             optimizer: OptimizerRival | None = None, accum: int = 1) -> ActivationPlan:
    """Measure, choose, verify: per-block activation policies whose micro-batch peaks below `cap`.

    1. `probe_pattern` on one forward: the bytes each policy keeps per block (allocator between
       blocks), then one micro-batch with that pattern: its peak minus what the pattern kept is the
       state plus the transient working set ("base"). With `shrink` > 1 (long sequences) these
       measurements run on 1/shrink of the tokens (the forward) and on 1/shrink and 2/shrink (two
       micro-batches): what a block keeps grows with its tokens, so kept bytes scale by `shrink`,
       and the peak is extrapolated on the line through the two micro-batches (the gradients and
       weights are its constant part). Attention's cost grows with the square of the tokens, so at
       1/4 and 1/8 the probe costs a fraction of one full micro-batch; the verification (step 2)
       runs at full length and corrects what the extrapolation misses.
    2. Split the budget `margin * (cap - base)` between kept activations and the host optimizer's
       device share (`split_memory`), run a micro-batch with the chosen policies; over `cap` less
       the optimizer's share, or out of memory: the next budget is what that choice was predicted to keep
       less the overshoot (or a quarter less after an OOM), `tries` times; then the least memory
       ("offload") everywhere.
    An OOM while probing the pattern drops "none" from the ladder (the pattern's one block kept
    whole did not fit) and measures again. Probes that run out of memory are caught and freed:
    they are measurements, not failures. (Under a symmetric layout every rank runs out at the same
    point; an OOM on one rank alone would leave its peers in a collective until NCCL's timeout.)
    """
    notes: list[str] = []
    pattern = probe_pattern(n_blocks)
    if pattern is None:
        return ActivationPlan(["full"] * n_blocks, {}, None, None,
                              [f"{n_blocks} blocks are too few to probe; using full"])
    allowed = LADDER
    for _ in range(2):
        try:
            if shrink > 1:
                f = 1.0 / shrink
                kept = {p: b * shrink for p, b in kept_from_marks(pattern, probe.pattern_marks(pattern, f)).items()}
                low, high = probe.micro_batch_peak(pattern, f), probe.micro_batch_peak(pattern, 2 * f)
                peak = high + (shrink - 2) * (high - low)  # the line through (1/shrink, low), (2/shrink, high) at 1
            else:
                kept = kept_from_marks(pattern, probe.pattern_marks(pattern))
                peak = probe.micro_batch_peak(pattern)
            oom = 0.0
        except torch_oom():
            probe.recover()
            kept, peak, oom = {p: 0.0 for p in LADDER}, 0.0, 1.0
        agreed = probe.agree_max([min(kept[p], _FINITE_MAX) for p in LADDER] + [peak, oom])
        kept = {p: (b if b < _FINITE_MAX else float("inf")) for p, b in zip(LADDER, agreed[:4])}
        peak, oom = agreed[4], agreed[5]
        if not oom:
            break
        if "none" not in pattern:
            return ActivationPlan(["offload"] * n_blocks, kept, None, None,
                                  notes + ["even the probe ran out of memory; using offload everywhere"])
        pattern = [p if p != "none" else "full" for p in pattern]
        allowed = ("offload", "full", "selective")
        notes.append("the probe with one block kept whole ran out of memory; choosing among offload/full/selective")
    base = peak - policies_bytes(pattern, kept)
    costs = BlockCosts(kept, recompute)
    budget = margin * (cap - base)
    for _ in range(tries):
        policies, reserve = split_memory(n_blocks, costs, budget, allowed=allowed, optimizer=optimizer, accum=accum)
        try:
            got = probe.micro_batch_peak(policies)
        except torch_oom():
            probe.recover()
            got = float("inf")
        got = probe.agree_max([min(got, _FINITE_MAX)])[0]
        if got <= cap - reserve:
            return ActivationPlan(policies, kept, base, got, notes, reserve)
        notes.append(f"{describe(policies)} peaked above the cap" if got < _FINITE_MAX
                     else f"{describe(policies)} ran out of memory")
        # Next budget: below what this choice was predicted to use (the budget itself may have had
        # room to spare), by the overshoot, or by a quarter after an OOM.
        used = policies_bytes(policies, kept) + reserve
        budget = used - 1.1 * (got - (cap - reserve)) if got < _FINITE_MAX else 0.75 * used
    return ActivationPlan(["offload"] * n_blocks, kept, base, None, notes + ["no choice verified; using offload"])


def probe_shrink(tokens_per_rank: int, min_tokens: int = 4096) -> int:
    """How much shorter the probe's measuring passes may run: 8 when 1/8 of a rank's tokens is still
    `min_tokens` or more (so the line is fitted on realistic kernels), 4, else 1 (full length)."""
    for k in (8, 4):
        if tokens_per_rank // k >= min_tokens:
            return k
    return 1


def torch_oom():
    """The out-of-memory exception type (imported lazily: this module's pure part needs no torch)."""
    import torch

    return torch.OutOfMemoryError
