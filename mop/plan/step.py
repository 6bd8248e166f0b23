"""What the planner models: one training step's configuration (`Step`) and the machines (`Cluster`).

`Step` names exactly the `mop train` options that change memory or time, and `Step.overrides()`
gives them back as `--section.key=value` strings; `step_from_overrides` reads them (e.g. from a
bench result's command line), so a prediction and a measurement always describe the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mop.models.config import ModelConfig
from mop.optim.registry import offload_choices
from mop.parallel.fsdp_config import ACCUMULATION_MODES, resolve_reduce_dtype
from mop.parallel.layout import LayoutSpec

POLICIES = ("none", "selective", "full", "offload")
# optimizer.offload: "none" (torch AdamW on the device) and every registered host-state engine
# (mop.optim.registry): a new engine is planned without an edit here.
OFFLOADS = offload_choices()
PARAM_DTYPES = {"fp32": 4, "bf16": 2}  # training.param_dtype -> bytes per weight and per gradient
# parallel.fsdp.reduce_dtype -> bytes per gradient element in FSDP's reduce-scatter; "auto" is the
# gradients' storage dtype (bf16 with training.param_dtype=bf16, else fp32), as
# mop.strategies.mixed_precision_dtypes resolves it.
REDUCE_DTYPES = {"fp32": 4, "bf16": 2}
# parallel.fsdp.accumulation: what FSDP keeps between the micro-batches of a step (with
# training.grad_accum > 1): "reshard" (nothing), "keep_gathered" (every block's gathered weights),
# "keep_all" (those and every FSDP unit's unsharded gradients). mop.parallel.fsdp_config's list.
ACCUMULATIONS = ACCUMULATION_MODES
GIB = 2**30


def parse_policy_spec(spec: str, n_layers: int) -> tuple[str, ...]:
    """Per-block policies from `training.activation_checkpoint` ("full", "none*4,full", true/false)."""
    text = str(spec).strip().lower()
    text = {"true": "full", "1": "full", "false": "none", "0": "none"}.get(text, text)
    out: list[str] = []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for i, part in enumerate(parts):
        name, _, count = part.partition("*")
        if name not in POLICIES:
            raise ValueError(f"activation policy {name!r} is not one of {POLICIES}")
        if count:
            out += [name] * int(count)
        elif i == len(parts) - 1:  # the last entry without a count fills the remaining blocks
            out += [name] * max(n_layers - len(out), 0)
        else:
            out.append(name)
    if len(out) != n_layers:
        raise ValueError(f"activation policy {spec!r} covers {len(out)} blocks, the model has {n_layers}")
    return tuple(out)


def policy_spec(policies: tuple[str, ...]) -> str:
    """The compact `training.activation_checkpoint` string of per-block policies ("none*4,full")."""
    runs: list[list] = []
    for p in policies:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    if len(runs) == 1:
        return runs[0][0]
    return ",".join(f"{p}*{n}" for p, n in runs[:-1]) + f",{runs[-1][0]}"


@dataclass(frozen=True)
class Step:
    """One training step as the planner sees it, per rank (the `mop train` options that matter)."""

    model: ModelConfig
    layout: LayoutSpec
    seq_len: int
    batch_size: int = 1  # sequences per sequence-parallel group per micro-batch
    grad_accum: int = 1
    policies: tuple[str, ...] | str = "full"  # per block, or one policy for every block
    offload: str = "none"  # optimizer state: "none" (device AdamW) or a host engine (OFFLOADS)
    device_fraction: float = 0.0  # share of offloaded state on the device; -1: as much as fits (auto)
    overlap_update: bool = True  # the host optimizer's update runs beside the next forward
    param_dtype: str = "fp32"  # training.param_dtype: "bf16" keeps weights and gradients in bf16 (host optimizer)
    reduce_dtype: str = "auto"  # parallel.fsdp.reduce_dtype: "auto", "fp32" or "bf16" (REDUCE_DTYPES)
    reshard_after_forward: bool = True  # parallel.fsdp.reshard_after_forward: FSDP re-gathers in backward
    accumulation: str = "reshard"  # parallel.fsdp.accumulation (ACCUMULATIONS); acts only with grad_accum > 1
    dispatcher: str = "llep_pipelined"
    chunk_tokens: int = 16384  # llep_pipelined: tokens per chunk (parallel.experts.chunk_tokens)
    max_chunks: int = 10  # llep_pipelined: at most this many chunks (parallel.experts.max_chunks)
    llep_alpha: float = 1.1  # LLEP: per-rank capacity / mean load (parallel.experts.llep_alpha)
    llep_threshold: float = 1.3  # LLEP: plain EP below this home-rank imbalance (parallel.experts.llep_imbalance_threshold)
    head_chunks: int = 1  # Ulysses head chunks (parallel.seq.head_chunks)
    # Attention kernel forwards per step in a "full"/"offload" block: 2 (forward, recompute). Code
    # before 9eaa9cc ran 3 under Ulysses (its backward recomputed again); kept for old measurements.
    attention_forwards: int = 2
    # Code before 2e437ce kept the dispatcher (ExpertParallelExperts) at Ep = 1 as well; since then
    # the experts are sharded as dense weights there (`experts_as_dense`). Kept for old measurements.
    ep1_dispatcher: bool = False
    # Code before 4e813c6 all-reduced the routers' statistics again in a checkpoint's recompute (a
    # wait on the compute stream behind backward's collectives); since then the recompute reuses the
    # forward's. Kept for old measurements.
    router_recompute_sync: bool = False
    # Code before b186d27 all-reduced the routers' statistics synchronously in every MoE block's
    # forward (behind the FSDP collectives queued on the same communicator); since then it starts the
    # all-reduce and waits once after the last block (mop.models.moe.PendingAux). Kept for old
    # measurements.
    router_forward_sync: bool = False
    # training.elementwise_kernels resolved for the device: "fused" (torch.compile'd RoPE, SwiGLU and
    # the experts' slot gathers: SwiGLU saves no silu output, less memory-bound traffic) or "eager".
    elementwise_kernels: str = "eager"
    act_bytes: int = 2  # 2: bf16 compute (GPU); 4: fp32 (the CPU path)
    cpu: bool = False  # CPU kernels: composite RMSNorm (one more saved tensor), no GQA expansion
    max_strip_elements: int = 2**28
    bucket_numel: int = 2**25

    def __post_init__(self):
        if isinstance(self.policies, str):
            object.__setattr__(self, "policies", parse_policy_spec(self.policies, self.model.n_layers))
        if len(self.policies) != self.model.n_layers or any(p not in POLICIES for p in self.policies):
            raise ValueError(f"policies must name one of {POLICIES} per block ({self.model.n_layers} blocks)")
        if self.offload not in OFFLOADS:
            raise ValueError(f"optimizer offload {self.offload!r} is not one of {OFFLOADS}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype {self.param_dtype!r} is not one of {tuple(PARAM_DTYPES)}")
        if self.param_dtype == "bf16" and self.offload == "none":
            raise ValueError("param_dtype=bf16 needs a host optimizer (optimizer.offload=gpu_stream or cpu) for the "
                             "fp32 master weights")
        if self.reduce_dtype != "auto" and self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"reduce_dtype {self.reduce_dtype!r} is not 'auto' or one of {tuple(REDUCE_DTYPES)}")
        if self.accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation {self.accumulation!r} is not one of {ACCUMULATIONS}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum} must be at least 1")
        if self.elementwise_kernels not in ("eager", "fused"):
            raise ValueError(f"elementwise_kernels {self.elementwise_kernels!r} is not 'eager' or 'fused' "
                             "(resolve 'auto' for the device first)")
        if self.seq_len % self.layout.seq:
            raise ValueError(f"seq_len={self.seq_len} must be divisible by D={self.layout.seq}")

    @property
    def param_bytes(self) -> int:
        """Bytes per weight and per gradient on the device (4: fp32, 2: bf16)."""
        return PARAM_DTYPES[self.param_dtype]

    @property
    def reduce_bytes(self) -> int:
        """Bytes per gradient element in FSDP's reduce-scatter (`parallel.fsdp.reduce_dtype`; "auto":
        the gradients' storage dtype, so bf16 parameters reduce in bf16)."""
        return REDUCE_DTYPES[resolve_reduce_dtype(self.reduce_dtype, self.param_dtype)]

    @property
    def fsdp_accumulation(self) -> str:
        """What FSDP keeps between this step's micro-batches: `accumulation` with gradient
        accumulation, "reshard" with one micro-batch (the trainer sets FSDP's accumulation phases
        only when `grad_accum > 1`: mop.trainer.Trainer.train_step)."""
        return self.accumulation if self.grad_accum > 1 else "reshard"

    @property
    def experts_as_dense(self) -> bool:
        """Whether the routed experts are the model's own module, sharded over all W ranks by FSDP like
        the dense weights (gathered per block, one block ahead; no dispatcher): at Ep = 1 unless the
        dispatcher bounds the routed activations in chunks. The rule of
        `mop.parallel.parallelize.experts_sharded_as_dense`, read from the dispatcher's property."""
        from mop.parallel.experts.registry import dispatcher_class

        if self.layout.expert != 1 or self.ep1_dispatcher:
            return False
        return not dispatcher_class(self.dispatcher).bounds_memory

    @property
    def tokens(self) -> int:
        """Tokens per rank per micro-batch (N = b * S / D)."""
        return self.batch_size * self.seq_len // self.layout.seq

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks."""
        return self.layout.data_parallel * self.batch_size * self.seq_len * self.grad_accum

    @property
    def expert_recompute(self) -> bool:
        """Whether the expert layer of a block keeps only its inputs (pipelined, or under any checkpoint)."""
        return self.dispatcher == "llep_pipelined"

    def expert_chunks(self) -> int:
        """K: chunks of the pipelined dispatcher (1 otherwise)."""
        if self.dispatcher != "llep_pipelined":
            return 1
        return max(1, min(math.ceil(self.tokens / self.chunk_tokens), self.max_chunks))

    def overrides(self) -> list[str]:
        """The exact `mop train` options of this step (the model shape and cluster not included)."""
        ly = self.layout
        out = [f"--parallel.seq.degree={ly.seq}", f"--parallel.experts.degree={ly.expert}",
               f"--parallel.vocab.degree={ly.vocab}", f"--parallel.experts.dispatcher={self.dispatcher}"]
        if self.dispatcher == "llep_pipelined":
            out.append(f"--parallel.experts.chunk_tokens={self.chunk_tokens}")
        if self.head_chunks > 1:
            out.append(f"--parallel.seq.head_chunks={self.head_chunks}")
        out += [f"--training.seq_len={self.seq_len}", f"--training.batch_size={self.batch_size}",
                f"--training.grad_accum={self.grad_accum}",
                f"--training.activation_checkpoint={policy_spec(self.policies)}",
                f"--optimizer.offload={self.offload}"]
        if self.param_dtype != "fp32":
            out.append(f"--training.param_dtype={self.param_dtype}")
        if self.reduce_dtype != "auto":
            out.append(f"--parallel.fsdp.reduce_dtype={self.reduce_dtype}")
        if not self.reshard_after_forward:
            out.append("--parallel.fsdp.reshard_after_forward=false")
        # Named whenever it can act (even "reshard"), so that applying these options (parallel.plan
        # = auto) replaces a job's own mode with the planned one; and whenever it is not the default.
        if self.grad_accum > 1 or self.accumulation != "reshard":
            out.append(f"--parallel.fsdp.accumulation={self.accumulation}")
        if self.offload != "none":
            out.append(f"--optimizer.device_fraction={round(self.device_fraction, 3)}")
        if not self.overlap_update:
            out.append("--optimizer.overlap_update=false")
        if self.elementwise_kernels != "eager":
            out.append(f"--training.elementwise_kernels={self.elementwise_kernels}")
        return out


@dataclass(frozen=True)
class Cluster:
    """The machines: GPUs per node, nodes, device and host memory, link bandwidths (None: calibration's)."""

    gpus_per_node: int = 1
    nodes: int = 1
    device_bytes: float | None = None  # per GPU; None: the calibration's
    host_bytes: float | None = None  # per node; None: not checked
    intra_bw: float | None = None  # bytes/s per GPU inside a node (collective bus bandwidth)
    inter_bw: float | None = None  # bytes/s per GPU across nodes
    # bytes/s over a node's host links with all its GPUs copying: a ceiling on the calibration's
    # measured or assumed total (Calibration.host_link_node_total); None: no ceiling
    host_link_node_bw: float | None = None

    def host_link_per_gpu(self, cal) -> float:
        """One GPU's host-link bytes/s while the node's other GPUs copy too (`Calibration.host_link_per_gpu`)."""
        return cal.host_link_per_gpu(self.gpus_per_node, self.host_link_node_bw)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


_TRUE = ("1", "true", "yes", "on")


def step_from_overrides(model: ModelConfig, overrides: list[str], world: int, *, act_bytes: int = 2,
                        cpu: bool = False) -> Step:
    """A `Step` from `--section.key=value` options (a bench point's command line, or `mop train`'s)."""
    from mop.config import RENAMED

    opts = {}
    for item in overrides:
        key, _, value = item.lstrip("-").partition("=")
        # Recorded command lines (bench/results) may predate the nested names: read those too.
        opts[RENAMED.get(key, key)] = value
    g = opts.get
    n_off = int(g("training.offload_checkpoints", "0"))
    spec = g("training.activation_checkpoint", "none")
    if spec.lower() in _TRUE + ("false", "0", "no", "off"):
        spec = "full" if spec.lower() in _TRUE else "none"
    policies = list(parse_policy_spec(spec, model.n_layers))
    if n_off:  # the older option: the first N checkpointed blocks (-1: all) keep their input on the host
        n = model.n_layers if n_off < 0 else min(n_off, model.n_layers)
        policies = ["offload" if i < n and p == "full" else p for i, p in enumerate(policies)]
    layout = LayoutSpec(world, int(g("parallel.seq.degree", 1)), int(g("parallel.experts.degree", 1)),
                        int(g("parallel.vocab.degree", 1)))
    return Step(model=model, layout=layout, seq_len=int(g("training.seq_len", 256)),
                batch_size=int(g("training.batch_size", 4)), grad_accum=int(g("training.grad_accum", 1)),
                policies=tuple(policies), offload=g("optimizer.offload", "none"),
                device_fraction=float(g("optimizer.device_fraction", -1.0)),
                overlap_update=g("optimizer.overlap_update", "true").lower() in _TRUE,
                param_dtype=g("training.param_dtype", "fp32"),
                reduce_dtype=g("parallel.fsdp.reduce_dtype", "auto"),
                reshard_after_forward=g("parallel.fsdp.reshard_after_forward", "true").lower() in _TRUE,
                accumulation=g("parallel.fsdp.accumulation", "reshard"),
                dispatcher=g("parallel.experts.dispatcher", "alltoall"),
                chunk_tokens=int(g("parallel.experts.chunk_tokens", 16384)),
                max_chunks=int(g("parallel.experts.max_chunks", 10)),
                llep_alpha=float(g("parallel.experts.llep_alpha", 1.1)),
                llep_threshold=float(g("parallel.experts.llep_imbalance_threshold", 1.3)),
                head_chunks=int(g("parallel.seq.head_chunks", 1)),
                elementwise_kernels=resolve_elementwise_kernels(g("training.elementwise_kernels", "eager"), cpu),
                act_bytes=act_bytes, cpu=cpu)


def resolve_elementwise_kernels(kernels: str, cpu: bool) -> str:
    """`training.elementwise_kernels` as it runs: "auto" is fused on CUDA, eager on CPU."""
    return ("eager" if cpu else "fused") if kernels == "auto" else kernels


def with_policy(step: Step, policy: str) -> Step:
    """The same step with one policy for every block."""
    return replace(step, policies=(policy,) * step.model.n_layers)


__all__ = ["Step", "Cluster", "POLICIES", "OFFLOADS", "PARAM_DTYPES", "REDUCE_DTYPES", "ACCUMULATIONS", "GIB",
           "parse_policy_spec", "policy_spec", "resolve_elementwise_kernels", "step_from_overrides", "with_policy"]
