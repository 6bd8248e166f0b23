"""Typed, nested job configuration: dataclasses, TOML files and `--section.key=value` overrides.

Resolution order: defaults <- named model shape (`model.shape`) <- TOML file <- command line.
Every section validates itself in `__post_init__` and names the offending option.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mop.models.config import ModelConfig
from mop.models.shapes import get_shape


def resolve_shape(name: str, **overrides) -> ModelConfig:
    """`model.shape`: a named shape (mop.models.shapes), or `hf:PATH`, the architecture of a Hugging
    Face checkpoint directory's config.json (mop.hf); `overrides` applied and validated."""
    if name.startswith("hf:"):
        from dataclasses import replace

        from mop.hf import load_hf_config

        return replace(load_hf_config(name[3:]), shape=name, **overrides)
    return get_shape(name, **overrides)


def _bad(option: str, msg: str) -> ValueError:
    return ValueError(f"{option}: {msg}")


@dataclass
class ParallelConfig:
    """Degrees of the MoP layout (each divides the world size) and component options."""

    nproc: int = 1  # `mop train --nproc N` launches N local workers (ignored under torchrun)
    seq: int = 1  # D: Ulysses sequence-parallel degree
    expert: int = 1  # Ep: expert-parallel degree (experts further sharded over W/Ep)
    vocab: int = 1  # P: vocabulary-parallel degree
    ulysses_head_chunks: int = 1
    dispatcher: str = "alltoall"  # a name in mop.parallel.experts.registry.DISPATCHERS
    llep_alpha: float = 1.1
    llep_min_chunk: int = 1024
    llep_lambda: float = 1.3
    moe_chunk_tokens: int = 16384
    moe_max_chunks: int = 10
    vocab_schedule: str = "auto"  # "auto" | "weights" | "activations"
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype on GPU: "fp32" | "bf16"
    reshard_after_forward: bool = True
    # "auto": `mop plan` chooses D, Ep, P, the dispatcher, the activation policies and the optimizer's
    # placement for this model, context, tokens per step and machine (replacing those options).
    plan: str = "none"

    def __post_init__(self):
        for name in ("nproc", "seq", "expert", "vocab", "ulysses_head_chunks", "moe_chunk_tokens", "moe_max_chunks"):
            if getattr(self, name) < 1:
                raise _bad(f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        from mop.parallel.experts.registry import check_dispatcher

        check_dispatcher(self.dispatcher)
        if self.vocab_schedule not in ("auto", "weights", "activations"):
            raise _bad("parallel.vocab_schedule", f"{self.vocab_schedule!r} is not one of 'auto', 'weights', 'activations'")
        if self.reduce_dtype not in ("fp32", "bf16"):
            raise _bad("parallel.reduce_dtype", f"{self.reduce_dtype!r} is not one of 'fp32', 'bf16'")
        if self.plan not in ("none", "auto"):
            raise _bad("parallel.plan", f"{self.plan!r} is not one of 'none', 'auto'")


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters and where its state lives."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    offload: str = "none"  # "none" (torch AdamW on the device) | a host engine of mop.optim.registry.ENGINES
    device_fraction: float = -1.0  # share of offloaded state kept on the device; -1 = from free memory
    bucket_numel: int = 2**25
    overlap_update: bool = True  # host optimizer: update while the next forward runs (False: finish in the step)

    def __post_init__(self):
        # NaN compares false with everything, so "lr <= 0" alone lets nan through: test finiteness first.
        for name in ("lr", "eps", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise _bad(f"optimizer.{name}", f"must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise _bad("optimizer.lr", f"must be > 0, got {self.lr}")
        if self.eps <= 0:
            raise _bad("optimizer.eps", f"must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise _bad("optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise _bad("optimizer.betas", f"must be two numbers in [0, 1), got {self.betas}")
        from mop.optim.registry import offload_choices

        if self.offload not in offload_choices():
            raise _bad("optimizer.offload", f"{self.offload!r} is not one of "
                       + ", ".join(repr(c) for c in offload_choices()))
        if not (self.device_fraction == -1.0 or 0.0 <= self.device_fraction <= 1.0):
            raise _bad("optimizer.device_fraction", f"must be -1 (auto) or in [0, 1], got {self.device_fraction}")


@dataclass
class DataConfig:
    """Where tokens come from."""

    dataset: str = "default"  # "default" (bundled stdlib-docs corpus) | "synthetic" | path to a prepared dir
    cache_dir: str = "~/.cache/mop"
    synthetic_doc_len: int = 0  # synthetic data: document length (0 = one document per sequence)

    def __post_init__(self):
        if self.dataset not in ("default", "synthetic") and not self.dataset:
            raise _bad("data.dataset", "must be 'default', 'synthetic' or a prepared dataset directory")


def _activation_spec(value) -> str:
    """Normalise training.activation_checkpoint: booleans map to "full"/"none"; the syntax is checked
    here (the block count only once the model is known)."""
    from mop.models.checkpointing import parse_policies

    text = str(value).strip().lower()
    text = {"true": "full", "1": "full", "yes": "full", "on": "full",
            "false": "none", "0": "none", "no": "none", "off": "none"}.get(text, text)
    if text == "auto":
        return text
    try:
        parse_policies(text, None)
    except ValueError as e:
        raise _bad("training.activation_checkpoint", f"{e} (or 'auto')") from None
    return text


@dataclass
class TrainingConfig:
    """The training loop."""

    steps: int = 120
    seq_len: int = 256
    batch_size: int = 4  # sequences per sequence-parallel group per micro-batch
    grad_accum: int = 1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    nonfinite: str = "stop"  # a NaN/Inf loss or gradient norm: "stop" the run (exit 3) | "skip" the update, counted
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    # Per-block activation policy (mop.models.checkpointing): "none" | "selective" (recompute all
    # but attention) | "full" | "offload" (full, block input in host memory) | "auto" (chosen before
    # step 1 by a measured probe: memory buys the least recomputation) | per block, in order, e.g.
    # "none*4,selective*12,full". true/false mean "full"/"none".
    activation_checkpoint: str = "none"
    loss_kernels: str = "auto"  # "auto": fused (torch.compile) strip kernels on CUDA, eager on CPU | "fused" | "eager"
    # dtype of the weights the model holds, and so of their gradients: "fp32", or "bf16" with a host
    # optimizer (optimizer.offload=cpu|gpu_stream), which keeps the fp32 master weights: the device
    # then holds 2 + 2 bytes per parameter instead of 4 + 4 (MOP.md §1), the rest goes to activations.
    param_dtype: str = "fp32"

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise _bad(f"training.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise _bad("training.warmup_steps", "must be >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise _bad("training.max_grad_norm", f"must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.nonfinite not in ("stop", "skip"):
            raise _bad("training.nonfinite", f"{self.nonfinite!r} is not one of 'stop', 'skip'")
        if not 0 <= self.min_lr_ratio <= 1:
            raise _bad("training.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        self.activation_checkpoint = _activation_spec(self.activation_checkpoint)
        if self.param_dtype not in ("fp32", "bf16"):
            raise _bad("training.param_dtype", f"{self.param_dtype!r} is not one of 'fp32', 'bf16'")
        if self.loss_kernels not in ("auto", "fused", "eager"):
            raise _bad("training.loss_kernels", f"{self.loss_kernels!r} is not one of 'auto', 'fused', 'eager'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise _bad("training.device", f"{self.device!r} is not one of 'auto', 'cpu', 'cuda'")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise _bad("training.dtype", f"{self.dtype!r} is not one of 'auto', 'bf16', 'fp32'")


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint saves."""

    every: int = 0  # save every N steps (0: only at the end when enabled)
    keep: int = 2  # keep the last K checkpoints
    enabled: bool = False
    resume: bool = False  # continue from the newest complete checkpoint in the run directory
    init_from: str = ""  # Hugging Face checkpoint directory whose weights start the run (not the seeded init)

    def __post_init__(self):
        if self.init_from and not (Path(self.init_from) / "config.json").is_file():
            raise _bad("checkpoint.init_from", f"{self.init_from!r} is not a Hugging Face checkpoint directory "
                       "(no config.json)")
        if self.every < 0:
            raise _bad("checkpoint.every", "must be >= 0")
        if self.keep < 1:
            raise _bad("checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class LoggingConfig:
    """Where and how often to report."""

    run_dir: str = "runs/default"
    log_every: int = 10
    progress: str = "auto"  # "auto" (bar on a terminal) | "bar" | "plain" | "none"
    tensorboard: bool = False
    wandb: str = ""  # a Weights & Biases project name: also log there (optional package `wandb`)
    profile_step: int = 0   # >0: profile this optimizer step (1-based) with torch.profiler into run_dir
    memory_step: int = 0    # >0: record this step's CUDA allocations; write the peak's breakdown into run_dir

    def __post_init__(self):
        if self.memory_step < 0:
            raise _bad("logging.memory_step", "must be >= 0 (0: off)")
        if self.profile_step < 0:
            raise _bad("logging.profile_step", "must be >= 0 (0: off)")
        if self.log_every < 1:
            raise _bad("logging.log_every", "must be >= 1")
        if self.progress not in ("auto", "bar", "plain", "none"):
            raise _bad("logging.progress", f"{self.progress!r} is not one of 'auto', 'bar', 'plain', 'none'")


@dataclass
class JobConfig:
    """Everything a run needs."""

    model: ModelConfig = field(default_factory=lambda: get_shape("tiny"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.training.param_dtype == "bf16" and self.optimizer.offload == "none":
            raise _bad("training.param_dtype", "bf16 weights need a host optimizer to keep the fp32 master "
                       "weights: add --optimizer.offload=cpu (or gpu_stream)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(JobConfig))


def _coerce(option: str, value, typ):
    """Convert a TOML value or command-line string to the field's declared type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise _bad(option, f"expected true/false, got {value!r}")
    if typ in (int, float):
        try:
            if typ is int and isinstance(value, str):
                if value.lstrip("+-").isdigit():
                    return int(value)  # exact, however large
                number = float(value)  # accepts "2e6"; refuses "abc" and "1.5"
                if not number.is_integer():
                    raise ValueError(value)
                return int(number)
            return typ(value)
        except (TypeError, ValueError):
            raise _bad(option, f"expected {typ.__name__}, got {value!r}") from None
    if typ is str:
        return str(value)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(typ)
        if len(items) != len(args):
            raise _bad(option, f"expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(option, v, t) for v, t in zip(items, args))
    return value


def _section_types(section_cls) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def build_config(file: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Resolve defaults, the model shape, a TOML file and `--section.key=value` overrides."""
    raw: dict[str, dict] = {s: {} for s in SECTIONS}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for key, table in data.items():
            if key not in raw or not isinstance(table, dict):
                raise _bad(key, f"unknown config section in {path}; sections: {list(SECTIONS)}")
            raw[key].update(table)
    for item in overrides or []:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body or "." not in body.split("=", 1)[0]:
            raise ValueError(f"override {item!r}: expected --section.key=value, e.g. --training.steps=100")
        key, value = body.split("=", 1)
        section, name = key.split(".", 1)
        if section not in raw:
            raise _bad(key, f"unknown section {section!r}; sections: {list(SECTIONS)}")
        raw[section][name.replace("-", "_")] = value

    built = {}
    for section in SECTIONS:
        section_cls = typing.get_type_hints(JobConfig)[section]
        types = _section_types(section_cls)
        values = {}
        for name, value in raw[section].items():
            if name not in types:
                raise _bad(f"{section}.{name}", f"unknown option; options of [{section}]: {sorted(types)}")
            values[name] = _coerce(f"{section}.{name}", value, types[name])
        if section == "model":
            shape = values.pop("shape", "tiny")
            built[section] = resolve_shape(shape, **values)
        else:
            built[section] = section_cls(**values)
    return JobConfig(**built)


def apply_overrides(job: JobConfig, overrides: list[str]) -> JobConfig:
    """`job` with `--section.key=value` options applied, coerced and validated as on the command line
    (e.g. a plan's choice; the model section is not changed here)."""
    changes: dict[str, dict] = {}
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        key, value = body.split("=", 1)
        section, name = key.split(".", 1)
        types = _section_types(type(getattr(job, section)))
        if section == "model" or name not in types:
            raise _bad(key, "cannot be applied to a built job")
        changes.setdefault(section, {})[name] = _coerce(key, value, types[name])
    return dataclasses.replace(job, **{s: dataclasses.replace(getattr(job, s), **kw) for s, kw in changes.items()})


def option_names() -> list[str]:
    """Every `section.key` the configuration accepts (frozen by a test so the CLI does not sprawl)."""
    out = []
    for section in SECTIONS:
        section_cls = typing.get_type_hints(JobConfig)[section]
        out += [f"{section}.{f.name}" for f in dataclasses.fields(section_cls)]
    return out
