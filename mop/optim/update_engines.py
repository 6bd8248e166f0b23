"""How HostAdamW updates a bucket of state: one small class per engine, behind one interface.

`HostAdamW` plans the buckets and owns the bookkeeping (steps, events, streams, the ordered driver
thread); an engine only says where a bucket's update runs and how its bytes move:

* `DeviceEngine` ("device"): the state lives on the device and is updated there. It also updates
  the device-resident share (`device_fraction`) of the other engines.
* `GpuStreamEngine` ("gpu_stream"): (master, exp_avg, exp_avg_sq) stream host->device into
  `staging_slots` device buffers, are updated on the GPU with the gradient, and stream back;
  bucket i+1's upload overlaps bucket i's update (CUDA events order the three side streams).
* `CpuEngine` ("cpu"): gradients go device->host (param dtype), a thread pool runs the fused AdamW
  kernel on slices of the bucket, cast weights go host->device.

A new engine subclasses `UpdateEngine` in its own file and adds one line to
`mop.optim.registry.ENGINES`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mop.optim.buckets import AdamWHyper, Bucket, HostThreadPool, adamw_flat_, record_event

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


@dataclass
class BucketUpdate:
    """Everything one bucket's update of one `step_async` reads."""

    runs: list[list[int]]  # [start, end, step] ranges of the bucket to update
    grads: list  # local gradient of every parameter (None: no gradient)
    locals_: list  # detached local shard of every parameter (written with the new weights)
    has_grad: list[bool]
    hyper: AdamWHyper
    clip_coef: object  # as the device sees it: None, a float or a tensor
    clip_host: object  # as the host sees it (cpu engine)
    clip_event: object  # CUDA event: clip_host's copy is complete
    ready: object  # CUDA event: gradients final on the current stream


class UpdateEngine(ABC):
    """Interface: where an offloaded bucket's update runs. One instance per optimizer.

    `device_resident`: the engine keeps all state on the device (device_fraction is 1).
    `grads_to_host`: the update reads gradients from host memory (`offload_grads` copies them).
    `stages_on_device`: an offloaded bucket's state is staged on the device during its update.
    `link_bytes_per_bf16_param`: host<->device bytes each way per offloaded bf16 parameter and step.
    `host_state_seconds_per_byte`: seconds per step that one byte of fp32 state (master, m, v) costs
    when it lives on the host instead of the device; what `mop.memory_budget.split_memory` weighs
    the device share against kept activations by.
    """

    device_resident = False
    grads_to_host = False
    stages_on_device = False
    link_bytes_per_bf16_param = 0
    host_state_seconds_per_byte = 0.0

    def __init__(self, opt):
        self.opt = opt

    def host_staging_bytes(self, offloaded: list[Bucket]) -> int:
        """Host bytes this engine allocates per offloaded bucket besides the state itself."""
        return 0

    def allocate(self, b: Bucket) -> None:
        """Allocate an offloaded bucket's engine buffers (after its state)."""

    def start(self, offloaded: list[Bucket], staging_slots: int, cpu_threads: int) -> None:
        """Create what the engine needs once the buckets are allocated (slots, threads)."""

    def device_bytes(self) -> int:
        """Device bytes of the engine's own buffers."""
        return 0

    @abstractmethod
    def launch(self, b: Bucket, u: BucketUpdate) -> None:
        """Start bucket `b`'s update; set `b.params_ready` (CUDA) or `b.future` (host worker)."""


class DeviceEngine(UpdateEngine):
    """State on the device, updated on the optimizer's update stream (or the driver thread on CPU)."""

    device_resident = True

    def launch(self, b: Bucket, u: BucketUpdate) -> None:
        opt = self.opt

        @torch.no_grad()
        def work():
            grad_flat = opt._gather_grads(b, u.grads, u.has_grad)
            for start, end, step in u.runs:
                adamw_flat_(b.master[start:end], b.exp_avg[start:end], b.exp_avg_sq[start:end],
                            grad_flat[start:end], u.hyper, step, u.clip_coef)
            opt._write_params(b, b.master, u.locals_, u.has_grad)

        if opt._cuda:
            update = opt._streams["update"]
            with torch.cuda.stream(update):
                work()
                opt._record_grads_use(b, u.grads, u.has_grad, update)
                b.params_ready = record_event(update)
        else:
            b.future = opt._driver.submit(work)


class _Slot:
    """One device staging buffer set for the gpu_stream engine."""

    def __init__(self, numel: int, device: torch.device):
        self.tensors = [torch.empty(numel, dtype=torch.float32, device=device) for _ in STATE_KEYS]
        self.free = None  # CUDA event: the last occupant's copy back to the host is done


class GpuStreamEngine(UpdateEngine):
    """Host state streamed through device staging slots and updated on the GPU."""

    stages_on_device = True
    link_bytes_per_bf16_param = 12  # master, exp_avg and exp_avg_sq in fp32
    # In and out over PCIe: pinned copies measured at 55 GB/s each way on H200
    # (bench/results/2026-11-28-session2-1xh200/SUMMARY.md section 5).
    host_state_seconds_per_byte = 2 / 55e9

    def __init__(self, opt):
        super().__init__(opt)
        self.slots: list[_Slot] = []
        self._cursor = 0

    def start(self, offloaded: list[Bucket], staging_slots: int, cpu_threads: int) -> None:
        if offloaded:
            slot_numel = max(b.numel for b in offloaded)
            self.slots = [_Slot(slot_numel, self.opt._device) for _ in range(min(staging_slots, len(offloaded)))]

    def device_bytes(self) -> int:
        return sum(t.nbytes for s in self.slots for t in s.tensors)

    def launch(self, b: Bucket, u: BucketUpdate) -> None:
        opt = self.opt
        slot = self.slots[self._cursor % len(self.slots)]
        self._cursor += 1
        staged = [t[: b.numel] for t in slot.tensors]
        host = [b.master, b.exp_avg, b.exp_avg_sq]

        def update_staged():
            grad_flat = opt._gather_grads(b, u.grads, u.has_grad)
            for start, end, step in u.runs:
                adamw_flat_(*(t[start:end] for t in staged), grad_flat[start:end], u.hyper, step, u.clip_coef)
            opt._write_params(b, staged[0], u.locals_, u.has_grad)

        if not opt._cuda:

            @torch.no_grad()
            def work():
                for dst, src in zip(staged, host):
                    dst.copy_(src)
                update_staged()
                for dst, src in zip(host, staged):
                    dst.copy_(src)

            b.future = opt._driver.submit(work)
            return
        h2d, update, d2h = (opt._streams[k] for k in ("h2d", "update", "d2h"))
        with torch.cuda.stream(h2d):
            for ev in (slot.free, b.host_ready):  # slot emptied; this bucket's last copy-back landed
                if ev is not None:
                    h2d.wait_event(ev)
            for dst, src in zip(staged, host):
                dst.copy_(src, non_blocking=True)
            loaded = record_event(h2d)
        with torch.cuda.stream(update):
            update.wait_event(loaded)
            update_staged()
            opt._record_grads_use(b, u.grads, u.has_grad, update)
            b.params_ready = record_event(update)
        with torch.cuda.stream(d2h):
            d2h.wait_event(b.params_ready)
            for dst, src in zip(host, staged):
                dst.copy_(src, non_blocking=True)
            b.host_ready = slot.free = record_event(d2h)


class CpuEngine(UpdateEngine):
    """Gradients to the host, AdamW on host threads, weights back to the device."""

    grads_to_host = True
    link_bytes_per_bf16_param = 2  # the gradient down, the cast weight up
    # Updated on the host: 2.21 Gparam/s measured on a 16-core H200 host, 12 B of state each (same source).
    host_state_seconds_per_byte = 1 / (12 * 2.21e9)

    def __init__(self, opt):
        super().__init__(opt)
        self.pool: HostThreadPool | None = None

    def host_staging_bytes(self, offloaded: list[Bucket]) -> int:
        total = 0
        for b in offloaded:
            itemsize = torch.empty((), dtype=b.dtype).element_size()
            total += b.numel * itemsize * (2 if self.opt._cuda and b.dtype != torch.float32 else 1)
        return total

    def allocate(self, b: Bucket) -> None:
        pin = self.opt._pin
        b.host_grad = torch.empty(b.numel, dtype=b.dtype, pin_memory=pin)
        if self.opt._cuda and b.dtype != torch.float32:
            b.host_weight = torch.empty(b.numel, dtype=b.dtype, pin_memory=pin)

    def start(self, offloaded: list[Bucket], staging_slots: int, cpu_threads: int) -> None:
        if offloaded:
            self.pool = HostThreadPool(cpu_threads)

    def launch(self, b: Bucket, u: BucketUpdate) -> None:
        missing = [k for k, piece in enumerate(b.pieces) if u.has_grad[piece.param_index] and k not in b.offloaded]
        if missing:
            self.offload_pieces(b, missing, u.grads, u.ready)
        targets = [
            (piece, u.locals_[piece.param_index].view(-1)[piece.param_offset : piece.param_offset + piece.numel])
            for piece in b.pieces
            if u.has_grad[piece.param_index]
        ]
        b.future = self.opt._driver.submit(self._host_update, b, u, targets)

    @torch.no_grad()
    def _host_update(self, b: Bucket, u: BucketUpdate, targets) -> None:
        """Worker-thread body for one bucket: wait for grads, update, send weights."""
        opt = self.opt
        device_ctx = torch.cuda.device(opt._device) if opt._cuda else contextlib.nullcontext()
        with device_ctx:  # CUDA's current device is per thread; this worker must use the params' one
            for ev in (b.grads_ready, u.clip_event, b.host_ready):
                if ev is not None:
                    ev.synchronize()  # host wait, in this worker only
            out = b.host_weight if b.host_weight is not None else b.master

            def update_slice(start, end, step):
                adamw_flat_(b.master[start:end], b.exp_avg[start:end], b.exp_avg_sq[start:end],
                            b.host_grad[start:end], u.hyper, step, u.clip_host)
                if out is not b.master:
                    out[start:end].copy_(b.master[start:end])

            tasks = [
                (lambda s=s, e=e, st=step: update_slice(s, e, st))
                for start, end, step in u.runs
                for s, e in self.pool.slices(start, end)
            ]
            self.pool.run(tasks)
            if not opt._cuda:
                for piece, dst in targets:
                    dst.copy_(b.master[piece.bucket_offset : piece.bucket_offset + piece.numel])
                return
            h2d = opt._streams["h2d"]
            with torch.cuda.stream(h2d):
                h2d.wait_event(u.ready)  # backward may still be reading the old weights
                for piece, dst in targets:
                    dst.copy_(out[piece.bucket_offset : piece.bucket_offset + piece.numel], non_blocking=True)
                b.params_ready = b.host_ready = record_event(h2d)

    def offload_pieces(self, b: Bucket, piece_ids: list[int], grads, ready) -> None:
        """Copy these pieces' gradients into the bucket's host buffer (async on CUDA)."""
        opt = self.opt

        def copy(non_blocking):
            for k in piece_ids:
                piece = b.pieces[k]
                src = grads[piece.param_index].reshape(-1)[piece.param_offset : piece.param_offset + piece.numel]
                b.host_grad[piece.bucket_offset : piece.bucket_offset + piece.numel].copy_(
                    src, non_blocking=non_blocking
                )

        if opt._cuda:
            d2h = opt._streams["d2h"]
            with torch.cuda.stream(d2h):
                d2h.wait_event(ready)
                copy(True)
                for k in piece_ids:
                    grads[b.pieces[k].param_index].record_stream(d2h)
                b.grads_ready = record_event(d2h)
        else:
            copy(False)
        b.offloaded.update(piece_ids)
