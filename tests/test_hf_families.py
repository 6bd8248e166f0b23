"""DeepSeek-V3 (MLA) and gpt-oss checkpoints built by transformers itself: mop's logits and loss equal
transformers' (fp32, CPU), and an export loads back in transformers with the same logits and the
same config.json (every key, except the dtype key, which states the written tensors' dtype)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from mop.hf import HFCheckpoint, load_hf_checkpoint, save_hf_checkpoint
from mop.models.transformer import Transformer

# Logits of a 3-4 layer random model with weights ~0.2 agree to ~1e-6; 2e-5 leaves room for
# summation order (SDPA vs eager softmax, grouped GEMM vs per-expert loops).
ATOL, RTOL = 2e-5, 1e-5
VOCAB = 97

DEEPSEEK = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
                q_lora_rank=24, qk_rope_head_dim=4, v_head_dim=6, qk_nope_head_dim=8, n_group=4, topk_group=2,
                num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256)
DEEPSEEK_YARN = {**DEEPSEEK, "q_lora_rank": None, "rope_parameters": {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}}
GPT_OSS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
               swiglu_limit=0.6, max_position_embeddings=256)
FAMILIES = {
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, DEEPSEEK),
    "deepseek_v3_yarn_no_q_lora": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, DEEPSEEK_YARN),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM, GPT_OSS),
}


def _randomise(model):
    """Weights large enough that routing, sinks and windows depend on every tensor; norms not all ones."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # selection-only bias: must change routing
                b.copy_(0.3 * torch.randn_like(b))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, checkpoint dir, transformers class) of a random tiny model saved in the Hub layout."""
    config_cls, model_cls, kwargs = FAMILIES[request.param]
    model = model_cls(config_cls(**kwargs))
    _randomise(model)
    path = tmp_path_factory.mktemp("hf") / request.param
    model.save_pretrained(path)
    return request.param, path, model_cls


def _tokens():
    return torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))


def _hf_logits(model_cls, path, tokens, labels=None):
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(tokens, labels=labels)
    return out.logits, out.loss


def _mop_model(path):
    cfg, state = load_hf_checkpoint(path)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("expert_bias") for k in missing), (missing, unexpected)
    return model.eval()


def _mop_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions) @ model.output.weight.t()


def test_logits_and_loss_match_transformers(family):
    name, path, model_cls = family
    model = _mop_model(path)
    cfg = model.cfg
    if name.startswith("deepseek"):
        assert cfg.attention == "mla" and cfg.value_head_dim != cfg.head_dim and cfg.n_groups == 4
        assert any(r.expert_bias.abs().sum() > 0 for r in model.routers())  # the correction bias was loaded
    else:
        assert cfg.attn_sinks and cfg.sliding_window == 5 and cfg.swiglu_limit == 0.6 and cfg.rope_scaling == "yarn"
    tokens = _tokens()
    hf_logits, hf_loss = _hf_logits(model_cls, path, tokens, labels=tokens)
    torch.testing.assert_close(_mop_logits(model, tokens), hf_logits, atol=ATOL, rtol=RTOL)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)  # HF shifts inside
    with torch.no_grad():
        ce, _ = model(tokens, torch.arange(48).expand_as(tokens), labels)
    torch.testing.assert_close(ce, hf_loss, atol=1e-5, rtol=1e-5)


def test_export_loads_in_transformers_with_the_same_config(family, tmp_path):
    name, path, model_cls = family
    model = _mop_model(path)
    with torch.no_grad():  # a trained model is not the checkpoint: move every weight
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "export", dtype=torch.float32)
    tokens = _tokens()
    torch.testing.assert_close(_hf_logits(model_cls, out, tokens)[0], _mop_logits(model, tokens), atol=ATOL, rtol=RTOL)
    source, exported = (json.loads((d / "config.json").read_text()) for d in (path, out))
    assert source.keys() == exported.keys()
    for key in source:
        if key != "dtype":  # documented: the dtype of the tensors written
            assert exported[key] == source[key], key
    assert exported["dtype"] == "float32"
    assert (out / "generation_config.json").read_text() and json.loads((out / "generation_config.json").read_text()) \
        == json.loads((path / "generation_config.json").read_text())
    back = HFCheckpoint(out)  # and mop reads its own export back exactly
    for n, p in model.named_parameters():
        torch.testing.assert_close(back.tensor(n), p.detach(), atol=0, rtol=0, msg=n)


def test_a_changed_option_is_the_only_rewritten_key(family, tmp_path):
    import dataclasses

    name, path, _ = family
    model = _mop_model(path)
    cfg = dataclasses.replace(model.cfg, n_layers=model.cfg.n_layers - 1)  # e.g. --model.n_layers=N-1
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"layers.{cfg.n_layers}.")}
    out = save_hf_checkpoint(state, cfg, tmp_path / "export", dtype=torch.bfloat16)
    source, exported = (json.loads((d / "config.json").read_text()) for d in (path, out))
    changed = {k for k in source if exported.get(k) != source[k]}
    expected = {"num_hidden_layers", "dtype"} | ({"layer_types"} if name == "gpt_oss" else set())
    assert changed == expected


def test_kimi_k2_config_layout(tmp_path):
    """Kimi-K2's Hub config: model_type kimi_k2, the older rope_scaling {"type": "yarn"} with a top-level
    rope_theta, one expert group, no MTP. mop reads it as DeepSeek-V3 and gives transformers' logits of
    the same weights; the export writes that config back key by key."""
    import shutil

    rope = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
            "mscale_all_dim": 1.0}
    kwargs = {**DEEPSEEK, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, **rope}}
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kwargs))
    _randomise(model)
    model.save_pretrained(tmp_path / "ds")
    kimi = json.loads((tmp_path / "ds" / "config.json").read_text())
    del kimi["rope_parameters"]
    kimi.update(model_type="kimi_k2", rope_theta=50000.0, rope_scaling={"type": "yarn", **rope}, num_nextn_predict_layers=0,
                topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, ep_size=1,
                auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    shutil.copytree(tmp_path / "ds", tmp_path / "kimi")
    (tmp_path / "kimi" / "config.json").write_text(json.dumps(kimi))
    mop_model = _mop_model(tmp_path / "kimi")
    assert mop_model.cfg.rope_theta == 50000.0 and mop_model.cfg.rope_scaling == "yarn" and mop_model.cfg.n_groups == 1
    tokens = _tokens()
    hf_logits, _ = _hf_logits(transformers.DeepseekV3ForCausalLM, tmp_path / "ds", tokens)
    torch.testing.assert_close(_mop_logits(mop_model, tokens), hf_logits, atol=ATOL, rtol=RTOL)
    out = save_hf_checkpoint(mop_model.state_dict(), mop_model.cfg, tmp_path / "export", dtype=torch.float32)
    exported = json.loads((out / "config.json").read_text())
    assert {k for k in kimi.keys() | exported.keys() if kimi.get(k) != exported.get(k)} == set()


def test_checkpoint_serves_the_router_bias_buffer(family):
    """`HFCheckpoint.buffer`: DeepSeek's correction bias by mop name, None where a family has none."""
    name, path, _ = family
    ckpt = HFCheckpoint(path)
    bias = ckpt.buffer("layers.1.moe.router.expert_bias")
    if name.startswith("deepseek"):
        assert bias is not None and bias.shape == (8,) and bias.abs().sum() > 0
    else:
        assert bias is None


def test_init_from_keeps_the_routing_correction_bias(tmp_path):
    """`checkpoint.init_from` of a DeepSeek-V3 checkpoint starts from its `e_score_correction_bias`
    (zeroing it, as fresh buffers are, would change which experts the pretrained model routes to)."""
    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    config_cls, model_cls, kwargs = FAMILIES["deepseek_v3"]
    model = model_cls(config_cls(**kwargs))
    _randomise(model)
    path = tmp_path / "ds"
    model.save_pretrained(path)
    job = build_config(None, [f"--model.shape=hf:{path}", f"--checkpoint.init_from={path}", "--training.device=cpu",
                              "--data.dataset=synthetic", "--training.seq_len=16", f"--logging.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    ckpt = HFCheckpoint(path)
    for i, block in trainer.model.layers.items():
        if block.is_moe:
            want = ckpt.buffer(f"layers.{i}.moe.router.expert_bias")
            torch.testing.assert_close(block.moe.router.expert_bias, want.float())
            assert want.abs().sum() > 0
