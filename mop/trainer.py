"""The training loop: data, model build (meta -> parallelize -> materialise), AdamW, schedule,
gradient accumulation, clipping, metrics and checkpoints. One code path for 1 CPU process, one GPU
and N ranks under torchrun."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.profiler import record_function

from mop.checkpoint import (CheckpointManager, RunDir, RunDirError, Stateful, agree, check_same_model, rng_state,
                            set_rng_state)
from mop.config import JobConfig
from mop.distributed import ProcessInfo, init_process, local_shard
from mop.guard import NonFiniteError, NonFiniteGuard  # noqa: F401 (NonFiniteError: re-exported for callers)
from mop.metrics import (MetricsLogger, Throughput, describe_phases, device_memory, host_rss_bytes, memory_snapshot,
                         step_profiler)
from mop.models.transformer import Transformer
from mop.parallel.parallelize import apply_activation_policy, set_accumulation_phase
from mop.strategies import MoPStrategy


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store every parameter (not the buffers: routing counts and biases stay fp32) in `dtype`, on
    the meta device before sharding; a parameter shared by two modules (tied embeddings) stays one."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.dtype == dtype:
                continue
            if id(p) not in done:
                done[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]


class _PhaseTimer:
    def __init__(self, into: dict[str, float], name: str, device: torch.device):
        self.into, self.name, self.device = into, name, device

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if exc[0] is None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.into[self.name] = time.perf_counter() - self.t0


@dataclass
class TrainResult:
    """What a run produced (for callers and tests)."""

    history: list[dict] = field(default_factory=list)
    captured_grads: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Trainer:
    """Builds everything from a `JobConfig` and trains. Works in-process under an existing group."""

    def __init__(self, job: JobConfig, proc: ProcessInfo | None = None, strategy=None):
        started = time.perf_counter()
        # Seconds per start-up phase (printed once built; `mop bench` records them): on a GPU, start-up
        # of a large model takes minutes, and which phase takes them decides what to shorten.
        self.startup_s: dict[str, float] = {}
        self.proc = proc or init_process(job.training.device)
        self.device = self.proc.device
        # How the model is laid out and reduced (mop.strategies): the MoP layout unless told otherwise.
        self.strategy = strategy or MoPStrategy()
        self.strategy.validate(job, self.proc)
        self.plan_overrides: list[str] = []  # what parallel.plan=auto applied (recorded by `mop bench`)
        if job.parallel.plan == "auto":
            with self._phase("plan"):
                job = self._apply_plan(job)
        self.job = job
        t = job.training
        if t.param_dtype == "bf16" and t.grad_accum > 1 and self.proc.is_main:
            print(f"mop: warning: training.param_dtype=bf16 with grad_accum={t.grad_accum}: gradients accumulate "
                  "over the micro-batches in bf16 (the fp32 master weights are updated from that sum)", flush=True)
        self.spec = job.parallel.layout_spec(self.proc.world)
        self.spec.validate_model(n_heads=job.model.n_heads, n_kv_heads=job.model.n_kv_heads,
                                 n_experts=job.model.n_experts, seq_len=t.seq_len)
        # GPUs always take the sharded path (FSDP2 mixed precision, also on one GPU); one CPU process
        # runs the plain model in fp32.
        self.sharded = self.proc.world > 1 or self.device.type == "cuda"
        if self.sharded and not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                from mop.launch import _free_port

                os.environ["MASTER_PORT"] = str(_free_port())
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=0, world_size=1)
        dtype = t.dtype if t.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        torch.manual_seed(t.seed)
        self.strategy.check_memory(self)

        self.loader = self.strategy.build_loader(self)
        self.ckpt = CheckpointManager(job.logging.run_dir, keep=job.checkpoint.keep)
        self._tell = self._print_main  # rank 0's console messages (train() routes them around the progress bar)
        self.run_dir = RunDir(job.logging.run_dir)
        self._open_run_dir()
        resume_from = self._find_resume_checkpoint()  # verified before anything large is allocated
        self.startup_s["setup"] = time.perf_counter() - started - self.startup_s.get("plan", 0.0)
        with self._phase("model"):
            self.model = self.strategy.build_model(self) or self._build_model()
        with self._phase("memory_plan"):
            self._plan_memory()
        with self._phase("optimizer"):
            self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))
        self.step = 0
        self.clip_coef = None  # set per step when the host optimizer folds clipping into its update
        self.guard = NonFiniteGuard(t.nonfinite, self.proc.rank, self.proc.world, self.device, self._all_reduce,
                                    lambda text: self._tell(text))
        if resume_from is not None:
            with self._phase("resume"):
                self.load_checkpoint(resume_from)
        self.startup_s["total"] = time.perf_counter() - started
        if self.proc.is_main and self.device.type == "cuda":
            self._print_main("mop: start-up " + describe_phases(self.startup_s))

    def _phase(self, name: str):
        """Time one start-up phase into `startup_s[name]` (device work included: it syncs at the end)."""
        return _PhaseTimer(self.startup_s, name, self.device)

    # -- run directory and resume checks -----------------------------------------------------------
    def _print_main(self, text: str) -> None:
        if self.proc.is_main:
            print(text, flush=True)

    def _open_run_dir(self) -> None:
        """Rank 0 checks the run directory (writable, not locked, not another run's) and takes its lock;
        every rank raises the same RunDirError, so none waits for a peer that gave up."""
        error = None
        if self.proc.is_main:
            try:
                self.run_dir.check(resume=self.job.checkpoint.resume)
            except RunDirError as e:
                error = str(e)
        error = agree(error)
        if error:
            raise RunDirError(error)

    def _find_resume_checkpoint(self):
        """The newest checkpoint that verifies and holds this model, or None (said aloud) when there is none."""
        if not self.job.checkpoint.resume:
            return None
        try:
            path = self.ckpt.latest_verified(log=self._tell)
            if path is not None:
                check_same_model(path, dataclasses.asdict(self.job.model))
        except BaseException:
            self.run_dir.unlock()  # refused: the directory is free again at once, not when this object is collected
            raise
        if path is None:
            self._tell(f"mop: checkpoint.resume=true, but {self.ckpt.root} holds no checkpoint yet: starting from step 0")
        return path

    # -- construction ------------------------------------------------------------------------------
    def _apply_plan(self, job: JobConfig) -> JobConfig:
        """`parallel.plan = "auto"`: `mop plan`'s fastest configuration that fits this machine.

        Every rank runs the same deterministic search on the same inputs, so all apply the same
        choice without communicating. The tokens per step are kept (the plan derives the batch and
        accumulation for its D). CPU runs plan with the CPU calibration and host-only optimizers.
        Options left "auto" in the job (activation policy, optimizer device share) are measured at
        start-up instead of taken from the prediction.
        """
        from mop.config import apply_overrides
        from mop.optim.registry import offload_choices
        from mop.plan import Calibration, for_device, plan_for_job

        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            cal, offloads, device_bytes = for_device(props.name), offload_choices(), props.total_memory
        else:
            cal, offloads, device_bytes = Calibration.load("cpu"), offload_choices(host_only=True), None
        from mop.plan.step import resolve_elementwise_kernels

        kernels = resolve_elementwise_kernels(job.training.elementwise_kernels, cpu=self.device.type != "cuda")
        plan = plan_for_job(job, self.proc.world, gpus_per_node=self.proc.local_world, calibration=cal,
                            offloads=offloads, device_bytes=device_bytes, host_bytes=self._node_host_bytes(),
                            elementwise_kernels=kernels)
        overrides = plan.best.step.overrides() + ["--parallel.plan=none"]
        # Measured beats predicted: an "auto" activation policy or optimizer device share stays for
        # the start-up probe to decide (mop.memory_budget) within the planned layout.
        keep = {"training.activation_checkpoint": job.training.activation_checkpoint == "auto",
                "optimizer.device_fraction": job.optimizer.device_fraction < 0}
        overrides = [o for o in overrides if not keep.get(o[2:].split("=", 1)[0], False)]
        if self.proc.is_main:
            print(f"mop: parallel.plan=auto chose {' '.join(overrides[:-1])} (predicted "
                  f"{plan.best.time.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
                  f"{plan.best.memory.reserved / 2**30:.1f} GiB per GPU)", flush=True)
        self.plan_overrides = overrides[:-1]
        return apply_overrides(job, overrides)

    def _node_host_bytes(self) -> float | None:
        """Host memory a plan may fill on each node: 95% of what is available now (before this job
        pins anything), the least over all nodes, in whole GiB so that every rank searches with the
        same number (the plan is chosen by each rank alone). None where it cannot be read."""
        from mop.optim.buckets import host_available_bytes

        avail = host_available_bytes()
        gib = float(-1 if avail is None else (0.95 * avail) // 2**30)
        if dist.is_initialized() and self.proc.world > 1:
            t = torch.tensor([gib if gib >= 0 else float("inf")], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            gib = t.item()
        return None if gib < 0 or math.isinf(gib) else gib * 2**30

    def _build_model(self) -> Transformer:
        from mop.parallel.weight_init import init_weights_sharded

        job = self.job
        with torch.device("meta"):
            model = Transformer(job.model)
        model.output.loss_kernels = job.training.loss_kernels  # per head, not process-wide
        model.set_elementwise_kernels(job.training.elementwise_kernels)  # per module, before parallelize
        if job.training.param_dtype == "bf16":
            _cast_parameters(model, torch.bfloat16)
        if self.sharded:
            self.strategy.parallelize(self, model)
            model.to_empty(device=self.device)
            self._retie(model)
            ckpt = self._init_checkpoint()
            init_weights_sharded(model, job.training.seed, self.device, values=ckpt and ckpt.tensor,
                                 buffers=ckpt and ckpt.buffer)
        else:
            self.layout = None
            apply_activation_policy(model, job.training.activation_checkpoint)
            model.to_empty(device=self.device)
            self._retie(model)
            ckpt = self._init_checkpoint()
            if ckpt is None:
                model.init_weights(job.training.seed)
            else:
                init_weights_sharded(model, job.training.seed, self.device, values=ckpt.tensor, buffers=ckpt.buffer)
        model.train()
        return model

    def _init_checkpoint(self):
        """The Hugging Face checkpoint of `checkpoint.init_from` (`.tensor(fqn)`, `.buffer(fqn)`), else
        None (seeded init).

        Read lazily, one parameter at a time, on every rank (the OS page cache shares the files).
        Skipped when resuming: the run's own checkpoint then overwrites every weight anyway.
        """
        path = self.job.checkpoint.init_from
        resuming = self.job.checkpoint.resume and self.ckpt.latest() is not None
        if not path or resuming:
            return None
        from mop.hf import HFCheckpoint

        return HFCheckpoint(path)

    @staticmethod
    def _retie(model: Transformer) -> None:
        """`to_empty` gives shared parameters separate storage: share the embedding table again."""
        if model.cfg.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
            model.output.weight = model.tok_embeddings.weight

    # -- memory buys time (mop.memory_probe) --------------------------------------------------------
    def _plan_memory(self) -> None:
        """Before step 1 on a GPU: the activation policies ("auto") and the peak a micro-batch will
        have (`step_peak_bytes`); what the peak leaves (`_room_bytes`) is the optimizer's device share."""
        from mop.memory_probe import DeviceMemory, plan_memory

        self.step_peak_bytes, self._room_bytes = None, 0.0
        if self.device.type == "cuda":
            self.step_peak_bytes, self._room_bytes = plan_memory(self, DeviceMemory(self.device))

    def _auto_device_fraction(self, local_numel: int) -> float:
        """Share of this rank's optimizer state (12 B/param) that fits in what the measured step leaves."""
        if self.step_peak_bytes is None:
            return 0.0
        return max(0.0, min(1.0, self._room_bytes / max(1, 12 * local_numel)))

    def _say(self, msg: str) -> None:
        if self.proc.is_main:
            print(f"mop: {msg}", flush=True)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.job.optimizer
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        custom = self.strategy.build_optimizer(self, groups)
        if custom is not None:
            return custom
        if o.engine is not None:
            from mop.optim import HostAdamW

            local_numel = sum(local_shard(p).numel() for p in self.model.parameters())
            fraction = o.device_fraction if o.device_fraction >= 0 else self._auto_device_fraction(local_numel)
            # Reject a host state that cannot fit before allocating any of it (an engine that updates
            # on the host also stages each gradient and cast weight there).
            extra = 4 if (o.engine.grads_to_host and self.device.type == "cuda") else 0
            HostAdamW.check_host_memory(int(local_numel * (1 - fraction)), self.proc.local_world,
                                        bytes_per_param=12 + extra)
            self.device_fraction = fraction
            from mop.optim.overlap import UpdateOverlap, forward_order

            opt = HostAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, engine=o.offload, device_fraction=fraction,
                            bucket_numel=o.bucket_numel, update_order=forward_order(self.model))
            # The update runs (step_async) while the next forward starts; each module waits for its own.
            self.update_overlap = UpdateOverlap(self.model, opt)
            if o.engine.grads_to_host:
                self._install_early_grad_offload(opt)
            return opt
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused, foreach=not fused)

    def _install_early_grad_offload(self, opt) -> None:
        """Engines that update on the host: copy each gradient there as soon as it is final, during backward.

        A post-accumulate-grad hook fires when a parameter's gradient is complete: from autograd for
        the expert and vocabulary shards, and from FSDP2 right after the reduce-scatter for the dense
        shards, on the stream that produced the gradient, so the copy (ordered after that stream) never
        reads a gradient still being reduced. With accumulation only the last micro-batch copies.
        """
        self._final_backward = True

        def hook(p):
            if self._final_backward:
                opt.offload_grads_async([p])

        for p in self.model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(hook)

    # -- one optimizer step ------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.proc.world > 1:
            dist.all_reduce(t)
        return t

    def train_step(self, capture_grads: bool = False) -> dict:
        t = self.job.training
        batches = [next(self.loader) for _ in range(t.grad_accum)]
        n_targets = sum((b["labels"] != -100).sum() for b in batches).to(self.device, torch.float32)
        normalizer = self.strategy.normalizer(self, n_targets)
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        routers = self.model.routers()
        loads_LE = torch.zeros(len(routers), self.job.model.n_experts, device=self.device)
        fsdp = self.job.parallel.fsdp
        for i, b in enumerate(batches):
            self._final_backward = i == len(batches) - 1  # gradients become final only in the last one
            if t.grad_accum > 1:  # what FSDP keeps between micro-batches (parallel.fsdp.accumulation)
                set_accumulation_phase(self.model, fsdp.accumulation, self._final_backward, fsdp.reshard_after_forward)
            tensors = [b[k].to(self.device, non_blocking=True) for k in ("tokens", "positions", "labels")]
            with self.strategy.micro_batch_context(self, tensors):
                with record_function("mop.forward"):  # profiler labels: idle time is charged to them
                    ce, aux = self.model(*tensors, normalizer)
                    loss = ce + aux / t.grad_accum
                with record_function("mop.backward"):
                    loss.backward()
            loss_sum += ce.detach()
            aux_sum += aux.detach() / t.grad_accum
            if routers:
                loads_LE += torch.stack([r.last_tokens_per_expert for r in routers])
        with record_function("mop.after_backward"):
            self.strategy.after_backward(self)
        captured = self.full_grads() if capture_grads else None
        with record_function("mop.grad_norm_and_clip"):
            grad_norm = self.strategy.grad_norm_and_clip(self)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses (logged with this step)
        update = self.guard.allow_update(self.step + 1, grad_norm, loss_sum, self.optimizer)
        with record_function("mop.optimizer_step"):
            if update and self.job.optimizer.engine is not None:
                self.optimizer.step_async(self.clip_coef)  # finished by the next forward's hooks (overlap.py)
                if not self.job.optimizer.overlap_update:
                    self.finish_update()
            elif update:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if update and routers and any(r.use_expert_bias for r in routers):
            self.model.update_expert_bias(self._all_reduce(loads_LE))
        self.step += 1
        scale = self.strategy.loss_report_scale(self)
        return {"loss_local": loss_sum * scale, "aux_local": aux_sum * scale, "grad_norm": grad_norm,
                "loads": loads_LE, "grads": captured, "lr": lr}

    # -- the loop ----------------------------------------------------------------------------------
    def tokens_per_device_per_step(self) -> int:
        return self.strategy.tokens_per_device_per_step(self)

    def train(self, capture_grads_at: tuple[int, ...] = ()) -> TrainResult:
        job, t = self.job, self.job.training
        result = TrainResult()
        if self.proc.is_main:  # before the progress bar exists, so that it does not print onto the bar's line
            counts = job.model.param_counts()
            print(f"mop: {job.model.shape} ({counts['total'] / 1e6:.1f}M params, {counts['active'] / 1e6:.1f}M active) "
                  f"on {self.proc.world} x {self.device.type}, layout W={self.spec.world} D={self.spec.seq} "
                  f"Ep={self.spec.expert} P={self.spec.vocab}, {t.seq_len} tokens/seq, "
                  f"{self.tokens_per_device_per_step() * self.proc.world} tokens/step", flush=True)
        first_step = self.step + 1
        logger = MetricsLogger(job.logging.run_dir, t.steps, job.logging.progress, job.logging.tensorboard,
                               enabled=self.proc.is_main, start_step=self.step, wandb_project=job.logging.wandb,
                               config=job.to_dict() if job.logging.wandb else None)
        self._tell = logger.message if self.proc.is_main else self._print_main
        meter = Throughput(job.model.flops_per_token(t.seq_len), self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.step < t.steps:
                with step_profiler(job.logging.run_dir, self.proc.rank, self.device,
                                   enabled=self.step + 1 == job.logging.profile_step), \
                        memory_snapshot(job.logging.run_dir, self.proc.rank, self.device,
                                        enabled=self.step + 1 == job.logging.memory_step):
                    out = self.train_step(capture_grads=(self.step + 1) in capture_grads_at)
                meter.add(self.tokens_per_device_per_step())
                if out["grads"] is not None:
                    result.captured_grads[self.step] = out["grads"]
                if self.step % job.logging.log_every == 0 or self.step in (first_step, t.steps):
                    stats = self._all_reduce(torch.stack([out["loss_local"], out["aux_local"]]))
                    stats = stats.tolist()  # host sync: logging steps only
                    metrics = {"loss": stats[0], "aux_loss": stats[1], "grad_norm": float(out["grad_norm"]),
                               "lr": out["lr"], **meter.read(), **device_memory(self.device),
                               "host_rss_gib": host_rss_bytes() / 2**30}
                    if t.nonfinite == "skip":
                        metrics["skipped_steps"] = self.guard.skipped
                    loads = out["loads"]
                    if loads.numel():
                        loads = self._all_reduce(loads)
                        metrics["expert_imbalance"] = float((loads.max(-1).values / loads.mean(-1).clamp(min=1)).max())
                    result.history.append({"step": self.step, **metrics})
                    logger.log(self.step, metrics)
                    self.guard.check()
                    self.guard.check_loss(self.step, stats[0])  # all-reduced: every rank agrees
                logger.advance()
                if job.checkpoint.enabled and ((job.checkpoint.every and self.step % job.checkpoint.every == 0)
                                               or self.step == t.steps):
                    self.save_checkpoint()
            self.guard.check()
        finally:
            logger.close()
            self._tell = self._print_main
            self.run_dir.unlock()
        self.finish_update()
        return result

    # -- state -------------------------------------------------------------------------------------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        model, optim = self.model, self.optimizer
        optim_state = Stateful(lambda: get_optimizer_state_dict(model, optim),
                               lambda sd: set_optimizer_state_dict(model, optim, sd))
        return {
            "model": Stateful(lambda: get_model_state_dict(model), lambda sd: set_model_state_dict(model, sd)),
            "optimizer": optim_state,
            "scheduler": Stateful(self.scheduler.state_dict, self.scheduler.load_state_dict),
            "loader": Stateful(self.loader.state_dict, self.loader.load_state_dict),
            "trainer": Stateful(lambda: {"step": self.step, "rng": rng_state()}, self._load_trainer_state),
        }

    def _load_trainer_state(self, sd: dict) -> None:
        self.step = int(sd["step"])
        set_rng_state(sd["rng"])

    def finish_update(self) -> None:
        """Wait for an in-flight host-optimizer update (before reading or saving parameters)."""
        if hasattr(self.optimizer, "synchronize"):
            self.optimizer.synchronize()

    def save_checkpoint(self):
        self.finish_update()
        self.guard.check()  # never a checkpoint of a NaN run: keep-K rotation would discard the good ones
        self.guard.check_weights(self.model, self.step)
        t0 = time.perf_counter()
        model_json = json.dumps(dataclasses.asdict(self.job.model), indent=1)
        path = self.ckpt.save(self.step, self._state(), files={"model.json": model_json})
        self._tell(f"saved checkpoint {path} in {time.perf_counter() - t0:.1f}s")
        return path

    def load_checkpoint(self, path) -> None:
        self.ckpt.load(path, self._state())
        if self.proc.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter as a full (unsharded) CPU tensor, keyed by FQN (collective on all ranks)."""
        self.finish_update()
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu()
                for n, p in self.model.named_parameters()}

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every gradient as a full CPU tensor, keyed by FQN (collective on all ranks)."""
        out = {}
        for n, p in self.model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                out[n] = g.detach().float().cpu().clone()  # a copy: clipping scales p.grad in place afterwards
        return out
