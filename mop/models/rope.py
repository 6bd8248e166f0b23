"""Rotary position embeddings with the variants the model families use: YaRN scaling, interleaved pairs.

`Rotary(cfg, dim)` owns the inverse frequencies and the YaRN attention factor of one head width
(`head_dim` for GQA, `qk_rope_head_dim` for MLA); `tables(positions)` gives fp32 cos/sin, already
multiplied by that factor as Hugging Face does (which scales q.k by its square), and `rotate`
applies them. Nothing here is a parameter: frequencies are recomputed from the config (a few
hundred floats, built on the CPU even inside `with torch.device("meta")`), so meta-device
construction and sharding never see them.
"""

from __future__ import annotations

import math
import warnings

import torch

from mop.models.config import ModelConfig, yarn_mscale
from mop.models.layers import apply_rope


def yarn_inv_freq(dim: int, theta: float, factor: float, original_max_len: int, beta_fast: float,
                  beta_slow: float, truncate: bool) -> torch.Tensor:
    """YaRN inverse frequencies (arXiv 2309.00071): interpolated low frequencies, extrapolated high ones,
    a linear ramp between the dims that rotate beta_slow and beta_fast times over the original length."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation = 1 - ramp  # share of the original frequency kept, per dim pair
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class Rotary:
    """RoPE of one head width under the config's scaling; `tables` then `rotate` (pairs as configured)."""

    def __init__(self, cfg: ModelConfig, dim: int):
        self.dim, self.interleave = dim, cfg.rope_interleave
        self.max_seq_len, self._checked = cfg.max_seq_len, False
        if cfg.rope_scaling == "yarn":
            self.inv_freq = yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_len,
                                          cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate)
            if cfg.rope_mscale and cfg.rope_mscale_all_dim:
                self.attention_factor = (yarn_mscale(cfg.rope_factor, cfg.rope_mscale)
                                         / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim))
            else:
                self.attention_factor = yarn_mscale(cfg.rope_factor)
        else:
            self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
            self.attention_factor = 1.0

    def tables(self, positions_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, S, dim/2] in fp32 for the given (per-document) positions."""
        if self.max_seq_len and not self._checked:
            self._check(positions_BS)
        angles = positions_BS.float()[..., None] * self.inv_freq.to(positions_BS.device)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin

    def rotate(self, x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor,
               kernels: str = "eager") -> torch.Tensor:
        """Rotate x [B, S, heads, dim]. Interleaved pairs (x0, x1), (x2, x3), ... come out as halves:
        q and k get the same permutation of their dims, so q.k, the only use, is unchanged (as in HF)."""
        if self.interleave:
            x_BSHD = torch.cat([x_BSHD[..., 0::2], x_BSHD[..., 1::2]], dim=-1)
        return apply_rope(x_BSHD, cos_BSD, sin_BSD, kernels)

    def _check(self, positions_BS: torch.Tensor) -> None:
        """Warn when positions reach past the trained context (`max_position_embeddings`): RoPE (and
        YaRN's interpolation) were fitted to it. Checked once per layer: `.item()` is a host sync."""
        self._checked = True
        top = int(positions_BS.max().item()) if positions_BS.numel() else 0  # host sync, first forward only
        if top >= self.max_seq_len:
            warnings.warn(f"positions reach {top}, past model.max_seq_len={self.max_seq_len} (the checkpoint's "
                          "max_position_embeddings): quality beyond the trained context is not guaranteed; shorten "
                          "training.seq_len or documents, or raise model.max_seq_len knowingly", stacklevel=3)
