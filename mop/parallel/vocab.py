"""Data-tensor-parallel vocabulary: output head + loss and token embedding (the MoP paper, §3.4).

Both modules keep the original parameter name and full shape: `weight` is a DTensor [V, H] on the
layout's [P, W/P] ("vocab", "vocab_shard") `vocab_mesh` with placements (Shard(0), Shard(0)). So the
vocabulary is first cut into P contiguous blocks (one per position in the vocabulary group, the
contiguous rank block [g*P, (g+1)*P)), and each block is cut again over the W/P ranks of the strided
vocab-shard group. At rest a rank holds H x V/W; on use it all-gathers its block over the vocab-shard
group (H x V/P), uses it, frees it, and in backward reduce-scatters (SUM) the block's gradient back
into `weight.grad` (a DTensor with the same placements).

* `VocabParallelOutputHead`: the loss of this rank's own tokens against all P blocks, assembled
  round a ring over the vocabulary group (`mop.parallel.vocab_ring`); never N x V logits.
* `VocabParallelEmbedding`: looks up this rank's own tokens with two all-to-alls over the
  vocabulary group: token ids go to the rank owning their block, rows come back (backward: row
  gradients go to the owner, which sums them into its block gradient). Chosen over ringing the
  blocks because it moves N x H per rank instead of (P-1)/P x V x H, and N < V at every scale we
  train; it costs one host sync for the split sizes (flagged below).

Tied embeddings: pass the embedding's DTensor `weight` to `VocabParallelOutputHead.from_module(...,
weight=emb.weight)` (or the other way round); both modules then share one parameter and their
gradients add up in `weight.grad`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from mop.distributed import all_gather_into, reduce_scatter_into
from mop.parallel.vocab_ring import (
    SCHEDULES,
    check_loss_inputs,
    chunk_sizes,
    make_ring_plan,
    offsets_of,
    ring_cross_entropy,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "VocabParallelEmbedding",
    "VocabParallelOutputHead",
    "vocab_parallel_cross_entropy",
]

_PLACEMENTS = (Shard(0), Shard(0))


class VocabBlockShards:
    """Geometry of a [V, H] weight on a ("vocab", "vocab_shard") mesh and the gather / reduce-scatter of a block."""

    def __init__(self, mesh: DeviceMesh, vocab_size: int):
        if mesh.mesh_dim_names != ("vocab", "vocab_shard"):
            raise ValueError(f"expected a mesh with dims ('vocab', 'vocab_shard'), got {mesh.mesh_dim_names}")
        self.mesh = mesh
        self.vocab_size = vocab_size
        self.P, self.S = mesh.size(0), mesh.size(1)
        self.vocab_group = mesh.get_group("vocab")
        self.shard_group = mesh.get_group("vocab_shard")
        self.block = mesh.get_local_rank("vocab")  # which vocabulary block this rank computes with
        self.shard = mesh.get_local_rank("vocab_shard")
        self.block_sizes = chunk_sizes(vocab_size, self.P)
        self.block_offsets = offsets_of(self.block_sizes)
        self.block_rows = self.block_sizes[self.block]
        # DTensor nests the second Shard(0) inside the first: torch.chunk of the block over W/P ranks.
        self.part_sizes = chunk_sizes(self.block_rows, self.S)
        self.part_rows = self.part_sizes[self.shard]
        self.part_stride = max(self.part_sizes)

    def gather(self, local_sH: torch.Tensor) -> torch.Tensor:
        """All-gather this rank's block [V/P, H] from the vocab-shard group's pieces [V/W, H]."""
        if self.S == 1:
            return local_sH
        H = local_sH.shape[1]
        out = local_sH.new_empty(self.S * self.part_stride, H)
        if self.part_stride == 0:
            return out
        piece = local_sH
        if self.part_rows != self.part_stride:  # uneven tail: pad to the common piece size
            piece = local_sH.new_zeros(self.part_stride, H)
            piece[: self.part_rows] = local_sH
        all_gather_into(out, piece.contiguous(), group=self.shard_group)
        # torch.chunk pieces are full except a shorter one followed by empty ones, so the
        # concatenation of the unpadded pieces is exactly the padded buffer's prefix.
        return out[: self.block_rows]

    def reduce_scatter(self, grad_block_vH: torch.Tensor) -> torch.Tensor:
        """Sum a block gradient over the vocab-shard group and keep this rank's piece."""
        if self.S == 1:
            return grad_block_vH
        H = grad_block_vH.shape[1]
        if self.part_stride == 0:
            return grad_block_vH.new_zeros(0, H)
        full = grad_block_vH
        if self.block_rows != self.S * self.part_stride:
            full = grad_block_vH.new_zeros(self.S * self.part_stride, H)
            full[: self.block_rows] = grad_block_vH
        out = grad_block_vH.new_empty(self.part_stride, H)
        reduce_scatter_into(out, full.contiguous(), op=dist.ReduceOp.SUM, group=self.shard_group)
        return out[: self.part_rows]

    def local_shape(self, hidden_dim: int) -> tuple[int, int]:
        return (self.part_rows, hidden_dim)


def _make_weight(shards: VocabBlockShards, hidden_dim: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised DTensor parameter [V, H] with this rank's piece allocated (nothing global is built)."""
    local = torch.empty(shards.local_shape(hidden_dim), dtype=dtype, device=device)
    full_shape = torch.Size([shards.vocab_size, hidden_dim])
    dt = DTensor.from_local(local, shards.mesh, _PLACEMENTS, run_check=False, shape=full_shape,
                            stride=(hidden_dim, 1))
    return nn.Parameter(dt)


def _vocab_weight(shards: VocabBlockShards, dim: int, dtype: torch.dtype, device: torch.device | None,
                  shared: nn.Parameter | None) -> nn.Parameter:
    """The module's [V, H] parameter: the `shared` one (tied embeddings, checked) or a new one."""
    if shared is not None:
        _check_shared_weight(shared, shards.mesh, (shards.vocab_size, dim))
        return shared
    return _make_weight(shards, dim, dtype, device or torch.device(shards.mesh.device_type))


def _check_shared_weight(weight, mesh: DeviceMesh, shape) -> None:
    if not isinstance(weight, DTensor) or tuple(weight.placements) != _PLACEMENTS:
        raise ValueError("weight= must be a DTensor parameter with placements (Shard(0), Shard(0)) "
                         "(the weight of another VocabParallel* module)")
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"weight= has shape {tuple(weight.shape)}, the module needs {tuple(shape)}")
    if weight.device_mesh.mesh_dim_names != ("vocab", "vocab_shard") or weight.device_mesh != mesh:
        raise ValueError("weight= must live on the same ('vocab', 'vocab_shard') mesh as this module")


class VocabParallelOutputHead(nn.Module):
    """Output projection + loss with the vocabulary split over the P-group (same forward as `OutputHead`).

    `forward(hidden_NH, labels_N, normalizer) -> loss`: this rank's tokens' CE summed and divided by
    the global `normalizer`. `weight`: DTensor [V, H], placements (Shard(0), Shard(0)) on
    the ("vocab", "vocab_shard") mesh. Build with `from_module`.
    """

    param_dtype: torch.dtype | None = None  # compute dtype (set by parallelize)
    max_strip_elements: int = 2**28  # fp32 logits per strip (tests set fewer to exercise many strips)
    loss_kernels: str = "auto"  # the strip math (mop.ops.cross_entropy.LOSS_KERNELS), as the replaced head's

    def __init__(self, vocab_size: int, dim: int, mesh: DeviceMesh, *, schedule: str = "auto",
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 weight: nn.Parameter | None = None):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.shards = VocabBlockShards(mesh, vocab_size)
        self.weight = _vocab_weight(self.shards, dim, dtype, device, weight)
        self.schedule = schedule

    @classmethod
    def from_module(cls, orig: nn.Module, layout, schedule: str = "auto", *,
                    weight: nn.Parameter | None = None) -> "VocabParallelOutputHead":
        """Replace a (meta-device) `OutputHead` on `layout.vocab_mesh`: same V, H, dtype and loss kernels.

        `weight`: share an existing vocab-parallel DTensor parameter (tied embeddings).
        """
        V, H = orig.weight.shape
        head = cls(V, H, layout.vocab_mesh, schedule=schedule, dtype=orig.weight.dtype, device=layout.device,
                   weight=weight)
        head.loss_kernels = getattr(orig, "loss_kernels", "auto")
        return head

    def late_parameters(self) -> list[nn.Parameter]:
        """Parameters the forward uses last and FSDP's root does not gather: an optimizer update
        overlapped with the next forward (`mop.optim.overlap`) waits for them last."""
        return list(self.parameters())

    def forward(self, hidden_NH: torch.Tensor, labels_N: torch.Tensor, normalizer) -> torch.Tensor:
        check_loss_inputs(hidden_NH, labels_N, normalizer, self.weight.shape[1])
        plan = make_ring_plan(hidden_NH.shape[0], hidden_NH.device, vocab_group=self.shards.vocab_group,
                              vocab_size=self.shards.vocab_size, block_sizes=self.shards.block_sizes,
                              schedule=self.schedule, max_strip_elements=self.max_strip_elements,
                              kernels=self.loss_kernels)
        w_local = self.weight.to_local()
        if self.param_dtype is not None:  # mixed precision (set by parallelize): gather in compute dtype
            w_local = w_local.to(self.param_dtype)
        return ring_cross_entropy(hidden_NH, w_local, labels_N, normalizer, plan, self.shards)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.shards.vocab_size}, dim={self.weight.shape[1]}, P={self.shards.P}, "
                f"schedule={self.schedule!r}")


class _VocabParallelLookup(torch.autograd.Function):
    """Embedding rows of this rank's token ids, fetched from the block owners with two all-to-alls."""

    @staticmethod
    def forward(ctx, weight_local_sH, ids_N, shards: VocabBlockShards):
        block_vH = shards.gather(weight_local_sH)
        H, P = weight_local_sH.shape[1], shards.P
        if P == 1:  # the whole table is this rank's block: a plain lookup
            ctx.save_for_backward(ids_N)
            ctx.splits, ctx.shards, ctx.dtype = None, shards, weight_local_sH.dtype
            return block_vH.index_select(0, ids_N)
        chunk = -(-shards.vocab_size // P)  # block b holds ids [b*chunk, (b+1)*chunk)
        owner_N = torch.div(ids_N, chunk, rounding_mode="floor")
        order_N = torch.argsort(owner_N, stable=True)
        send_counts_P = torch.bincount(owner_N, minlength=P)
        recv_counts_P = torch.empty_like(send_counts_P)
        dist.all_to_all_single(recv_counts_P, send_counts_P, group=shards.vocab_group)
        # Host sync: all-to-all split sizes must be Python ints.
        send_splits, recv_splits = send_counts_P.tolist(), recv_counts_P.tolist()
        ids_in = ids_N.new_empty(sum(recv_splits))
        dist.all_to_all_single(ids_in, ids_N[order_N].contiguous(), recv_splits, send_splits,
                               group=shards.vocab_group)
        local_ids = ids_in - shards.block_offsets[shards.block]
        rows_in = block_vH.index_select(0, local_ids)
        del block_vH
        rows_out = rows_in.new_empty(ids_N.shape[0], H)
        dist.all_to_all_single(rows_out, rows_in, send_splits, recv_splits, group=shards.vocab_group)
        out_NH = torch.empty_like(rows_out)
        out_NH[order_N] = rows_out
        ctx.save_for_backward(order_N, local_ids)
        ctx.splits, ctx.shards, ctx.dtype = (send_splits, recv_splits), shards, weight_local_sH.dtype
        return out_NH

    @staticmethod
    def backward(ctx, grad_NH):
        shards, H = ctx.shards, grad_NH.shape[1]
        if ctx.splits is None:  # P == 1
            (local_ids,) = ctx.saved_tensors
            grad_in = grad_NH
        else:
            order_N, local_ids = ctx.saved_tensors
            send_splits, recv_splits = ctx.splits
            grad_in = grad_NH.new_empty(local_ids.shape[0], H)
            dist.all_to_all_single(grad_in, grad_NH[order_N].contiguous(), recv_splits, send_splits,
                                   group=shards.vocab_group)
        # Sum repeated ids in fp32: frequent tokens collect thousands of rows.
        acc_dtype = torch.promote_types(ctx.dtype, torch.float32)
        grad_block = torch.zeros(shards.block_rows, H, dtype=acc_dtype, device=grad_NH.device)
        grad_block.index_add_(0, local_ids, grad_in.to(acc_dtype))
        return shards.reduce_scatter(grad_block.to(ctx.dtype)), None, None


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the table split like `VocabParallelOutputHead` (same forward as `nn.Embedding`).

    `forward(tokens) -> x` with `x.shape == tokens.shape + (H,)`; `weight`: DTensor [V, H],
    placements (Shard(0), Shard(0)) on the ("vocab", "vocab_shard") mesh. Build with `from_module`.
    Collective: every rank of the vocabulary group must call forward (and backward) together.
    """

    param_dtype: torch.dtype | None = None  # compute dtype (set by parallelize)

    def __init__(self, vocab_size: int, dim: int, mesh: DeviceMesh, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, weight: nn.Parameter | None = None):
        super().__init__()
        self.shards = VocabBlockShards(mesh, vocab_size)
        self.weight = _vocab_weight(self.shards, dim, dtype, device, weight)

    @classmethod
    def from_module(cls, orig: nn.Module, layout, *, weight: nn.Parameter | None = None) -> "VocabParallelEmbedding":
        """Replace a (meta-device) `nn.Embedding`-like module with param `weight` [V, H] on `layout.vocab_mesh`."""
        if getattr(orig, "padding_idx", None) is not None or getattr(orig, "max_norm", None) is not None:
            raise ValueError("VocabParallelEmbedding supports plain embeddings only (padding_idx=None, max_norm=None)")
        V, H = orig.weight.shape
        return cls(V, H, layout.vocab_mesh, dtype=orig.weight.dtype, device=layout.device, weight=weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        ids_N = tokens.reshape(-1).to(torch.int64)
        w_local = self.weight.to_local()
        if self.param_dtype is not None:  # mixed precision (set by parallelize): rows move in compute dtype
            w_local = w_local.to(self.param_dtype)
        out_NH = _VocabParallelLookup.apply(w_local, ids_N, self.shards)
        return out_NH.view(*tokens.shape, self.weight.shape[1])

    def extra_repr(self) -> str:
        return f"vocab_size={self.shards.vocab_size}, dim={self.weight.shape[1]}, P={self.shards.P}"
