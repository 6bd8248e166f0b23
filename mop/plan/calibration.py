"""Measured constants of one GPU type: kernel rates, link and host bandwidths, allocator slack.

A calibration is a small JSON file (`mop/plan/calibration/<name>.json`). `mop plan calibrate`
writes one for the machine at hand by running micro-benchmarks (`mop.plan.microbench`); the
shipped `h200.json` holds the H200 numbers measured in bench/results (session 1 and 2), and
`cpu.json` a CPU fallback for tests. The memory factors (`expert_slot_factor`, ...) are fitted to
measured peaks, not derived; each field's comment says where it comes from.

Kernel rates follow a saturating curve, rate(w) = peak * w / (w + half): `half` is the work size
(FLOPs of one call, or rows per expert, or sequence length) at which the kernel reaches half its
peak; small calls are slow, large ones approach the peak.

What a micro-benchmark measures and how much of it a training step gets are kept apart: the rates
are the micro-benchmarks' own, and one in-step efficiency per term (`EFFICIENCIES`: attention,
expert GEMM, dense GEMM, memory-bound work, collective links) scales them where the time model
uses them (`Calibration.in_step`). The efficiencies are fitted to measured steps by `mop plan fit`
(mop.plan.fit), which records in `fit` the points it used and its leave-one-out error; a factor
the measured steps do not determine stays 1.0 (the micro-benchmark as measured).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CALIBRATION_DIR = Path(__file__).parent / "calibration"

# In-step efficiency factors: term -> (the factor's field, the measured rates it multiplies).
EFFICIENCIES = {
    "attention": ("attn_efficiency", ("attn_flops",)),
    "expert": ("expert_efficiency", ("expert_flops",)),
    "gemm": ("gemm_efficiency", ("gemm_flops",)),  # the dense GEMMs and the vocabulary's
    "memory": ("memory_efficiency", ("hbm_bw",)),  # memory-bound work, FSDP's copies, device optimizer
    "link": ("link_efficiency", ("intra_bw", "alltoall_bw", "inter_bw")),  # every collective
}


@dataclass(frozen=True)
class Calibration:
    """Constants of one GPU type (rates in FLOP/s and bytes/s; sizes in bytes)."""

    name: str = "h200"
    device_name: str = "NVIDIA H200"
    device_bytes: float = 150_000_000_000.0  # torch.cuda.get_device_properties().total_memory
    peak_flops: float = 989e12  # dense bf16 peak used for MFU
    gemm_flops: float = 800e12  # bf16 torch.matmul, large shapes
    gemm_half: float = 2e10  # FLOPs of one GEMM call at which it runs at half `gemm_flops`
    attn_flops: float = 650e12  # cuDNN causal SDPA, long sequences (forward FLOPs counted causal)
    attn_half_seq: float = 2048.0  # sequence length at half `attn_flops`
    attn_bwd_ratio: float = 3.2  # backward time / forward time of the attention kernel (fitted: 1xH200 32K, 128K)
    expert_flops: float = 420e12  # torch._grouped_mm at qwen3 widths, many rows per expert
    # Routed rows per expert at half `expert_flops`. The grouped GEMMs took the same time at 512 and
    # 1024 rows per expert (same FLOPs: 106.0 ms in session 5's 8K profile with Ep = 1,
    # f-experts-as-dense/f8k; 108.2 ms at Ep = 2 in session 4's e-8k-profile-after), and 416 TFLOP/s
    # at 2048 rows on 1xH200 (32K profile, 95.2 ms): half at 32 rows fits both (it was 256).
    expert_half_rows: float = 32.0
    hbm_bw: float = 4.2e12  # device memory bandwidth (elementwise work)
    elementwise_factor: float = 42.0  # memory-bound bytes moved per step / bytes a "none" block saves (fitted)
    # With fused elementwise kernels (mop.ops.fused), the share of that memory-bound time left: the
    # non-GEMM bytes per token of a qwen3-30b-a3b block, fused over op by op (0.64 / 1.66 MB,
    # forward + backward, 2,048 tokens in bf16, `python -m mop.bench.ledger`; RMSNorm fused either way).
    # Counted, not measured: to be replaced by the measured ratio of `python -m mop.bench.block`.
    fused_elementwise_ratio: float = 0.38
    # Device idle (host-bound) per step (the step boundary: loss and grad-norm syncs, the optimizer's
    # launches), per block and pass of an expert layer with a dispatcher (its plan's host sync drains
    # the launch queue), and per block and pass otherwise. Session 4's 8K profile after the split
    # (e-8k-profile-after) has ~99 ms idle in a 0.81 s step of 96 block-passes; the 1xH200 8K points
    # (16 block-passes) leave 64 ms: 0.44 ms per block-pass and 57 ms per step, both with a
    # dispatcher. Session 5's 8K profile with the experts sharded as dense, no dispatcher
    # (2026-11-30-session5-2xh200/f-experts-as-dense/f8k), idles 58.8 ms at 96 block-passes: the
    # step's 57 ms, nothing per block beyond the dispatcher's sync.
    layer_overhead_s: float = 0.0
    dispatcher_sync_s: float = 0.00044
    step_overhead_s: float = 0.057
    intra_bw: float = 330e9  # NVLink collective bus bandwidth per GPU (all-gather)
    alltoall_bw: float = 250e9  # NVLink all-to-all per GPU
    inter_bw: float = 50e9  # across nodes per GPU (400 Gb/s InfiniBand)
    h2d_bw: float = 55e9  # pinned host<->device, one GPU alone
    h2d_node_bw: float = 153e9  # pinned host<->device, `h2d_node_gpus` GPUs of a node at once (total)
    # How many GPUs were copying at once when `h2d_node_bw` was measured (`mop plan calibrate` under
    # torchrun: its LOCAL_WORLD_SIZE). The total is a measurement for nodes of at most that many
    # GPUs only (`host_link_per_gpu`). 0: not recorded (files before this field): the total is
    # taken for a node of any size, as it was then.
    h2d_node_gpus: int = 0
    host_adam_cpu: float = 2.2e9  # params/s, cpu engine (host AdamW, 16 cores)
    host_adam_stream: float = 3.95e9  # params/s, gpu_stream engine, one GPU
    device_adam_bytes: float = 36.0  # bytes of device traffic per parameter of fused AdamW (fitted: 26 ms/3.1B)
    # The host optimizer's update of its device share, in bytes per parameter at `hbm_bw`: gradients
    # gathered to fp32, fused AdamW on (master, m, v), weights written back (~40 B moved); measured
    # 81.4 ms of _fused_adamw_ + 35.4 ms of copies for 7.79 B parameters (e-8k-profile-after).
    device_master_update_bytes: float = 63.0
    allocator_slack: float = 0.10  # reserved / allocated - 1 (expandable segments; measured 0.03-0.11)
    # live bytes per routed slot / ((H + 3I) * act_bytes), all-to-all send/receive copies included
    # (fitted on the 1xH200 expert-layer benchmark before Ep = 1 became the identity; memory.py
    # removes the copies at Ep = 1)
    expert_slot_factor: float = 4.4
    expert_token_factor: float = 2.0  # live bytes per token / (k * H * act_bytes), pipelined (fitted)
    strip_bytes_per_element: float = 6.0  # loss strip: bf16 logits + fp32 math + bf16 gradient (fitted)
    host_process_bytes: float = 2.2e9  # host RSS of one rank before any pinned state (measured)
    # In-step efficiency per term (`EFFICIENCIES`): the share of the rate above that a training step
    # achieves. 1.0: the micro-benchmark as measured. Fitted by `mop plan fit`; `mop plan calibrate`
    # carries them over from the shipped calibration of the same device type.
    attn_efficiency: float = 1.0
    expert_efficiency: float = 1.0
    gemm_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    link_efficiency: float = 1.0
    # What `mop plan fit` did: the factors it fitted, the points it fitted them on (and those it left
    # out, with why), its in-sample and leave-one-out errors. Empty: never fitted.
    fit: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # field -> where its value comes from, where that needs saying

    def host_link_node_total(self, gpus_per_node: int, node_ceiling: float | None = None) -> float:
        """Bytes/s over the host links of a node whose `gpus_per_node` GPUs all copy at once.

        Up to `h2d_node_gpus` GPUs: the measured total. A larger node's total is not measured: each
        GPU is assumed to get its own link at the one-GPU rate (`h2d_bw` x the GPUs), since a total
        measured on fewer GPUs says nothing of how a bigger node's links are shared. `node_ceiling`
        (bytes/s, `mop plan --host-link-node-bw`) caps the total of any node: the user's knowledge
        of their node's PCIe switches, host memory or sockets.
        """
        if not self.h2d_node_gpus or gpus_per_node <= self.h2d_node_gpus:
            total = self.h2d_node_bw
        else:
            total = self.h2d_bw * gpus_per_node
        return min(total, node_ceiling) if node_ceiling else total

    def host_link_per_gpu(self, gpus_per_node: int, node_ceiling: float | None = None) -> float:
        """Bytes/s of one GPU's host link while the node's other GPUs copy too (`host_link_node_total`
        shared evenly, at most the one-GPU rate)."""
        return min(self.h2d_bw, self.host_link_node_total(gpus_per_node, node_ceiling) / gpus_per_node)

    def host_link_basis(self, gpus_per_node: int, node_ceiling: float | None = None) -> str:
        """Where `host_link_node_total` comes from for this node, in words (for reports)."""
        total = self.host_link_node_total(gpus_per_node) / 1e9
        if node_ceiling and node_ceiling < total * 1e9:
            return f"{node_ceiling / 1e9:.0f} GB/s per node: the given ceiling (--host-link-node-bw)"
        if not self.h2d_node_gpus:
            return f"{total:.0f} GB/s per node: the calibration's total (GPU count not recorded)"
        if gpus_per_node <= self.h2d_node_gpus:
            return f"{total:.0f} GB/s per node: measured with {self.h2d_node_gpus} GPUs copying at once"
        return (f"{total:.0f} GB/s per node: assumed, not measured ({gpus_per_node} GPUs x {self.h2d_bw / 1e9:.0f} "
                f"GB/s, one link each; measured only with {self.h2d_node_gpus} GPUs; --host-link-node-bw caps it)")

    def efficiencies(self) -> dict[str, float]:
        """The in-step efficiency of each term (`EFFICIENCIES`' names)."""
        return {term: getattr(self, name) for term, (name, _) in EFFICIENCIES.items()}

    def with_efficiencies(self, factors: dict[str, float]) -> "Calibration":
        """The same calibration with these terms' efficiencies (`{"attention": 0.66}`)."""
        unknown = sorted(set(factors) - set(EFFICIENCIES))
        if unknown:
            raise ValueError(f"efficiency terms {unknown} unknown; known: {sorted(EFFICIENCIES)}")
        return dataclasses.replace(self, **{EFFICIENCIES[t][0]: float(f) for t, f in factors.items()})

    def in_step(self) -> "Calibration":
        """The rates a training step achieves: each measured rate times its term's efficiency (the
        efficiencies then 1.0, so applying this twice changes nothing)."""
        changes = {}
        for name, rates in EFFICIENCIES.values():
            factor = getattr(self, name)
            changes[name] = 1.0
            for rate in rates:
                changes[rate] = getattr(self, rate) * factor
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"calibration: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path_or_name: str | Path) -> "Calibration":
        """A calibration file by path, or by name from mop/plan/calibration/ ("h200", "cpu")."""
        path = Path(path_or_name)
        if not path.suffix:
            path = CALIBRATION_DIR / f"{path_or_name}.json"
        if not path.is_file():
            names = sorted(p.stem for p in CALIBRATION_DIR.glob("*.json"))
            raise FileNotFoundError(f"calibration {path_or_name!r} not found; shipped: {names}, or a path to a .json")
        return cls.from_dict(json.loads(path.read_text()))


def for_device(device_name: str | None) -> Calibration:
    """The shipped calibration whose `device_name` matches (H200 by default)."""
    for path in sorted(CALIBRATION_DIR.glob("*.json")):
        cal = Calibration.load(path)
        if device_name and cal.device_name.lower() in device_name.lower():
            return cal
    return Calibration.load("h200")
