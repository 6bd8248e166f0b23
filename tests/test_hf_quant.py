"""Quantized Hub checkpoints import dequantized: DeepSeek-V3 / Kimi-K2 FP8 (128x128 block scales) and
gpt-oss MXFP4 experts; exports are plain bf16/fp32. Multi-token-prediction layers are refused with a
warning that names them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mop.hf import HFCheckpoint, save_hf_checkpoint
from mop.hf.quant import dequantize_fp8_blocks, dequantize_mxfp4, quantize_mxfp4
from tests.test_hf_families import DEEPSEEK, GPT_OSS, _mop_logits, _randomise, _tokens


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(115, 135, (3, 40, 2), generator=g, dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)
    assert ours.shape == (3, 64, 40)
    torch.testing.assert_close(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), atol=0, rtol=0)
    # quantize_mxfp4 (the fixture below) round-trips values it can represent
    torch.testing.assert_close(dequantize_mxfp4(*quantize_mxfp4(ours)), ours, atol=0, rtol=0)


def test_fp8_block_dequantization():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(200, 300, generator=g) * 3).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, generator=g) + 0.5
    ref = w.float().clone()
    for i in range(2):
        for j in range(3):
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= scale_inv[i, j]
    torch.testing.assert_close(dequantize_fp8_blocks(w, scale_inv), ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        dequantize_fp8_blocks(w, scale_inv[:1])


def _save(model, path):
    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def test_fp8_deepseek_checkpoint_imports_dequantized_and_refuses_mtp_layers(tmp_path):
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**DEEPSEEK))
    _randomise(model)
    tensors = _save(model, tmp_path / "plain")
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith("proj.weight"):  # the Linear weights DeepSeek ships in FP8
            q = (t / 0.05).to(torch.float8_e4m3fn)
            s = torch.full((-(-t.shape[0] // 128), -(-t.shape[1] // 128)), 0.05)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            dequantized[name] = q.float() * 0.05
        else:
            quantized[name] = dequantized[name] = t
    mtp = "model.layers.3.eh_proj.weight"  # a multi-token-prediction layer (index num_hidden_layers)
    quantized[mtp] = torch.zeros(32, 64)
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    save_file(quantized, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((tmp_path / "plain" / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(hf))
    with pytest.warns(UserWarning, match="not loaded .*multi-token prediction"):
        ckpt = HFCheckpoint(fp8_dir)
    assert ckpt.tensor("layers.1.attention.wkv_b.weight").dtype == torch.float32
    torch.testing.assert_close(ckpt.tensor("layers.1.attention.wkv_b.weight"),
                               dequantized["model.layers.1.self_attn.kv_b_proj.weight"], atol=0, rtol=0)
    torch.testing.assert_close(ckpt.tensor("layers.2.moe.experts.w2")[3],
                               dequantized["model.layers.2.mlp.experts.3.down_proj.weight"].t(), atol=0, rtol=0)
    # The export is bf16, without scales, without quantization_config, without the MTP layer.
    from mop.models.transformer import Transformer

    mop_model = Transformer(ckpt.config)
    mop_model.load_state_dict(ckpt.state_dict(buffers=True), strict=False)
    out = save_hf_checkpoint(mop_model.state_dict(), ckpt.config, tmp_path / "export")
    written = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    assert not any(n.endswith("_scale_inv") for n in written) and mtp not in written
    exported = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in exported and exported["dtype"] == "bfloat16"


def test_mxfp4_gpt_oss_checkpoint_gives_the_dequantized_models_logits(tmp_path):
    cfg = transformers.GptOssConfig(**{**GPT_OSS, "intermediate_size": 32})  # MXFP4 packs 32 inputs per scale
    model = transformers.GptOssForCausalLM(cfg)
    _randomise(model)
    tensors = _save(model, tmp_path / "plain")
    packed, plain = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t)
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            plain[name] = dequantize_mxfp4(blocks, scales)  # what the quantized checkpoint means
        else:
            packed[name] = plain[name] = t
    for d, ts in (("mxfp4", packed), ("dequantized", plain)):
        (tmp_path / d).mkdir()
        save_file(ts, str(tmp_path / d / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / d / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    from mop.models.transformer import Transformer

    ckpt = HFCheckpoint(tmp_path / "mxfp4")
    mop_model = Transformer(ckpt.config)
    mop_model.load_state_dict(ckpt.state_dict(), strict=False)
    reference = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(_mop_logits(mop_model.eval(), _tokens()), reference(_tokens()).logits,
                                   atol=2e-5, rtol=1e-5)
