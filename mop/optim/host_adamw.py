"""HostAdamW: AdamW whose fp32 state lives in (pinned) host memory and updates in pipelined buckets.

The MoP paper, §3.5. The device keeps only the model's parameters (bf16 or fp32) and their gradients; for
every parameter's local shard the optimizer keeps fp32 master weights, exp_avg and exp_avg_sq. The
first `device_fraction` of that state (by numel, parameter order) stays on the device; the rest is
offloaded and updated, bucket by bucket in parameter order, by the engine named in
`mop.optim.registry.ENGINES` (`mop.optim.update_engines`):

- "cpu": gradients go device->host (param dtype, so 2 B/param for bf16), a thread pool runs the
  fused AdamW kernel on slices of the bucket, cast weights go host->device.
- "gpu_stream": (master, exp_avg, exp_avg_sq) stream host->device into `staging_slots` device
  buffers, are updated on the GPU with the gradient, and stream back; bucket i+1's upload overlaps
  bucket i's update (CUDA events order the three side streams; no host syncs in the loop).
- "device": everything on the device (device_fraction = 1).

`step()` is a complete update. `step_async()` starts it and returns; `wait_params(params)` orders
the current stream after those parameters' writes (CUDA) or waits for the worker (CPU), and
`synchronize()` waits for all. `offload_grads_async(params)` lets backward hooks start gradient
copies early. Every public method first waits for what it depends on, so skipping the optional
calls costs overlap, never correctness.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from mop.optim.buckets import (
    Bucket,
    as_param_layout,
    check_clip,
    check_host_memory,
    check_hyper,
    group_hyper,
    plan_buckets,
    record_event,
    shards_device,
)
from mop.distributed import local_shard
from mop.optim.registry import ENGINES, engine_class
from mop.optim.update_engines import STATE_KEYS, BucketUpdate, DeviceEngine


class HostAdamW(torch.optim.Optimizer):
    """Decoupled AdamW (torch.optim.AdamW semantics) with host-resident fp32 state; see module doc.

    `params` may be parameters, `(name, parameter)` pairs (e.g. `model.named_parameters()`) or
    param-group dicts. Parameters may be FSDP2 DTensors: each rank keeps state for its local shard.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        engine: str = "cpu",
        device_fraction: float = 0.0,
        bucket_numel: int = 2**25,
        staging_slots: int = 2,
        cpu_threads: int | None = None,
        pin_memory: bool = True,
        update_order=None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: expected one of {tuple(ENGINES)}")
        if not 0.0 <= device_fraction <= 1.0:
            raise ValueError(f"device_fraction={device_fraction}: expected a number in [0, 1]")
        if int(bucket_numel) < 1:
            raise ValueError(f"bucket_numel={bucket_numel}: expected a positive element count")
        if int(staging_slots) < 1:
            raise ValueError(f"staging_slots={staging_slots}: expected at least 1")
        if cpu_threads is not None and int(cpu_threads) < 1:
            raise ValueError(f"cpu_threads={cpu_threads}: expected None (auto) or at least 1")
        check_hyper(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.engine = engine
        self._engine = engine_class(engine)(self)
        self._device_engine = DeviceEngine(self)  # updates the device-resident share of any engine
        self.bucket_numel = int(bucket_numel)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index_of = {p: i for i, p in enumerate(self._params)}
        if len(self._index_of) != len(self._params):
            raise ValueError("params: a parameter appears more than once across the param groups")
        group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        locals_ = [local_shard(p) for p in self._params]
        self._device = shards_device(locals_)
        self._cuda = self._device.type == "cuda"
        numels = [t.numel() for t in locals_]
        fraction = 1.0 if self._engine.device_resident else float(device_fraction)
        self._device_numel = round(fraction * sum(numels))
        order = None
        if update_order is not None:  # e.g. forward order, so the next forward waits least (overlap.py)
            order = [self._index_of.get(p, -1) for p in update_order]
            if sorted(order) != list(range(len(self._params))):
                raise ValueError("update_order must list every parameter of the param groups exactly once")
        self._buckets = plan_buckets(
            numels, group_of, [t.dtype for t in locals_], self._device_numel, self.bucket_numel, order
        )
        self._buckets_of_param: list[list[int]] = [[] for _ in self._params]
        for b in self._buckets:
            for piece in b.pieces:
                self._buckets_of_param[piece.param_index].append(b.index)
        self._steps = [0] * len(self._params)
        for p in self._params:
            # Non-empty state tells torch.distributed.checkpoint not to run a warm-up step.
            self.state[p] = {"layout": "HostAdamW"}
        offloaded = [b for b in self._buckets if not b.on_device]
        self._pin = bool(pin_memory) and torch.cuda.is_available()
        extra = self._engine.host_staging_bytes(offloaded)
        num_offloaded = sum(b.numel for b in offloaded)
        if num_offloaded:
            self.check_host_memory(num_offloaded, 1, bytes_per_param=12, staging_bytes=extra)
        self._allocate(locals_)
        self._streams = {}
        if self._cuda:
            self._streams = {k: torch.cuda.Stream(self._device) for k in ("h2d", "update", "d2h")}
        self._clip_host = torch.zeros((), dtype=torch.float32, pin_memory=self._pin)
        if cpu_threads is None:
            cpu_threads = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.cpu_threads = int(cpu_threads)
        self._engine.start(offloaded, int(staging_slots), self.cpu_threads)
        # One ordered worker: host updates (CPU engine) and, on CPU-only runs, every bucket.
        self._driver = ThreadPoolExecutor(1, thread_name_prefix="host-adamw-driver")
        self._frozen = True

    # ---------------------------------------------------------------- construction helpers
    def add_param_group(self, param_group: dict) -> None:
        """Add a group; only possible during construction because the bucket layout is fixed then."""
        if getattr(self, "_frozen", False):
            raise ValueError("add_param_group: HostAdamW's bucket layout is fixed; pass all groups to the constructor")
        super().add_param_group(param_group)

    def _allocate(self, locals_: list[torch.Tensor]) -> None:
        for b in self._buckets:
            if b.on_device:
                alloc = dict(device=self._device)
            else:
                alloc = dict(device="cpu", pin_memory=self._pin)
            b.master, b.exp_avg, b.exp_avg_sq = (torch.empty(b.numel, dtype=torch.float32, **alloc) for _ in STATE_KEYS)
            b.exp_avg.zero_()
            b.exp_avg_sq.zero_()
            for piece in b.pieces:
                src = (
                    locals_[piece.param_index]
                    .detach()
                    .reshape(-1)[piece.param_offset : piece.param_offset + piece.numel]
                )
                b.master[piece.bucket_offset : piece.bucket_offset + piece.numel].copy_(src)
            if not b.on_device:
                self._engine.allocate(b)

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def step(self, clip_coef: torch.Tensor | float | None = None, closure=None):
        """Run the whole update (gradients scaled by `clip_coef`) and return once the weights are in place."""
        if callable(clip_coef) and closure is None:  # torch-style step(closure)
            clip_coef, closure = None, clip_coef
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_async(clip_coef)
        self.synchronize()
        return loss

    @torch.no_grad()
    def step_async(self, clip_coef: torch.Tensor | float | None = None) -> None:
        """Start the update bucket by bucket in parameter order and return; see `wait_params`."""
        self.synchronize()  # the previous update must be done before its buffers are reused
        # An update was made: what torch's LR schedulers check (`step()` sets it through its wrapper;
        # this entry point bypasses that wrapper), so they do not warn about a step before the update.
        self._opt_called = True
        clip_coef = check_clip(clip_coef)
        grads = [local_shard(p.grad) if p.grad is not None else None for p in self._params]
        # Detached aliases: writes through them are invisible to autograd, in any thread's grad mode.
        locals_ = [local_shard(p).detach() for p in self._params]
        for i, (g, t) in enumerate(zip(grads, locals_)):
            if g is not None and (g.is_sparse or g.shape != t.shape or g.device != t.device):
                raise ValueError(
                    f"params[{i}].grad: expected a dense gradient shaped like the local shard {tuple(t.shape)}"
                )
            if not t.is_contiguous():
                raise ValueError(f"params[{i}]: the local shard became non-contiguous; HostAdamW writes it flat")
        has_grad = [g is not None for g in grads]
        for i, flag in enumerate(has_grad):
            self._steps[i] += int(flag)
        hypers = [group_hyper(g) for g in self.param_groups]
        ready = self._record_ready()
        if self._cuda:
            self._streams["update"].wait_event(ready)
        clip_host, clip_event = self._clip_for_host(clip_coef, ready)
        if not self._cuda:
            clip_coef = clip_host  # a private copy: the caller may change its tensor before the worker runs
        elif isinstance(clip_coef, torch.Tensor) and clip_coef.is_cuda:
            clip_coef.record_stream(self._streams["update"])
        for b in self._buckets:
            runs = self._runs(b, has_grad)
            if runs:
                update = BucketUpdate(runs, grads, locals_, has_grad, hypers[b.group_index], clip_coef, clip_host,
                                      clip_event, ready)
                (self._device_engine if b.on_device else self._engine).launch(b, update)
            b.offloaded.clear()

    def wait_params(self, params) -> None:
        """Block until these parameters hold their updated values (CUDA: the current stream waits)."""
        if isinstance(params, torch.Tensor):
            params = [params]
        for bi in sorted({bi for p in params for bi in self._buckets_of_param[self._param_index(p)]}):
            self._wait_bucket(self._buckets[bi])

    def synchronize(self) -> None:
        """Wait until every parameter holds its updated value (CUDA: the current stream waits)."""
        for b in self._buckets:
            self._wait_bucket(b)

    @torch.no_grad()
    def offload_grads_async(self, params) -> None:
        """Start the device->host copy of these parameters' (final) gradients now (cpu engine).

        The copy is ordered after the work already on the current stream, so call it once the
        gradients' producer is ordered before that stream (with FSDP2: after the reduce-scatter's
        result was waited for). The other engines consume gradients on the device: a no-op for them.
        """
        if not self._engine.grads_to_host:
            return
        if isinstance(params, torch.Tensor):
            params = [params]
        todo: dict[int, list[int]] = {}
        for p in params:
            i = self._param_index(p)
            if p.grad is None:
                continue
            for bi in self._buckets_of_param[i]:
                b = self._buckets[bi]
                if not b.on_device:
                    todo.setdefault(bi, []).extend(
                        k for k, piece in enumerate(b.pieces) if piece.param_index == i and k not in b.offloaded
                    )
        if not todo:
            return
        grads = [local_shard(p.grad) if p.grad is not None else None for p in self._params]
        ready = self._record_ready()
        for bi, pieces in todo.items():
            b = self._buckets[bi]
            self._wait_future(b)  # the previous update may still be reading host_grad
            self._engine.offload_pieces(b, pieces, grads, ready)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, after any in-flight update has finished reading them.

        CUDA with set_to_none: nothing to wait for, since every side-stream use of a gradient was
        recorded with the caching allocator (`record_stream`), which keeps the memory until then;
        so the next forward can start while the update still runs.
        """
        if not self._cuda:
            self.synchronize()
        elif not set_to_none:  # zeroing in place must wait for the side streams' reads
            stream = torch.cuda.current_stream(self._device)
            for b in self._buckets:
                for ev in (b.grads_ready, b.params_ready):
                    if ev is not None:
                        stream.wait_event(ev)
        super().zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------- small helpers
    def _param_index(self, p) -> int:
        i = self._index_of.get(p)
        if i is None:
            raise ValueError("params: got a tensor that is not one of this optimizer's parameters")
        return i

    def _runs(self, b: Bucket, has_grad: list[bool]) -> list[list[int]]:
        """Maximal [start, end, step] ranges of the bucket whose params have grads and share a step."""
        runs: list[list[int]] = []
        for piece in b.pieces:
            if not has_grad[piece.param_index]:
                continue
            step = self._steps[piece.param_index]
            if runs and runs[-1][1] == piece.bucket_offset and runs[-1][2] == step:
                runs[-1][1] += piece.numel
            else:
                runs.append([piece.bucket_offset, piece.bucket_offset + piece.numel, step])
        return runs

    def _gather_grads(self, b: Bucket, grads, has_grad) -> torch.Tensor:
        """The bucket's gradients as one fp32 flat tensor on the device (pieces without grads unset)."""
        flat = torch.empty(b.numel, dtype=torch.float32, device=self._device)
        for piece in b.pieces:
            if has_grad[piece.param_index]:
                src = grads[piece.param_index].reshape(-1)[piece.param_offset : piece.param_offset + piece.numel]
                flat[piece.bucket_offset : piece.bucket_offset + piece.numel].copy_(src)
        return flat

    def _write_params(self, b: Bucket, master_flat: torch.Tensor, locals_, has_grad) -> None:
        for piece in b.pieces:
            if has_grad[piece.param_index]:
                dst = locals_[piece.param_index].view(-1)[piece.param_offset : piece.param_offset + piece.numel]
                dst.copy_(master_flat[piece.bucket_offset : piece.bucket_offset + piece.numel])

    def _record_grads_use(self, b: Bucket, grads, has_grad, stream) -> None:
        """Tell the caching allocator these grads are in use on `stream` (they may be freed meanwhile)."""
        for i in {piece.param_index for piece in b.pieces if has_grad[piece.param_index]}:
            grads[i].record_stream(stream)

    def _record_ready(self):
        """CUDA: an event on the current stream after the grads (and clip coefficient) are final."""
        return record_event(torch.cuda.current_stream(self._device)) if self._cuda else None

    def _clip_for_host(self, clip_coef, ready):
        """The clip coefficient as the host engine sees it, plus the event its copy completes on."""
        if not isinstance(clip_coef, torch.Tensor):
            return clip_coef, None
        if not clip_coef.is_cuda:
            return clip_coef.detach().to(torch.float32).reshape(()).clone(), None
        d2h = self._streams["d2h"]
        with torch.cuda.stream(d2h):
            d2h.wait_event(ready)
            self._clip_host.copy_(clip_coef.detach().reshape(()), non_blocking=True)
            clip_coef.record_stream(d2h)
            return self._clip_host, record_event(d2h)

    def _wait_future(self, b: Bucket) -> None:
        future, b.future = b.future, None
        if future is not None:
            future.result()  # host wait; re-raises a worker's exception

    def _wait_bucket(self, b: Bucket) -> None:
        self._wait_future(b)
        if self._cuda and b.params_ready is not None:
            torch.cuda.current_stream(self._device).wait_event(b.params_ready)

    def _quiesce(self) -> None:
        """Wait until no stream or thread touches the host buffers (host sync on CUDA)."""
        self.synchronize()
        for stream in self._streams.values():
            stream.synchronize()

    # ---------------------------------------------------------------- memory accounting
    def host_memory_bytes(self) -> int:
        """Bytes of the offloaded state and host staging buffers this optimizer allocated."""
        total = self._clip_host.nbytes
        for b in self._buckets:
            if not b.on_device:
                total += sum(
                    t.nbytes for t in (b.master, b.exp_avg, b.exp_avg_sq, b.host_grad, b.host_weight) if t is not None
                )
        return total

    def device_memory_bytes(self) -> int:
        """Bytes of device-resident state, staging slots and the largest transient gradient gather.

        On a CPU-only run the "device" is host memory too; the split still reports the two roles.
        """
        total = self._engine.device_bytes()
        device_side = [b for b in self._buckets if b.on_device or self._engine.stages_on_device]
        total += sum(t.nbytes for b in self._buckets if b.on_device for t in (b.master, b.exp_avg, b.exp_avg_sq))
        if device_side:
            total += 4 * max(b.numel for b in device_side)
        return total

    # Raise ValueError unless local_ranks x (params x bytes_per_param + staging) fits in host memory
    # (MemAvailable by default); returns the bytes needed. Usable before any optimizer exists.
    check_host_memory = staticmethod(check_host_memory)

    # ---------------------------------------------------------------- checkpointing
    @torch.no_grad()
    def state_dict(self) -> dict:
        """Torch-format state: per param index {step, master, exp_avg, exp_avg_sq} for the local shard.

        DTensor parameters get DTensor state with the same mesh/placements, so
        `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` and DCP resharding work.
        Tensors are views of the live buffers where a parameter sits in one bucket (as in torch).
        """
        self._quiesce()
        state = {}
        for i, p in enumerate(self._params):
            entry = {"step": torch.tensor(float(self._steps[i]), dtype=torch.float32)}
            for key in STATE_KEYS:
                entry[key] = as_param_layout(p, self._gather_state(i, key))
            state[i] = entry
        groups, offset = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(offset, offset + len(g["params"])))
            offset += len(g["params"])
            groups.append(packed)
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` (possibly reloaded through DCP) and write the masters into the params."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                "load_state_dict: expected a dict with 'state' and 'param_groups' (from HostAdamW.state_dict())"
            )
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                f"load_state_dict: saved group sizes {[len(g['params']) for g in saved_groups]} do not match "
                f"this optimizer's {[len(g['params']) for g in self.param_groups]}"
            )
        self._quiesce()
        saved_ids = [pid for g in saved_groups for pid in g["params"]]
        for i, pid in enumerate(saved_ids):
            entry = state_dict["state"].get(pid)
            if entry is None:
                continue
            for key in STATE_KEYS:
                if key in entry:
                    self._scatter_state(i, key, local_shard(entry[key]))
            if "step" in entry:
                step = entry["step"]
                self._steps[i] = int(local_shard(step).item() if isinstance(step, torch.Tensor) else step)  # host read
        for g, saved in zip(self.param_groups, saved_groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        locals_ = [local_shard(p).detach() for p in self._params]
        for b in self._buckets:
            self._write_params(b, b.master, locals_, [True] * len(self._params))
        if self._cuda:
            torch.cuda.current_stream(self._device).synchronize()  # host buffers may be reused right after

    def _pieces_of(self, i: int):
        return [
            (self._buckets[bi], piece)
            for bi in self._buckets_of_param[i]
            for piece in self._buckets[bi].pieces
            if piece.param_index == i
        ]

    def _gather_state(self, i: int, key: str) -> torch.Tensor:
        shape = local_shard(self._params[i]).shape
        parts = [
            getattr(b, key)[piece.bucket_offset : piece.bucket_offset + piece.numel] for b, piece in self._pieces_of(i)
        ]
        if not parts:
            return torch.zeros(shape, dtype=torch.float32, device=self._device)
        if len(parts) == 1:
            return parts[0].view(shape)
        if len({t.device for t in parts}) > 1:
            parts = [t.cpu() for t in parts]
        return torch.cat(parts).view(shape)

    def _scatter_state(self, i: int, key: str, value: torch.Tensor) -> None:
        flat = value.reshape(-1)
        numel = local_shard(self._params[i]).numel()
        if flat.numel() != numel:
            raise ValueError(
                f"load_state_dict: state[{i}][{key!r}] has {flat.numel()} elements, the local shard has {numel}"
            )
        for b, piece in self._pieces_of(i):
            dst = getattr(b, key)[piece.bucket_offset : piece.bucket_offset + piece.numel]
            src = flat[piece.param_offset : piece.param_offset + piece.numel]
            if dst.data_ptr() != src.data_ptr() or dst.device != src.device:
                dst.copy_(src)
