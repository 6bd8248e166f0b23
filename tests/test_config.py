"""Configuration: defaults, TOML, overrides, validation messages, and the frozen option set."""

import pytest

from mop.config import build_config, option_names
from mop.parallel.layout import LayoutSpec


def test_overrides_and_shape(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nshape = "qwen3-30b-a3b"\nn_layers = 2\n[training]\nsteps = 7\nseq_len = 1024\n')
    job = build_config(f, ["--training.steps=9", "--optimizer.betas=0.9,0.99", "--parallel.seq.degree=4"])
    assert job.model.dim == 2048 and job.model.n_layers == 2 and job.model.n_experts == 128
    assert job.training.steps == 9 and job.training.seq_len == 1024
    assert job.optimizer.betas == (0.9, 0.99)
    assert job.parallel.seq.degree == 4


def test_shipped_configs_parse():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.toml"))
    assert files, "configs/ should ship named runs"
    for f in files:
        build_config(f)


@pytest.mark.parametrize("override,needle", [
    ("--training.steps=0", "training.steps: must be >= 1"),
    ("--parallel.experts.dispatcher=magic", "parallel.experts.dispatcher: 'magic' is not one of"),
    ("--model.shape=nope", "model.shape: unknown shape 'nope'"),
    ("--model.n_kv_heads=3", "model.n_kv_heads: 3 must divide n_heads"),
    ("--training.bogus=1", "training.bogus: unknown option"),
    ("--nosection.x=1", "unknown section"),
    ("--training.steps=abc", "training.steps: expected int"),
    ("--optimizer.offload=disk", "optimizer.offload"),
    ("--model.top_k=99", "model.top_k: 99 exceeds n_experts"),
    ("training.steps", "expected --section.key=value"),
])
def test_validation_names_the_option(override, needle):
    with pytest.raises(ValueError, match=None) as e:
        build_config(overrides=[override])
    assert needle in str(e.value)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        build_config("/nonexistent/run.toml")


def test_layout_validation_messages():
    with pytest.raises(ValueError,
                       match=r"parallel.seq.degree \(D\)=3 must divide the world size 4; valid values: \[1, 2, 4\]"):
        LayoutSpec(4, seq=3)
    with pytest.raises(ValueError, match=r"parallel.experts.degree \(Ep\)=8 must divide the world size 4"):
        LayoutSpec(4, expert=8)
    with pytest.raises(ValueError, match=r"parallel.experts.degree \(Ep\)=4 must divide the number of experts 6"):
        LayoutSpec(4, expert=4).validate_model(n_heads=4, n_kv_heads=2, n_experts=6)
    with pytest.raises(ValueError, match="training.seq_len=10 must be divisible by parallel.seq.degree"):
        LayoutSpec(4, seq=4).validate_model(n_heads=4, n_kv_heads=2, n_experts=8, seq_len=10)


@pytest.mark.parametrize("W,D,Ep,P", [(4, 2, 2, 4), (8, 4, 2, 8), (8, 8, 1, 2), (6, 3, 2, 1)])
def test_layout_group_membership(W, D, Ep, P):
    """The rank grids Layout.build makes its meshes from: contiguous groups, strided complements."""
    s = LayoutSpec(W, seq=D, expert=Ep, vocab=P)
    for deg in (D, Ep, P):
        grid = s.rank_grid(deg)
        assert grid.shape == (W // deg, deg) and sorted(grid.flatten().tolist()) == list(range(W))
        for r in range(W):
            g, p = r // deg, r % deg
            assert grid[g].tolist() == list(range(g * deg, (g + 1) * deg))  # contiguous blocks
            assert grid[:, p].tolist() == list(range(p, W, deg))  # the complementary strided group
            assert grid[g, p] == r  # the two groups meet in r
    for r in range(W):
        assert s.rank_grid(D)[s.dp_rank(r), s.seq_rank(r)] == r
    assert s.data_parallel == W // D and s.expert_shard == W // Ep


def test_option_set_is_frozen():
    """Adding an option is a deliberate act: update this list (and the README) together."""
    assert option_names() == [
        "model.shape", "model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
        "model.head_dim", "model.qk_norm", "model.attn_bias", "model.rope_theta", "model.norm_eps",
        "model.n_experts", "model.top_k", "model.expert_dim", "model.n_shared_experts", "model.shared_expert_dim",
        "model.score_func", "model.norm_topk", "model.route_scale", "model.aux_loss_coef", "model.expert_bias",
        "model.expert_bias_rate", "model.n_dense_layers", "model.dense_dim", "model.tie_embeddings", "model.init_std",
        "model.attention", "model.q_lora_rank", "model.kv_lora_rank", "model.qk_rope_head_dim", "model.v_head_dim",
        "model.rope_interleave", "model.rope_scaling", "model.rope_factor", "model.rope_original_max_len",
        "model.rope_beta_fast", "model.rope_beta_slow", "model.rope_mscale", "model.rope_mscale_all_dim",
        "model.rope_truncate", "model.max_seq_len", "model.attn_sinks", "model.sliding_window",
        "model.sliding_window_layers", "model.n_groups", "model.topk_groups", "model.moe_bias", "model.swiglu_limit",
        "model.swiglu_alpha", "model.hf_files",
        "parallel.nproc", "parallel.plan",
        "parallel.seq.degree", "parallel.seq.head_chunks",
        "parallel.experts.degree", "parallel.experts.dispatcher", "parallel.experts.llep_alpha",
        "parallel.experts.llep_min_chunk", "parallel.experts.llep_imbalance_threshold",
        "parallel.experts.chunk_tokens", "parallel.experts.max_chunks",
        "parallel.vocab.degree", "parallel.vocab.schedule",
        "parallel.fsdp.reduce_dtype", "parallel.fsdp.reshard_after_forward", "parallel.fsdp.accumulation",
        "optimizer.lr", "optimizer.betas", "optimizer.eps", "optimizer.weight_decay", "optimizer.offload",
        "optimizer.device_fraction", "optimizer.bucket_numel", "optimizer.overlap_update",
        "data.dataset", "data.cache_dir", "data.synthetic_doc_len",
        "training.steps", "training.seq_len", "training.batch_size", "training.grad_accum", "training.warmup_steps",
        "training.min_lr_ratio", "training.max_grad_norm", "training.nonfinite", "training.seed", "training.device", "training.dtype",
        "training.activation_checkpoint", "training.loss_kernels", "training.elementwise_kernels", "training.param_dtype",
        "checkpoint.every", "checkpoint.keep", "checkpoint.enabled", "checkpoint.resume", "checkpoint.init_from",
        "logging.run_dir", "logging.log_every", "logging.progress", "logging.tensorboard", "logging.wandb",
        "logging.profile_step", "logging.memory_step",
    ]


def test_nested_sections_from_toml_and_overrides(tmp_path):
    """[parallel.experts] tables and --parallel.experts.key=value overrides, at any depth; the
    command line wins over the file, and untouched options keep the file's or the default value."""
    f = tmp_path / "run.toml"
    f.write_text('[parallel]\nnproc = 2\n[parallel.fsdp]\nreduce_dtype = "bf16"\n'
                 '[parallel.seq]\ndegree = 2\nhead_chunks = 2\n'
                 '[parallel.experts]\ndegree = 2\ndispatcher = "llep"\nllep_alpha = 1.5\n'
                 '[parallel.vocab]\nschedule = "weights"\n')
    job = build_config(f, ["--parallel.experts.dispatcher=llep_pipelined", "--parallel.experts.chunk-tokens=64",
                           "--parallel.vocab.degree=2"])
    p = job.parallel
    assert (p.nproc, p.fsdp.reduce_dtype, p.fsdp.reshard_after_forward) == (2, "bf16", True)
    assert (p.seq.degree, p.seq.head_chunks) == (2, 2)
    assert (p.experts.degree, p.experts.dispatcher, p.experts.llep_alpha, p.experts.chunk_tokens) == \
        (2, "llep_pipelined", 1.5, 64)
    assert p.experts.max_chunks == 10 and (p.vocab.degree, p.vocab.schedule) == (2, "weights")
    # Dotted keys inside a TOML table are the same nesting.
    g = tmp_path / "dotted.toml"
    g.write_text('[parallel]\nexperts.dispatcher = "llep"\nseq.degree = 4\n')
    assert (build_config(g).parallel.experts.dispatcher, build_config(g).parallel.seq.degree) == ("llep", 4)


def test_apply_overrides_nested():
    from mop.config import apply_overrides

    job = build_config()
    new = apply_overrides(job, ["--parallel.experts.dispatcher=llep", "--parallel.seq.head_chunks=2"])
    assert (new.parallel.experts.dispatcher, new.parallel.seq.head_chunks) == ("llep", 2)
    assert job.parallel.experts.dispatcher == "alltoall"  # the original is unchanged
    with pytest.raises(ValueError, match="parallel.experts.llep_alpha: must be >= 1.0, got 0.5"):
        apply_overrides(job, ["--parallel.experts.llep_alpha=0.5"])
    with pytest.raises(ValueError, match="did you mean parallel.experts.chunk_tokens"):
        apply_overrides(job, ["--parallel.moe_chunk_tokens=5"])


@pytest.mark.parametrize("old,new", [
    ("parallel.seq", "parallel.seq.degree"), ("parallel.expert", "parallel.experts.degree"),
    ("parallel.vocab", "parallel.vocab.degree"), ("parallel.dispatcher", "parallel.experts.dispatcher"),
    ("parallel.llep_alpha", "parallel.experts.llep_alpha"),
    ("parallel.llep_min_chunk", "parallel.experts.llep_min_chunk"),
    ("parallel.llep_lambda", "parallel.experts.llep_imbalance_threshold"),
    ("parallel.moe_chunk_tokens", "parallel.experts.chunk_tokens"),
    ("parallel.moe_max_chunks", "parallel.experts.max_chunks"),
    ("parallel.ulysses_head_chunks", "parallel.seq.head_chunks"),
    ("parallel.vocab_schedule", "parallel.vocab.schedule"),
    ("parallel.reduce_dtype", "parallel.fsdp.reduce_dtype"),
    ("parallel.reshard_after_forward", "parallel.fsdp.reshard_after_forward"),
])
def test_old_flat_name_suggests_the_new_one(old, new, tmp_path):
    """No aliases: an old flat name fails in one line that names the new spelling (CLI and TOML)."""
    with pytest.raises(ValueError) as e:
        build_config(overrides=[f"--{old}=2"])
    assert str(e.value).startswith(f"{old}: ") and f"did you mean {new}?" in str(e.value)
    assert "\n" not in str(e.value)
    f = tmp_path / "old.toml"
    f.write_text(f"[parallel]\n{old.split('.')[1]} = 2\n")
    with pytest.raises(ValueError, match=f"did you mean {new}\\?"):
        build_config(f)


def test_option_types_and_sections_are_checked():
    with pytest.raises(ValueError, match=r"parallel.experts.dispatcher: 'foo' is not one of 'alltoall', 'llep'"):
        build_config(overrides=["--parallel.experts.dispatcher=foo"])
    with pytest.raises(ValueError, match="parallel.vocab.schedule: 'rows' is not one of"):
        build_config(overrides=["--parallel.vocab.schedule=rows"])
    with pytest.raises(ValueError, match="parallel.fsdp.reduce_dtype: 'fp16' is not one of 'auto', 'fp32', 'bf16'"):
        build_config(overrides=["--parallel.fsdp.reduce_dtype=fp16"])
    with pytest.raises(ValueError, match="parallel.fsdp.accumulation: 'foo' is not one of 'reshard', 'keep_gathered'"):
        build_config(overrides=["--parallel.fsdp.accumulation=foo"])
    with pytest.raises(ValueError, match="parallel.seq.head_chunks: must be >= 1, got 0"):
        build_config(overrides=["--parallel.seq.head_chunks=0"])
    with pytest.raises(ValueError, match="parallel.experts.degree: expected int, got 'two'"):
        build_config(overrides=["--parallel.experts.degree=two"])
    with pytest.raises(ValueError, match=r"parallel.experts.bogus: unknown option; options of \[parallel.experts\]"):
        build_config(overrides=["--parallel.experts.bogus=1"])
    with pytest.raises(ValueError, match="parallel.nproc: an option of type int, not a section"):
        build_config(overrides=["--parallel.nproc.x=1"])


def test_help_lists_every_option_with_type_default_and_help(capsys):
    """`mop train --help` is generated from the dataclasses: every option, its type, default and help."""
    from mop.config_help import options
    from mop.train import main as train_main

    listed = list(options())
    assert [path for path, *_ in listed] == option_names()
    assert all(text for *_, text in listed), [path for path, *_, text in listed if not text]
    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for path in option_names():
        assert f"--{path}  " in out, path
    assert "--parallel.experts.dispatcher  str  (default: 'alltoall')" in out
    assert "--parallel.seq.degree  int  (default: 1)" in out
    assert "--optimizer.betas  float,float  (default: 0.9,0.95)" in out
    assert "[parallel.experts]" in out and "LLEP: per-rank capacity = alpha * total / Ep" in out


def test_model_options_help_is_each_fields_own_comment(capsys):
    """Every ModelConfig field carries its `mop train --help` line as a trailing comment on the field.

    A field without one would take a section comment above it (`# MoE`) as its help.
    """
    import dataclasses
    import inspect

    from mop.config_help import field_help
    from mop.models.config import ModelConfig
    from mop.train import main as train_main

    source = inspect.getsource(ModelConfig).splitlines()
    help_by_field = field_help(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        line = next(s for s in source if s.lstrip().startswith(f"{f.name}:"))
        assert "  # " in line and help_by_field[f.name] == line.split("  # ", 1)[1], f.name
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out.splitlines()
    for i, row in enumerate(out):
        if row.startswith("  --model."):
            assert out[i + 1].startswith(" " * 8) and out[i + 1].strip(), row
    assert "  --model.n_experts  int  (default: 8)" in out
    assert out[out.index("  --model.n_experts  int  (default: 8)") + 1].strip() == "routed experts per MoE layer (E)"


def test_optimizer_offload_is_read_from_the_engine_registry():
    """`optimizer.offload` names a registered engine; callers ask its class, not its name."""
    from mop.config import OptimizerConfig
    from mop.optim.registry import ENGINES, engine_class, offload_choices
    from mop.optim.update_engines import CpuEngine

    assert offload_choices() == ("none",) + tuple(n for n in ENGINES if not engine_class(n).device_resident)
    assert offload_choices() == ("none", "cpu", "gpu_stream")
    assert offload_choices(host_only=True) == ("none", "cpu")  # a CPU run: no device to stage state on
    assert OptimizerConfig().engine is None
    assert OptimizerConfig(offload="cpu").engine is CpuEngine and CpuEngine.grads_to_host
    with pytest.raises(ValueError, match="optimizer.offload: 'device' is not one of 'none', 'cpu', 'gpu_stream'"):
        OptimizerConfig(offload="device")
