"""Export a shardflow checkpoint as a Hugging Face ``MixtralForCausalLM`` (config.json + safetensors).

transformers changed Mixtral's parameter layout between majors (v4: one module per expert under
``block_sparse_moe.experts.{e}.w1/w2/w3``; v5: fused ``mlp.experts.gate_up_proj``/``down_proj``
tensors and ``mlp.gate``). Rather than pin one, the target names and shapes are read from a
``MixtralForCausalLM`` built on the meta device with the exported config, and the layout whose
keys match is emitted — so the files load into whichever transformers is installed here.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .model_config import ModelConfig

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` unless ``cfg`` computes exactly what Mixtral computes."""
    problems = []
    if cfg.moe_layer_ids != list(range(cfg.n_layers)):
        problems.append(f"every layer must be MoE (moe_layers={cfg.moe_layers!r}; Mixtral has no dense layers)")
    if cfg.shared_expert_hidden:
        problems.append(f"Mixtral has no shared expert (shared_expert_hidden={cfg.shared_expert_hidden})")
    if cfg.router.dispatch != "dropless":
        problems.append(f"Mixtral is dropless; router.dispatch={cfg.router.dispatch!r} drops tokens")
    if problems:
        raise ValueError("cannot export to MixtralForCausalLM: " + "; ".join(problems))


def to_hf_config(
    cfg: ModelConfig,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """``config.json`` contents for ``MixtralConfig``.

    ``router_aux_loss_coef`` is converted, not copied: transformers' balance loss is ``top_k`` times
    ours (it normalizes expert fractions by tokens, we by token-slots), so fine-tuning in HF keeps
    the same effective pressure.
    """
    check_exportable(cfg)
    major = _transformers_major()
    dtype_name = str(dtype).removeprefix("torch.")
    conf = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.expert_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.router.aux_loss_coef / cfg.top_k,
        "router_jitter_noise": cfg.router.jitter,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if major >= 5:
        conf["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        conf["dtype"] = dtype_name
    else:
        conf["torch_dtype"] = dtype_name
    return conf


def _strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for name, t in state.items():
        for p in _WRAPPER_PREFIXES:
            name = name.removeprefix(p)
        out[name] = t
    return out


def _experts_v4(i: int, w1: Tensor, w3: Tensor, w2: Tensor, gate: Tensor) -> dict[str, Tensor]:
    pre = f"model.layers.{i}.block_sparse_moe"
    out = {f"{pre}.gate.weight": gate}
    for e in range(w1.shape[0]):
        out[f"{pre}.experts.{e}.w1.weight"] = w1[e]
        out[f"{pre}.experts.{e}.w3.weight"] = w3[e]
        out[f"{pre}.experts.{e}.w2.weight"] = w2[e]
    return out


def _experts_fused(i: int, w1: Tensor, w3: Tensor, w2: Tensor, gate: Tensor) -> dict[str, Tensor]:
    # v5 MixtralExperts: gate_up_proj [E, 2·hidden, dim] = [w1; w3] (chunked gate-first), down_proj = w2.
    pre = f"model.layers.{i}.mlp"
    return {
        f"{pre}.gate.weight": gate,
        f"{pre}.experts.gate_up_proj": torch.cat([w1, w3], dim=1),
        f"{pre}.experts.down_proj": w2,
    }


_LAYOUTS: dict[str, Callable[..., dict[str, Tensor]]] = {"v4-per-expert": _experts_v4, "v5-fused": _experts_fused}


def _candidate(
    state: dict[str, Tensor], cfg: ModelConfig, experts: Callable[..., dict[str, Tensor]]
) -> dict[str, Tensor]:
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    out["lm_head.weight"] = state["embed.weight"] if cfg.tie_embeddings else state["lm_head.weight"]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}", f"model.layers.{i}"
        out[f"{h}.input_layernorm.weight"] = state[f"{b}.attn_norm.weight"]
        out[f"{h}.post_attention_layernorm.weight"] = state[f"{b}.ffn_norm.weight"]
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{h}.self_attn.{theirs}.weight"] = state[f"{b}.attn.{ours}.weight"]
        e = f"{b}.ffn.experts"
        # Mixtral sums the renormalized top-k outputs unscaled: fold router.routed_scale into w2.
        w2 = state[f"{e}.w2"] if cfg.routed_scale == 1.0 else state[f"{e}.w2"] * cfg.routed_scale
        out.update(experts(i, state[f"{e}.w1"], state[f"{e}.w3"], w2, state[f"{b}.ffn.router.weight"]))
    return out


def hf_target_shapes(hf_config: dict) -> dict[str, torch.Size]:
    """Parameter names and shapes of the installed ``MixtralForCausalLM`` (built on meta: no memory)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig.from_dict(hf_config))
    return {k: v.shape for k, v in model.state_dict().items()}


def to_hf_state_dict(model_state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``MoETransformer.state_dict()`` onto the installed transformers' Mixtral names and layout.

    Returned tensors may be views of ``model_state``; ``lm_head.weight`` is included even when tied
    (``load_state_dict`` expects it, ``save_hf`` drops it).
    """
    check_exportable(cfg)
    state = _strip_wrappers(model_state)
    target = hf_target_shapes(to_hf_config(cfg, None, None, None))
    required = set(target) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    tried = []
    for name, experts in _LAYOUTS.items():
        out = _candidate(state, cfg, experts)
        if not required <= set(out) or not set(out) <= set(target):
            tried.append(name)
            continue
        for k, t in out.items():
            if t.shape != target[k]:
                raise ValueError(f"{k}: exported shape {tuple(t.shape)} != transformers' {tuple(target[k])}")
        return out
    raise ValueError(f"installed transformers' Mixtral layout matches none of {tried}; e.g. keys {sorted(target)[:8]}")


def save_hf(
    model_state: Mapping[str, Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``config.json`` and ``model.safetensors`` loadable by ``MixtralForCausalLM.from_pretrained``.

    ``dtype`` None keeps the checkpoint's dtype. ``model_state`` must hold full (gathered) tensors,
    not FSDP shards.
    """
    from safetensors.torch import save_file

    hf_state = to_hf_state_dict(model_state, cfg)
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight")  # transformers re-ties it; safetensors refuses shared storage
    # clone: per-expert slices share storage, which safetensors rejects
    tensors = {k: t.detach().to("cpu", dtype=dtype or t.dtype).clone().contiguous() for k, t in hf_state.items()}
    out_dtype = dtype or next(iter(tensors.values())).dtype
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg, bos_id, eos_id, pad_id, dtype=out_dtype), f, indent=2, sort_keys=True)
