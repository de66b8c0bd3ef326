"""Decoder-only mixture-of-experts Transformer in the Mixtral layout (config: ``train.model_config``).

Layout per block: RMSNorm → grouped-query attention (RoPE, causal SDPA) → residual; RMSNorm →
sparse MoE (``train.moe``) or dense SwiGLU → residual. RoPE uses the rotate-half convention of
Hugging Face Llama/Mixtral so ``train.hf_export`` maps weights one-to-one and logits match.

Meta-device construction is supported: build under ``torch.device("meta")``, ``to_empty`` on the
target device, then call ``init_weights()`` (it also rebuilds the non-persistent RoPE tables).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .model_config import ModelConfig, RouterConfig  # noqa: F401 - re-exported: callers build both from here
from .moe import MoEBlock, Router, SwiGLU, SwiGLUExperts

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as HF Mixtral, for exact parity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """fp32 ``cos``/``sin`` of shape ``[max_seq_len, head_dim]``, frequencies repeated over both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, S, D]`` by position; rotate-half pairs dim ``i`` with ``i + D/2`` (HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def _sdpa_has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: ask by calling it
        try:
            t = torch.zeros(1, 2, 1, 2)
            F.scaled_dot_product_attention(t, t[:, :1], t[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


SDPA_GQA = _sdpa_has_gqa()


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, gqa: bool | None = None) -> Tensor:
    """Causal SDPA of ``q`` ``[B, H, S, D]`` over ``k``/``v`` ``[B, H_kv, S, D]`` (``H_kv`` divides ``H``).

    With torch's ``enable_gqa`` (2.5+) each group of ``H / H_kv`` query heads reads its shared K/V
    head in place; the fallback materialises K/V repeated to ``H`` heads (``H / H_kv`` times the K/V
    activation memory and bandwidth). ``gqa`` forces one or the other (tests compare them).
    """
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if SDPA_GQA if gqa is None else gqa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


MoEStats = tuple[Tensor, Tensor, Tensor, Tensor]  # aux_loss, z_loss, expert_counts [E], dropped


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        r = cfg.router
        self.ffn: nn.Module = (
            MoEBlock(cfg.dim, cfg.n_experts, cfg.top_k, cfg.expert_hidden, cfg.shared_expert_hidden,
                     r.dispatch, r.capacity_factor, r.jitter, cfg.routed_scale)
            if moe else SwiGLU(cfg.dim, cfg.dense_hidden)
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, MoEStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if isinstance(self.ffn, MoEBlock):
            y, *stats = self.ffn(self.ffn_norm(x))
            return x + y, tuple(stats)
        return x + self.ffn(self.ffn_norm(x)), None


@dataclass
class ModelOutput:
    """What one forward returns; ``total_loss`` is what the trainer backpropagates."""

    logits: Tensor | None  # [B, S, V] in the compute dtype; None when return_logits=False
    loss: Tensor | None  # cross-entropy mean over targets != -100; None without targets
    aux_loss: Tensor  # load-balancing loss, mean over MoE layers (1.0 = balanced)
    z_loss: Tensor  # router z-loss, mean over MoE layers
    expert_counts: Tensor  # int64 [n_moe_layers, n_experts] token-slots routed (before drops)
    dropped_tokens: Tensor  # int64 scalar: token-slots dropped by capacity dispatch, all layers
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    @property
    def total_loss(self) -> Tensor:
        if self.loss is None:
            raise ValueError("total_loss needs targets: call forward(tokens, targets)")
        return self.loss + self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        moe_ids = set(cfg.moe_layer_ids)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std); projections into the residual stream scaled by 1/sqrt(2·n_layers).

        Scaling the residual writers keeps the residual variance roughly depth-independent at init
        (GPT-2 / Megatron). Norm weights start at one; RoPE tables are recomputed (they are buffers
        that ``to_empty`` leaves uninitialized) and a tied head is re-tied (``to_empty`` unties it).
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Attention):
                for lin in (m.wq, m.wk, m.wv):
                    nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(m.wo.weight, std=out_std)
            elif isinstance(m, (SwiGLU, SwiGLUExperts)):
                stacked = isinstance(m, SwiGLUExperts)
                w1, w3, w2 = (m.w1, m.w3, m.w2) if stacked else (m.w1.weight, m.w3.weight, m.w2.weight)
                nn.init.normal_(w1, std=std)
                nn.init.normal_(w3, std=std)
                nn.init.normal_(w2, std=out_std)
            elif isinstance(m, Router):
                r_std = self.cfg.router.init_std
                nn.init.normal_(m.weight, std=std if r_std is None else r_std) if r_std != 0 else nn.init.zeros_(m.weight)
        nn.init.normal_(self.embed.weight, std=std)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # to_empty() unties: it replaces each parameter
        else:
            nn.init.normal_(self.lm_head.weight, std=std)
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *, return_logits: bool = True) -> ModelOutput:
        """``tokens`` int64 ``[B, S]`` (S ≤ max_seq_len), ``targets`` ``[B, S]`` with -100 = ignore."""
        _, s = tokens.shape
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        h = self.embed(tokens)
        stats: list[MoEStats] = []
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h, st = checkpoint(block, h, cos, sin, use_reentrant=False)
            else:
                h, st = block(h, cos, sin)
            if st is not None:
                stats.append(st)
        logits = self.lm_head(self.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(
            logits=logits if return_logits else None,
            loss=loss,
            **self._moe_summary(stats, h),
            aux_loss_coef=self.cfg.router.aux_loss_coef,
            z_loss_coef=self.cfg.router.z_loss_coef,
        )

    def _moe_summary(self, stats: list[MoEStats], h: Tensor) -> dict[str, Tensor]:
        if not stats:
            zero = h.new_zeros((), dtype=torch.float32)
            counts = torch.zeros(0, self.cfg.n_experts, dtype=torch.long, device=h.device)
            return dict(aux_loss=zero, z_loss=zero, expert_counts=counts, dropped_tokens=counts.sum())
        aux, z, counts, dropped = zip(*stats)
        return dict(
            aux_loss=torch.stack(aux).mean(),
            z_loss=torch.stack(z).mean(),
            expert_counts=torch.stack(counts),
            dropped_tokens=torch.stack(dropped).sum(),
        )
