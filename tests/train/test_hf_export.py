"""Export to transformers' MixtralForCausalLM: same logits, loadable from disk, generates."""
import json

import pytest
import torch

from shardflow.train import hf_export
from shardflow.train.hf_export import save_hf, to_hf_config, to_hf_state_dict
from shardflow.train.model import ModelConfig, MoETransformer

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, n_experts=4,
                top_k=2, expert_hidden=24, init_std=0.1, rope_theta=500.0)
    return ModelConfig(**(base | kw))


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def trained(request):
    torch.manual_seed(0)
    cfg = tiny(tie_embeddings=request.param)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm mapping would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_in_memory_state_dict_gives_same_logits(trained):
    cfg, model = trained
    hf = MixtralForCausalLM(MixtralConfig.from_dict(to_hf_config(cfg, 1, 2, 0))).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    torch.testing.assert_close(logits(hf, tokens), logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_saved_dir_loads_with_from_pretrained_and_generates(trained, tmp_path):
    cfg, model = trained
    save_hf(model.state_dict(), cfg, tmp_path, bos_id=1, eos_id=2, pad_id=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["architectures"] == ["MixtralForCausalLM"] and conf["num_local_experts"] == 4
    hf = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    tokens = torch.randint(3, cfg.vocab_size, (2, 24))
    torch.testing.assert_close(logits(hf, tokens), logits(model, tokens), atol=1e-4, rtol=1e-4)
    mask = torch.ones(1, 6, dtype=torch.long)
    out = hf.generate(tokens[:1, :6], max_new_tokens=5, do_sample=False, attention_mask=mask)
    assert out.shape[0] == 1 and 6 < out.shape[1] <= 11
    assert ((out >= 0) & (out < cfg.vocab_size)).all()


def test_compiled_or_ddp_prefixes_are_stripped():
    cfg = tiny()
    state = {"_orig_mod." + k: v for k, v in MoETransformer(cfg).state_dict().items()}
    assert "model.embed_tokens.weight" in to_hf_state_dict(state, cfg)


def test_per_expert_layout_is_chosen_when_transformers_wants_it(monkeypatch):
    """Older transformers (v4) name each expert separately; the target's keys pick the layout."""
    cfg = tiny(n_layers=1)
    model = MoETransformer(cfg)
    v4 = {"model.embed_tokens.weight": (97, 32), "model.norm.weight": (32,), "lm_head.weight": (97, 32),
          "model.layers.0.input_layernorm.weight": (32,), "model.layers.0.post_attention_layernorm.weight": (32,),
          "model.layers.0.block_sparse_moe.gate.weight": (4, 32)}
    for p, shape in (("q", (32, 32)), ("k", (16, 32)), ("v", (16, 32)), ("o", (32, 32))):
        v4[f"model.layers.0.self_attn.{p}_proj.weight"] = shape
    for e in range(4):
        for w, shape in (("w1", (24, 32)), ("w3", (24, 32)), ("w2", (32, 24))):
            v4[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] = shape
    monkeypatch.setattr(hf_export, "hf_target_shapes", lambda _: {k: torch.Size(s) for k, s in v4.items()})
    out = to_hf_state_dict(model.state_dict(), cfg)
    assert set(out) == set(v4)
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.2.w3.weight"], model.blocks[0].ffn.experts.w3[2])


@pytest.mark.parametrize("kw, msg", [
    ({"moe_layers": [0]}, "every layer must be MoE"),
    ({"shared_expert_hidden": 8}, "shared expert"),
    ({"router": {"dispatch": "capacity"}}, "dropless"),
])
def test_non_mixtral_models_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        to_hf_config(tiny(**kw), 1, 2, 0)
