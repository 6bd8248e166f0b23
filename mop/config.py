"""Typed, nested job configuration: dataclasses, TOML files and `--section.key=value` overrides.

Resolution order: defaults <- named model shape (`model.shape`) <- TOML file <- command line.
Sections nest to any depth: a component owns its section beside its code (`[parallel.experts]` is
`mop.parallel.experts.config.ExpertParallelConfig`), written `[parallel.experts]` in TOML and
`--parallel.experts.dispatcher=llep` on the command line. Every section validates itself in
`__post_init__` and names the offending option as the user types it. `mop train --help` lists every
option from these dataclasses (mop.config_help).
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
from mop.parallel.config import ParallelConfig


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
class OptimizerConfig:
    """AdamW hyper-parameters and where its state lives."""

    lr: float = 3e-3  # peak learning rate (after warmup; cosine decay follows)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW beta1,beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay (AdamW)
    offload: str = "none"  # "none" (torch AdamW on the device) | a host engine of mop.optim.registry.ENGINES
    device_fraction: float = -1.0  # share of offloaded state kept on the device; -1 = from free memory
    bucket_numel: int = 2**25  # host optimizer: parameters per bucket moved and updated as one
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

    @property
    def engine(self) -> type | None:
        """HostAdamW's `UpdateEngine` class that `offload` names; None for "none" (torch AdamW on the device).

        Callers ask the class what they need (`grads_to_host`, `stages_on_device`, ...) rather than
        test the name, so a new engine needs no edits outside its file and its registry line.
        """
        from mop.optim.registry import engine_class

        return None if self.offload == "none" else engine_class(self.offload)


@dataclass
class DataConfig:
    """Where tokens come from."""

    dataset: str = "default"  # "default" (bundled stdlib-docs corpus) | "synthetic" | path to a prepared dir
    cache_dir: str = "~/.cache/mop"  # where the default dataset is built once
    synthetic_doc_len: int = 0  # synthetic data: document length (0 = one document per sequence)

    def __post_init__(self):
        if self.dataset not in ("default", "synthetic") and not self.dataset:
            raise _bad("data.dataset", "must be 'default', 'synthetic' or a prepared dataset directory")


def _activation_spec(value) -> str:
    """Normalise training.activation_checkpoint: booleans map to "full"/"none"; the syntax is checked
    here (the block count only once the model is known)."""
    from mop.models.activation_policy import parse_policies

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

    steps: int = 120  # optimizer steps
    seq_len: int = 256  # tokens per sequence (the context length)
    batch_size: int = 4  # sequences per sequence-parallel group per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 20  # linear learning-rate warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    nonfinite: str = "stop"  # a NaN/Inf loss or gradient norm: "stop" the run (exit 3) | "skip" the update, counted
    seed: int = 0  # seeds the initial weights and the data order
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    # Per-block activation policy (mop.models.activation_policy): "none" | "selective" (recompute all
    # but attention) | "full" | "offload" (full, block input in host memory) | "auto" (chosen before
    # step 1 by a measured probe: memory buys the least recomputation) | per block, in order, e.g.
    # "none*4,selective*12,full". true/false mean "full"/"none".
    activation_checkpoint: str = "none"
    loss_kernels: str = "auto"  # "auto": fused (torch.compile) strip kernels on CUDA, eager on CPU | "fused" | "eager"
    # RoPE, SwiGLU and the experts' weighted sum (mop.ops.fused): "eager" (op by op) | "fused"
    # (torch.compile'd, one kernel each way) | "auto" (fused on CUDA). Eager by default until the
    # fused kernels are measured on the GPU (bench/scripts/session8.sh PART=a).
    elementwise_kernels: str = "eager"
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
        if self.elementwise_kernels not in ("auto", "fused", "eager"):
            raise _bad("training.elementwise_kernels", f"{self.elementwise_kernels!r} is not one of 'auto', 'fused', 'eager'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise _bad("training.device", f"{self.device!r} is not one of 'auto', 'cpu', 'cuda'")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise _bad("training.dtype", f"{self.dtype!r} is not one of 'auto', 'bf16', 'fp32'")


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint saves."""

    every: int = 0  # save every N steps (0: only at the end when enabled)
    keep: int = 2  # keep the last K checkpoints
    enabled: bool = False  # save checkpoints (at the end, and every N steps with checkpoint.every)
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

    run_dir: str = "runs/default"  # metrics, checkpoints and profiles go here
    log_every: int = 10  # report every N steps (metrics reduced across ranks only then)
    progress: str = "auto"  # "auto" (bar on a terminal) | "bar" | "plain" | "none"
    tensorboard: bool = False  # also write TensorBoard event files into run_dir
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
        if self.training.param_dtype == "bf16" and self.optimizer.engine is None:
            raise _bad("training.param_dtype", "bf16 weights need a host optimizer to keep the fp32 master "
                       "weights: add --optimizer.offload=cpu (or gpu_stream)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(JobConfig))

# Options that issue #16 renamed or moved into a component's section. Not aliases: only so that an
# old spelling fails with the new one in its message.
RENAMED = {
    "parallel.seq": "parallel.seq.degree",
    "parallel.expert": "parallel.experts.degree",
    "parallel.vocab": "parallel.vocab.degree",
    "parallel.ulysses_head_chunks": "parallel.seq.head_chunks",
    "parallel.dispatcher": "parallel.experts.dispatcher",
    "parallel.llep_alpha": "parallel.experts.llep_alpha",
    "parallel.llep_min_chunk": "parallel.experts.llep_min_chunk",
    "parallel.llep_lambda": "parallel.experts.llep_imbalance_threshold",
    "parallel.moe_chunk_tokens": "parallel.experts.chunk_tokens",
    "parallel.moe_max_chunks": "parallel.experts.max_chunks",
    "parallel.vocab_schedule": "parallel.vocab.schedule",
    "parallel.reduce_dtype": "parallel.fsdp.reduce_dtype",
    "parallel.reshard_after_forward": "parallel.fsdp.reshard_after_forward",
}


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


def field_types(section_cls) -> dict[str, type]:
    """Each field of a config dataclass and its declared type (nested sections are dataclasses)."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _is_section(typ) -> bool:
    return dataclasses.is_dataclass(typ) and isinstance(typ, type)


def _walk(cls, prefix: str = ""):
    """(path, type) of every option under the dataclass `cls`, depth first in declaration order."""
    for name, typ in field_types(cls).items():
        path = f"{prefix}{name}"
        if _is_section(typ):
            yield from _walk(typ, f"{path}.")
        else:
            yield path, typ


def option_names() -> list[str]:
    """Every option path the configuration accepts, e.g. `parallel.experts.dispatcher` (frozen by a
    test so the CLI does not sprawl)."""
    return [path for path, _ in _walk(JobConfig)]


def _unknown(path: str, cls) -> ValueError:
    """The error for an option `path` that the section `cls` lacks, suggesting its new spelling."""
    if path in RENAMED:
        return _bad(path, f"unknown option; did you mean {RENAMED[path]}?")
    if "." not in path:
        return _bad(path, f"unknown section; sections: {list(SECTIONS)}")
    name = path.rsplit(".", 1)[1]
    moved = [p for p in option_names() if p.endswith(f".{name}")]
    if len(moved) == 1:
        return _bad(path, f"unknown option; did you mean {moved[0]}?")
    section = path.rsplit(".", 1)[0]
    return _bad(path, f"unknown option; options of [{section}]: {sorted(field_types(cls))}")


def _section_not_option(path: str, typ) -> ValueError:
    """A value given to a whole section (`--parallel.seq=2`): name the option it most likely meant."""
    if path in RENAMED:
        return _bad(path, f"a section, not an option; did you mean {RENAMED[path]}?")
    return _bad(path, f"a section, not an option; its options: {[f'{path}.{n}' for n in field_types(typ)]}")


def _split_override(item: str) -> tuple[list[str], str]:
    """`--a.b.c=value` -> (["a", "b", "c"], "value"); dashes in names read as underscores."""
    body = item[2:] if item.startswith("--") else item
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ValueError(f"override {item!r}: expected --section.key=value, e.g. --training.steps=100 "
                         "or --parallel.experts.dispatcher=llep")
    key, value = body.split("=", 1)
    return [part.replace("-", "_") for part in key.split(".")], value


def _merge(tree: dict, parts: list[str], value, path: str) -> None:
    """Set `value` at `parts` in the nested dict `tree` (a TOML file's tables, then the overrides)."""
    for i, part in enumerate(parts[:-1]):
        sub = tree.setdefault(part, {})
        if not isinstance(sub, dict):
            # A scalar where a table is now expected: an old flat name, e.g. `seq = 2` under [parallel].
            raise _scalar_then_table(".".join(parts[:i + 1]), path)
        tree = sub
    if isinstance(value, dict):
        for key, item in value.items():
            _merge(tree, [parts[-1], key], item, f"{path}.{key}")
    else:
        tree[parts[-1]] = value


def _scalar_then_table(scalar_path: str, path: str) -> ValueError:
    """The error for an option given both a value and sub-options (`seq = 2`, then `parallel.seq.degree`)."""
    hint = f"; did you mean {RENAMED[scalar_path]}?" if scalar_path in RENAMED else ""
    return _bad(scalar_path, f"given a value and also sub-options ({path}){hint}")


def _build_section(cls, raw: dict, prefix: str):
    """Build the dataclass `cls` from the nested dict `raw` (coerced, validated by its __post_init__)."""
    types = field_types(cls)
    values = {}
    for name, value in raw.items():
        path = f"{prefix}{name}"
        if name not in types:
            raise _unknown(path, cls)
        typ = types[name]
        if _is_section(typ):
            if not isinstance(value, dict):
                raise _section_not_option(path, typ)
            values[name] = _build_section(typ, value, f"{path}.")
        elif isinstance(value, dict):
            raise _bad(path, f"an option of type {_type_name(typ)}, not a section")
        else:
            values[name] = _coerce(path, value, typ)
    if cls is ModelConfig:
        return resolve_shape(values.pop("shape", "tiny"), **values)
    return cls(**values)


def _type_name(typ) -> str:
    """How an option's type reads in help and errors: int, float, str, bool, float,float, dict."""
    if typing.get_origin(typ) is tuple:
        return ",".join(_type_name(t) for t in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ))


def build_config(file: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Resolve defaults, the model shape, a TOML file and `--section.key=value` overrides (any depth:
    `[parallel.experts]` in TOML, `--parallel.experts.dispatcher=llep` on the command line)."""
    raw: dict = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for key, table in data.items():
            if key not in SECTIONS or not isinstance(table, dict):
                raise _bad(key, f"unknown config section in {path}; sections: {list(SECTIONS)}")
            _merge(raw, [key], table, key)
    for item in overrides or []:
        parts, value = _split_override(item)
        if parts[0] not in SECTIONS:
            raise _bad(".".join(parts), f"unknown section {parts[0]!r}; sections: {list(SECTIONS)}")
        _merge(raw, parts, value, ".".join(parts))
    return _build_section(JobConfig, {s: raw.get(s, {}) for s in SECTIONS}, "")


def _replace(obj, parts: list[str], value, prefix: str):
    """`obj` (a config dataclass) with the option at `parts` set to `value`, coerced and validated."""
    types = field_types(type(obj))
    name, path = parts[0], f"{prefix}{parts[0]}"
    if name not in types:
        raise _unknown(path, type(obj))
    typ = types[name]
    if len(parts) == 1:
        if _is_section(typ):
            raise _section_not_option(path, typ)
        return dataclasses.replace(obj, **{name: _coerce(path, value, typ)})
    if not _is_section(typ):
        raise _bad(path, f"an option of type {_type_name(typ)}, not a section")
    return dataclasses.replace(obj, **{name: _replace(getattr(obj, name), parts[1:], value, f"{path}.")})


def apply_overrides(job: JobConfig, overrides: list[str]) -> JobConfig:
    """`job` with `--section.key=value` options applied, coerced and validated as on the command line
    (e.g. a plan's choice; the model section is not changed here)."""
    for item in overrides:
        parts, value = _split_override(item)
        if parts[0] == "model":
            raise _bad(".".join(parts), "cannot be applied to a built job")
        job = _replace(job, parts, value, "")
    return job
