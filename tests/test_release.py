"""The released checkpoints, on CPU, with tiny stand-ins in each release's exact layout: LLaVA-1.5 as llava-hf
converted it (three key layouts; transformers' LlavaForConditionalGeneration is the reference) and as LLaVA
released it (pytorch_model-*.bin, LLaVA's config fields, the tower inside or in its own CLIP directory), and
INF-LLaVA (its DEM as SpatialEmbed, the release's encode_images restated as the reference). Key tables, shape
checks, refused config fields, the .bin -> safetensors conversion, and the demo commands end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import hire
import llm as llmlib
from data import IMAGE_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, IMAGE_TOKEN_ID = 520, 519   # the tiny tokenizer's 512 pieces and spare rows (llava-hf's <image>, <pad>)
TURN = [{"from": "human", "value": "<image>\nWhat is written in the center cell?"}]


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=32, patch_size=8)
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # no zero-initialised tensor may hide a mapping error
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny llava-hf model, saved by transformers 5 (its own layout), with the tiny tokenizer."""
    d = tmp_path_factory.mktemp("llava-hf")
    model = tiny_llava()
    model.save_pretrained(d)
    data.build_tiny_tokenizer(str(d))
    return model, d


def rename_file(src, dst, rename, shards=1):
    """Copy a release directory's config, tokenizer and weights with every key renamed (None: dropped)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name == "config.json":
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    state = {rename(k): t for k, t in load_file(os.path.join(src, "model.safetensors")).items() if rename(k)}
    write_shards(dst, state, shards, "safetensors")
    return state


def write_shards(d, state, shards, kind):
    """state as `shards` files with an index, as the hub holds them (kind "safetensors" or "bin": torch.save)."""
    keys = sorted(state)
    name = "model{}.safetensors" if kind == "safetensors" else "pytorch_model{}.bin"
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in keys[i::shards]}
        file = name.format(f"-{i + 1:05d}-of-{shards:05d}" if shards > 1 else "")
        save_file(part, os.path.join(d, file)) if kind == "safetensors" else torch.save(part, os.path.join(d, file))
        weight_map.update({k: file for k in part})
    if shards > 1:
        with open(os.path.join(d, name.format("") + ".index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def prompt_and_pixels(tok, size):
    ids, _ = data.tokenize_conversation(tok, TURN, "vicuna_v1")
    image = Image.fromarray((torch.rand(40, 24, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    return ids, data.load_image(image, size, pad_square=True)[None], image


def hf_ids(ids, n_image):
    """Our ids (one IMAGE_ID) as llava-hf takes them: the <image> token repeated once per visual token."""
    p = ids.index(IMAGE_ID)
    return torch.tensor([ids[:p] + [IMAGE_TOKEN_ID] * n_image + ids[p + 1:]])


def check_against_reference(model, reference_model, tok):
    ids, pixels, _ = prompt_and_pixels(tok, model.config.vit.image_size)
    n = model.vit.num_patches
    with torch.no_grad():
        ours = model(pixels, torch.tensor([ids]))
        theirs = reference_model(input_ids=hf_ids(ids, n), pixel_values=pixels).logits
    assert ours.shape == theirs.shape == (1, len(ids) - 1 + n, VOCAB)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    reference_model.generation_config.eos_token_id = None   # compare 8 tokens, whatever they are
    want = reference_model.generate(input_ids=hf_ids(ids, n), pixel_values=pixels, max_new_tokens=8,
                                    do_sample=False)[0, len(ids) - 1 + n:]
    got = model.generate(pixels, torch.tensor([ids]), max_new_tokens=8)[0]
    assert got.tolist() == want.tolist()


# hub (transformers 4), transformers >= 4.52, transformers 5 (what save_pretrained writes here)
LAYOUTS = {
    "hub": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1),
    "4.52": lambda k: ("lm_head." + k[len("language_model.lm_head."):] if k.startswith("language_model.lm_head.")
                       else "model.language_model." + k[len("language_model.model."):]
                       if k.startswith("language_model.model.")
                       else "model." + k.replace("vision_tower.", "vision_tower.vision_model.", 1)),
    "5": lambda k: k,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_llava_hf_layouts_match_transformers(reference, tmp_path, layout):
    """llava-hf in each key layout, sharded as on the hub: logits equal transformers' within 1e-5 (fp32), greedy
    tokens identical; and the file layout is what we think (so that the renames test what they claim)."""
    model_hf, d = reference
    keys = set(load_file(os.path.join(d, "model.safetensors")))
    assert "language_model.model.embed_tokens.weight" in keys and "vision_tower.pre_layrnorm.weight" in keys
    state = rename_file(d, tmp_path / layout, LAYOUTS[layout], shards=2)
    want = {"hub": "vision_tower.vision_model.pre_layrnorm.weight", "5": "language_model.lm_head.weight",
            "4.52": "model.vision_tower.vision_model.pre_layrnorm.weight"}[layout]
    assert want in state and ("lm_head.weight" in state) == (layout == "4.52")
    model = hire.HIRE.from_release(str(tmp_path / layout))
    check_round_trip(model, state, hire.LLAVA_HF_KEYS)
    assert model.config.enricher == "none" and model.config.vit_layer == -2 and model.config.template == "vicuna_v1"
    check_against_reference(model, model_hf, llmlib.Tokenizer.from_pretrained(str(d)))


# ----------------------------------------------------------------------------- LLaVA's own release
LLAVA_FIELDS = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
                "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False, "mm_resampler_type": None, "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False, "use_mm_proj": True}


def to_original(k):
    """llava-hf (transformers 5 file) key -> liuhaotian/llava-v1.5-7b key (the reverse of llava-hf's converter)."""
    for a, b in [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                 ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                 ("vision_tower.", "model.vision_tower.vision_tower.vision_model.")]:
        if k.startswith(a):
            return b + k[len(a):]
    raise KeyError(k)


def write_original(reference, d, tower_inside=True):
    """A LLaVA-1.5 release as liuhaotian's: config.json (LLaMA fields + LLaVA's), two pytorch_model-*.bin shards
    with an index (torch.save, as transformers 4.31 wrote them, inv_freq buffers included), the tokenizer; the CLIP
    tower inside, or in its own directory named by mm_vision_tower."""
    model_hf, src = reference
    os.makedirs(d, exist_ok=True)
    state = {to_original(k): t for k, t in load_file(os.path.join(src, "model.safetensors")).items()}
    state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(6) for i in range(2)})
    tower = os.path.join(d, "clip")   # mm_vision_tower: a local CLIP directory (its config, maybe its weights)
    os.makedirs(tower)
    if not tower_inside:
        vit = {"vision_model." + k.split("vision_tower.vision_model.", 1)[1]: state.pop(k)
               for k in [k for k in state if ".vision_tower." in k]}
        save_file(vit, os.path.join(tower, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    json.dump(cfg["vision_config"], open(os.path.join(tower, "config.json"), "w"))
    text = {k: v for k, v in cfg["text_config"].items() if k != "model_type"}
    json.dump({**text, **LLAVA_FIELDS, "mm_vision_tower": tower}, open(os.path.join(d, "config.json"), "w"))
    write_shards(str(d), state, 2, "bin")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(d, name), "wb") as g:
            g.write(f.read())
    return state


def check_round_trip(model, state, table, exclude=()):
    """Every tensor of the release is in the model, unchanged, where the key table sends it."""
    ours = model.state_dict()
    n = 0
    for key, t in state.items():
        prefix = max((p for p, _ in table if key.startswith(p)), key=len)
        to = dict(table)[prefix]
        name = to(key[len(prefix):]) if callable(to) else to + key[len(prefix):]
        if key.endswith("inv_freq"):
            assert name not in ours
            continue
        assert torch.equal(ours[name], t), key
        n += 1
    assert n == len(ours) - sum(k.startswith(tuple(exclude)) for k in ours) if exclude else n == len(ours)


def test_llava_original_bin_tower_inside(reference, tmp_path):
    """liuhaotian's layout, .bin shards, tower inside: every tensor lands where LLAVA_KEYS says, unchanged, and the
    model equals transformers' llava-hf model of the same weights (logits, greedy tokens). The one-command
    conversion to safetensors loads to the same tensors."""
    model_hf, _ = reference
    d = tmp_path / "llava-v1.5"
    state = write_original(reference, d)
    model = hire.HIRE.from_release(str(d))
    check_round_trip(model, state, hire.LLAVA_KEYS)
    check_against_reference(model, model_hf, llmlib.Tokenizer.from_pretrained(str(d)))
    subprocess.run([sys.executable, os.path.join(ROOT, "llm.py"), "--to_safetensors", str(d)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert llmlib.release_files(str(d))[0].endswith(".safetensors")
    for p in d.glob("*.bin"):
        p.unlink()
    again = hire.HIRE.from_release(str(d))
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in again.state_dict().items())


def test_llava_original_tower_from_its_clip_directory(reference, tmp_path):
    model_hf, _ = reference
    d = tmp_path / "llava-v1.5"
    state = write_original(reference, d, tower_inside=False)
    model = hire.HIRE.from_release(str(d))   # mm_vision_tower is the local CLIP directory
    check_round_trip(model, state, hire.LLAVA_KEYS, exclude=("vit.",))
    check_against_reference(model, model_hf, llmlib.Tokenizer.from_pretrained(str(d)))
    cfg = json.load(open(d / "config.json"))
    json.dump({**cfg, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"names the vision tower 'openai/clip-vit-large-patch14-336' and holds no "
                                         r"tower weights: pass its CLIP directory"):
        hire.HIRE.from_release(str(d))
    assert hire.HIRE.from_release(str(d), vit=str(d / "clip")).vit.config == model.vit.config


def test_release_errors_name_the_key_the_shape_and_the_field(reference, tmp_path):
    d = tmp_path / "llava-v1.5"
    state = write_original(reference, d)

    def rewrite(change_state=None, change_cfg=None):
        s = dict(state)
        if change_state:
            change_state(s)
        for f in d.glob("pytorch_model*"):
            f.unlink()
        write_shards(str(d), s, 1, "bin")
        cfg = {k: v for k, v in json.load(open(d / "config.json")).items()}
        if change_cfg:
            change_cfg(cfg)
        json.dump(cfg, open(d / "config.json", "w"))

    rewrite(lambda s: s.pop("model.mm_projector.2.bias"))
    with pytest.raises(ValueError, match=r"missing \(our names\): \['projector.2.bias'\]"):
        hire.HIRE.from_release(str(d))
    rewrite(lambda s: s.update({"model.spatial_embed.ln_fuse.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"unexpected: \['model.spatial_embed.ln_fuse.weight'\]"):
        hire.HIRE.from_release(str(d))   # an INF-LLaVA checkpoint is not a LLaVA-1.5 one
    rewrite(lambda s: s.update({"model.norm.weight": torch.ones(47)}))
    with pytest.raises(ValueError, match=r"wrong shape: \['model.norm.weight \(47,\) -> llm.norm.weight \(48,\)'\]"):
        hire.HIRE.from_release(str(d))
    original = json.load(open(d / "config.json"))
    for field, value in [("mm_patch_merge_type", "spatial_unpad"), ("image_aspect_ratio", "anyres"),
                         ("mm_projector_type", "linear"), ("mm_vision_select_feature", "cls_patch"),
                         ("mm_use_im_start_end", True), ("mm_newline_position", "grid")]:
        json.dump({**original, field: value}, open(d / "config.json", "w"))
        with pytest.raises(ValueError, match=rf"not implemented here: {field}={value!r}" if field != "mm_newline_"
                           "position" else "not implemented here: mm_newline_position"):
            hire.HIRE.from_release(str(d))
    json.dump({k: v for k, v in original.items() if k != "image_aspect_ratio"}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"image_aspect_ratio=None \(absent: LLaVA's default\)"):
        hire.HIRE.from_release(str(d))
    # a pickle that is more than tensors is refused by torch.load(weights_only=True), and named
    json.dump(original, open(d / "config.json", "w"))
    torch.save({"model.norm.weight": torch.ones(48), "extra": Image.new("L", (1, 1))}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: torch.load\(weights_only=True\) refused it"):
        hire.HIRE.from_release(str(d))


def run_demo(script, release, image):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--release", str(release), "--image",
                          str(image), "--prompt", "What is written in the center cell?", "--max_new_tokens", "5"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_hire_demo_runs_a_release(reference, tmp_path):
    """python hire.py --release DIR --image x.png --prompt "...": prints the greedy answer our model gives to the
    vicuna_v1 prompt of the question, on the image padded and resized as LLaVA does."""
    d = tmp_path / "llava-v1.5"
    write_original(reference, d)
    model, tok = hire.HIRE.from_release(str(d)), llmlib.Tokenizer.from_pretrained(str(d))
    ids, pixels, image = prompt_and_pixels(tok, model.config.image_size)
    image.save(tmp_path / "x.png")
    want = data.answer_text(tok, model.generate(pixels, torch.tensor([ids]), max_new_tokens=5, eos_id=tok.eos_id)[0])
    assert run_demo("hire.py", d, tmp_path / "x.png") == want


# ----------------------------------------------------------------------------- INF-LLaVA
D, TOWER = 32, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                    patch_size=8)   # width 32: 8 heads of 4 in the DEM, FFN 32 -> 2 -> 16 (d/16, d/2)


def spatial_embed_shapes(d):
    """SpatialEmbed(channel=d)'s parameters (INF_llava/model/llava_arch.py), by name and shape."""
    shapes = {f"attention.linears.{i}.weight": (d, d) for i in range(4)}
    shapes.update({f"attention.linears.{i}.bias": (d,) for i in range(4)})
    shapes.update({"attention.ln.weight": (d,), "attention.ln.bias": (d,), "ln_fuse.weight": (d,),
                   "ln_fuse.bias": (d,)})
    for f in ("ffn_crop", "ffn_stride"):
        shapes.update({f"{f}.0.weight": (d // 16, d), f"{f}.0.bias": (d // 16,), f"{f}.2.weight": (d // 2, d // 16),
                       f"{f}.2.bias": (d // 2,)})
    return shapes


@pytest.fixture(scope="module")
def inf_release(reference, tmp_path_factory):
    """A tiny INF-LLaVA release: LLaMA layout (model.*, lm_head.*), model.mm_projector.{0,2}, model.spatial_embed.*,
    the tower inside, LLaVA's config fields with model_type llava_llama, sharded safetensors, the tiny tokenizer
    (it has the LLaMA-3 header tokens the llama3 template needs). Returns (dir, release state, transformers tower,
    transformers LM)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("inf-llava")
    torch.manual_seed(1)
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()
    lm_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=5e5)
    lm = LlamaForCausalLM(lm_cfg).eval()
    g = torch.Generator().manual_seed(2)
    state = {k: t + 0.05 * torch.randn(t.shape, generator=g) for k, t in lm.state_dict().items()}
    lm.load_state_dict(state)
    tower_state = tower.state_dict()   # transformers 5 names them without the vision_model. that 4.x wrote
    assert "embeddings.class_embedding" in tower_state
    state.update({"model.vision_tower.vision_tower.vision_model." + k: t for k, t in tower_state.items()})
    state.update({f"model.mm_projector.{i}.{p}": 0.2 * torch.randn(s, generator=g) for i, p, s in
                  [(0, "weight", (48, D)), (0, "bias", (48,)), (2, "weight", (48, 48)), (2, "bias", (48,))]})
    state.update({"model.spatial_embed." + k: (1 if "ln" in k and k.endswith("weight") else 0) + 0.3 *
                  torch.randn(s, generator=g) for k, s in spatial_embed_shapes(D).items()})
    write_shards(str(d), state, 3, "safetensors")
    os.makedirs(d / "clip")
    json.dump(tower.config.to_dict(), open(d / "clip" / "config.json", "w"))
    json.dump({**lm_cfg.to_dict(), **LLAVA_FIELDS, "model_type": "llava_llama", "mm_vision_tower": str(d / "clip")},
              open(d / "config.json", "w"))
    _, src = reference
    for name in ("tokenizer.model", "tokenizer_config.json"):
        with open(os.path.join(src, name), "rb") as f, open(d / name, "wb") as g_:
            g_.write(f.read())
    return d, state, tower, lm


def release_encode_images(state, tower, images, n=3):
    """INF-LLaVA's LlavaMetaForCausalLM.encode_images and SpatialEmbed.forward, restated from the release:
    bicubic 336 -> 1008, 3x3 crops and 3x3 strided sub-images, one tower call each (hidden_states[-2], class token
    dropped), the crop/stride maps combined, global queries in crop windows and local queries in strided windows
    (one 8-head attention, LayerNorm(W_o a + q)), FFNs, LayerNorm fusion, bilinear to the tower grid, mean with the
    1x view, projector. Weights by their release names."""
    w = lambda name: state["model.spatial_embed." + name]
    S = images.shape[-1]
    big = F.interpolate(images.float(), (S * n, S * n), mode="bicubic", align_corners=False)
    crops = [big[:, :, i * S:(i + 1) * S, j * S:(j + 1) * S] for i in range(n) for j in range(n)]
    strides = [big[:, :, i::n, j::n] for i in range(n) for j in range(n)]
    one = F.interpolate(images.float(), (S, S), mode="bicubic", align_corners=False)
    feats = [tower(x, output_hidden_states=True).hidden_states[-2][:, 1:] for x in crops + strides + [one]]
    b, hw, d = feats[0].shape
    h = int(hw ** 0.5)
    grid = lambda fs: [f.reshape(b, h, h, d) for f in fs]
    crop_map = torch.cat([torch.cat(grid(feats[:n * n])[i * n:(i + 1) * n], dim=2) for i in range(n)], dim=1)
    stride_map = torch.zeros(b, n * h, n * h, d)
    for k, f in enumerate(grid(feats[n * n:2 * n * n])):
        stride_map[:, k // n::n, k % n::n] = f

    def attention(q, kv):   # MultiHeadedAttention(8, d)
        lin = lambda x, i: F.linear(x, w(f"attention.linears.{i}.weight"), w(f"attention.linears.{i}.bias"))
        split = lambda x: x.view(b, -1, 8, d // 8).transpose(1, 2)
        a = torch.softmax(split(lin(q, 0)) @ split(lin(kv, 1)).transpose(-2, -1) / (d // 8) ** 0.5, dim=-1)
        out = (a @ split(lin(kv, 2))).transpose(1, 2).reshape(b, -1, d)
        return F.layer_norm(lin(out, 3) + q, (d,), w("attention.ln.weight"), w("attention.ln.bias"))

    blocks = lambda m: [m[:, i * h:(i + 1) * h, j * h:(j + 1) * h].reshape(b, hw, d)
                        for i in range(n) for j in range(n)]
    strided = lambda m: [m[:, i::n, j::n].reshape(b, hw, d) for i in range(n) for j in range(n)]
    glo = [attention(g, l).reshape(b, h, h, d) for g, l in zip(blocks(stride_map), blocks(crop_map))]
    loc = [attention(l, g).reshape(b, h, h, d) for l, g in zip(strided(crop_map), strided(stride_map))]
    new_stride = torch.cat([torch.cat(glo[i * n:(i + 1) * n], dim=2) for i in range(n)], dim=1)
    new_crop = torch.zeros_like(crop_map)
    for k, f in enumerate(loc):
        new_crop[:, k // n::n, k % n::n] = f
    ffn = lambda x, f: F.linear(F.gelu(F.linear(x, w(f"{f}.0.weight"), w(f"{f}.0.bias"))), w(f"{f}.2.weight"),
                                w(f"{f}.2.bias"))
    fused = F.layer_norm(torch.cat([ffn(new_crop, "ffn_crop"), ffn(new_stride, "ffn_stride")], -1) + new_stride
                         + new_crop, (d,), w("ln_fuse.weight"), w("ln_fuse.bias"))
    out = F.interpolate(fused.permute(0, 3, 1, 2), size=(h, h), mode="bilinear", align_corners=False)
    x = torch.stack([feats[-1], out.permute(0, 2, 3, 1).reshape(b, hw, d)], dim=-1).mean(-1)
    p = lambda i: (state[f"model.mm_projector.{i}.weight"], state[f"model.mm_projector.{i}.bias"])
    return F.linear(F.gelu(F.linear(x, *p(0))), *p(2))


def test_inf_llava_release_matches_its_encode_images_and_spatial_embed(inf_release):
    """from_release puts every release tensor where INF_LLAVA_KEYS says, unchanged; the model's visual tokens equal
    the release's encode_images + SpatialEmbed restated above (transformers' CLIP as the tower), and its logits
    transformers' LLaMA on the same spliced embeddings: the release DEM (windows, shared 8-head attention, fusion,
    bilinear downsample, mean) is the official maths, not only the paper's."""
    import inf_llava as inf
    d, state, tower, lm = inf_release
    model = inf.INFLLaVA.from_release(str(d))
    c = model.config
    assert (c.image_size, c.resize_input, c.template, c.windows, c.attention, c.fusion, c.downsample, c.dual_combine) \
        == (96, True, "llama3", "release", "release", "release", "bilinear", "mean")
    check_round_trip(model, state, inf.INF_LLAVA_KEYS)
    tok = llmlib.Tokenizer.from_pretrained(str(d))
    ids, _ = data.tokenize_conversation(tok, TURN, "llama3")
    pixels = data.load_image(Image.new("RGB", (50, 30), (200, 30, 90)), c.input_size, c.pad_square)[None]
    pixels = pixels + 0.3 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.encode_images(pixels)
        want = release_encode_images(state, tower, pixels)
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        p = ids.index(IMAGE_ID)
        emb = lm.model.embed_tokens(torch.tensor([ids[:p] + ids[p + 1:]]))
        embeds = torch.cat([emb[:, :p], want, emb[:, p:]], dim=1)
        torch.testing.assert_close(model(pixels, torch.tensor([ids])), lm(inputs_embeds=embeds).logits,
                                   atol=1e-5, rtol=1e-5)
    # the DEM matters: with its weights perturbed the tokens move
    with torch.no_grad():
        model.dem.fusion.norm.bias.add_(1.0)
        assert (model.encode_images(pixels) - ours).abs().max() > 1e-2


def test_inf_llava_release_errors(inf_release, reference, tmp_path):
    import inf_llava as inf
    d, state, _, _ = inf_release
    os.makedirs(tmp_path / "r")
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        with open(d / name, "rb") as f, open(tmp_path / "r" / name, "wb") as g:
            g.write(f.read())
    s = {k: v for k, v in state.items() if k != "model.spatial_embed.ffn_crop.2.bias"}
    s["model.spatial_embed.ffn_crop.2.bias"] = torch.zeros(17)
    write_shards(str(tmp_path / "r"), s, 1, "bin")
    with pytest.raises(ValueError, match=r"wrong shape: \['model.spatial_embed.ffn_crop.2.bias \(17,\) -> "
                                         r"dem.fusion.ffn_loc.2.bias \(16,\)'\]"):
        inf.INFLLaVA.from_release(str(tmp_path / "r"))
    s.pop("model.spatial_embed.ffn_crop.2.bias")
    write_shards(str(tmp_path / "r"), s, 1, "bin")
    with pytest.raises(ValueError, match=r"missing \(our names\): \['dem.fusion.ffn_loc.2.bias'\]"):
        inf.INFLLaVA.from_release(str(tmp_path / "r"))
    write_original(reference, tmp_path / "llava")   # a LLaVA-1.5 release is not an INF-LLaVA one: no DEM
    with pytest.raises(ValueError, match=r"missing \(our names\): \['dem.attn.0.k_proj.bias'"):
        inf.INFLLaVA.from_release(str(tmp_path / "llava"))


def test_inf_llava_demo_runs_a_release(inf_release, tmp_path):
    """python inf_llava.py --release DIR ...: the image padded and resized to 336 (input_size), upsampled inside,
    the conv_llama3 prompt, greedy up to <|eot_id|>: the answer our model gives in-process."""
    import inf_llava as inf
    d = inf_release[0]
    model, tok = inf.INFLLaVA.from_release(str(d)), llmlib.Tokenizer.from_pretrained(str(d))
    image = Image.fromarray((torch.rand(30, 50, 3, generator=torch.Generator().manual_seed(4)) * 255).byte().numpy())
    image.save(tmp_path / "x.png")
    ids, _ = data.tokenize_conversation(tok, TURN, "llama3")
    pixels = data.load_image(image, model.config.input_size, True)[None]
    out = model.generate(pixels, torch.tensor([ids]), max_new_tokens=5, eos_id=data.end_of_turn(tok, "llama3"))
    assert run_demo("inf_llava.py", d, tmp_path / "x.png") == data.answer_text(tok, out[0])
