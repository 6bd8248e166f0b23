"""The decoder-only MoE transformer, in plain single-device PyTorch.

Parallelism is applied afterwards by `mop.parallel.parallelize`, which swaps submodules with the
same forward signature (attention core, experts, embedding, output head) and shards parameters.
Build on the meta device, then materialise and initialise:

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn

from mop.models.activation_policy import checkpoint_block
from mop.models.config import ModelConfig
from mop.models.layers import Attention, FeedForward, RMSNorm
from mop.models.mla import MultiHeadLatentAttention
from mop.models.moe import MoE, resolve_aux
from mop.models.rope import Rotary
from mop.models.activation_offload import HostStash, checkpoint_block_offloaded
from mop.ops.cross_entropy import OutputHead


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a MoE (or dense, for the first layers) FFN."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.attention == "mla":
            self.attention = MultiHeadLatentAttention(cfg)
        else:
            self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.attn_bias,
                                       cfg.norm_eps, cfg.rope_theta, rope=Rotary(cfg, cfg.head_dim),
                                       sinks=cfg.attn_sinks, window=cfg.layer_window(layer_id))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.n_dense_layers
        if self.is_moe:
            self.moe = MoE(cfg)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.dense_dim)

    def forward(self, x_BSH, positions_BS):
        """Returns (x_BSH, aux_loss), the loss possibly still pending (mop.models.moe.PendingAux)."""
        x_BSH = x_BSH + self.attention(self.attention_norm(x_BSH), positions_BS)
        h = self.ffn_norm(x_BSH)
        if self.is_moe:
            y, aux = self.moe(h)
        else:
            y, aux = self.feed_forward(h), h.new_zeros((), dtype=torch.float32)
        return x_BSH + y, aux


class Transformer(nn.Module):
    """Decoder-only MoE language model. `forward(tokens, positions, labels, normalizer)` -> losses."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # ModuleDict keyed by layer index keeps FQNs stable when layers are wrapped/sharded.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = OutputHead(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Per-block activation policy (mop.models.activation_policy.POLICIES), set by parallelize() or
        # the trainer: "none", "selective" (recompute all but attention), "full", "offload".
        self.block_policies: list[str] = ["none"] * cfg.n_layers
        self._stashes: dict[int, HostStash] = {}

    # -- initialisation ----------------------------------------------------------------------------
    def param_init_std(self, fqn: str) -> float | None:
        """Init rule by parameter name: None = ones (norm scales), 0.0 = zeros (biases), else normal std."""
        parts = fqn.split(".")
        if len(parts) >= 2 and parts[-2].endswith("norm"):
            return None
        if parts[-1] == "bias" or fqn.endswith(("experts.b1", "experts.b2", "experts.b3")):  # gpt-oss expert biases
            return 0.0
        std = self.cfg.init_std
        if fqn.endswith(("attention.wo.weight", "w2.weight")) or fqn.endswith("experts.w2"):
            std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs: keep the stream's scale
        return std

    def full_param_value(self, fqn: str, shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
        """The full, layout-independent initial value of parameter `fqn` (fp32).

        Seeded per parameter by (seed, name), so any sharding initialises identically to one device.
        """
        std = self.param_init_std(fqn)
        if std is None:
            return torch.ones(shape, device=device)
        if std == 0.0:
            return torch.zeros(shape, device=device)
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(fqn.encode()))
        return torch.randn(shape, generator=gen, device=device) * std

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter and buffer of a (non-sharded) model in place."""
        for fqn, p in self.named_parameters():
            p.copy_(self.full_param_value(fqn, p.shape, seed, p.device).to(p.dtype))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        for block in self.layers.values():
            if block.is_moe:
                block.moe.router.expert_bias.zero_()
                block.moe.router.last_tokens_per_expert.zero_()

    # -- forward -----------------------------------------------------------------------------------
    def hidden_states(self, tokens_BS: torch.Tensor, positions_BS: torch.Tensor):
        """Final-norm hidden states [B, S, H] and the summed auxiliary loss."""
        h = self.tok_embeddings(tokens_BS)
        auxes = []
        policies = self.block_policies if (self.training and torch.is_grad_enabled()) else ["none"] * len(self.layers)
        for i, (block, policy) in enumerate(zip(self.layers.values(), policies)):
            if policy == "offload":
                h, aux = checkpoint_block_offloaded(block, h, positions_BS, self._stash(i))
            elif policy in ("full", "selective"):
                h, aux = checkpoint_block(block, h, positions_BS, keep_attention=policy == "selective")
            else:
                h, aux = block(h, positions_BS)
            auxes.append(aux)
        # After the last block: the routers' statistics all-reduces started in their forwards have
        # had the whole forward to finish (mop.models.moe.PendingAux). Summed in layer order.
        aux_total = h.new_zeros((), dtype=torch.float32)
        for aux in auxes:
            aux_total = aux_total + resolve_aux(aux)
        return self.norm(h), aux_total

    @property
    def activation_checkpoint(self) -> bool:
        """Whether any block is checkpointed (setting it: every block "full", or every block "none")."""
        return any(p != "none" for p in self.block_policies)

    @activation_checkpoint.setter
    def activation_checkpoint(self, enabled: bool) -> None:
        self.block_policies = ["full" if enabled else "none"] * len(self.layers)

    def _stash(self, i: int) -> HostStash:
        """Host stash of block i's input; backward recomputes the previous offloaded block next, so
        i prefetches that one."""
        stash = self._stashes.setdefault(i, HostStash())
        earlier = [j for j in range(i) if self.block_policies[j] == "offload"]
        stash.prefetch_next = self._stashes.setdefault(earlier[-1], HostStash()) if earlier else None
        return stash

    def forward(self, tokens_BS, positions_BS, labels_BS=None, normalizer=None):
        """Without labels: hidden states. With labels: (cross-entropy loss, auxiliary loss).

        The cross-entropy is summed over target tokens and divided by `normalizer` (the number of
        target tokens in the global batch), so per-rank losses add up to the global mean.
        """
        hidden, aux = self.hidden_states(tokens_BS, positions_BS)
        if labels_BS is None:
            return hidden
        if normalizer is None:
            normalizer = (labels_BS != -100).sum().clamp(min=1)
        ce = self.output(hidden.flatten(0, 1), labels_BS.flatten(), normalizer)
        return ce, aux

    def set_elementwise_kernels(self, kernels: str) -> None:
        """RoPE, SwiGLU and the experts' weighted sum op by op or fused (`mop.ops.fused`), in every
        module that has them. Before `parallelize`, whose expert layers copy the choice."""
        from mop.ops.fused import check_kernels

        check_kernels(kernels)
        for m in self.modules():
            if hasattr(m, "elementwise_kernels"):
                m.elementwise_kernels = kernels

    def routers(self):
        return [b.moe.router for b in self.layers.values() if b.is_moe]

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_LE: torch.Tensor) -> None:
        """Aux-loss-free balancing step: move each router's bias towards the mean load.

        `tokens_per_expert_LE` holds the (globally reduced) loads of the last optimizer step.
        """
        for router, load_E in zip(self.routers(), tokens_per_expert_LE):
            if router.use_expert_bias:
                router.expert_bias.add_(self.cfg.expert_bias_rate * torch.sign(load_E.mean() - load_E))
