"""The model's typed config, kept free of torch so that reading and validating a pipeline config
(every CLI call) does not pay torch's import time; ``train.model`` builds the network from it."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RouterConfig(BaseModel):
    """How tokens are routed to experts and what keeps the router healthy."""

    model_config = ConfigDict(extra="forbid")

    aux_loss_coef: float = Field(0.01, ge=0, description="Weight of the load-balancing loss (1.0 = balanced).")
    z_loss_coef: float = Field(0.001, ge=0, description="Weight of the router z-loss.")
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = Field(1.25, gt=0, description="Capacity dispatch: slots per expert / fair share.")
    jitter: float = Field(0.0, ge=0, lt=1, description="Multiplicative input noise at train time; 0 = off.")
    routed_scale: float | None = Field(
        None, gt=0, description="Multiplier of the routed experts' renormalized weighted sum (DeepSeek's routed_scaling_factor). "
        "None = top_k: the k active experts then add up like one dense FFN of top_k x expert_hidden instead of being "
        "averaged (1.0 = Mixtral's average, which gives the experts 1/top_k of a dense FFN's effective learning rate).")
    init_std: float | None = Field(None, ge=0, description="Std of the router's initial weights; None = model.init_std, "
                                   "0 = zeros (uniform routing at the start).")


class ModelConfig(BaseModel):
    """Architecture of ``MoETransformer``. Unknown keys are errors so config typos fail loudly."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, gt=0)
    dim: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(8, gt=0)
    n_kv_heads: int = Field(4, gt=0, description="Key/value heads (GQA); must divide n_heads.")
    head_dim: int | None = Field(None, gt=0, description="None = dim // n_heads.")
    max_seq_len: int = Field(1024, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    n_experts: int = Field(8, gt=0)
    top_k: int = Field(2, gt=0)
    expert_hidden: int = Field(512, gt=0, description="Intermediate size of each routed expert.")
    shared_expert_hidden: int = Field(0, ge=0, description="Dense expert applied to every token; 0 = none.")
    moe_layers: Literal["all"] | list[int] = Field("all", description="MoE layer indices; others are dense.")
    dense_hidden: int = Field(1024, gt=0, description="Intermediate size of the dense (non-MoE) layers.")
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    router: RouterConfig = Field(default_factory=RouterConfig)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.moe_layers != "all":
            bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
            if bad or len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(f"moe_layers must be distinct ints in [0, {self.n_layers}), got {self.moe_layers}")
        return self

    @property
    def routed_scale(self) -> float:
        """The effective ``router.routed_scale`` (``top_k`` when unset)."""
        return float(self.top_k if self.router.routed_scale is None else self.router.routed_scale)

    @property
    def moe_layer_ids(self) -> list[int]:
        return list(range(self.n_layers)) if self.moe_layers == "all" else sorted(self.moe_layers)

    # ---- sizes, for logging and MFU

    def _attn_params(self) -> int:
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return 2 * self.dim * q_out + 2 * self.dim * kv_out

    def _ffn_params(self, experts: int) -> tuple[int, int]:
        """(params of all MoE layers with ``experts`` experts counted, params of all dense layers)."""
        n_moe = len(self.moe_layer_ids)
        moe = self.n_experts * self.dim + 3 * self.dim * (experts * self.expert_hidden + self.shared_expert_hidden)
        return n_moe * moe, (self.n_layers - n_moe) * 3 * self.dim * self.dense_hidden

    def num_params(self) -> int:
        """All unique parameters (a tied LM head is counted once); equals ``sum(p.numel())``."""
        moe, dense = self._ffn_params(self.n_experts)
        blocks = self.n_layers * (self._attn_params() + 2 * self.dim) + moe + dense
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return blocks + embed + self.dim

    def num_active_params(self) -> int:
        """Parameters each token multiplies through: ``top_k`` experts, LM head always, no embedding table.

        The embedding lookup does no matmul, while the LM head does even when tied; this is the ``N``
        of the ``6·N`` training-FLOPs rule.
        """
        moe, dense = self._ffn_params(self.top_k)
        blocks = self.n_layers * (self._attn_params() + 2 * self.dim) + moe + dense
        return blocks + self.vocab_size * self.dim + self.dim

    def flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        """Training FLOPs per token (fwd+bwd): ``6·N_active + 12·L·H·head_dim·seq_len`` (PaLM, appendix B).

        The attention term counts the full score matrix, as MFU is often quoted; ``causal=True``
        counts what a causal kernel executes instead: half of it (a token attends to ``seq_len / 2``
        keys on average), which is what bench/train_gpu.py reports so MFU is not inflated.
        """
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * self.num_active_params() + (attn / 2 if causal else attn)


def model_config_digest(model: ModelConfig | Mapping[str, Any]) -> str:
    """The digest of a model config, as checkpoints record it and evaluation reports it.

    One function for both, so the two can never disagree: a ModelConfig is digested as its JSON
    dump, which is what a checkpoint's ``meta.json`` stores as ``model_config``."""
    from shardflow.storage.store import digest_json

    return digest_json(model.model_dump(mode="json") if isinstance(model, ModelConfig) else dict(model))
