"""llm.py against transformers: tiny random HF models saved with save_pretrained, loaded with our from_pretrained."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from llm import LLM, KVCache, LLMConfig

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, initializer_range=0.1)
GPT2_SMALL = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
                  bos_token_id=0, eos_token_id=0)
FAMILIES = {
    "llama2": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama3": lambda: LlamaForCausalLM(LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_theta=500000.0,
        # original context 16: head_dim 8 has wavelengths on both sides of and inside [16/4, 16/1]
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "qwen2_tied": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_untied": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
    "phi": lambda: PhiForCausalLM(PhiConfig(**SMALL, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(**GPT2_SMALL)),
    # an lm_head of its own is an nn.Linear (V, d), not a transposed Conv1D
    "gpt2_untied": lambda: GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, tie_word_embeddings=False)),
    "gpt2_unscaled": lambda: GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, scale_attn_weights=False)),  # no 1/sqrt(hs)
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (transformers model in eval mode, directory it was saved to)."""
    out = {}
    for i, (name, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = make().eval()
        with torch.no_grad():  # norms/biases away from 1/0, so a missing norm or bias cannot pass
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (model, str(d))
    return out


def batch(T=10, B=3, pads=(0, 3, 6), V=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        idx[b, :p] = 0  # left padding
    return idx, mask


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("fam", FAMILIES)
def test_logits_match_transformers(hf_dirs, fam):
    hf, d = hf_dirs[fam]
    ours = LLM.from_pretrained(d)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    idx, mask = batch(pads=(0, 0, 0))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() <= 1e-4
        idx, mask = batch()
        ref = hf(idx, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = ours(idx, mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-4
    assert got.isfinite().all()  # padding rows too (no fully masked softmax rows)


@pytest.mark.parametrize("fam", FAMILIES)
def test_greedy_generate_matches_transformers(hf_dirs, fam):
    hf, d = hf_dirs[fam]
    ours = LLM.from_pretrained(d)
    idx, mask = batch(T=7, pads=(0, 2, 4), seed=1)
    ref = hf.generate(idx, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(idx, max_new_tokens=8, mask=mask), ref)
    ref1 = hf.generate(idx[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(idx[:1], max_new_tokens=8), ref1)


def test_eos_pads_finished_rows_like_transformers(hf_dirs):
    hf, d = hf_dirs["llama2"]
    ours = LLM.from_pretrained(d)
    idx, mask = batch(T=7, pads=(0, 2, 4), seed=1)
    free = ours.generate(idx, max_new_tokens=8, mask=mask)
    eos = int(free[0, 7 + 2])  # row 0 emits it at its third new token
    got = ours.generate(idx, max_new_tokens=8, mask=mask, eos_id=eos)
    ref = hf.generate(idx, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                      pad_token_id=eos)
    assert torch.equal(got, ref)
    assert (got[0, 7 + 2:] == eos).all()


@pytest.mark.parametrize("fam", ["llama3", "phi", "gpt2"])
def test_kv_cache_equals_recompute(hf_dirs, fam):
    ours = LLM.from_pretrained(hf_dirs[fam][1])
    idx, mask = batch(T=12, pads=(0, 2, 5), seed=2)
    with torch.no_grad():
        full = ours(idx, mask=mask)
        cache = KVCache(ours.config.n_layer)
        parts = [ours(idx[:, :6], mask=mask[:, :6], cache=cache)]       # prefill
        parts += [ours(idx[:, 6:9], mask=mask[:, :9], cache=cache)]     # a chunk of 3
        for t in range(9, 12):                                           # one token at a time
            parts.append(ours(idx[:, t:t + 1], mask=mask[:, :t + 1], cache=cache))
        assert cache.length == 12
        real = mask.bool()
        assert (torch.cat(parts, 1)[real] - full[real]).abs().max() <= 1e-5
        # unpadded batch: the no-mask paths (causal, offset causal chunk, single token)
        cache = KVCache(ours.config.n_layer)
        parts = [ours(idx[:1, :6], cache=cache), ours(idx[:1, 6:9], cache=cache), ours(idx[:1, 9:10], cache=cache)]
        assert (torch.cat(parts, 1) - ours(idx[:1, :10])).abs().max() <= 1e-5


def test_before_layer_hook(hf_dirs):
    ours = LLM.from_pretrained(hf_dirs["llama3"][1])
    idx, mask = batch(T=6, pads=(0, 1, 2))
    calls = []

    def identity(i, x):
        calls.append((i, x.shape[1]))
        return x

    plain = ours.generate(idx, max_new_tokens=4, mask=mask)
    hooked = ours.generate(idx, max_new_tokens=4, mask=mask, before_layer=identity)
    assert torch.equal(plain, hooked)
    # prefill over 6 positions, then 3 decode steps of one token each, every layer each time
    assert calls == [(0, 6), (1, 6)] + [(0, 1), (1, 1)] * 3
    with torch.no_grad():
        shifted = ours(idx, mask=mask, before_layer=lambda i, x: x + 1.0 if i == 1 else x)
        assert (shifted - ours(idx, mask=mask)).abs().max() > 1e-2


def test_embeds_prefix_and_sampling(hf_dirs):
    ours = LLM.from_pretrained(hf_dirs["qwen2_tied"][1])
    assert ours.lm_head.weight is ours.embed_tokens.weight
    idx, mask = batch(T=6, pads=(0, 1, 2))
    greedy = ours.generate(idx, max_new_tokens=5, mask=mask)
    with torch.no_grad():
        from_embeds = ours.generate(embeds=ours.embed(idx), max_new_tokens=5, mask=mask)
    assert torch.equal(from_embeds, greedy[:, 6:])
    torch.manual_seed(0)
    assert torch.equal(ours.generate(idx, max_new_tokens=5, mask=mask, temperature=0.7, top_k=1), greedy)
    torch.manual_seed(0)
    sampled = ours.generate(idx, max_new_tokens=5, mask=mask, temperature=5.0)
    assert not torch.equal(sampled, greedy)


def test_sharded_load_and_missing_shard(hf_dirs, tmp_path):
    hf, _ = hf_dirs["llama3"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    idx, _ = batch()
    with torch.no_grad():
        assert (LLM.from_pretrained(tmp_path)(idx) - hf(idx).logits).abs().max() <= 1e-4
    os.remove(tmp_path / shards[1])
    with pytest.raises(FileNotFoundError, match=shards[1]):
        LLM.from_pretrained(tmp_path)


def test_bf16_load(hf_dirs):
    d = hf_dirs["llama3"][1]
    fp32, bf16 = LLM.from_pretrained(d), LLM.from_pretrained(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    idx, mask = batch()
    with torch.no_grad():
        a, b = fp32(idx, mask=mask), bf16(idx, mask=mask)
    assert b.dtype == torch.bfloat16
    real = mask.bool()
    err = (a[real] - b[real].float()).abs().max() / a[real].abs().max()
    assert 0 < err <= 0.05


@pytest.mark.parametrize("fam", FAMILIES)
def test_save_pretrained_round_trips(hf_dirs, fam, tmp_path):
    hf, d = hf_dirs[fam]
    ours = LLM.from_pretrained(d)
    ours.save_pretrained(tmp_path)
    ours2 = LLM.from_pretrained(tmp_path)
    assert ours2.config == ours.config
    sd, sd2 = ours.state_dict(), ours2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the files are what transformers itself expects: same keys as its own save, and it loads them
    assert load_file(tmp_path / "model.safetensors").keys() == load_file(os.path.join(d, "model.safetensors")).keys()
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx, _ = batch(pads=(0, 0, 0))
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max() <= 1e-4


def test_tiny_preset_saves_as_llama(tmp_path):
    torch.manual_seed(0)
    ours = LLM(LLMConfig.preset("tiny")).eval()
    ours.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max() <= 1e-4


def test_from_hf_reads_old_top_level_rope_fields():
    new = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 32, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
                                                              "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 16}}
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    a, b = LLMConfig.from_hf(new), LLMConfig.from_hf(old)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
    phi_old = {"model_type": "phi", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
               "partial_rotary_factor": 0.5, "rope_theta": 10000.0}
    assert LLMConfig.from_hf(phi_old).rotary_dim == 2


def test_phi_without_partial_rotary_factor_rotates_half_as_transformers(hf_dirs, tmp_path):
    """PhiConfig defaults partial_rotary_factor to 0.5: a config.json without it must load as transformers reads it."""
    _, d = hf_dirs["phi"]
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.pop("partial_rotary_factor", None)
    (cfg.get("rope_parameters") or {}).pop("partial_rotary_factor", None)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    os.link(os.path.join(d, "model.safetensors"), tmp_path / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5  # transformers filled its default in
    ours = LLM.from_pretrained(tmp_path)
    assert ours.config.rotary_dim == 4  # half of head_dim 8
    idx, _ = batch(pads=(0, 0, 0))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() <= 1e-4


def test_unsupported_activation_names_field_and_choices(hf_dirs, tmp_path):
    for fam, field in [("gpt2", "activation_function"), ("llama2", "hidden_act")]:
        cfg = json.load(open(os.path.join(hf_dirs[fam][1], "config.json")))
        with pytest.raises(ValueError, match=rf"{field}='relu' is not supported; supported: \['gelu', 'gelu_new'"):
            LLMConfig.from_hf({**cfg, field: "relu"})
    with pytest.raises(ValueError, match=r"LLMConfig.act='relu'.*'silu'"):
        LLM(LLMConfig(act="relu", mlp="gelu"))


def test_load_errors_name_the_culprit(hf_dirs, tmp_path):
    _, d = hf_dirs["llama2"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM.from_pretrained(tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump({**cfg, "model_type": "bert"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"'bert'.*'gpt2', 'llama', 'phi', 'qwen2'"):
        LLM.from_pretrained(tmp_path)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*only safetensors.*arbitrary code"):
        LLM.from_pretrained(tmp_path)
    os.remove(tmp_path / "pytorch_model.bin")
    sd = load_file(os.path.join(d, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.ones(33)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        LLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.layers.0.extra.weight" in msg
    assert "model.norm.weight: file (33,) vs model (32,)" in msg


def test_input_errors(hf_dirs):
    ours = LLM.from_pretrained(hf_dirs["gpt2"][1])  # learned positions: 64 of them
    with pytest.raises(ValueError, match=r"token id 96 is outside the vocabulary \[0, 96\)"):
        ours(torch.tensor([[1, 96]]))
    with pytest.raises(ValueError, match="65 positions.*max_seq_len=64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="60 tokens.*max_new_tokens=5.*max_seq_len=64"):
        ours.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="exactly one of idx / embeds"):
        ours()


@pytest.mark.parametrize("name,count", [("vicuna-7b", 6_738_415_616), ("llama3-8b", 8_030_261_248),
                                        ("qwen2-0.5b", 494_032_768), ("phi-1.5", 1_418_270_720),
                                        ("gpt2", 124_439_808)])
def test_presets_have_the_published_parameter_counts(name, count):
    with torch.device("meta"):  # no memory: shapes only
        model = LLM(LLMConfig.preset(name))
    assert sum(p.numel() for p in model.parameters()) == count
