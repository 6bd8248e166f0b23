"""Step time per rank, by term: FLOPs and bytes of each component over calibrated rates.

Compute (per micro-batch, per rank):
* attention: causal forward 2 * b * S^2 * Hq * Dh / D FLOPs (each rank runs Hq/D heads over all S
  tokens; S * w pairs instead of S^2 / 2 with a sliding window w), backward `attn_bwd_ratio` times
  that; "full"/"offload" blocks run the forward twice.
* expert GEMMs: 6 * N * k * H * I forward (three GEMMs), twice that backward; forward again when the
  layer recomputes itself (pipelined dispatcher, or any block checkpoint). The rate depends on the
  routed rows per local expert (per chunk when pipelined); each chunk also re-reads and accumulates
  every local expert's weight gradient.
* dense GEMMs (attention projections, router, shared and dense FFNs): 2 * params * N forward, 4x
  backward; recomputed forward in any checkpointed block.
* vocabulary: 6 * N * H * V on one block (gradients formed in forward), 8 * N * H * V in the ring
  (backward recomputes each strip), plus the softmax strips at memory bandwidth.
* memory-bound work (norms, RoPE, SiLU, permutations, casts) as bytes over HBM bandwidth (fitted
  on the 1xH200 points), FSDP's copies around its collectives (`fsdp_copy_seconds`: GiBs per step
  once the experts are FSDP's), and the device's host-bound idle: one per step (the step boundary's
  syncs and the optimizer's launches) and one per block and pass of an expert layer with a
  dispatcher (its plan's host sync), measured as the idle of session 4's 8K profile and the 1xH200
  8K points; session 5's 8K profile without a dispatcher has the step's idle alone.

Communication: every collective's bytes per rank over the bandwidth of its group (intra-node when
the group fits in a node, else inter-node). FSDP's all-gathers (compute dtype; forward, and again
in backward after `reshard_after_forward`) and reduce-scatters (`parallel.fsdp.reduce_dtype`) of a
block's weights, the routed experts' too at Ep = 1 (`Step.experts_as_dense`), run beside the
block's forward and backward, so only what exceeds them is exposed (code before b186d27: the
router's synchronous statistics all-reduce on the same communicator shortened that window to the
block's attention half, `Step.router_forward_sync`), and the first gather of each pass and the
last reduce-scatter have no compute beside them. With gradient accumulation, `parallel.fsdp.accumulation` keeps the gathered weights between micro-batches
("keep_gathered": each block gathered once per step, in the first forward) and also the unsharded
gradients ("keep_all": reduce-scattered once, in the last backward): `fsdp_micro_batches`.
ExpertParallelExperts gathers and reduce-scatters its own shards on the compute path (exposed).
Ulysses all-to-alls are exposed except for the overlap of head chunks; expert dispatch is exposed
except for the overlap of pipelined chunks.
Optimizer: device work is exposed in full (torch's AdamW, and a host optimizer's update of its
device share: the next forward waits for it and it shares the device); what a host engine moves
over the host link, or computes on host cores, overlaps the next step's first forward
(optimizer.overlap_update). The engine's properties (mop.optim.registry) say which rate applies.
A node's GPUs share its host links (`Calibration.host_link_node_total`: measured for nodes of up to
the GPUs it was measured with, assumed one link per GPU beyond, under the cluster's ceiling).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace

from mop.optim.registry import engine_class
from mop.plan.calibration import Calibration
from mop.plan.memory import (attention_saved_bytes, block_saved_bytes, cuda_attention_extra_bytes, dense_block_params,
                             fsdp_unit_params)
from mop.plan.step import Cluster, Step


def _rate(peak: float, work: float, half: float) -> float:
    return peak * work / (work + half)


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds per optimizer step, per rank, by term (the exposed ones add up to `step`)."""

    attention: float
    expert_gemm: float
    dense_gemm: float
    vocab: float
    memory_bound: float
    param_copies: float  # FSDP's copies around its collectives (gather in/out, reduce-scatter in, shard cast)
    overhead: float
    comm_exposed: float
    optimizer_exposed: float
    comm_hidden: float  # not part of the step: collectives overlapped with compute
    optimizer_total: float  # not part of the step: the whole update, overlapped or not
    tokens_per_step: int
    world: int

    _NOT_IN_STEP = ("comm_hidden", "optimizer_total")
    _NOT_TERMS = ("tokens_per_step", "world")

    @property
    def step(self) -> float:
        return sum(v for k, v in self.terms().items() if k not in self._NOT_IN_STEP)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.world / self.step

    def terms(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._NOT_TERMS}


def _optimizer_seconds(step: Step, cal: Calibration, local: float, frac: float, gpus_per_node: int,
                       host_link: float, window: float) -> tuple[float, float]:
    """(whole update, exposed part) of the optimizer, in seconds per step.

    Device work is exposed in full: torch's AdamW (`optimizer.offload=none`), and a host optimizer's
    update of its device share (the next forward waits for each bucket; the 8K profile after the
    split has the update's kernels serial with the forward's: 715 ms summed over streams, 711 active).
    What moves over the host link (or runs on host cores) overlaps the next forward (`window`) when
    `overlap_update` is on. Which rate applies is the engine's property, not its name. `host_link`:
    one GPU's host-link bytes/s with the node's other GPUs copying too (`Cluster.host_link_per_gpu`).
    """
    if step.offload == "none":
        t = local * cal.device_adam_bytes / cal.hbm_bw
        return t, t
    frac = min(max(frac, 0.0), 1.0)
    engine = engine_class(step.offload)
    share = host_link / cal.h2d_bw  # a node's GPUs share its host links
    if engine.stages_on_device:  # state streamed through the device: bound by the host link
        host_rate = cal.host_adam_stream * share
    else:  # updated on host cores shared by the node's GPUs; gradients down and weights up the link
        host_rate = min(cal.host_adam_cpu / gpus_per_node, cal.h2d_bw * share / (2 * engine.link_bytes_per_bf16_param))
    t_host = local * (1 - frac) / host_rate
    t_device = local * frac * cal.device_master_update_bytes / cal.hbm_bw
    hidden = min(t_host, window) if step.overlap_update else 0.0
    return t_host + t_device, t_host + t_device - hidden


def fsdp_micro_batches(step: Step) -> tuple[tuple[int, int, int, int], ...]:
    """FSDP's collectives of one block over an optimizer step, by kind of micro-batch: (how many
    micro-batches of that kind, all-gathers beside the block's forward, all-gathers in its
    backward, reduce-scatters of its gradients).

    "reshard" (and any step of one micro-batch) gathers in every forward, again in every backward
    after `reshard_after_forward` (a checkpoint's recompute reuses that gather), and reduce-scatters
    every backward. "keep_gathered" gathers in the first forward only (forward never reshards, nor
    does a backward before the last) and still reduce-scatters every backward. "keep_all" also
    accumulates the gradients unsharded and reduce-scatters them in the last backward only
    (mop.parallel.parallelize.set_accumulation_phase; counted by FSDP2's own profiler labels in
    tests/test_fsdp_accumulation.py).
    """
    acc, mode = step.grad_accum, step.fsdp_accumulation
    if mode == "reshard":
        return ((acc, 1, 1 if step.reshard_after_forward else 0, 1),)
    if mode == "keep_gathered":
        return ((1, 1, 0, 1), (acc - 1, 0, 0, 1))
    kinds = ((1, 1, 0, 0), (acc - 2, 0, 0, 0), (1, 0, 0, 1))  # keep_all: grad_accum >= 2 here
    return tuple(k for k in kinds if k[0] > 0)


def fsdp_collectives_per_step(step: Step) -> tuple[int, int]:
    """(all-gathers, reduce-scatters) of each FSDP block per optimizer step (`fsdp_micro_batches`)."""
    kinds = fsdp_micro_batches(step)
    return sum(n * (f + b) for n, f, b, _ in kinds), sum(n * rs for n, _, _, rs in kinds)


def fsdp_copy_seconds(step: Step, cal: Calibration, unit: float) -> float:
    """Device time of FSDP2's copies around one block's collectives, per optimizer step, at `hbm_bw`.

    Each all-gather copies the local shard into the send buffer in the compute dtype (read in the
    parameter dtype, written in the compute dtype) and the gathered buffer out into the unsharded
    weights (read and written); the reduce-scatter copies the unsharded gradients into its buffer in
    the reduce dtype, and the reduced shard is cast to the parameter dtype unless it already is one.
    At W = 1 FSDP2 makes the unsharded weights from the shard directly (a cast, when the dtypes
    differ) and copies the reduce buffer to the output. (Session 5's 8K profile with the experts
    sharded as dense: 24.8 + 31.4 ms gather in/out, 42.9 ms reduce copy-in, 10.9 ms shard cast for
    24 blocks of 0.62 B parameters, fp32 reduce: 110 ms, where these bytes at 4.2 TB/s give 75.)
    Gradient accumulation adds each micro-batch's gradients to the held ones after the first: the
    reduced shard into the shard gradient (read both, write one), or with "keep_all" the unsharded
    gradient into the accumulated one in the reduce dtype (the first micro-batch casts it there
    when the dtypes differ), which the one reduce-scatter then reads instead of the compute dtype's.
    """
    W, a, p, r = step.layout.world, step.act_bytes, step.param_bytes, step.reduce_bytes
    gathers, reduces = fsdp_collectives_per_step(step)
    if W > 1:
        gather = (p + a) * unit / W + 2 * a * unit
        copy_in = (a + r) * unit
        reduce = (r + p) * unit / W if r != p else 0.0
    else:
        gather = (p + a) * unit if p != a else 0.0
        copy_in = (a + r) * unit
        reduce = 2 * r * unit + ((r + p) * unit if r != p else 0.0)
    acc = step.grad_accum
    if step.fsdp_accumulation == "keep_all":
        first = (a + r) * unit if a != r else 0.0
        accumulate = first + (acc - 1) * (a + 2 * r) * unit
        copy_in = 2 * r * unit
    else:
        accumulate = (acc - 1) * 3 * p * unit / W
    return (gathers * gather + reduces * (copy_in + reduce) + accumulate) / cal.hbm_bw


def _bw(cluster: Cluster, cal: Calibration, spans_nodes: bool, alltoall: bool = False) -> float:
    if spans_nodes:
        return cluster.inter_bw or cal.inter_bw
    if alltoall:
        return cal.alltoall_bw if cluster.intra_bw is None else cluster.intra_bw * cal.alltoall_bw / cal.intra_bw
    return cluster.intra_bw or cal.intra_bw


def estimate_time(step: Step, cal: Calibration, cluster: Cluster | None = None, device_fraction: float | None = None
                  ) -> TimeEstimate:
    """Step time of `step`; `device_fraction` overrides the step's (e.g. the one memory resolved).

    Every rate is the calibration's measured one times its term's in-step efficiency
    (`Calibration.in_step`); link bandwidths given by the cluster are scaled like the measured ones.
    """
    m, ly, a = step.model, step.layout, step.act_bytes
    cluster = cluster or Cluster(gpus_per_node=ly.world)
    link = cal.link_efficiency
    cluster = replace(cluster, intra_bw=cluster.intra_bw and cluster.intra_bw * link,
                      inter_bw=cluster.inter_bw and cluster.inter_bw * link)
    cal = cal.in_step()
    G, W = cluster.gpus_per_node, ly.world
    N, S, b = step.tokens, step.seq_len, step.batch_size
    H, q, kv, k, I = m.dim, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.top_k, m.expert_dim
    moe = [i >= m.n_dense_layers for i in range(m.n_layers)]
    eager = replace(step, elementwise_kernels="eager")

    attn = exp = dense = mem = over = 0.0
    comm_exposed = comm_hidden = 0.0  # per micro-batch
    fsdp_copies = fsdp_exposed = fsdp_hidden = 0.0  # FSDP's, per optimizer step (`fsdp_micro_batches`)
    fwd_time = 0.0  # the first forward of a micro-batch (what the optimizer update hides behind)
    dv = m.value_head_dim if m.attention == "mla" else m.head_dim
    attn_fwd_flops = b * S * S * m.n_heads * (m.head_dim + dv) / ly.seq  # QK^T and AV, causal half
    attn_rate = _rate(cal.attn_flops, S, cal.attn_half_seq)
    E_local = m.n_experts // ly.expert
    chunks = step.expert_chunks()
    rows = N * k / chunks / max(E_local, 1)  # routed rows per local expert per chunk (balanced routing)
    exp_rate = _rate(cal.expert_flops, rows, cal.expert_half_rows)
    shard = W // ly.expert
    dense_params = dense_block_params(step)
    # The router's statistics all-reduce (aux loss on, over W ranks): see FSDP's collectives below.
    router_sync = m.aux_loss_coef > 0 and W > 1
    # The attention half of a routed-expert block (before its router): its share of the dense
    # parameters (all but the router and shared experts) and of the memory-bound bytes.
    router_params = H * m.n_experts + 3 * H * m.shared_dim
    attn_share = max(dense_params - router_params, 0.0) / max(dense_params, 1.0)
    mem_share = ((H * a + attention_saved_bytes(eager) - cuda_attention_extra_bytes(step))
                 / (block_saved_bytes(eager, True, True) - cuda_attention_extra_bytes(step)))
    # Blocks with the same policy, kind and attention window cost the same: each group is computed once.
    windows = [m.layer_window(i) if hasattr(m, "layer_window") else 0 for i in range(m.n_layers)]
    groups = Counter(zip(step.policies, moe, windows))
    fsdp_bw = _bw(cluster, cal, W > G)
    host_link = cluster.host_link_per_gpu(cal)
    for (policy, is_moe, window), n_blocks in sorted(groups.items()):
        attn0, exp0, dense0, mem0, over0, copies0 = attn, exp, dense, mem, over, fsdp_copies
        comm_exposed0, comm_hidden0, fwd0 = comm_exposed, comm_hidden, fwd_time
        fsdp_exposed0, fsdp_hidden0 = fsdp_exposed, fsdp_hidden
        ckpt = policy != "none"
        dense_f = 2.0 * N * dense_params  # attention projections, router, shared/dense FFN
        t_dense_f = dense_f / _rate(cal.gemm_flops, 2.0 * N * H * q, cal.gemm_half)
        # A sliding window of w keys: S*w query-key pairs instead of the causal S^2/2.
        t_attn_f = attn_fwd_flops * (min(1.0, 2.0 * window / S) if window else 1.0) / attn_rate
        attn_passes = step.attention_forwards if policy in ("full", "offload") else 1
        attn += t_attn_f * (attn_passes + cal.attn_bwd_ratio)
        dense += t_dense_f * ((2 if ckpt else 1) + 2)
        t_exp_f = 0.0
        exp_passes = 1 + (1 if (ckpt or step.expert_recompute) else 0)
        if is_moe:
            t_exp_f = 6.0 * N * k * H * I / exp_rate
            exp += t_exp_f * (exp_passes + 2)
            if chunks > 1:  # each chunk reads and accumulates the local experts' fp32 weight gradients
                exp += chunks * E_local * 3 * H * I * 12 / cal.hbm_bw
        passes = (2 if ckpt else 1) + 2
        # (elementwise_factor was fitted on the modelled saved bytes of op-by-op kernels, before the
        # measured CUDA extra; fused kernels scale the result instead)
        saved = block_saved_bytes(eager, is_moe, True) - cuda_attention_extra_bytes(step)
        t_mem = cal.elementwise_factor * N * saved / cal.hbm_bw
        if step.elementwise_kernels == "fused":
            t_mem *= cal.fused_elementwise_ratio
        mem += t_mem * passes / 3
        # Host-bound idle: a dispatcher's plan syncs the host in each pass of an expert layer; the
        # experts sharded as dense have no dispatcher.
        idle = cal.layer_overhead_s + (cal.dispatcher_sync_s if is_moe and not step.experts_as_dense else 0.0)
        over += idle * passes
        t_fwd = t_dense_f + t_attn_f + t_exp_f + t_mem / 3  # the block's forward, then the rest of its step
        t_bwd = (t_dense_f * (passes - 1) + t_attn_f * (attn_passes - 1 + cal.attn_bwd_ratio)
                 + t_exp_f * (exp_passes + 1) + t_mem * (passes - 1) / 3)
        fwd_time += t_fwd + idle
        # FSDP's collectives of this block (its dense weights, and its experts when sharded as
        # dense), on their own streams: the next block's all-gather beside this block's forward; in
        # backward the previous block's all-gather (again, after `reshard_after_forward`; a
        # checkpoint's recompute reuses it) and this block's reduce-scatter in the reduce dtype;
        # per kind of micro-batch (`fsdp_micro_batches`), so these are per optimizer step.
        unit = fsdp_unit_params(step, is_moe)
        t_ag = unit * a * (W - 1) / W / fsdp_bw
        t_rs = unit * step.reduce_bytes * (W - 1) / W / fsdp_bw
        # What hides them: the block's compute. (Code before b186d27, `Step.router_forward_sync`:
        # the router summed its load statistics over all W ranks on FSDP's communicator with a
        # synchronous all-reduce on the compute stream, which waited for the gathers and
        # reduce-scatters issued before it, so only the attention half of the block's forward hid
        # them; code before 4e813c6 all-reduced them again in a checkpoint's recompute:
        # `Step.router_recompute_sync`. Now the all-reduce is started in the forward and waited for
        # after the last block.)
        fwd_window, bwd_window = t_fwd, t_bwd
        if is_moe and router_sync and step.router_forward_sync:
            fwd_window = t_attn_f + t_dense_f * attn_share + t_mem / 3 * mem_share
            if ckpt and step.router_recompute_sync:  # a selective block keeps its attention
                bwd_window = fwd_window - (t_attn_f if policy == "selective" else 0.0)
        for n_micro, fwd_gathers, bwd_gathers, reduces in fsdp_micro_batches(step):
            t_fwd_comm, t_bwd_comm = fwd_gathers * t_ag, bwd_gathers * t_ag + reduces * t_rs
            exposed = max(0.0, t_fwd_comm - fwd_window) + max(0.0, t_bwd_comm - bwd_window)
            fsdp_exposed += n_micro * exposed
            fsdp_hidden += n_micro * (t_fwd_comm + t_bwd_comm - exposed)
        fsdp_copies += fsdp_copy_seconds(step, cal, unit)
        # ExpertParallelExperts sharded over W/Ep gathers its expert shards itself, in the compute
        # dtype, once per expert pass, and reduce-scatters their gradients in the compute dtype, on
        # the compute path (the layer waits for each): exposed in full.
        if is_moe and shard > 1 and not step.experts_as_dense:
            t = E_local * 3 * H * I * a * (exp_passes + 1) * (shard - 1) / shard / fsdp_bw
            comm_exposed += t
        # Offloaded block input: to the host in forward, back one block ahead in backward (hidden
        # behind the block's compute unless the host link is slower).
        if policy == "offload":
            block_compute = t_fwd + t_bwd
            t = 2 * N * H * a / host_link
            comm_exposed += max(0.0, t - block_compute)
            comm_hidden += min(t, block_compute)
        # Ulysses: q, k, v in and the output back, per attention pass (forward, recompute, backward).
        if ly.seq > 1:
            vol = a * N * (2 * q + 2 * kv) * (ly.seq - 1) / ly.seq * (attn_passes + 1)
            t = vol / _bw(cluster, cal, ly.seq > G, alltoall=True)
            hidden = t * (1 - 1 / step.head_chunks)
            comm_exposed += t - hidden
            comm_hidden += hidden
        # Expert dispatch and combine over Ep, per expert pass.
        if is_moe and ly.expert > 1:
            vol = 2 * a * N * k * H * (ly.expert - 1) / ly.expert * (exp_passes + 1)
            t = vol / _bw(cluster, cal, ly.expert > G, alltoall=True)
            hidden = t * (1 - 1 / chunks)
            comm_exposed += t - hidden
            comm_hidden += hidden
        # The group's other blocks cost the same as this one.
        attn, exp, dense = attn0 + (attn - attn0) * n_blocks, exp0 + (exp - exp0) * n_blocks, \
            dense0 + (dense - dense0) * n_blocks
        mem, over, fwd_time = mem0 + (mem - mem0) * n_blocks, over0 + (over - over0) * n_blocks, \
            fwd0 + (fwd_time - fwd0) * n_blocks
        fsdp_copies = copies0 + (fsdp_copies - copies0) * n_blocks
        comm_exposed = comm_exposed0 + (comm_exposed - comm_exposed0) * n_blocks
        comm_hidden = comm_hidden0 + (comm_hidden - comm_hidden0) * n_blocks
        fsdp_exposed = fsdp_exposed0 + (fsdp_exposed - fsdp_exposed0) * n_blocks
        fsdp_hidden = fsdp_hidden0 + (fsdp_hidden - fsdp_hidden0) * n_blocks
    # FSDP's first gather of each pass that gathers (the first block's in forward, the last
    # block's as backward starts) and the last reduce-scatter of each backward that reduces (the
    # first block's, which the micro-batch's end waits for) have no compute beside them.
    if W > 1:
        first, last = fsdp_unit_params(step, moe[0]), fsdp_unit_params(step, moe[-1])
        for n_micro, fwd_gathers, bwd_gathers, reduces in fsdp_micro_batches(step):
            fsdp_exposed += n_micro * ((fwd_gathers * first + bwd_gathers * last) * a
                                       + reduces * first * step.reduce_bytes) * (W - 1) / W / fsdp_bw
    # Vocabulary: strips (GEMMs + softmax at memory bandwidth), ring hops of weight blocks.
    V = m.vocab_size
    vocab_flops = (6.0 if ly.vocab == 1 else 8.0) * N * H * V
    vocab = vocab_flops / _rate(cal.gemm_flops, 2.0 * min(N, 8192) * H * V / ly.vocab, cal.gemm_half)
    vocab += (4 if ly.vocab == 1 else 6) * N * V * a / cal.hbm_bw
    fwd_time += vocab if ly.vocab == 1 else vocab / 2  # one block forms its gradients in forward
    if ly.vocab > 1:
        t = 2 * (ly.vocab - 1) * (V // ly.vocab) * H * a / _bw(cluster, cal, ly.vocab > G)
        hidden = min(t, vocab)
        comm_exposed += t - hidden
        comm_hidden += hidden
    over_step = cal.step_overhead_s  # the step boundary, once per optimizer step
    acc = step.grad_accum
    micro = attn + exp + dense + mem + fsdp_copies / acc + over + vocab  # a micro-batch, on average
    local = m.param_counts()["total"] / W
    frac = step.device_fraction if device_fraction is None else device_fraction
    window = fwd_time + (micro if acc > 1 else 0.0)
    t_opt, opt_exposed = _optimizer_seconds(step, cal, local, frac, G, host_link, window)
    return TimeEstimate(attention=attn * acc, expert_gemm=exp * acc, dense_gemm=dense * acc, vocab=vocab * acc,
                        memory_bound=mem * acc, param_copies=fsdp_copies, overhead=over * acc + over_step,
                        comm_exposed=comm_exposed * acc + fsdp_exposed,
                        optimizer_exposed=opt_exposed, comm_hidden=comm_hidden * acc + fsdp_hidden,
                        optimizer_total=t_opt, tokens_per_step=step.tokens_per_step, world=W)
