"""`choose(...) -> Plan`: the fastest configuration that fits, by a deterministic exhaustive search.

The search visits every layout (D, Ep, P dividing W; Ep dividing the experts; P at most a node),
every dispatcher (the pipelined one with 16K- and 4K-token chunks; at Ep = 1 the others mean the
experts sharded as dense weights by FSDP, `Step.experts_as_dense`) and optimizer placement, and
per layout the activation policies from the fastest (no checkpoint) down to the leanest (offloaded
block inputs), plus the mix of the first that fits and the next faster one ("selective*17,full":
the faster policy on the most first blocks that fit). With gradient accumulation each of these is
also tried with every `parallel.fsdp.accumulation` mode: keeping the gathered weights (and the
unsharded gradients) between micro-batches saves collectives for memory, so it is chosen only
where it fits and is faster. Each candidate gets the memory and
time model (`estimate_memory`, `estimate_time`); it fits when the predicted reserved device memory
is under `headroom` x the device and the predicted host memory under the node's. Candidates are
ranked by predicted tokens/s/GPU, ties broken by the configuration itself, so the result is the
same on every run.

For `mop train` / `mop bench` (`parallel.plan = "auto"`): call `choose(model, gpus=W,
context=S, ...)` and apply `plan.best.step.overrides()` (the accumulation mode included where the
step accumulates); `plan_for_job` does it from a JobConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mop.models.config import ModelConfig
from mop.parallel.layout import LayoutSpec, divisors
from mop.plan.calibration import Calibration, for_device
from mop import memory_budget as mb
from mop.memory_budget import BlockCosts, OptimizerRival
from mop.plan.memory import (ADAM_STATE_BYTES, MemoryEstimate, block_kept_bytes, estimate_memory,
                             trainer_memory_cap)
from mop.plan.state import state_memory
from mop.optim.registry import engine_class
from mop.plan.step import ACCUMULATIONS, GIB, OFFLOADS, Cluster, Step, policy_spec, resolve_elementwise_kernels
from mop.plan.timing import TimeEstimate, estimate_time

FASTEST_FIRST = ("none", "selective", "full", "offload")
# Ties: the device optimizer, then the host engines by what a byte of host state costs them per step
# (UpdateEngine.host_state_seconds_per_byte: gpu_stream before cpu).
_OFFLOAD_PREFERENCE = ("none",) + tuple(sorted((o for o in OFFLOADS if o != "none"),
                                               key=lambda o: engine_class(o).host_state_seconds_per_byte))


@dataclass(frozen=True)
class Candidate:
    """One configuration with its predictions; `reason` says why it was rejected ("" when it fits)."""

    step: Step
    memory: MemoryEstimate
    time: TimeEstimate
    reason: str = ""
    # Reserved bytes without the host optimizer's automatic device share, where it has one: what the
    # fit was judged on (the share then takes what the step leaves under the trainer's cap).
    judged_reserved: float | None = None

    @property
    def fits(self) -> bool:
        return not self.reason

    def label(self) -> str:
        s = self.step
        disp = s.dispatcher + (f":{s.chunk_tokens}" if s.dispatcher == "llep_pipelined" else "")
        return (f"D={s.layout.seq} Ep={s.layout.expert} P={s.layout.vocab} {disp} "
                f"ac={policy_spec(s.policies)} opt={s.offload}"
                + (f"@{s.device_fraction:.2f}" if s.offload != "none" else "")
                + (f" accum={s.grad_accum}:{s.accumulation}" if s.grad_accum > 1 else ""))

    def summary(self) -> str:
        return (f"{self.label()}: {self.time.tokens_per_s_per_gpu:,.0f} tok/s/GPU, "
                f"{self.memory.reserved / GIB:.1f} GiB device, {self.memory.host / GIB:.1f} GiB host per rank")


class NoPlan(ValueError):
    """No configuration fits; the message gives the numbers and what would help."""


@dataclass(frozen=True)
class Plan:
    """The chosen configuration, the runner-ups and why the other layouts were rejected."""

    best: Candidate
    runners_up: tuple[Candidate, ...]
    rejected: tuple[Candidate, ...]
    cluster: Cluster
    device_bytes: float
    headroom: float
    host_link: str = ""  # where the node's host-link total comes from (Calibration.host_link_basis)

    def overrides(self) -> list[str]:
        """`mop train` options of the chosen configuration, the model shape included."""
        s = self.best.step
        return [f"--model.shape={s.model.shape}", f"--model.n_layers={s.model.n_layers}"] + s.overrides()

    def command(self) -> str:
        c = self.cluster
        head = (f"torchrun --nproc-per-node {c.gpus_per_node} -m mop.train" if c.nodes == 1 else
                f"torchrun --nnodes {c.nodes} --nproc-per-node {c.gpus_per_node} -m mop.train")
        return head + " " + " ".join(self.overrides())

    def to_dict(self) -> dict:
        """The plan as plain data (for scripts): options, predicted terms, runner-ups, rejections."""
        def cand(c: Candidate) -> dict:
            return {"label": c.label(), "overrides": c.step.overrides(), "fits": c.fits, "reason": c.reason,
                    "tokens_per_s_per_gpu": c.time.tokens_per_s_per_gpu, "step_s": c.time.step,
                    "device_gib": c.memory.reserved / GIB, "host_gib_per_rank": c.memory.host / GIB,
                    "memory_gib": {k: v / GIB for k, v in c.memory.device_terms().items()},
                    "time_s": c.time.terms()}
        return {"best": cand(self.best), "command": self.command(), "runners_up": [cand(c) for c in self.runners_up],
                "rejected": [cand(c) for c in self.rejected], "host_link": self.host_link}

    def render(self, n_rejected: int = 8) -> str:
        b = self.best
        m, t = b.memory, b.time
        lines = [f"best: {b.summary()}",
                 f"  step {t.step:.3f} s for {t.tokens_per_step:,} tokens; time by term: "
                 + ", ".join(f"{k} {v:.3f}s" for k, v in t.terms().items() if v > 0),
                 f"  device memory by term (limit {self.headroom * self.device_bytes / GIB:.1f} GiB): "
                 + ", ".join(f"{k} {v / GIB:.1f}" for k, v in m.device_terms().items() if v > 0.05 * GIB),
                 *([f"  fits at {b.judged_reserved / GIB:.1f} GiB without the optimizer's device share "
                    f"({b.step.device_fraction:.2f} of its state), which takes what the step leaves under "
                    "the trainer's cap"] if b.judged_reserved is not None else []),
                 f"  host per rank: pinned state {m.host_pinned_state / GIB:.1f}, staging {m.host_staging / GIB:.1f}, "
                 f"offloaded checkpoints {m.host_checkpoints / GIB:.1f}, process {m.host_process / GIB:.1f} GiB; "
                 f"per node {m.host * self.cluster.gpus_per_node / GIB:.1f} GiB",
                 *([f"  host link (optimizer, offloaded checkpoints): {self.host_link}"]
                   if self.host_link and (b.step.offload != "none" or "offload" in b.step.policies) else []),
                 "", "run it:", "  " + self.command(), "", "runner-ups:"]
        lines += [f"  {c.summary()}" for c in self.runners_up] or ["  (none)"]
        lines += ["", "rejected (faster but too large; then layouts where nothing fits):"]
        lines += [f"  {c.label()}: {c.reason}" for c in self.rejected[:n_rejected]] or ["  (none)"]
        return "\n".join(lines)


def _head_chunks(model: ModelConfig, D: int) -> int:
    """Ulysses head chunks: up to 4 when the local heads divide evenly (overlap the next chunk's all-to-all)."""
    if D == 1:
        return 1
    local = max(model.n_heads // D, 1)
    return max(c for c in (1, 2, 4) if local % c == 0)


def _rank(c: Candidate):
    s = c.step
    return (-round(c.time.tokens_per_s_per_gpu, 6), s.layout.seq, s.layout.expert, s.layout.vocab,
            FASTEST_FIRST.index(s.policies[-1]), s.policies, _OFFLOAD_PREFERENCE.index(s.offload), s.dispatcher,
            # Ties between accumulation modes go to the one that keeps least (ACCUMULATIONS' order).
            -s.chunk_tokens, s.param_dtype, ACCUMULATIONS.index(s.accumulation))


def evaluate(step: Step, cal: Calibration, cluster: Cluster, device_bytes: float, headroom: float = 0.95
             ) -> Candidate:
    """Predict `step` and say whether it fits (device: reserved <= headroom x device; host: per node).

    A host optimizer with an automatic device share (`device_fraction < 0`) gets the share the
    trainer gives it (`memory.auto_device_fraction`: what the step leaves below the trainer's cap);
    the step fits when it fits without that share, which only fills the room that is left.
    """
    judged = None
    if step.offload != "none" and step.device_fraction < 0:
        judged = estimate_memory(replace(step, device_fraction=0.0), cal, device_bytes)
        step = replace(step, device_fraction=estimate_memory(step, cal, device_bytes).device_fraction)
    mem = estimate_memory(step, cal, device_bytes)
    judged = judged or mem
    t = estimate_time(step, cal, cluster, device_fraction=mem.device_fraction)
    reason = ""
    limit = headroom * device_bytes
    if judged.reserved > limit:
        reason = (f"device {judged.reserved / GIB:.1f} GiB > {limit / GIB:.1f} GiB (largest term: {judged.largest()})")
    elif cluster.host_bytes is not None and mem.host * cluster.gpus_per_node > cluster.host_bytes:
        reason = (f"host {mem.host * cluster.gpus_per_node / GIB:.1f} GiB per node > "
                  f"{cluster.host_bytes / GIB:.1f} GiB (pinned state {mem.host_pinned_state / GIB:.1f} GiB per rank)")
    return Candidate(step, mem, t, reason, judged.reserved if judged is not mem else None)


def split_inputs(step: Step, cal: Calibration, device_bytes: float
                 ) -> tuple[BlockCosts, float, OptimizerRival | None]:
    """What `mop train` hands `mop.memory_budget.split_memory` for `step` under
    `training.activation_checkpoint=auto` (`mop.memory_probe.plan_memory`), predicted instead of
    probed: per-block kept bytes by policy (a routed-expert block), `recompute_seconds` from the same
    function, the budget `0.95 x (cap - base)` (base: the step's peak less what its blocks keep, as
    the probe measures it), and the host optimizer's rival when its device share is automatic."""
    m = step.model
    i = m.n_layers - 1  # a routed-expert block (the probe measures interior blocks of the same kind)
    kept = {p: block_kept_bytes(replace(step, policies=(p,) * m.n_layers))[i] for p in mb.LADDER}
    recompute = mb.recompute_seconds(m, step.seq_len, step.tokens,
                                     pipelined_experts=step.dispatcher == "llep_pipelined")
    full = replace(step, policies=("full",) * m.n_layers, device_fraction=0.0)
    zero = estimate_memory(full, cal, device_bytes)
    # (AdamW's moments, or the staging slots, come off the trainer's cap instead)
    base = zero.allocated - zero.optimizer - zero.optimizer_staging - sum(block_kept_bytes(full))
    budget = 0.95 * (trainer_memory_cap(step, device_bytes) - base)
    rival = None
    if step.offload != "none" and step.device_fraction < 0:
        local = m.param_counts()["total"] / step.layout.world
        rival = mb.optimizer_rival(step.offload, ADAM_STATE_BYTES * local, m.n_layers * recompute["full"],
                                   overlap=step.overlap_update)
    return mb.BlockCosts(kept, recompute), budget, rival


def split_candidate(base: Step, cal: Calibration, cluster: Cluster, device_bytes: float, headroom: float = 0.95,
                    allowed: tuple[str, ...] = mb.LADDER, optimizer_competes: bool = True, tries: int = 3
                    ) -> Candidate:
    """The configuration `mop train` reaches with `activation_checkpoint=auto`: per-block policies and
    the optimizer's device share split by `mop.memory_budget.split_memory` (seconds saved per byte),
    from the predicted kept bytes instead of the probe's. `optimizer_competes=False`: the trainer
    before a271e05, which gave the activations everything and the optimizer what was left.

    As `memory_budget.plan_activation_policies` does, each split is verified: the predicted
    micro-batch peak against the trainer's cap less the optimizer's reserve, and against this
    planner's own limit (`headroom` x device with the allocator's slack, which is stricter); one that
    peaks above gets a budget smaller by the overshoot, `tries` times, then "offload" on every block.
    (The budget assumes every block's kept bytes are alive at the peak; a checkpointed step peaks as
    backward ends, when most are freed, so the first split can keep more than fits.)"""
    costs, budget, rival = split_inputs(base, cal, device_bytes)
    rival = rival if optimizer_competes else None
    cap = trainer_memory_cap(base, device_bytes)
    for _ in range(tries):
        policies, reserve = mb.split_memory(base.model.n_layers, costs, budget, allowed=allowed, optimizer=rival,
                                            accum=base.grad_accum)
        step = replace(base, policies=tuple(policies))
        zero = estimate_memory(replace(step, device_fraction=0.0), cal, device_bytes)
        got = zero.allocated - zero.optimizer_staging  # what the trainer's probe measures (staging comes later)
        limit = min(cap - reserve, headroom * device_bytes / (1 + cal.allocator_slack) - zero.optimizer_staging)
        if got <= limit:
            return evaluate(step, cal, cluster, device_bytes, headroom)
        budget = mb.policies_bytes(policies, costs.kept_bytes) + reserve - 1.1 * (got - limit)
    return evaluate(replace(base, policies=("offload",) * base.model.n_layers), cal, cluster, device_bytes, headroom)


def choose(model: ModelConfig, *, gpus: int, context: int, gpus_per_node: int | None = None,
           tokens_per_step: int | None = None, host_bytes: float | None = None, intra_bw: float | None = None,
           inter_bw: float | None = None, calibration: Calibration | None = None, device_bytes: float | None = None,
           host_link_node_bw: float | None = None, headroom: float = 0.95, offloads=OFFLOADS,
           dispatchers=("alltoall", "llep_pipelined", "llep_pipelined:4096"),
           policies=FASTEST_FIRST, max_vocab_degree: int | None = None, seq_degrees=None,
           param_dtypes=("fp32",), reduce_dtype: str = "auto", accumulations=ACCUMULATIONS, runners_up: int = 4,
           suggest: bool = True, elementwise_kernels: str = "eager") -> Plan:
    """The fastest configuration of `model` on `gpus` GPUs at `context` tokens per sequence that fits.

    `host_link_node_bw`: bytes/s over a node's host links with all its GPUs copying, a ceiling on
    the calibration's total (`Calibration.host_link_node_total`; None: none).
    `tokens_per_step`: tokens per optimizer step (default: one sequence per sequence group); the
    accumulation is derived per layout and a layout that cannot reach it exactly is skipped.
    `seq_degrees` restricts D (e.g. (1,) for an FSDP-style layout where every rank holds whole
    sequences). `param_dtypes` ("fp32", "bf16"): the `training.param_dtype` values to consider (bf16
    only with a host optimizer, and with gradient accumulation only when fp32 is not offered: bf16
    weights accumulate their gradients in bf16); `reduce_dtype`: `parallel.fsdp.reduce_dtype` ("auto": the
    parameters'). Ep = 1 with a dispatcher that does not chunk is the experts sharded as dense
    (`Step.experts_as_dense`), so the search weighs that against expert parallelism.
    `accumulations`: the `parallel.fsdp.accumulation` modes to consider where a layout accumulates
    gradients (one micro-batch: "reshard" only, the modes act on nothing else). With a host
    optimizer the policies and its device share are those `mop train` reaches with
    `activation_checkpoint=auto` (`split_candidate`). `elementwise_kernels` ("eager" or "fused"):
    the job's `training.elementwise_kernels` as it runs (not a choice: measured first, then set).
    Raises `NoPlan` with the numbers when nothing
    fits, and (`suggest`) the smallest larger cluster that would (whole nodes: 2x, 4x, 8x, and 1x
    and 2x what the state alone needs).
    """
    cal = calibration or for_device(None)
    device_bytes = device_bytes or cal.device_bytes
    G = gpus_per_node or gpus
    if gpus % G:
        raise NoPlan(f"--gpus {gpus} is not a multiple of --gpus-per-node {G}")
    cluster = Cluster(gpus_per_node=G, nodes=gpus // G, device_bytes=device_bytes, host_bytes=host_bytes,
                      intra_bw=intra_bw, inter_bw=inter_bw, host_link_node_bw=host_link_node_bw)
    W = gpus
    if not accumulations or any(mode not in ACCUMULATIONS for mode in accumulations):
        raise ValueError(f"accumulations {tuple(accumulations)!r}: name one or more of {ACCUMULATIONS}")
    fitting: list[Candidate] = []
    faster_rejected: list[Candidate] = []
    closest: dict[tuple, Candidate] = {}
    max_p = max_vocab_degree or G
    for D in divisors(W):
        if context % D or (seq_degrees is not None and D not in seq_degrees):
            continue
        for Ep in divisors(W):
            if model.n_experts % Ep:
                continue
            for P in [p for p in divisors(W) if p <= max_p]:
                layout = LayoutSpec(W, D, Ep, P)
                accum = 1
                if tokens_per_step:
                    per_micro = layout.data_parallel * context
                    if tokens_per_step % per_micro:
                        continue
                    accum = tokens_per_step // per_micro
                # One micro-batch: the modes act on nothing, so "reshard" stands for all of them.
                modes = [mode for mode in ACCUMULATIONS if mode in accumulations] if accum > 1 \
                    else ["reshard"]
                for disp_spec in dispatchers:  # "name" or "name:chunk_tokens" (pipelined chunk size)
                    disp, _, chunk = disp_spec.partition(":")
                    for off in offloads:
                        for dtype in param_dtypes:
                            if dtype != "fp32" and off == "none":
                                continue  # bf16 weights need the host optimizer's fp32 master
                            if dtype != "fp32" and accum > 1 and "fp32" in param_dtypes:
                                # bf16 weights accumulate their gradients in bf16 (FSDP's shard or
                                # keep_all's unsharded buffer): the numbers of a different run. Only
                                # when bf16 is all the caller allows.
                                continue
                            cands = []
                            for mode in modes:
                                base = Step(model=model, layout=layout, seq_len=context, batch_size=1,
                                            grad_accum=accum, policies="full", offload=off,
                                            device_fraction=-1.0 if off != "none" else 0.0, dispatcher=disp,
                                            head_chunks=_head_chunks(model, D),
                                            chunk_tokens=int(chunk) if chunk else 16384, param_dtype=dtype,
                                            reduce_dtype=reduce_dtype, accumulation=mode,
                                            elementwise_kernels=elementwise_kernels)
                                if off == "none":
                                    cands += _policy_candidates(base, cal, cluster, device_bytes, headroom, policies)
                                else:  # what `mop train` does with activation_checkpoint=auto: the memory split
                                    cands.append(split_candidate(base, cal, cluster, device_bytes, headroom,
                                                                 tuple(p for p in mb.LADDER if p in policies)))
                            for cand in cands:
                                key = (D, Ep, P)
                                if cand.fits:
                                    fitting.append(cand)
                                    continue
                                faster_rejected.append(cand)
                                if key not in closest or cand.memory.reserved < closest[key].memory.reserved:
                                    closest[key] = cand
    if not fitting:
        raise NoPlan(_refusal(model, W, context, closest, cal, device_bytes, headroom, cluster, suggest, param_dtypes,
                              reduce_dtype))
    fitting.sort(key=_rank)
    best = fitting[0]
    seen, ups = {best.label()}, []
    for c in fitting[1:]:  # one runner-up per (D, Ep): the fastest of each (P matters least)
        key = (c.step.layout.seq, c.step.layout.expert)
        if key in seen or key == (best.step.layout.seq, best.step.layout.expert):
            continue
        seen.add(key)
        ups.append(c)
        if len(ups) == runners_up:
            break
    # Rejected: the configurations predicted faster than the best that do not fit (the fastest per
    # layout), then the layouts where nothing fits (closest to fitting first).
    tps = best.time.tokens_per_s_per_gpu
    faster: dict[tuple, Candidate] = {}
    for c in sorted(faster_rejected, key=_rank):
        key = (c.step.layout.seq, c.step.layout.expert, c.step.layout.vocab)
        if c.time.tokens_per_s_per_gpu > tps and key not in faster:
            faster[key] = c
    fit_layouts = {(c.step.layout.seq, c.step.layout.expert, c.step.layout.vocab) for c in fitting}
    never = sorted((c for k, c in closest.items() if k not in fit_layouts), key=lambda c: c.memory.reserved)
    rejected = sorted(faster.values(), key=_rank) + never
    return Plan(best, tuple(ups), tuple(rejected), cluster, device_bytes, headroom,
                cal.host_link_basis(G, host_link_node_bw))


def _policy_candidates(base: Step, cal, cluster, device_bytes, headroom, policies):
    """Uniform policies from the fastest down to the first that fits, then the mix of that one and
    the next faster: the faster policy on as many of the first blocks as fit (e.g. "selective*17,full")."""
    out = []
    L = base.model.n_layers
    for p in policies:
        cand = evaluate(replace(base, policies=(p,) * L), cal, cluster, device_bytes, headroom)
        out.append(cand)
        if cand.fits:
            break
    if len(out) >= 2 and out[-1].fits:
        faster, leaner = out[-2].step.policies[0], out[-1].step.policies[0]
        lo, hi, best = 1, L - 1, None  # binary search: memory grows with n
        while lo <= hi:
            n = (lo + hi) // 2
            cand = evaluate(replace(base, policies=(faster,) * n + (leaner,) * (L - n)), cal, cluster,
                            device_bytes, headroom)
            if cand.fits:
                best, lo = cand, n + 1
            else:
                hi = n - 1
        if best is not None:
            out.append(best)
    return out


def _refusal(model, W, context, closest, cal, device_bytes, headroom, cluster, suggest: bool,
             param_dtypes=("fp32",), reduce_dtype: str = "auto") -> str:
    counts = model.param_counts()
    state = state_memory(model, W, _OFFLOAD_PREFERENCE[1], 0.0)  # any host engine: all state on the host
    lines = [f"no configuration of {model.shape} ({counts['total'] / 1e9:.1f}B parameters, {model.n_layers} layers) "
             f"fits on {W} GPU(s) of {device_bytes / GIB:.0f} GiB at {context:,} tokens per sequence."]
    if closest:
        best = min(closest.values(), key=lambda c: c.memory.reserved)
        lines.append(f"closest: {best.label()}: {best.reason}")
    need = state.weights + state.grads
    min_state = W
    if need > headroom * device_bytes:
        min_state = int(-(-need * W // (headroom * device_bytes)))
        lines.append(f"weights + gradients alone are {need / GIB:.1f} GiB per GPU (fp32 shards, optimizer on the "
                     f"host): at least {min_state} GPUs for the state alone")
    if suggest:
        G = cluster.gpus_per_node
        m = -(-min_state // G) * G  # the state alone, in whole nodes
        for more in sorted({w for w in (2 * W, 4 * W, 8 * W, m, 2 * m) if w > W and w % G == 0}):
            try:  # the smallest larger cluster that fits (whole nodes), with its plan
                plan = choose(model, gpus=more, context=context, gpus_per_node=G, host_bytes=cluster.host_bytes,
                              intra_bw=cluster.intra_bw, inter_bw=cluster.inter_bw, calibration=cal,
                              host_link_node_bw=cluster.host_link_node_bw,
                              device_bytes=device_bytes, headroom=headroom, param_dtypes=param_dtypes,
                              reduce_dtype=reduce_dtype, suggest=False)
            except NoPlan:
                continue
            lines.append(f"{more} GPUs would fit: {plan.best.summary()}")
            break
        else:
            lines.append(f"up to {max(8 * W, 2 * m)} GPUs do not fit either: a shorter context or fewer layers")
    return "\n".join(lines)


def plan_for_job(job, world: int, gpus_per_node: int | None = None, calibration: Calibration | None = None,
                 **kwargs) -> Plan:
    """`choose` for a `JobConfig` (what `parallel.plan = "auto"` calls): the job's model, context and
    tokens per step (its batch x accumulation x sequence groups at its current D), on `world` GPUs.
    Where the chosen layout accumulates gradients, the search also picks `parallel.fsdp.accumulation`
    (the job's own mode is not an input: the fastest that fits replaces it), and the step's
    overrides name it, so applying them sets it.

    Apply the result with `build_config(file, overrides + plan.best.step.overrides())`.
    """
    t, D = job.training, job.parallel.seq.degree
    tokens = (world // D) * t.batch_size * t.grad_accum * t.seq_len if world % D == 0 else None
    kwargs.setdefault("param_dtypes", (t.param_dtype,))
    kwargs.setdefault("reduce_dtype", job.parallel.fsdp.reduce_dtype)
    # ("auto" resolves for the device: the caller knows it; a plan for GPUs by default)
    kwargs.setdefault("elementwise_kernels", resolve_elementwise_kernels(t.elementwise_kernels, cpu=False))
    if t.param_dtype != "fp32":  # bf16 weights need the host optimizer's fp32 master
        kwargs.setdefault("offloads", tuple(o for o in OFFLOADS if o != "none"))
    return choose(job.model, gpus=world, context=t.seq_len, gpus_per_node=gpus_per_node,
                  tokens_per_step=tokens if tokens and tokens > (world // D) * t.seq_len else None,
                  calibration=calibration, **kwargs)


def check_step_fits(job, world: int, device_bytes: float, calibration: Calibration | None = None,
                    margin: float = 1.15) -> MemoryEstimate:
    """Pre-flight check of a whole step (activations included) for a `JobConfig` on `world` GPUs.

    Raises ValueError with the terms when the predicted peak exceeds the device by more than the
    model's error `margin` (predictions are within ~10% where measured; the exact state-only check,
    `check_state_fits`, stays the hard gate). Returns the estimate otherwise.
    """
    from mop.plan.step import step_from_overrides

    t, p, o = job.training, job.parallel, job.optimizer
    opts = [f"--parallel.seq.degree={p.seq.degree}", f"--parallel.experts.degree={p.experts.degree}",
            f"--parallel.vocab.degree={p.vocab.degree}", f"--parallel.experts.dispatcher={p.experts.dispatcher}",
            f"--parallel.experts.chunk_tokens={p.experts.chunk_tokens}",
            f"--parallel.experts.max_chunks={p.experts.max_chunks}", f"--parallel.seq.head_chunks={p.seq.head_chunks}",
            f"--training.seq_len={t.seq_len}", f"--training.batch_size={t.batch_size}",
            f"--training.grad_accum={t.grad_accum}", f"--optimizer.offload={o.offload}",
            f"--optimizer.device_fraction={o.device_fraction}", f"--training.param_dtype={t.param_dtype}",
            f"--parallel.fsdp.reduce_dtype={p.fsdp.reduce_dtype}",
            f"--parallel.fsdp.reshard_after_forward={p.fsdp.reshard_after_forward}",
            f"--parallel.fsdp.accumulation={p.fsdp.accumulation}",
            "--training.activation_checkpoint=" + ("full" if t.activation_checkpoint == "auto"
                                                   else t.activation_checkpoint)]
    cal = calibration or for_device(None)
    step = step_from_overrides(job.model, opts, world)
    mem = estimate_memory(step, cal, device_bytes)
    if mem.reserved > margin * device_bytes:
        terms = ", ".join(f"{k} {v / GIB:.1f}" for k, v in mem.device_terms().items() if v > 0.05 * GIB)
        raise ValueError(f"predicted peak {mem.reserved / GIB:.1f} GiB per GPU exceeds the "
                         f"{device_bytes / GIB:.0f} GiB "
                         f"device ({terms}); `mop plan --shape {job.model.shape} --gpus {world} --context "
                         f"{t.seq_len}` lists configurations that fit")
    return mem
