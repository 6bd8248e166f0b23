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
"""

from __future__ import annotations

import contextlib
import threading

from torch.utils.checkpoint import checkpoint

_state = threading.local()


def checkpoint_phase() -> str | None:
    """None outside a checkpointed block; "forward" in its forward; "recompute" while it is recomputed."""
    return getattr(_state, "phase", None)


@contextlib.contextmanager
def _phase(name: str):
    prev = getattr(_state, "phase", None)
    _state.phase = name
    try:
        yield
    finally:
        _state.phase = prev


def _contexts():
    return _phase("forward"), _phase("recompute")


def checkpoint_block(fn, *args):
    """Run `fn(*args)` with activation checkpointing (non-reentrant), tagging both passes."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
