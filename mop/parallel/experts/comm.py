"""Communication primitives of the expert layer (raw, no autograd; the layer's Function orders them).

All collectives of one MoE layer are issued by one `autograd.Function` in a fixed order, so every
rank of a group issues the same sequence regardless of how many tokens it routes: no rank can
skip a backward collective because its part of the graph happened to be empty.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, async_op: bool = False):
    """Variable-size all-to-all of rows of `x` over `group`; returns (out, work or None).

    A group of one is the identity: `x` itself is returned (no copy; callers only read the result),
    which saves one activation-sized buffer per exchange when Ep = 1.
    """
    if dist.get_world_size(group) == 1:
        return x, None
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=async_op)
    return out, work


def shard_sizes(size: int, n: int) -> tuple[list[int], int]:
    """Sizes of `n` shards of a dim of `size` with torch.chunk / DTensor semantics, and the chunk size."""
    cs = math.ceil(size / n) if size else 0
    return [max(0, min(cs, size - q * cs)) for q in range(n)], cs


def _pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def gather_shards(local: torch.Tensor, dim: int, full_size: int, group) -> torch.Tensor:
    """All-gather the shards of `dim` (uneven, torch.chunk semantics) over `group` into the full tensor."""
    n = dist.get_world_size(group)
    if n == 1:
        return local
    sizes, cs = shard_sizes(full_size, n)
    padded = _pad_dim(local.contiguous(), dim, cs)
    bufs = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim=dim)


def reduce_scatter_shards(full: torch.Tensor, dim: int, group) -> torch.Tensor:
    """SUM `full` over `group` and return this rank's shard of `dim` (inverse of `gather_shards`)."""
    n = dist.get_world_size(group)
    if n == 1:
        return full
    q = dist.get_rank(group)
    sizes, cs = shard_sizes(full.shape[dim], n)
    padded = _pad_dim(full, dim, cs * n)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-reduce, keep our shard
        padded = padded.contiguous()
        dist.all_reduce(padded, group=group)
        return padded.narrow(dim, q * cs, sizes[q]).contiguous()
    stacked = torch.stack(padded.split(cs, dim=dim)).contiguous()
    out = stacked.new_empty(stacked.shape[1:])
    dist.reduce_scatter_tensor(out, stacked, group=group)
    return out.narrow(dim, 0, sizes[q]).contiguous()


def _pack(ws: list[torch.Tensor], i: int) -> torch.Tensor:
    return torch.cat([w[i].reshape(-1) for w in ws])


def _unpack_into(flat: torch.Tensor, outs: list[torch.Tensor], i: int) -> None:
    off = 0
    for o in outs:
        n = o[i].numel()
        o[i].copy_(flat[off:off + n].view_as(o[i]))
        off += n


def _p2p(ops: list) -> None:
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def send_expert_weights(home: list[torch.Tensor], transfers: list[tuple[int, int]], foreign: list[int],
                        me: int, experts_per_rank: int, group) -> list[torch.Tensor]:
    """Point-to-point: home ranks send spilled experts' full weights to helpers.

    `home` are this rank's gathered weights ([E_local, ...] each); `transfers` the plan's sorted
    (expert, helper) pairs (group ranks); `foreign` the experts this rank receives, in order.
    Returns the received weights stacked like `home` ([len(foreign), ...] each).
    """
    received = [w.new_empty((len(foreign),) + tuple(w.shape[1:])) for w in home]
    ops, recv_bufs = [], []
    for tag, (e, helper) in enumerate(transfers):
        owner = e // experts_per_rank
        if owner == me:
            peer = dist.get_global_rank(group, helper)
            ops.append(dist.P2POp(dist.isend, _pack(home, e - me * experts_per_rank), peer, group, tag))
        elif helper == me:
            buf = home[0].new_empty(sum(w[0].numel() for w in home))
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, owner), group, tag))
            recv_bufs.append((foreign.index(e), buf))
    _p2p(ops)
    for i, buf in recv_bufs:
        _unpack_into(buf, received, i)
    return received


def return_expert_grads(home_grads: list[torch.Tensor], foreign_grads: list[torch.Tensor],
                        transfers: list[tuple[int, int]], foreign: list[int], me: int, experts_per_rank: int,
                        group) -> None:
    """Backward of `send_expert_weights`: helpers send weight grads back; owners add them in place."""
    ops, recv_bufs = [], []
    for tag, (e, helper) in enumerate(transfers):
        owner = e // experts_per_rank
        if helper == me:
            peer = dist.get_global_rank(group, owner)
            ops.append(dist.P2POp(dist.isend, _pack(foreign_grads, foreign.index(e)), peer, group, tag))
        elif owner == me:
            buf = home_grads[0].new_empty(sum(g[0].numel() for g in home_grads))
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, helper), group, tag))
            recv_bufs.append((e - me * experts_per_rank, buf))
    _p2p(ops)
    for i, buf in recv_bufs:
        off = 0
        for g in home_grads:
            n = g[i].numel()
            g[i].add_(buf[off:off + n].view_as(g[i]))
            off += n
