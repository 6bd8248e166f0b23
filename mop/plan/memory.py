"""Peak device memory and host memory of one training step, per rank, by term.

The state (weights, gradients, optimizer) is the exact arithmetic of `mop.plan.state`. The rest is
first principles: what each op of a block saves for backward (per token, from the model code), what
each activation policy keeps (mop.models.activation_policy), and the largest transient working set of
one block (attention kernel, all-to-all buffers, one expert chunk, one loss strip). The peak is
reached at the start of the backward of the last block: every block's kept activations, plus that
block's recomputed activations, plus the largest working set, plus FSDP's transients: the gathered
weights of two blocks (the running one and the next, prefetched) and the block's gradients with the
previous block's reduce-scatter buffer. At Ep = 1 the routed experts are part of FSDP's blocks
(`Step.experts_as_dense`): ~1.2 GB per block of qwen3-30b-a3b in bf16, so these are GiBs.

With gradient accumulation the peak is a later micro-batch's: every gradient of the step so far is
alive from its start, and each block's new gradients are formed beside them before they are added
(`backward_peak`). `parallel.fsdp.accumulation` keeps more between micro-batches: every block's
gathered weights ("keep_gathered", in place of the two in flight), and also every FSDP unit's
unsharded gradients in the reduce dtype ("keep_all", in place of their shards and of the
reduce-scatter buffer, which only the last micro-batch fills from them).

Per-token bytes below use a = activation bytes (2: bf16), N = tokens per rank, H the width,
Hq/Hkv heads, Dh head dim, E experts, k top-k, I expert width. Ulysses (D > 1) moves attention to
a head-sharded layout of the same size per rank, so the per-rank bytes do not depend on D.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

from mop.optim.registry import engine_class
from mop.plan.calibration import Calibration
from mop.plan.state import state_memory
from mop.plan.step import GIB, Step

ADAM_STATE_BYTES = 12  # fp32 master, m, v per parameter of the host optimizer

# On CUDA the attention state of a block holds 2 x a x Hq x Dh bytes per token more than the
# tensors listed in `attention_state_bytes` (the trainer's allocator probe, session 4 on H200,
# qwen3-30b-a3b: "selective" kept 39.3 KB/token at 8K and 32K (D=1) and 47.5 KB at 128K (D=2),
# where those tensors and the block input make 22.7 / 30.8 KB: 16.7 KB more at every point, 2.04
# x a x Hq x Dh). Which tensor it is (an expanded K/V pair or a contiguous q/out copy made by the
# fused kernel's path) is not pinned down; the size is measured, and CPU runs (exact) do not have it.
CUDA_ATTENTION_STATE_EXTRA = 2.0


def _norm_saved(H: int, a: int, cpu: bool) -> float:
    """RMSNorm: rstd (fp32) and the output (saved by the next linear); CPU's composite adds the normalised x."""
    return 4 + H * a + (H * a if cpu else 0)


def attention_state_bytes(step: Step) -> float:
    """Per token: what the attention kernel keeps for backward (q, k, v post-RoPE, K/V unexpanded, out, lse)."""
    m, a = step.model, step.act_bytes
    dv = m.value_head_dim if m.attention == "mla" else m.head_dim  # MLA: values narrower than q/k heads
    if step.layout.seq > 1:  # Ulysses pads MLA's v (and so the output) to the q/k head dim (mop.models.mla)
        dv = max(dv, m.head_dim)
    q, k, v, out = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.n_kv_heads * dv, m.n_heads * dv
    return a * (q + k + v + out) + 4 * m.n_heads + cuda_attention_extra_bytes(step)


def cuda_attention_extra_bytes(step: Step) -> float:
    """Per token: the measured CUDA-only part of the attention state (`CUDA_ATTENTION_STATE_EXTRA`)."""
    m = step.model
    return 0.0 if step.cpu else CUDA_ATTENTION_STATE_EXTRA * step.act_bytes * m.n_heads * m.head_dim


def attention_saved_bytes(step: Step) -> float:
    """Per token: everything the attention half of a block saves with no checkpoint (input excluded)."""
    m, a = step.model, step.act_bytes
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    b = _norm_saved(m.dim, a, step.cpu)
    b += 4 * m.head_dim  # RoPE cos/sin tables (fp32, Dh/2 each)
    if m.qk_norm:
        b += a * (q + kv) + 4 * (m.n_heads + m.n_kv_heads)  # q/k norm inputs and rstd
    b += 4 * (q + kv)  # RoPE multiplies fp32 copies of q and k (the tensors themselves in fp32)
    b += attention_state_bytes(step)
    if step.layout.seq > 1:  # Ulysses: the output projection's input is the all-to-all's result, not a view
        b += a * q
    return b


def ffn_saved_bytes(step: Step, is_moe: bool, experts_recompute: bool) -> float:
    """Per token: what the FFN half saves with no block checkpoint (residual sum and norm included)."""
    m, a = step.model, step.act_bytes
    # SwiGLU keeps w1's and w3's outputs, silu's output and the product (the next GEMM's input); fused
    # (mop.ops.fused), silu's output is recomputed in its backward instead of kept.
    swiglu = 3 if step.elementwise_kernels == "fused" else 4
    b = m.dim * a + _norm_saved(m.dim, a, step.cpu)  # the residual sum (the norm's input), the norm
    if not is_moe:
        return b + swiglu * m.dense_dim * a
    k = m.top_k
    b += (0 if a == 4 else 4 * m.dim) + 4 * m.n_experts + 12 * k + 4  # router: fp32 input, scores, top-k
    b += swiglu * m.shared_dim * a
    if not experts_recompute:
        if step.experts_as_dense:
            # The model's own GroupedExperts (mop.models.moe): the routed rows, w1/w3 outputs, SiLU
            # output and product, the gathered expert outputs (the weighting's input), the slot order
            # and its inverse (int64; the graph keeps the sort's output alive), the combine weights in
            # the compute dtype. Exact on CPU, one process and 2 gloo ranks (tests/test_planner.py).
            b += k * (2 * m.dim + swiglu * m.expert_dim) * a + k * (16 + a)
        else:
            # ExpertParallelExperts: routed input, w1/silu/w3/product, expert output (on the rank that
            # computes the expert: the most loaded one holds `routed_load_factor` x the mean), the
            # output sent back; route indices
            load = routed_load_factor(step)
            b += k * ((2 * m.dim + swiglu * m.expert_dim) * load + m.dim) * a + 20 * k
    return b


def routed_load_factor(step: Step) -> float:
    """Routed rows on the most loaded rank / the mean, at most. LLEP (Ep > 1) keeps plain expert
    parallelism while the experts' home ranks are within `llep_imbalance_threshold` of the mean and
    caps every rank at `llep_alpha` x the mean beyond it, so no rank exceeds the larger of the two
    (the session-4 probes: "none" kept 1.23-1.27 x the balanced routed bytes at 8K-128K, under the
    1.3 bound); plain all-to-all is modelled balanced (its imbalance is the routing's)."""
    if step.layout.expert > 1 and step.dispatcher.startswith("llep"):
        return max(step.llep_alpha, step.llep_threshold)
    return 1.0


def block_saved_bytes(step: Step, is_moe: bool, experts_recompute: bool) -> float:
    """Per token: a block with no checkpoint, its input included."""
    return step.model.dim * step.act_bytes + attention_saved_bytes(step) + ffn_saved_bytes(step, is_moe,
                                                                                            experts_recompute)


def kept_bytes(step: Step, policy: str, is_moe: bool) -> float:
    """Per token: what one block keeps from its forward to its backward on the device, by policy."""
    a, H = step.act_bytes, step.model.dim
    if policy == "none":
        return block_saved_bytes(step, is_moe, experts_recompute=step.expert_recompute)
    if policy == "selective":
        copy = step.model.n_heads * step.model.head_dim * a if step.layout.seq > 1 else 0  # local output copy
        return H * a + attention_state_bytes(step) + copy
    if policy == "full":
        return H * a
    return 0.0  # offload: the input is in host memory


def outside_blocks_bytes(step: Step) -> float:
    """Per token: the final norm's input (the last block's output) and rstd, the loss's input gradient
    (formed in forward), labels. The loss keeps no logits."""
    a, H = step.act_bytes, step.model.dim
    return H * a + 4 + (H * a if step.cpu else 0) + H * a + 8


def loss_grad_weight_bytes(step: Step) -> float:
    """One vocabulary block formed its weight gradient during forward (P = 1); the ring recomputes (P > 1)."""
    if step.layout.vocab > 1:
        return 0.0
    return step.model.vocab_size * step.model.dim * step.act_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank device bytes at the step's peak, by term; host bytes per rank.

    `grads` and `activations_kept` are what is alive at the peak: backward frees a block's kept
    activations as it forms that block's gradients, so a step that keeps much (no checkpoint) peaks
    as backward starts, with few gradients, and one that keeps little peaks as it ends, with all.
    """

    weights: float
    grads: float
    optimizer: float
    optimizer_staging: float  # an engine that stages on the device: the slots offloaded buckets are updated in
    activations_kept: float
    recompute: float  # the backward block's recomputed activations
    attention_ws: float
    alltoall_ws: float
    expert_ws: float
    vocab_ws: float
    # FSDP's gathered block(s) in the compute dtype (the experts too when sharded as dense): two in
    # flight, or every block's with parallel.fsdp.accumulation keeping them between micro-batches
    param_gather: float
    grad_reduce: float  # the previous block's reduce-scatter input in flight (FSDP, reduce dtype)
    slack: float  # allocator: reserved beyond allocated
    host_pinned_state: float
    host_staging: float
    host_checkpoints: float
    host_process: float
    device_fraction: float  # the optimizer state share on the device this estimate assumes

    @property
    def allocated(self) -> float:
        return self.reserved - self.slack

    @property
    def reserved(self) -> float:
        terms = [f.name for f in fields(self) if not f.name.startswith("host") and f.name != "device_fraction"]
        return sum(getattr(self, t) for t in terms)

    @property
    def host(self) -> float:
        return self.host_pinned_state + self.host_staging + self.host_checkpoints + self.host_process

    def device_terms(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not f.name.startswith("host") and f.name != "device_fraction"}

    def largest(self) -> str:
        """The largest device term, for refusals ("activations_kept 212 GiB")."""
        name, value = max(self.device_terms().items(), key=lambda kv: kv[1])
        return f"{name} {value / GIB:.1f} GiB"


def _gathered_experts_kept(step: Step) -> float:
    """Bytes an expert layer that keeps its activations (no checkpoint, no pipelining) also keeps:
    the expert weights ExpertParallelExperts gathered (or cast to the compute dtype) until its
    backward (measured on 2 gloo ranks). Unsharded experts already in the compute dtype (bf16
    parameters) are used as they are. Experts sharded as dense keep nothing: FSDP frees the gathered
    storage after the block's forward and gathers it again for backward (`fsdp_kept_bytes`)."""
    m, a, ly = step.model, step.act_bytes, step.layout
    if step.experts_as_dense or step.expert_recompute or not (ly.expert_shard > 1 or a < step.param_bytes):
        return 0.0
    return (m.n_experts // ly.expert) * 3 * m.dim * m.expert_dim * a


def expert_block_params(step: Step) -> float:
    """Routed-expert parameters of one MoE block (all E experts)."""
    m = step.model
    n_moe = sum(i >= m.n_dense_layers for i in range(m.n_layers))
    return m.param_counts()["experts"] / max(n_moe, 1)


def fsdp_unit_params(step: Step, is_moe: bool) -> float:
    """Parameters FSDP gathers and reduces as one block: the dense ones, and the routed experts when
    they are sharded as dense (`Step.experts_as_dense`; otherwise ExpertParallelExperts owns them)."""
    return dense_block_params(step) + (expert_block_params(step) if is_moe and step.experts_as_dense else 0.0)


def fsdp_gathered_blocks(step: Step) -> int:
    """Blocks whose gathered weights are alive at once: the running one and the next, all-gathered
    ahead (explicit prefetch, mop.parallel.parallelize.configure_fsdp_units). At W = 1 FSDP2 makes a
    block's unsharded weights only when it runs (no all-gather to issue ahead). Without
    `reshard_after_forward` every block keeps its gathered weights until its backward instead
    (`fsdp_kept_bytes`), so none are in flight beyond them; with the weights kept between
    micro-batches every block's are gathered for the whole step (`fsdp_step_gathered_bytes`)."""
    if not step.reshard_after_forward or step.fsdp_accumulation != "reshard":
        return 0
    return 2 if step.layout.world > 1 else 1


def fsdp_kept_bytes(step: Step, is_moe: bool) -> float:
    """Gathered weights a block keeps from its forward to its backward: none when FSDP reshards
    after forward (the default), else the whole unit in the compute dtype. With the weights kept
    between micro-batches they outlive the block's backward: `fsdp_step_gathered_bytes`, not here."""
    if step.reshard_after_forward or step.fsdp_accumulation != "reshard":
        return 0.0
    return fsdp_unit_params(step, is_moe) * step.act_bytes


def fsdp_block_params(step: Step) -> float:
    """Parameters of all of FSDP's blocks together (`fsdp_unit_params` of each)."""
    m = step.model
    return sum(fsdp_unit_params(step, i >= m.n_dense_layers) for i in range(m.n_layers))


def fsdp_root_params(step: Step) -> float:
    """Parameters of FSDP's root unit (mop.parallel.parallelize.apply_fsdp): the final norm, and the
    embedding and output head unless they are vocabulary blocks (P > 1), which are not FSDP's."""
    m = step.model
    counts = m.param_counts()
    return m.dim + (counts["embedding"] + counts["output"] if step.layout.vocab == 1 else 0)


def fsdp_step_gathered_bytes(step: Step) -> float:
    """`parallel.fsdp.accumulation` = "keep_gathered" or "keep_all" (with `grad_accum > 1`): every
    block's gathered weights in the compute dtype, alive from the step's first forward (which never
    reshards) to its last backward, on every rank (mop.parallel.parallelize.set_accumulation_phase).
    They subsume the two blocks in flight. The root unit is left out: FSDP holds it gathered from
    each micro-batch's first forward to its last backward in every mode (the root's pre-forward
    and pre-backward gather it, its post-backward frees it), so keeping it between micro-batches
    raises no peak."""
    if step.fsdp_accumulation == "reshard":
        return 0.0
    return fsdp_block_params(step) * step.act_bytes


def fsdp_largest_unit(step: Step) -> float:
    """Parameters of FSDP's largest block (a routed-expert block when the experts are sharded as dense)."""
    m = step.model
    return max(fsdp_unit_params(step, i >= m.n_dense_layers) for i in range(m.n_layers))


def fsdp_reduce_bytes(step: Step) -> float:
    """The reduce-scatter in flight while a block is backpropagated: the previous block's input
    buffer, its unsharded gradients in the reduce dtype (`Step.reduce_bytes`), which FSDP2 keeps
    until this block's reduce-scatter is issued. (Session 5's trainer probe at 8K with the experts
    sharded as dense: 1.16 GiB more peak with an fp32 than a bf16 reduce, 2 B x 0.62 B parameters
    of one block: f-experts-as-dense/f8k against g-bf16-reduce/g8k.) With "keep_all" only the last
    micro-batch reduce-scatters, and its input is the block's accumulated unsharded gradient, which
    FSDP drops as it fills the buffer: counted once, in the kept gradients (`backward_peak`)."""
    if step.fsdp_accumulation == "keep_all":
        return 0.0
    return fsdp_largest_unit(step) * step.reduce_bytes


def block_kept_bytes(step: Step) -> list[float]:
    """Device bytes each block keeps from its forward to its backward (all its tokens), in block order."""
    m, N = step.model, step.tokens
    per: dict[tuple[str, bool], float] = {}
    out = []
    gathered = _gathered_experts_kept(step)
    for i, p in enumerate(step.policies):
        e = i >= m.n_dense_layers
        if (p, e) not in per:
            per[(p, e)] = N * kept_bytes(step, p, e) + (gathered if p == "none" and e else 0.0) + \
                fsdp_kept_bytes(step, e)
        out.append(per[(p, e)])
    return out


def block_recompute_bytes(step: Step, i: int) -> float:
    """Bytes alive while block i is backpropagated beyond what it kept: a checkpointed block's
    recomputed activations (its experts excepted: they are their own checkpoint), plus the gradient
    stream (dx, residual grad, a temporary)."""
    m, N, a = step.model, step.tokens, step.act_bytes
    p, e = step.policies[i], i >= m.n_dense_layers
    recompute = 0.0
    if p != "none":
        recompute = N * (block_saved_bytes(step, e, True) - kept_bytes(step, p, e))
    return recompute + 3 * N * m.dim * a


def outside_kept_bytes(step: Step) -> float:
    """Kept outside the blocks until the loss's backward: the final norm and loss inputs, and the
    loss's weight gradient formed in forward (P = 1)."""
    return step.tokens * outside_blocks_bytes(step) + loss_grad_weight_bytes(step)


def offload_in_flight_bytes(step: Step) -> float:
    """An offloaded block input is back on the device one block ahead (two in flight at most)."""
    n_off = sum(p == "offload" for p in step.policies)
    return min(n_off, 2) * step.tokens * step.model.dim * step.act_bytes


def activation_peak(step: Step, cal: Calibration) -> dict[str, float]:
    """Device bytes of activations and transient working sets as backward starts (the last block):
    every block's kept activations, that block's recomputation, and each working set."""
    m, a, ly = step.model, step.act_bytes, step.layout
    N = step.tokens
    H, Hq, Dh, k, I = m.dim, m.n_heads, m.head_dim, m.top_k, m.expert_dim
    moe = [i >= m.n_dense_layers for i in range(m.n_layers)]
    kept = sum(block_kept_bytes(step)) + offload_in_flight_bytes(step) + outside_kept_bytes(step)
    recompute = block_recompute_bytes(step, m.n_layers - 1)
    chunks = step.head_chunks if ly.seq > 1 else 1
    q = Hq * Dh
    # Attention backward: dout, dq/dk/dv (expanded to the query heads on CUDA), K/V re-expanded,
    # cuDNN's fp32 dq accumulator; per head chunk under Ulysses.
    # Plus the block's unsharded weight gradients (FSDP's, compute dtype): its FFN, backpropagated
    # first, formed them.
    attention_ws = N * (a * q + (3 * a * q + 2 * a * q + 4 * q) / chunks) + fsdp_largest_unit(step) * a
    alltoall_ws = 0.0
    if ly.seq > 1:  # send + receive buffers of q, k, v, out in the head chunk in flight (two when overlapped)
        alltoall_ws = N * 2 * a * (2 * q + 2 * m.n_kv_heads * Dh) / chunks * (2 if chunks > 1 else 1)
    expert_ws = 0.0
    if any(moe) and step.experts_as_dense:
        # The model's GroupedExperts (mop.models.moe) over all N tokens at once, per routed slot, at
        # the larger of two moments (traced op by op on CPU). Its forward, or a checkpoint's
        # recompute, peaks in the combine: what backward keeps (the routed rows, w1/w3 outputs, SiLU
        # output, product, the expert outputs permuted back to token order: 2H + 4I), the expert
        # output and the weighted copy (2H), and the fp32 sum over k per token. Its backward starts
        # no higher (what it keeps and two H-wide gradients) and, as the weight gradients complete
        # (the block's, FSDP's unsharded ones in the compute dtype), holds the routed rows, the
        # w1/w3 output gradients and two input gradients (3H + 2I). Its gathered weights are
        # FSDP's (`param_gather`).
        forward = N * k * (4 * H + 4 * I) * a + N * 4 * H
        expert_ws = max(forward, N * k * (3 * H + 2 * I) * a + fsdp_largest_unit(step) * a)
    elif any(moe):
        E_local = m.n_experts // ly.expert
        weights = E_local * 3 * H * I * a
        if step.dispatcher == "llep_pipelined":
            live = -(-N // step.expert_chunks())
            token_term = N * cal.expert_token_factor * k * H * a
        else:
            live, token_term = N, 0.0
        alpha = routed_load_factor(step)
        per_slot = cal.expert_slot_factor * (H + 3 * I) * a
        if ly.expert == 1:  # the all-to-all over a group of one is the identity: no send/receive copies
            per_slot -= 2 * H * a
        slots = live * k * alpha * per_slot
        expert_ws = 2 * weights + slots + token_term  # gathered weights and their gradients
    # Loss: one strip of logits (bf16 + fp32 math + gradient), the vocabulary block(s) in use.
    V_block = m.vocab_size // ly.vocab
    strip = min(step.max_strip_elements, N * V_block) * cal.strip_bytes_per_element
    vocab_ws = strip + (2 if ly.vocab > 1 else 1) * V_block * H * a
    return {"activations_kept": kept, "recompute": recompute, "attention_ws": attention_ws,
            "alltoall_ws": alltoall_ws, "expert_ws": expert_ws, "vocab_ws": vocab_ws,
            "grad_reduce": fsdp_reduce_bytes(step)}


def dense_block_params(step: Step) -> float:
    """Parameters of one block outside the routed experts (attention, norms, router, shared/dense FFN),
    averaged over the blocks (the final norm excluded)."""
    m = step.model
    return (m.param_counts()["dense"] - m.dim) / max(m.n_layers, 1)


def _largest_working_set(act: dict[str, float]) -> dict[str, float]:
    """The working sets do not coincide in time: the peak holds the largest one (attention counts
    with its all-to-all buffers; a block's backward, attention's or the experts', with the previous
    block's reduce-scatter in flight, which the loss's backward precedes); the others are reported as 0."""
    groups = {"attention": ("attention_ws", "alltoall_ws", "grad_reduce"), "expert": ("expert_ws", "grad_reduce"),
              "vocab": ("vocab_ws",)}
    top = max(groups, key=lambda g: sum(act[k] for k in groups[g]))
    return {k: (act[k] if k in groups[top] else 0.0) for keys in groups.values() for k in keys}


def block_params(step: Step) -> list[float]:
    """Parameters of each block (its routed experts included), in block order."""
    m = step.model
    expert, dense = expert_block_params(step), dense_block_params(step)
    return [dense + (expert if i >= m.n_dense_layers else 0.0) for i in range(m.n_layers)]


def accumulated_grads(step: Step, grad_bytes: float) -> tuple[float, list[float], float]:
    """Gradients alive through a micro-batch after the first of a step (`grad_accum > 1`): (the
    bytes held from its start to its end, each block's new gradients beside them while that block
    is backpropagated, the held bytes plus the new ones at the end of backward).

    Every gradient of the step so far is held: the shards (FSDP's reduce-scatter output, the expert
    and vocabulary blocks' own), which are summed in place. A block's new gradients exist beside
    them until they are added: FSDP's reduced shard, and autograd's new gradient of a parameter
    that already has one (AccumulateGrad adds it and frees it; the first micro-batch's is kept as
    the gradient itself). The root unit's reduced shard is added last, as backward ends. With
    "keep_all" FSDP's gradients are held unsharded in the reduce dtype instead of as shards
    (`FSDPParam.unsharded_accumulated_grad`, or the unsharded parameter's own gradient when the
    compute dtype is the reduce dtype: FSDP's autograd gradients are the blocks' working sets, in
    the compute dtype), and are reduce-scattered into fresh shards only in the last micro-batch,
    which frees them; only the other parameters' new gradients are added to held ones.
    The first micro-batch holds no more than this (its gradients grow to the same sum), so the
    step's peak is a later micro-batch's. (The trainer's start-up probe measures it the same way:
    the second of two micro-batches, the first one's gradients alive: mop.memory_probe.ActivationProbe.)
    """
    m = step.model
    per_param = grad_bytes / m.param_counts()["total"]
    params = block_params(step)
    if step.fsdp_accumulation == "keep_all":
        fsdp = fsdp_block_params(step) + fsdp_root_params(step)
        held = grad_bytes + fsdp * (step.reduce_bytes - per_param)
        new = [per_param * (params[i] - fsdp_unit_params(step, i >= m.n_dense_layers)) for i in range(m.n_layers)]
        return held, new, grad_bytes
    new = [per_param * p for p in params]
    return grad_bytes, new, grad_bytes + per_param * fsdp_root_params(step)


def backward_peak(step: Step, grad_bytes: float, working_set: float) -> dict[str, float]:
    """Kept activations, recomputation and gradients alive at the step's peak, over backward.

    Backward runs the loss, then blocks L-1 .. 0, then the embedding. As block j is backpropagated,
    blocks 0..j still hold what they kept, block j its recomputation, and the gradients of the output
    layer and of blocks j..L-1 exist (the reduce-scatter makes each block's gradient shard as its
    backward ends; set to None after every step, so none exist as backward starts). The same shape
    holds, mirrored, in the next forward while an overlapped host update still reads the previous
    step's gradients (a block's forward waits for its bucket's update, which frees its gradients).
    With gradient accumulation a later micro-batch holds every gradient throughout, and block j's
    new ones beside them (`accumulated_grads`).
    `grad_bytes` are all of this rank's gradients, `working_set` the largest transient one.
    """
    m = step.model
    counts = m.param_counts()
    per_param = grad_bytes / counts["total"]
    params = block_params(step)
    kept = block_kept_bytes(step)
    steady = offload_in_flight_bytes(step)
    best = None
    kept_below = sum(kept)
    grads = per_param * (counts["output"] + m.dim)  # the output layer (and final norm) first
    held, new, at_end = accumulated_grads(step, grad_bytes) if step.grad_accum > 1 else (0.0, [], grad_bytes)
    for j in range(m.n_layers - 1, -1, -1):
        grads += per_param * params[j]
        alive = dict(activations_kept=kept_below + steady + (outside_kept_bytes(step) if j == m.n_layers - 1 else 0.0),
                     recompute=block_recompute_bytes(step, j), grads=held + new[j] if new else grads)
        total = sum(alive.values()) + working_set
        if best is None or total > best[0]:
            best = (total, alive)
        kept_below -= kept[j]
    end = dict(activations_kept=0.0, recompute=0.0, grads=at_end)  # after the embedding: every gradient
    if at_end > best[0]:
        best = (at_end, end)
    return best[1]


def staging_device_bytes(step: Step) -> float:
    """An engine that stages state on the device (gpu_stream): two device slots of (master,
    exp_avg, exp_avg_sq) fp32 for offloaded buckets."""
    if step.offload == "none" or not engine_class(step.offload).stages_on_device:
        return 0.0
    local = step.model.param_counts()["total"] / step.layout.world
    return 2 * ADAM_STATE_BYTES * min(step.bucket_numel, local)


def trainer_memory_cap(step: Step, device_bytes: float) -> float:
    """The device bytes `mop train` lets one micro-batch peak at before the first step
    (`mop.memory_probe.plan_memory`): 90% of the device, less AdamW's moments (device optimizer) or
    the gpu_stream staging slots; what the step leaves below it is the host optimizer's device share."""
    local = step.model.param_counts()["total"] / step.layout.world
    cap = 0.9 * device_bytes
    if step.offload == "none":
        return cap - 8 * local
    return cap - 2 * ADAM_STATE_BYTES * min(step.bucket_numel, local)


def auto_device_fraction(step: Step, step_peak: float, device_bytes: float) -> float:
    """`optimizer.device_fraction = -1` as the trainer resolves it: the share of the offloaded state
    that fits between the micro-batch's peak (no optimizer state) and `trainer_memory_cap`."""
    local = step.model.param_counts()["total"] / step.layout.world
    room = trainer_memory_cap(step, device_bytes) - step_peak
    return max(0.0, min(1.0, room / (ADAM_STATE_BYTES * local)))


def estimate_memory(step: Step, cal: Calibration, device_bytes: float | None = None) -> MemoryEstimate:
    """Peak device memory and host memory of `step` per rank.

    `step.device_fraction = -1` (auto) resolves like the trainer does (`auto_device_fraction`).
    The allocator's slack is taken on everything but the optimizer state, which is allocated once,
    in whole buckets, and never freed.
    """
    W = step.layout.world
    a = step.act_bytes
    device_bytes = device_bytes or cal.device_bytes
    act = activation_peak(step, cal)
    ws = _largest_working_set(act)
    # The current block and the next, prefetched; or every block, kept between micro-batches.
    gathered = fsdp_gathered_blocks(step) * fsdp_largest_unit(step) * a + fsdp_step_gathered_bytes(step)
    state0 = state_memory(step.model, W, step.offload, 0.0, step.param_bytes)
    alive = backward_peak(step, state0.grads, sum(ws.values()))
    step_bytes = alive["activations_kept"] + alive["recompute"] + sum(ws.values()) + gathered
    frac = step.device_fraction
    if step.offload == "none":
        frac = 1.0
    elif frac < 0:
        frac = auto_device_fraction(step, state0.weights + alive["grads"] + step_bytes, device_bytes)
    state = state_memory(step.model, W, step.offload, frac, step.param_bytes)
    staging = staging_device_bytes(step) if frac < 1 else 0.0
    allocated = state.weights + alive["grads"] + state.optimizer_device + staging + step_bytes
    host_state = state.optimizer_host
    host_staging = 0.0
    engine = engine_class(step.offload) if step.offload != "none" else None
    if engine is not None and engine.stages_on_device:
        host_staging = 2 * step.bucket_numel * 16  # two pinned slots of master, m, v, grad
    elif engine is not None and engine.grads_to_host:  # gradients in and weights out, each way's bytes
        host_staging = 2 * state.weights / step.param_bytes * engine.link_bytes_per_bf16_param
    n_off = sum(p == "offload" for p in step.policies)
    host_ckpt = n_off * step.tokens * step.model.dim * a
    return MemoryEstimate(weights=state.weights, grads=alive["grads"], optimizer=state.optimizer_device,
                          optimizer_staging=staging, activations_kept=alive["activations_kept"],
                          recompute=alive["recompute"], **ws, param_gather=gathered,
                          slack=cal.allocator_slack * (allocated - state.optimizer_device),
                          host_pinned_state=host_state, host_staging=host_staging, host_checkpoints=host_ckpt,
                          host_process=cal.host_process_bytes, device_fraction=frac)
