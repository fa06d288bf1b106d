"""vit.py against transformers' CLIP (tiny, random, saved and loaded back), loader errors, and LoRA."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from vit import (LoRAConv2d, LoRALinear, ViT, ViTConfig, add_lora, lora_parameters, set_adapter)

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)


def perturb_norms(model):
    """LayerNorm weights/biases away from 1/0, so a skipped or misplaced norm can't pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))


def hf_vision(act="quick_gelu"):
    torch.manual_seed(0)
    m = CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act=act)).eval()
    perturb_norms(m)
    return m


def hf_clip(act="gelu"):
    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    m = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(**VISION, hidden_act=act), projection_dim=8)).eval()
    perturb_norms(m)
    return m


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip_vision"))
    hf = hf_vision()
    hf.save_pretrained(d)
    return d, hf


def pixels(size=32, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check_parity(ours, hf_vision_model, x, **hf_kwargs):
    with torch.no_grad():
        ref = hf_vision_model(pixel_values=x, output_hidden_states=True, **hf_kwargs)
        for layer in (-1, -2, 0):
            got = ours(x, layer=layer)
            want = ref.hidden_states[layer] if layer < 0 else ref.hidden_states[layer + 1]
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= TOL, f"layer {layer}"
        assert (ours.pool(ours(x)) - ref.pooler_output).abs().max().item() <= TOL


# --- parity with transformers -----------------------------------------------------------------------------------

def test_vision_layout_matches_transformers(vision_dir):
    d, hf = vision_dir
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        assert not any(k.startswith("vision_model.") for k in f.keys())  # transformers-5 layout: bare keys
    ours = ViT.from_pretrained(d).eval()
    assert ours.config == ViTConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_dim=64)
    check_parity(ours, hf, pixels())


def test_full_clip_layout_matches_transformers(tmp_path):
    hf = hf_clip(act="gelu")
    hf.save_pretrained(tmp_path)
    ours = ViT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.act == "gelu"
    check_parity(ours, hf.vision_model, pixels())  # text tower in the file is ignored


def test_legacy_vision_config_dict_wins_like_transformers(tmp_path):
    """Old CLIP config.json files carry vision_config_dict next to vision_config; transformers lets the dict win."""
    hf_clip(act="gelu").save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["vision_config_dict"] = {**VISION, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-2}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    hf = CLIPModel.from_pretrained(tmp_path).eval()
    assert (hf.config.vision_config.hidden_act, hf.config.vision_config.layer_norm_eps) == ("quick_gelu", 1e-2)
    ours = ViT.from_pretrained(str(tmp_path)).eval()
    assert (ours.config.act, ours.config.eps) == ("quick_gelu", 1e-2)
    check_parity(ours, hf.vision_model, pixels())


def test_prefixed_vision_layout_with_position_ids(vision_dir, tmp_path):
    # transformers-4 vision checkpoints: keys prefixed "vision_model.", plus the saved position_ids buffer
    d, hf = vision_dir
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        sd = {"vision_model." + k: f.get_tensor(k) for k in f.keys()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(d, "config.json")).read())
    check_parity(ViT.from_pretrained(str(tmp_path)).eval(), hf, pixels())


def test_vision_with_projection_layout(tmp_path):
    torch.manual_seed(0)
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=8)).eval()
    perturb_norms(hf)
    hf.save_pretrained(tmp_path)  # vision_model.* plus visual_projection.weight, which we ignore
    check_parity(ViT.from_pretrained(str(tmp_path)).eval(), hf.vision_model, pixels())


def test_sharded_checkpoint(tmp_path):
    hf = hf_vision()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert (tmp_path / "model.safetensors.index.json").exists() and len(shards) > 1
    check_parity(ViT.from_pretrained(str(tmp_path)).eval(), hf, pixels())


def test_position_interpolation_matches_transformers(vision_dir):
    d, hf = vision_dir
    ours = ViT.from_pretrained(d).eval()
    # same method as HF's interpolate_pos_encoding (bicubic, align_corners=False, to the new grid)
    for h, w in ((48, 48), (24, 40)):
        x = torch.randn(2, 3, h, w)
        assert ours(x).shape == (2, 1 + (h // 8) * (w // 8), 32)
        check_parity(ours, hf, x, interpolate_pos_encoding=True)
    # at the native size interpolation is the identity: the learned table itself
    assert ours.positions(4, 4) is ours.position_embedding
    check_parity(ours, hf, pixels(), interpolate_pos_encoding=True)


def test_bf16_load(vision_dir):
    d, _ = vision_dir
    x = pixels()
    fp32 = ViT.from_pretrained(d).eval()
    bf16 = ViT.from_pretrained(d, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    assert b.dtype == torch.bfloat16
    rel = (a - b.float()).norm() / a.norm()
    assert rel.item() < 2e-2, rel.item()


def test_save_pretrained_round_trip(vision_dir, tmp_path):
    d, hf = vision_dir
    ours = ViT.from_pretrained(d).eval()
    ours.save_pretrained(str(tmp_path))
    again = ViT.from_pretrained(str(tmp_path)).eval()
    for (n, p), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    theirs = CLIPVisionModel.from_pretrained(str(tmp_path)).eval()  # transformers reads what we wrote
    check_parity(ours, theirs, pixels())
    check_parity(ours, hf, pixels(seed=3))


def test_presets_match_transformers_parameter_counts():
    assert ViTConfig.preset("tiny") == ViTConfig(64, 8, 128, 4, 4, 512, "quick_gelu")
    for name, hf_cfg in [
        ("clip-vit-l-14-336", CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                               num_attention_heads=16, image_size=336, patch_size=14)),
        # DFN-5B's ViT-H is open_clip's ViT-H-14-quickgelu (pretrained="dfn5b"): CLIP's quick_gelu
        ("clip-vit-h-14", CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                           num_attention_heads=16, image_size=224, patch_size=14,
                                           hidden_act="quick_gelu"))]:
        with torch.device("meta"):
            ours, theirs = ViT(ViTConfig.preset(name)), CLIPVisionModel(hf_cfg)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()), name
        assert ViT.config_from_hf(hf_cfg.to_dict()) == ViTConfig.preset(name)
    assert ViT(ViTConfig.preset("tiny")).num_patches == 64


# --- errors -----------------------------------------------------------------------------------------------------

def rewrite(src, dst, edit):
    """Copy an HF dir, editing its state dict with edit(sd)."""
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(open(os.path.join(src, "config.json")).read())


def test_mismatched_keys_all_named(vision_dir, tmp_path):
    d, _ = vision_dir

    def edit(sd):
        del sd["encoder.layers.1.mlp.fc2.bias"]
        sd["encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        sd["embeddings.position_embedding.weight"] = torch.zeros(10, 32)

    rewrite(d, str(tmp_path), edit)
    with pytest.raises(ValueError) as e:
        ViT.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "layers.1.mlp.fc2.bias" in msg
    assert "encoder.layers.0.self_attn.extra.weight" in msg
    assert "embeddings.position_embedding.weight: file (10, 32) vs model (17, 32)" in msg


def test_missing_shard_named(tmp_path):
    hf_vision().save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / gone)
    with pytest.raises(FileNotFoundError, match=gone):
        ViT.from_pretrained(str(tmp_path))


def test_loader_refusals(vision_dir, tmp_path):
    d, _ = vision_dir
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ViT.from_pretrained(str(tmp_path))
    cfg = json.load(open(os.path.join(d, "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only safetensors are loaded.*pytorch_model\.bin|pytorch_model\.bin.*only safetensors"):
        ViT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "siglip_vision_model"}))
    with pytest.raises(ValueError, match="siglip_vision_model.*clip_vision_model"):
        ViT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="relu"):
        ViT.from_pretrained(str(tmp_path))


def test_bad_pixels_and_layer():
    vit = ViT(ViTConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        vit(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(1, 1, 64, 64\)"):
        vit(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="60x64.*patch_size 8"):
        vit(torch.zeros(1, 3, 60, 64))
    with pytest.raises(IndexError, match="layer 4"):
        vit(torch.zeros(1, 3, 64, 64), layer=4)


def test_layer_stops_early():
    vit = ViT(ViTConfig.preset("tiny")).eval()
    calls = []
    for i, b in enumerate(vit.layers):
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    vit(torch.randn(1, 3, 64, 64), layer=-3)
    assert calls == [0, 1]


# --- LoRA -------------------------------------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embed"]


def randomise_B(vit, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(vit, name):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_math():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(6, 5))
    lin.add("a", rank=2, alpha=4.0)
    nn.init.normal_(lin.lora_B["a"])
    lin.active = "a"
    x = torch.randn(3, 6)
    want = x @ lin.base.weight.T + lin.base.bias + 2.0 * x @ lin.lora_A["a"].T @ lin.lora_B["a"].T
    assert torch.allclose(lin(x), want, atol=1e-6)

    conv = LoRAConv2d(nn.Conv2d(3, 4, 2, stride=2, bias=False))
    conv.add("a", rank=3, alpha=1.5)
    nn.init.normal_(conv.lora_B["a"])
    conv.active = "a"
    x = torch.randn(2, 3, 6, 6)
    delta = (conv.lora_B["a"].view(4, 3) @ conv.lora_A["a"].view(3, -1)).view(4, 3, 2, 2)
    want = nn.functional.conv2d(x, conv.base.weight + 0.5 * delta, stride=2)
    assert torch.allclose(conv(x), want, atol=1e-5)


def test_lora_zero_B_then_switching():
    torch.manual_seed(0)
    vit = ViT(ViTConfig.preset("tiny")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = vit(x)
        wrapped = add_lora(vit, TARGETS, "global", rank=4, alpha=8)
        assert len(wrapped) == 1 + 6 * 4 and isinstance(vit.patch_embed, LoRAConv2d)
        assert torch.equal(vit(x, adapter="global"), base)  # B = 0: identity
        add_lora(vit, TARGETS, "local", rank=2, alpha=2, dropout=0.1)
        randomise_B(vit, "global", 1)
        randomise_B(vit, "local", 2)
        g, l = vit(x, adapter="global"), vit(x, adapter="local")
        assert (g - base).abs().max() > 1e-3 and (l - base).abs().max() > 1e-3 and (g - l).abs().max() > 1e-3
        assert torch.equal(vit(x), base)  # adapter=None: base weights
        # independence: changing "local" leaves "global" outputs unchanged
        randomise_B(vit, "local", 3)
        assert torch.equal(vit(x, adapter="global"), g)
        # set_adapter on a submodule-free call path: the layers themselves
        set_adapter(vit, "local")
        assert all(m.active == "local" for m in vit.modules() if isinstance(m, LoRALinear))
        set_adapter(vit, None)
    with pytest.raises(ValueError, match="'nope'"):
        vit(x, adapter="nope")
    with pytest.raises(ValueError, match="'global'"):
        ViT(ViTConfig.preset("tiny"))(x, adapter="global")  # no LoRA at all: naming an adapter is an error
    with pytest.raises(ValueError, match="already exists"):
        add_lora(vit, ["fc1"], "local", rank=2, alpha=2)
    with pytest.raises(ValueError, match="no layer"):
        add_lora(vit, ["not_a_layer"], "x", rank=2, alpha=2)
    with pytest.raises(TypeError, match="mlp"):
        add_lora(vit, ["mlp"], "x", rank=2, alpha=2)


def test_only_active_lora_params_get_grads():
    torch.manual_seed(0)
    vit = ViT(ViTConfig.preset("tiny"))
    vit.requires_grad_(False)
    add_lora(vit, TARGETS, "a", rank=4, alpha=4)
    add_lora(vit, ["fc1", "fc2"], "b", rank=2, alpha=2)
    randomise_B(vit, "a", 1)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vit.named_parameters() if ".lora_" in n}
    vit(torch.randn(2, 3, 64, 64), adapter="a").square().mean().backward()
    a_params = {id(p) for p in lora_parameters(vit, "a")}
    assert len(a_params) == 2 * (1 + 6 * 4) and len(lora_parameters(vit)) == len(a_params) + 2 * 2 * 4
    for n, p in vit.named_parameters():
        if id(p) in a_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_lora_generic_module_and_state_dicts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.ModuleDict({"q_proj": nn.Linear(8, 4)}))
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    assert add_lora(net, ["q_proj"], "x", rank=2, alpha=2) == ["2.q_proj"]
    sd = net.state_dict()
    assert "2.q_proj.base.weight" in sd and "2.q_proj.lora_A.x" in sd and "2.q_proj.lora_B.x" in sd
    # a state dict saved before wrapping still loads the base weights (LoRA params are then the missing keys)
    with torch.no_grad():
        net[2]["q_proj"].base.weight.zero_()
    res = net.load_state_dict(plain, strict=False)
    assert sorted(res.missing_keys) == ["2.q_proj.lora_A.x", "2.q_proj.lora_B.x"] and not res.unexpected_keys
    assert torch.equal(net[2]["q_proj"].base.weight, plain["2.q_proj.weight"])
    # and a wrapped model's own state dict round-trips strictly
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.ModuleDict({"q_proj": nn.Linear(8, 4)}))
    add_lora(other, ["q_proj"], "x", rank=2, alpha=2)
    other.load_state_dict(net.state_dict())
    x = torch.randn(3, 8)
    set_adapter(net, "x"), set_adapter(other, "x")
    assert torch.equal(net[2]["q_proj"](x), other[2]["q_proj"](x))


def test_pretrained_then_lora(vision_dir, tmp_path):
    d, hf = vision_dir
    vit = ViT.from_pretrained(d).eval()
    add_lora(vit, TARGETS, "a", rank=2, alpha=2)
    check_parity(vit, hf, pixels())  # B = 0 and adapter None: still the reference
    with pytest.raises(ValueError, match="LoRA"):
        vit.save_pretrained(str(tmp_path))
