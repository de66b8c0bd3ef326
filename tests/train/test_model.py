"""MoETransformer and ModelConfig: causality, learning, checkpointing, sizes, config strictness."""
import pydantic
import pytest
import torch

from shardflow.train.model import ModelConfig, MoETransformer, RouterConfig


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                n_experts=4, top_k=2, expert_hidden=24, dense_hidden=48)
    return ModelConfig(**(base | kw))


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(pydantic.ValidationError, match="n_expertz"):
        ModelConfig(n_expertz=8)
    with pytest.raises(pydantic.ValidationError, match="capacity_factr"):
        ModelConfig(router={"capacity_factr": 2.0})


def test_config_validation():
    assert ModelConfig(dim=64, n_heads=4).head_dim == 16
    with pytest.raises(pydantic.ValidationError, match="n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        ModelConfig(n_experts=2, top_k=3)
    with pytest.raises(pydantic.ValidationError, match="moe_layers"):
        ModelConfig(n_layers=2, moe_layers=[2])
    cfg = ModelConfig.model_validate({"router": {"dispatch": "capacity"}, "moe_layers": [1, 3]})
    assert cfg.router == RouterConfig(dispatch="capacity") and cfg.moe_layer_ids == [1, 3]


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "moe_layers": [1], "shared_expert_hidden": 16}])
def test_param_counts(kw):
    cfg = tiny(**kw)
    model = MoETransformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    # active = total - embedding table (unless it doubles as the head) - unused experts
    n_moe = len(cfg.moe_layer_ids)
    idle = n_moe * (cfg.n_experts - cfg.top_k) * 3 * cfg.dim * cfg.expert_hidden
    embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    assert cfg.num_active_params() == cfg.num_params() - embed - idle
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 32
    assert cfg.flops_per_token(32) == 6 * cfg.num_active_params() + attn


def test_output_fields_and_total_loss():
    cfg = tiny(moe_layers=[0])
    model = MoETransformer(cfg)
    tokens = torch.randint(0, 61, (3, 16))
    targets = tokens.clone()
    targets[:, :4] = -100
    out = model(tokens, targets)
    assert out.logits.shape == (3, 16, 61)
    assert out.expert_counts.shape == (1, 4) and out.expert_counts.sum() == 3 * 16 * 2
    assert out.dropped_tokens.item() == 0
    ce = torch.nn.functional.cross_entropy(out.logits[:, 4:].reshape(-1, 61), tokens[:, 4:].reshape(-1))
    torch.testing.assert_close(out.loss, ce)
    r = cfg.router
    torch.testing.assert_close(out.total_loss, out.loss + r.aux_loss_coef * out.aux_loss + r.z_loss_coef * out.z_loss)
    assert model(tokens, targets, return_logits=False).logits is None
    with pytest.raises(ValueError, match="targets"):
        model(tokens).total_loss


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_causal(dispatch):
    model = MoETransformer(tiny(init_std=0.2, router={"dispatch": dispatch, "capacity_factor": 4.0})).eval()
    tokens = torch.randint(0, 61, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 61
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_decreases_with_adamw():
    torch.manual_seed(0)
    model = MoETransformer(tiny(moe_layers=[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 61, (4, 17))
    losses = []
    for _ in range(30):
        out = model(tokens[:, :-1], tokens[:, 1:], return_logits=False)
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_activation_checkpointing_is_exact():
    # jitter: the recompute must replay the same noise; a dense layer and a shared expert too
    cfg = tiny(router={"jitter": 0.1}, moe_layers=[1], shared_expert_hidden=8)
    plain = MoETransformer(cfg)
    ckpt = MoETransformer(cfg, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 61, (2, 16))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        out = model(tokens, tokens)
        out.total_loss.backward()
        results.append((out.total_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-7, rtol=1e-6, msg=name)


def test_meta_init_then_materialize():
    cfg = tiny(tie_embeddings=True)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = MoETransformer(cfg)
    torch.testing.assert_close(model.rope_cos, ref.rope_cos)
    assert model.lm_head.weight is model.embed.weight
    out = model(torch.randint(0, 61, (1, 8)), torch.randint(0, 61, (1, 8)))
    assert torch.isfinite(out.total_loss)


def test_init_scales_residual_projections():
    cfg = tiny(n_layers=8, dim=128, init_std=0.02, expert_hidden=128)
    model = MoETransformer(cfg)
    blk = model.blocks[0]
    assert blk.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert blk.attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert blk.ffn.experts.w2.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert torch.all(blk.attn_norm.weight == 1)


def test_too_long_sequence_is_an_error():
    model = MoETransformer(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.slow  # ~40 s of torch.compile on 2 cores; the traced dropless loop itself is checked eagerly
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])  # in test_moe.py (is_compiling patched)
def test_compiled_blocks_match_eager(dispatch):
    """``trainer.compile`` compiles each block; the compiled model must train like the eager one.

    Dropless takes a different code path under compile (the traced per-expert loop, not the eager
    fused kernel), so this also checks the two dispatch implementations against each other."""
    torch.manual_seed(0)
    cfg = tiny(router={"dispatch": dispatch, "capacity_factor": 2.0})
    eager, compiled = MoETransformer(cfg), MoETransformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.blocks:
        block.compile()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    losses = []
    for model in (eager, compiled):
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.total_loss.backward()
        losses.append(out.total_loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
