"""Per-block activation checkpointing that tells modules which pass they are in.

`checkpoint_block(fn, *args)` is `torch.utils.checkpoint.checkpoint(use_reentrant=False)` whose
forward runs under phase "forward" and whose backward-time recomputation runs under phase
"recompute" (via checkpoint's `context_fn`). A module that already recomputes itself in backward
(the pipelined expert layer) reads `checkpoint_phase()` to avoid redoing its work twice:

* non-reentrant checkpointing backpropagates through the graph of the ORIGINAL forward; the
  recomputation only refills the tensors that graph saved (matched by the order they were saved).
  Its outputs are discarded. A module that keeps its own state for backward (on the autograd
  ctx) and whose output is consumed in the block only by ops that save nothing (the residual
  additions) can therefore skip its work in the recompute pass, as long as it saves the same
  tensors in the same order.

The phase is thread-local: the recomputation runs on the autograd engine's thread.

Per-block policies (`POLICIES`; chosen per block by `Transformer.block_policies`):
* "none": no checkpoint; everything the block's ops save stays until backward.
* "selective": checkpointed, but attention is not recomputed: the attention core keeps its
  kernel's state (q, k, v, output, log-sum-exp) and the recompute pass reuses its output
  (`checkpoint_keeps_attention()`, mop.models.attention_core). Norms, projections, router and
  experts are recomputed. At long context attention is most of the FLOPs; this avoids redoing it
  (and, under Ulysses, its all-to-alls) for about 5 tensors of N x heads x head_dim per block.
* "full": checkpointed; only the block input is kept; attention runs forward twice.
* "offload": "full" with the block input in pinned host memory (mop.models.activation_offload).
"""

from __future__ import annotations

import contextlib
import threading

from torch.utils.checkpoint import checkpoint

_state = threading.local()


POLICIES = ("none", "selective", "full", "offload")


def checkpoint_phase() -> str | None:
    """None outside a checkpointed block; "forward" in its forward; "recompute" while it is recomputed."""
    return getattr(_state, "phase", None)


def checkpoint_keeps_attention() -> bool:
    """Whether the enclosing checkpointed block is "selective" (its attention is not recomputed)."""
    return getattr(_state, "keep_attention", False)


@contextlib.contextmanager
def _phase(name: str, keep_attention: bool):
    prev = getattr(_state, "phase", None), getattr(_state, "keep_attention", False)
    _state.phase, _state.keep_attention = name, keep_attention
    try:
        yield
    finally:
        _state.phase, _state.keep_attention = prev


def checkpoint_block(fn, *args, keep_attention: bool = False):
    """Run `fn(*args)` with activation checkpointing (non-reentrant), tagging both passes.

    `keep_attention`: the "selective" policy (attention cores keep their state, see module doc).
    """
    def contexts():
        return _phase("forward", keep_attention), _phase("recompute", keep_attention)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def parse_policies(spec: str, n_blocks: int | None) -> list[str]:
    """Per-block policies from "full", or "none*4,selective*12,full" (the last segment may omit a count).

    Segments apply in block order; a segment without `*count` takes every block left. Raises
    ValueError naming what is wrong. `n_blocks=None` checks the syntax only.
    """
    out: list[str] = []
    segments = [s.strip() for s in spec.split(",") if s.strip()]
    if not segments:
        raise ValueError(f"empty activation policy {spec!r}; use one of {POLICIES} or e.g. 'selective*12,full'")
    for i, seg in enumerate(segments):
        name, _, count = seg.partition("*")
        if name not in POLICIES:
            raise ValueError(f"activation policy {name!r} in {spec!r} is not one of {POLICIES}")
        if count:
            if not count.isdigit():
                raise ValueError(f"activation policy segment {seg!r}: the count after '*' must be an integer")
            out += [name] * int(count)
        elif i == len(segments) - 1:
            out += [name] * max(0, (n_blocks or 0) - len(out))
        else:
            raise ValueError(f"activation policy segment {seg!r}: only the last segment may omit '*count'")
    if n_blocks is not None and len(out) != n_blocks:
        raise ValueError(f"activation policy {spec!r} names {len(out)} blocks; the model has {n_blocks}")
    return out
