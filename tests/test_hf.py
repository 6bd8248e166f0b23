"""Hugging Face interop: a Qwen3-MoE checkpoint loads into mop and gives transformers' logits; a mop run
starts from it under any layout and exports back to a checkpoint transformers loads (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from mop.hf import HFCheckpoint, config_from_hf, export_run, load_hf_checkpoint
from mop.models.transformer import Transformer
from tests.dist_utils import run_distributed

HF_CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
                 norm_topk_prob=True, max_position_embeddings=512, rope_theta=10000.0, mlp_only_layers=[0],
                 router_aux_loss_coef=0.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Qwen3-MoE (one dense layer first, two MoE layers) saved in the Hub layout."""
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**HF_CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norm scales, so a wrong mapping of any of them shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)  # large enough that routing depends on every weight
    path = tmp_path_factory.mktemp("hf") / "qwen3-moe-tiny"
    model.save_pretrained(path)
    return path


def _hf_logits(path, tokens):
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _mop_logits(model: Transformer, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model.eval()(tokens, positions) @ model.output.weight.t()


def _tokens():
    return torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))


def test_qwen3_moe_logits_match_transformers(hf_dir):
    cfg, state = load_hf_checkpoint(hf_dir)
    assert (cfg.n_layers, cfg.n_dense_layers, cfg.n_experts, cfg.top_k, cfg.expert_dim) == (3, 1, 8, 2, 16)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("expert_bias") for k in missing)  # a buffer, not in the Hub file
    torch.testing.assert_close(_mop_logits(model, _tokens()), _hf_logits(hf_dir, _tokens()), atol=2e-5, rtol=1e-5)


def _run(tmp, hf_dir, extra=()):
    from mop.config import build_config

    return build_config(overrides=[
        f"--model.shape=hf:{hf_dir}", f"--checkpoint.init_from={hf_dir}", "--data.dataset=synthetic",
        "--training.seq_len=32", "--training.batch_size=2", "--training.device=cpu", "--training.dtype=fp32",
        "--logging.progress=none", f"--logging.run_dir={tmp}", *extra])


def test_train_from_hf_and_export_back(hf_dir, tmp_path):
    """Start a run from the checkpoint, train, export: transformers loads the export and agrees with mop."""
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    trainer = Trainer(_run(tmp_path / "run", hf_dir, ["--training.steps=2", "--checkpoint.enabled=true"]),
                      ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    start = HFCheckpoint(hf_dir)
    for name, p in trainer.model.named_parameters():  # step 0 is the checkpoint, not the seeded init
        torch.testing.assert_close(p.detach(), start.tensor(name), atol=0, rtol=0, msg=name)
    trainer.train()
    out = export_run(tmp_path / "run", tmp_path / "export", dtype=torch.float32)
    # config.json round-trips through the run (model.json carries it): every key as imported, except
    # the dtype key, which states the written tensors' dtype; generation_config.json is copied.
    source, exported = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    assert {k for k in source.keys() | exported.keys() if source.get(k) != exported.get(k)} <= {"dtype"}
    assert exported["dtype"] == "float32" and exported["model_type"] == "qwen3_moe"
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((hf_dir / "generation_config.json").read_text())
    torch.testing.assert_close(_hf_logits(out, _tokens()), _mop_logits(trainer.model, _tokens()), atol=2e-5, rtol=1e-5)
    moved = max((p.detach() - start.tensor(n)).abs().max().item() for n, p in trainer.model.named_parameters())
    assert moved > 0  # the export holds the trained weights, not the initial ones
    # Sharded files with an index (as large models are published) read back to the same tensors.
    sharded = export_run(tmp_path / "run", tmp_path / "sharded", dtype=torch.float32, shard_bytes=20_000)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 20
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 3
    back = HFCheckpoint(sharded)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(back.tensor(name), p.detach(), atol=0, rtol=0, msg=name)


def _sharded_init(rank, world, hf_dir, run_dir):
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = _run(run_dir, hf_dir, ["--parallel.experts.degree=2", "--parallel.vocab.degree=2", "--training.steps=1"])
    trainer = Trainer(job, ProcessInfo(rank, world, rank, world, torch.device("cpu")))
    return trainer.full_state_dict()


def test_init_from_hf_under_a_sharded_layout(hf_dir, tmp_path):
    """W=2, Ep=2, P=2: every rank keeps its shards of the checkpoint; together they are the checkpoint."""
    full = run_distributed(_sharded_init, 2, str(hf_dir), str(tmp_path / "run"))[0]
    start = HFCheckpoint(hf_dir)
    for name, t in full.items():
        torch.testing.assert_close(t, start.tensor(name), atol=0, rtol=0, msg=name)


def test_bad_checkpoints_are_refused(hf_dir, tmp_path):
    from mop.config import build_config

    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="'num_experts' is missing or null"):  # not a raw TypeError
        config_from_hf({**HF_CONFIG, "model_type": "qwen3_moe", "num_experts": None})
    with pytest.raises(ValueError, match="'n_routed_experts' is missing"):
        config_from_hf({"model_type": "deepseek_v3", "num_attention_heads": 4})
    with pytest.raises(ValueError, match="rope scaling"):
        config_from_hf({**HF_CONFIG, "model_type": "qwen3_moe", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="first layers"):
        config_from_hf({**HF_CONFIG, "model_type": "qwen3_moe", "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="checkpoint.init_from"):
        build_config(overrides=[f"--checkpoint.init_from={tmp_path}"])
    with pytest.raises(ValueError, match="shape"):  # the model options do not match the checkpoint
        from mop.distributed import ProcessInfo
        from mop.trainer import Trainer

        Trainer(_run(tmp_path / "run", hf_dir, ["--model.expert_dim=8"]), ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export_run(tmp_path, tmp_path / "out")
