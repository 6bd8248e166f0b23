"""Dequantization of the quantized weights published checkpoints ship, on import (to fp32).

* DeepSeek-V3 / Kimi-K2: FP8 e4m3 weights with one fp32 `weight_scale_inv` per 128 x 128 block
  (the name is the Hub's: the stored factor multiplies, w = w_fp8 * scale_inv). Dequantized per
  parameter; export writes bf16 (or fp32), never FP8.
* gpt-oss: MXFP4 expert weights, `*_blocks` (uint8, two e2m1 values per byte, low nibble first) and
  `*_scales` (uint8 exponents, bias 127) per 32 values along the input dim, stored [E, out, in/32, 16];
  dequantized to [E, in, out] (the Hub's unquantized gpt-oss layout). Export writes bf16 (or fp32).
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
# e2m1 (FP4) code points, indexed by the 4-bit code (sign bit 3).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 of an FP8 [out, in] weight with [ceil(out/block), ceil(in/block)] block scales."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(weight.shape)} weight in "
                         f"{block}x{block} blocks needs ({rows}, {cols})")
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return weight.float() * scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [E, in, out] of MXFP4 `blocks` [E, out, G, 16] (uint8) and `scales` [E, out, G] (uint8)."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8).long()
    values = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).flatten(-2)  # [E, out, G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())
    E, out_dim = blocks.shape[:2]
    return values.reshape(E, out_dim, -1).transpose(1, 2).contiguous()


def quantize_mxfp4(w_EIO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of an [E, in, out] weight whose values are exactly representable (test fixture
    of the dequantizer; mop never writes MXFP4): one power-of-two scale per 32 inputs."""
    w = w_EIO.float().transpose(1, 2).contiguous()  # [E, out, in]
    E, O, I = w.shape
    groups = w.view(E, O, I // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(amax), exp.int())[..., None]
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - lut).abs().argmin(-1)  # nearest code point
    codes = torch.where((scaled == 0) & (codes == 8), torch.zeros_like(codes), codes)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)
