"""pheye.py on tiny configs: tiling order, adapters, positions, cross-attention placement and init, training
groups, loss normalisation, cached generation, save/load, bad input."""
import dataclasses
import re
import json
import zlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import IGNORE
import pheye
from pheye import DenseCrossAttentionBlock, Pheye, PheyeConfig, cross_attention_layers, init_std, split_tiles
from vit import ViT, ViTConfig, lora_parameters

N_SUB = 65  # tokens per tiny sub-image: (64 / 8)^2 patches + CLS


def tiny(**changes):
    torch.manual_seed(0)
    config = PheyeConfig.preset("tiny")
    for key, value in changes.items():
        target, _, name = key.rpartition(".")
        setattr(getattr(config, target) if target else config, name, value)
    return Pheye(config).eval()  # eval: no LoRA dropout, so runs are comparable


def pixels(B=2):
    return torch.randn(B, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def text(B=2, T=10, seed=2):
    return torch.randint(4, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def wake_cross_attention(model, std=0.05):
    """Output matrices away from their near-zero init, so the image visibly changes the logits."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.xattn.values():
            for w in (block.attn.out_proj.weight, block.fc2.weight):
                w.copy_(std * torch.randn(w.shape, generator=g))


# ----------------------------------------------------------------------------- image split and encoder

def test_tiles_are_column_major():
    img = torch.zeros(1, 3, 128, 128)
    quadrant = {"TL": 1.0, "TR": 2.0, "BL": 3.0, "BR": 4.0}
    img[..., :64, :64], img[..., :64, 64:] = quadrant["TL"], quadrant["TR"]
    img[..., 64:, :64], img[..., 64:, 64:] = quadrant["BL"], quadrant["BR"]
    tiles = split_tiles(img, 2)
    assert tiles.shape == (4, 3, 64, 64)
    # release order: down the left column, then down the right column
    for tile, name in zip(tiles, ["TL", "BL", "TR", "BR"]):
        assert torch.all(tile == quadrant[name])
    # 3 x 3 and a batch of 2: tile k of image b is cell (row k % 3, col k // 3); images stay apart
    grid = torch.arange(2 * 9.0).view(2, 1, 3, 1, 3, 1).expand(2, 3, 3, 5, 3, 5).reshape(2, 3, 15, 15)
    tiles = split_tiles(grid, 3)
    assert tiles.shape == (18, 3, 5, 5)
    for b in range(2):
        for k in range(9):
            assert torch.all(tiles[9 * b + k] == 9 * b + 3 * (k % 3) + k // 3)


def test_one_vit_call_per_adapter_with_the_documented_inputs():
    model, px = tiny(), pixels()
    calls = []
    model.vit.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0], kwargs["adapter"])),
                                        with_kwargs=True)
    tokens = model.encode_image(px)
    assert tokens.shape == (2, 5 * N_SUB, 128)  # P = 1 + 2x2 sub-images of 65 tokens, ViT width
    assert [a for _, a in calls] == ["global", "local"]
    global_view = F.interpolate(px, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(calls[0][0], global_view)
    assert torch.equal(calls[1][0], split_tiles(px, 2))  # all 8 tiles of the batch in one call


def test_each_view_uses_its_own_adapter():
    model, px = tiny(), pixels()
    with torch.no_grad():
        base = model.encode_image(px)
        for adapter, changed in (("global", slice(0, N_SUB)), ("local", slice(N_SUB, None))):
            saved = [p.clone() for p in lora_parameters(model.vit, adapter)]
            for p in lora_parameters(model.vit, adapter):
                p.add_(0.05 * torch.randn_like(p))  # B leaves zero: the adapter now does something
            out = model.encode_image(px)
            unchanged = slice(N_SUB, None) if adapter == "global" else slice(0, N_SUB)
            assert torch.equal(out[:, unchanged], base[:, unchanged]), adapter
            assert (out[:, changed] - base[:, changed]).abs().min() > 0, adapter
            for p, s in zip(lora_parameters(model.vit, adapter), saved):
                p.copy_(s)


def test_tokens_of_sub_image_k_get_row_k():
    model, px = tiny(), pixels()
    with torch.no_grad():
        rows = torch.arange(5.0)[:, None] * 10 + torch.randn(5, 128)
        model.pos_embed.weight.copy_(rows)
        with_pos = model.encode_image(px)
        model.pos_embed.weight.zero_()
        without = model.encode_image(px)
    added = (with_pos - without).view(2, 5, N_SUB, 128)  # (B, sub-image, token, D)
    torch.testing.assert_close(added, rows[None, :, None].expand_as(added), atol=1e-5, rtol=0)


def test_global_only_is_the_releases_level_1():
    """local=False (the no-tiles ablation) is the release's level 1 (encoder.py): the global view through the ViT,
    norm_lvl_1, then a LayerNorm connector, no position embeddings, no local adapter or LayerNorm at all. The
    tiles never go through the ViT."""
    full, glob = tiny(), tiny(local=False)
    assert not hasattr(glob, "pos_embed") and not hasattr(glob, "norm_local")
    assert lora_parameters(glob.vit, "local") == []
    own = glob.state_dict()
    glob.load_state_dict({k: v for k, v in full.state_dict().items() if k in own} | {
        k: own[k] for k in ("connector.weight", "connector.bias")})
    with torch.no_grad():
        glob.connector.weight.copy_(1 + 0.5 * torch.randn(128))
        glob.connector.bias.copy_(torch.randn(128))
        px = pixels()
        g = full.encode_image(px)[:, :N_SUB] - full.pos_embed.weight[0]  # the full model's normed global tokens
        want = F.layer_norm(g, (128,), glob.connector.weight, glob.connector.bias)
        torch.testing.assert_close(glob.encode_image(px), want, atol=1e-5, rtol=0)
        assert (want - g).abs().max() > 0.5  # the connector does change them
        calls = []
        hook = glob.vit.register_forward_pre_hook(lambda m, args, kw: calls.append((args[0].shape, kw["adapter"])),
                                                  with_kwargs=True)
        glob.encode_image(px)
        hook.remove()
    assert calls == [((2, 3, 64, 64), "global")]  # one ViT call, on the global view: the tiles never run
    groups = {g["name"]: g["params"] for g in glob.configure_stage("stage3")}
    assert list(groups) == ["cross_attn", "lora", "connector", "norms"]
    n = lambda m: sum(p.numel() for g in m.configure_stage("stage3") for p in g["params"])
    local = sum(p.numel() for p in lora_parameters(full.vit, "local"))
    assert n(full) - n(glob) == local + 5 * 128  # the local adapter and the 5 position rows (LayerNorms: 2 each)


@pytest.mark.parametrize("mode", ["train", "frozen", "none"])
def test_global_adapter_modes(mode):
    """global_lora: "train" (paper), "frozen" (release with first_level: adapter "first" runs but peft never lets
    it train), "none" (release default: the global view runs the bare ViT)."""
    model, px, idx = tiny(global_lora=mode), pixels(), text()
    global_params = lora_parameters(model.vit, "global")
    assert bool(global_params) == (mode != "none")
    groups = model.configure_stage("stage1")
    trained = {id(p) for g in groups for p in g["params"]}
    assert all((id(p) in trained) == (mode == "train") for p in global_params)
    with torch.no_grad():
        for p in global_params:
            p.add_(0.05 * torch.randn_like(p))  # B leaves zero: the adapter now does something
        view = F.interpolate(px, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
        bare = model.norm_global(model.vit(view)) + model.pos_embed.weight[0]
        g = model.encode_image(px)[:, :N_SUB]
        assert ((g - bare).abs().max() == 0) == (mode == "none")  # the adapter runs unless there is none
    before = [p.detach().clone() for p in global_params]
    labels = idx.clone()
    model(px, idx, labels)[1].backward()
    torch.optim.AdamW(groups).step()
    assert all(torch.equal(p, b) != (mode == "train") for p, b in zip(global_params, before))


# ----------------------------------------------------------------------------- dense cross-attention

@pytest.mark.parametrize("interval, layers", [(2, [1, 3, 5]), (4, [3]), (3, [2, 5])])
def test_block_count_and_placement(interval, layers):
    model = tiny(**{"interval": interval, "llm.n_layer": 6})
    assert sorted(map(int, model.xattn)) == layers
    events = []
    for i, layer in enumerate(model.llm.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: events.append(("layer", i)))
    for i, block in model.xattn.items():
        block.register_forward_pre_hook(lambda m, a, i=int(i): events.append(("xattn", i)))
    model(pixels(1), text(1))
    expected = [e for i in range(6) for e in ([("xattn", i)] if i in layers else []) + [("layer", i)]]
    assert events == expected
    # Phi-1.5's 24 layers (release rule (i+1) % I == 0): 12 blocks for I = 2, 6 for I = 4; I = 5 leaves 20..23
    assert cross_attention_layers(24, 2) == list(range(1, 24, 2))
    assert cross_attention_layers(24, 4) == [3, 7, 11, 15, 19, 23]
    assert cross_attention_layers(24, 3) == [2, 5, 8, 11, 14, 17, 20, 23]
    assert cross_attention_layers(24, 5) == [4, 9, 14, 19]


def test_cross_attention_width_follows_the_release():
    """Release xattn.py: inner width max(D_LM, D_ViT), heads of 64. The paper presets get its shapes (Phi-1.5 2048
    + ViT-H 1280: 32 heads of 64); a ViT wider than the LM builds and runs (it could not when the LM's width was
    the inner width); a width the head size does not divide is refused by name."""
    for name in ("paper-x4-448", "paper-x2-672"):
        with torch.device("meta"):
            block = next(iter(Pheye(PheyeConfig.preset(name)).xattn.values()))
        assert block.attn.n_head == 32
        shapes = {n: tuple(p.shape) for n, p in block.named_parameters()}
        assert shapes["attn.q_proj.weight"] == (2048, 2048) and shapes["attn.k_proj.weight"] == (2048, 1280)
        assert shapes["attn.out_proj.weight"] == (2048, 2048) and shapes["fc1.weight"] == (8192, 2048)
    model = tiny(**{"vit.width": 192, "vit.mlp_dim": 384})  # D_ViT 192 > D_LM 128; head 32 -> 6 heads
    block = model.xattn["1"]
    assert block.attn.n_head == 6
    assert block.attn.q_proj.weight.shape == (192, 128) and block.attn.k_proj.weight.shape == (192, 192)
    assert block.attn.out_proj.weight.shape == (128, 192)
    wake_cross_attention(model)
    with torch.no_grad():
        logits = model(pixels(), text())
        assert logits.shape == (2, 10, 512) and torch.isfinite(logits).all()
        assert (logits - model.llm(text())).abs().max() > 1e-3  # the image does reach the logits
    assert model.xattn["1"].attn.n_head == 6
    with pytest.raises(ValueError, match="max\\(LM 128, ViT 192\\) = 192 is not divisible by xattn_head_dim 40"):
        tiny(**{"vit.width": 192, "vit.mlp_dim": 384, "xattn_head_dim": 40})


def test_cross_attention_init():
    model = tiny()
    out_std = 0.01 / (2 * 36) ** 0.5  # release: 0.01 / sqrt(2 max(n_layers, 36)), tiny LM has 4 layers
    in_std = 0.01 * (2048 * 1280 / (128 * 128)) ** 0.25  # width-aware (init_std): 0.0356 at 128 + 128
    for block in model.xattn.values():
        for name, lin in [("q", block.attn.q_proj), ("k", block.attn.k_proj), ("v", block.attn.v_proj),
                          ("fc1", block.fc1), ("out", block.attn.out_proj), ("fc2", block.fc2)]:
            want = out_std if name in ("out", "fc2") else in_std
            assert abs(lin.weight.std().item() / want - 1) < 0.05, (name, lin.weight.std().item(), want)
            assert torch.all(lin.bias == 0), name


def initial_logit_std(block, d_model, d_vision):
    """Std of the block's attention logits q.k / sqrt(hs) at init, for unit-variance text and vision inputs."""
    g = torch.Generator().manual_seed(0)
    x, vision = torch.randn(2, 16, d_model, generator=g), torch.randn(2, 64, d_vision, generator=g)
    with torch.no_grad():
        q = block.attn.q_proj(block.attn.norm(x)).view(2, 16, block.attn.n_head, -1).transpose(1, 2)
        k, _ = block.attn.keys_values(vision)
        return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).std().item()


def test_cross_attention_init_keeps_the_papers_logit_spread_at_any_width():
    # paper widths (Phi-1.5 2048, ViT-H 1280): exactly the release's values, and a logit spread of ~0.16
    assert init_std(2048, 1280) == 0.01
    torch.manual_seed(0)
    paper = DenseCrossAttentionBlock(2048, 1280, 64, 24)
    for lin in (paper.attn.q_proj, paper.attn.k_proj, paper.attn.v_proj, paper.fc1):
        assert abs(lin.weight.std().item() / 0.01 - 1) < 0.01
    for w in (paper.attn.out_proj.weight, paper.fc2.weight):
        assert abs(w.std().item() / (0.01 / 72 ** 0.5) - 1) < 0.01  # 0.01 / sqrt(2 max(24, 36))
    spread = initial_logit_std(paper, 2048, 1280)
    assert abs(spread - 0.01 ** 2 * (2048 * 1280) ** 0.5) < 0.01  # 0.162
    # the tiny preset (128 + 128) gets the same spread; the release's flat 0.01 would give 0.013, 12x less
    block = tiny().xattn["1"]
    assert abs(initial_logit_std(block, 128, 128) / spread - 1) < 0.1


def test_at_init_logits_are_the_frozen_lms():
    model, px, idx = tiny(), pixels(), text()
    with torch.no_grad():
        lm = model.llm(idx)
        # tiny init: the tiny random LM's hidden states are small (embeddings N(0, 0.02^2)), so the near-zero
        # cross-attention still moves logits by ~0.17 (v and fc1 at init_std 0.036); output matrices at the
        # other linears' std would move them ~1.3
        assert (model(px, idx) - lm).abs().max() < 0.25
        for block in model.xattn.values():
            block.attn.out_proj.weight.zero_()
            block.fc2.weight.zero_()
        assert torch.equal(model(px, idx), lm)


# ----------------------------------------------------------------------------- training

def test_stages_and_groups():
    model = tiny()
    assert [s["lr"] for s in Pheye.STAGES.values()] == [2e-4, 1e-4, 5e-5]
    assert all((s["warmup_ratio"], s["min_lr_ratio"], s["grad_clip"]) == (0, 0, 0) for s in Pheye.STAGES.values())
    for stage, lr in zip(Pheye.STAGES, [2e-4, 1e-4, 5e-5]):
        groups = model.configure_stage(stage)
        assert [g["name"] for g in groups] == ["cross_attn", "lora", "pos_embed", "norms"]
        assert all(g["lr"] == lr for g in groups)
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    expected = (sum(p.numel() for p in model.xattn.parameters()) + sum(p.numel() for p in lora_parameters(model.vit))
                + 5 * 128 + 4 * 128)  # + pos_embed rows + two LayerNorms
    assert sum(p.numel() for g in groups for p in g["params"]) == expected
    with pytest.raises(ValueError, match="stage4"):
        model.configure_stage("stage4")


def test_paper_trainable_parameters_match_the_release():
    # The release README lists 295M (Pheye-x4) and 578M (Pheye-x2) trainable parameters: cross-attention + the
    # local LoRA (rank 16) + positions + LayerNorms, which is what global_lora "frozen" or "none" trains. The
    # paper's two trained adapters (the presets' default, "train") add the global LoRA (rank 8): 301.0M / 584.3M.
    for name, release, ours in (("paper-x4-448", 295, 301.0), ("paper-x2-672", 578, 584.3)):
        assert PheyeConfig.preset(name).global_lora == "train"
        for mode in ("train", "frozen", "none"):
            config = PheyeConfig.preset(name)
            config.global_lora = mode
            with torch.device("meta"):
                model = Pheye(config)
            n = sum(p.numel() for g in model.configure_stage("stage1") for p in g["params"])
            if mode == "train":
                assert round(n / 1e6, 1) == ours, (name, n)
            else:
                assert round(n / 1e6) == release, (name, mode, n)


def test_only_trainable_groups_change_after_a_step():
    model, px, idx = tiny(), pixels(), text()
    groups = model.configure_stage("stage1")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("vit.") and ".base." in n for n in frozen)  # ViT base weights
    assert any(n.startswith("llm.embed_tokens") for n in frozen)         # LM, input embeddings included
    labels = idx.clone()
    labels[:, :4] = IGNORE
    _, loss = model(px, idx, labels)
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    for g in groups:  # every group learns something (LoRA: B gets gradients, A waits for B to move)
        assert sum(p.grad.abs().sum() for p in g["params"]) > 0, g["name"]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW(groups, weight_decay=0.1).step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bitwise
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters()
               if n in trained and p.grad.abs().sum() > 0)


def test_loss_normalised_by_tokens_of_the_whole_effective_batch():
    """Sec. 3.1: sum-reduced micro-batch losses divided by the effective batch's output-token count give the
    gradient of the single concatenated batch, however different the micro-batches' lengths."""
    model, px = tiny(), pixels(4)
    model.configure_stage("stage1")
    g = torch.Generator().manual_seed(5)
    lengths = [3, 5, 40, 33]  # answers: two short, two long
    T = 8 + max(lengths)
    idx = torch.randint(4, 512, (4, T), generator=g)
    labels, mask = torch.full((4, T), IGNORE), torch.zeros(4, T, dtype=torch.long)
    for b, n in enumerate(lengths):  # 8 prompt tokens, n answer tokens, right padding
        mask[b, :8 + n] = 1
        labels[b, 8:8 + n] = idx[b, 8:8 + n]
    micro = [(slice(0, 2), 8 + 5), (slice(2, 4), T)]  # the short micro-batch is only as long as it needs

    def grads():
        out = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return out

    n_tokens = (labels[:, 1:] != IGNORE).sum()
    assert n_tokens == sum(lengths)
    for rows, t in micro:
        _, loss = model(px[rows], idx[rows, :t], labels[rows, :t], mask[rows, :t], reduction="sum")
        (loss / n_tokens).backward()
    accumulated = grads()
    model(px, idx, labels, mask)[1].backward()  # one batch, mean over its output tokens
    whole = grads()
    for a, w in zip(accumulated, whole):
        torch.testing.assert_close(a, w, atol=1e-7, rtol=1e-4)
    for rows, t in micro:  # the usual mean per micro-step weighs the short answers' tokens 7x more
        _, loss = model(px[rows], idx[rows, :t], labels[rows, :t], mask[rows, :t])
        (loss / len(micro)).backward()
    per_step_mean = grads()
    per_step_mean, whole = torch.cat([g.flatten() for g in per_step_mean]), torch.cat([g.flatten() for g in whole])
    assert (per_step_mean - whole).norm() / whole.norm() > 0.1


# ----------------------------------------------------------------------------- generation

def generate_recomputing_everything(model, px, idx, mask, steps):
    """Greedy decoding that re-runs the ViT, the cross-attention K/V and the whole LM (no cache) each step."""
    for _ in range(steps):
        nxt = model(px, idx, mask=mask)[:, -1].argmax(-1, keepdim=True)
        idx, mask = torch.cat([idx, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return idx[:, -steps:]


def test_generate_with_cached_image_keys_values_equals_recomputation():
    model, px = tiny(), pixels()
    wake_cross_attention(model)
    idx, mask = text(T=9), torch.ones(2, 9, dtype=torch.long)
    idx[0, :3], mask[0, :3] = 0, 0  # left padding in row 0
    kv_calls = []
    for block in model.xattn.values():
        block.attn.k_proj.register_forward_hook(lambda *a: kv_calls.append(1))
    new = model.generate(px, idx, max_new_tokens=12, mask=mask)
    assert len(kv_calls) == len(model.xattn)  # keys/values once per image, not once per step
    assert new.shape == (2, 12)
    assert torch.equal(new, generate_recomputing_everything(model, px, idx, mask, 12))
    lm_only = model.llm.generate(idx, max_new_tokens=12, mask=mask)[:, 9:]
    assert not torch.equal(new, lm_only)  # the image does steer this generation


# ----------------------------------------------------------------------------- checkpoints and bad input

def test_save_load_roundtrip(tmp_path):
    model, px, idx = tiny(), pixels(), text()
    wake_cross_attention(model)
    model.save(tmp_path / "ckpt")
    loaded = Pheye.load(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(px, idx), model(px, idx))
    assert Pheye.load(tmp_path / "ckpt", dtype=torch.bfloat16).xattn["1"].fc2.weight.dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["interval"] = 4  # a config that doesn't fit the weights: blocks before layer 1 are unexpected
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="xattn.1"):
        Pheye.load(tmp_path / "ckpt")


def test_bad_input_is_refused_with_the_sizes_named():
    model = tiny()
    with pytest.raises(ValueError, match="100x100 but this Pheye takes 128x128"):
        model(torch.randn(1, 3, 100, 100), text(1))
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\), got \(1, 1, 128, 128\)"):
        model(torch.randn(1, 1, 128, 128), text(1))
    with pytest.raises(ValueError, match="placeholder"):
        model(pixels(1), torch.tensor([[5, -200, 7]]))
    with pytest.raises(ValueError, match="B = 2"):
        model(pixels(2), text(3))
    config = PheyeConfig.preset("tiny")
    with pytest.raises(ValueError, match="image_size 192 must equal tiles \\(2\\) x vit.image_size \\(64\\) = 128"):
        Pheye(dataclasses.replace(config, image_size=192))
    with pytest.raises(ValueError, match="ViT is 64 wide but config.vit.width is 128"):
        Pheye(config, vit=ViT(dataclasses.replace(ViTConfig.preset("tiny"), width=64)))
    with pytest.raises(ValueError, match="interval 9 must be in 1..4"):
        Pheye(dataclasses.replace(config, interval=9))


def test_images_of_any_mode_and_size_are_resized_as_the_release_does():
    model = tiny()
    images = [Image.new("L", (50, 70), 128), Image.new("RGBA", (300, 200), (10, 200, 30, 128)),
              Image.new("RGB", (3, 2), (255, 0, 0)), Image.new("P", (2000, 1500))]
    px = torch.stack([data.load_image(im, model.config.image_size, model.config.pad_square) for im in images])
    assert px.shape == (4, 3, 128, 128)
    with torch.no_grad():
        assert torch.isfinite(model(px, text(4))).all()


# ----------------------------------------------------------------------------- it learns

class WordHashTokenizer:
    """A stand-in tokenizer for this test only: each whitespace-separated word hashes to one of the tiny LM's 512
    ids, so the synthetic set tokenises in no time (the real tiny tokenizer takes minutes to train)."""
    bos_id, eos_id, pad_id, vocab_size, special = 1, 2, 3, 512, {}

    def encode(self, text, bos=False, prefix=True):
        return [self.bos_id] * bos + [4 + zlib.crc32(w.encode()) % 508 for w in text.split()]


def test_tiny_pheye_trains_and_its_loss_falls():
    ds = data.SyntheticDataset(WordHashTokenizer(), n=32, template="pheye", image_size=128, pad_square=False)
    batches = [ds.collate([ds[i] for i in range(k, k + 4)]) for k in range(0, 32, 4)]
    model = tiny()
    model.train()
    groups = model.configure_stage("stage1")
    for g in groups:
        g["lr"] = 1e-2  # a few dozen steps instead of a stage
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    losses = []
    for step in range(20):
        b = batches[step % len(batches)]
        _, loss = model(b["pixels"], b["ids"], b["labels"], b["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # From ln(512) = 6.2 (a uniform guess) to about 3.9 within 20 steps. The frozen tiny LM here is random (the
    # test keeps to random weights), which caps how confident its logits can get.
    assert losses[0] > 6.0
    assert sum(losses[-5:]) / 5 < 5.3, losses  # the frozen random LM limits how far it can fall


# ----------------------------------------------------------------------------- the released checkpoints
# A tiny release directory built from the official module structure (github.com/miguelscarv/pheye), so that its
# state_dict() has the release's key names and shapes without typing one of them:
# - phEYE.py: the root holds vision_encoder and lang_encoder.
# - encoder.py: vision_encoder holds vision_model (CLIPModel.from_pretrained(...).vision_model, transformers'
#   CLIPVisionTransformer), norm_lvl_1/2/3 and connector (level 1: a LayerNorm; else Position, whose `embedding`
#   has max(LEVELS_TO_PATCHES) = 21 rows). From level 2 on, get_peft_model(vision_model, LoRA r 16 / alpha 32 on
#   q/k/v/out_proj, fc1, fc2, patch_embedding, "second"); add_first_level_adapter adds "first" (r 8 / alpha 16).
# - peft 0.7.0 (the release's requirements.txt; tuners/lora/layer.py): PeftModel.base_model is a LoraModel whose
#   .model is the wrapped module; each target becomes a LoRA layer keeping the original as base_layer, with
#   lora_A / lora_B ModuleDicts of bias-free nn.Linear (Conv2d: A with the base's kernel and stride, B 1x1).
# - wrapper_lm.py: the decoder layers stay as old_decoder_blocks, the blocks as cross_attn_layers (None where
#   (i+1) % cross_interval != 0), and model.layers becomes WrapperLayer(cross_attn_layer, decoder_layer).
# - xattn.py: CrossAttentionBlock(attn = CrossAttention(norm, to_q, to_kv, to_out), ff = FeedForward(norm, fc1,
#   fc2)), inner width max(D, D_ViT) in heads of 64, scale 64^-0.5, k, v = to_kv(media).chunk(2).
# The forward below is the release's maths, written from those files; the ViT and Phi are transformers' own.

import os
import subprocess
import sys

import numpy as np
import torch.nn as nn

from pheye import RELEASE_FIELDS, check_release, release_config, release_prompt, release_to_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S_VIT, D_VIT, D_LM = 32, 128, 64   # a ViT wider than the LM: the release's width rule, max(D, D_ViT) = 128


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class PeftLoRA(nn.Module):
    """peft 0.7's LoRA layer, state-dict-wise and maths-wise: base_layer(x) + scaling * B(A(x)) for the active
    adapter (dropout off)."""

    def __init__(self, base, adapters):
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B, self.scaling, self.active = base, nn.ModuleDict(), nn.ModuleDict(), {}, None
        for name, (r, alpha) in adapters.items():
            if isinstance(base, nn.Conv2d):
                self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
                self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=False)
            else:
                self.lora_A[name] = nn.Linear(base.in_features, r, bias=False)
                self.lora_B[name] = nn.Linear(r, base.out_features, bias=False)
            self.scaling[name] = alpha / r

    @property
    def weight(self):  # peft's layers answer .weight with the base layer's (CLIP reads patch_embedding.weight.dtype)
        return self.base_layer.weight

    def forward(self, x):
        y = self.base_layer(x)
        a = self.active
        return y if a is None else y + self.scaling[a] * self.lora_B[a](self.lora_A[a](x))


class ReleaseBlock(nn.Module):
    """xattn.py's CrossAttentionBlock (reduce_factor 1)."""

    def __init__(self, d_text, d_vis, dim_head=64):
        super().__init__()
        inner = max(d_text, d_vis)
        self.heads, self.scale = inner // dim_head, dim_head ** -0.5
        self.attn = Holder(norm=nn.LayerNorm(d_text), to_q=nn.Linear(d_text, inner), to_kv=nn.Linear(d_vis, 2 * inner),
                           to_out=nn.Linear(inner, d_text))
        self.ff = Holder(norm=nn.LayerNorm(d_text), fc1=nn.Linear(d_text, 4 * d_text), fc2=nn.Linear(4 * d_text, d_text))

    def forward(self, x, media):
        a, split = self.attn, lambda t: t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)  # b n (h d) -> b h n d
        k, v = a.to_kv(media).chunk(2, dim=-1)
        q, k, v = split(a.to_q(a.norm(x))) * self.scale, split(k), split(v)
        out = torch.einsum("bhij,bhjd->bhid", torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1), v)
        x = a.to_out(out.transpose(1, 2).flatten(2)) + x
        return self.ff.fc2(F.gelu(self.ff.fc1(self.ff.norm(x)))) + x


class Wrapper(nn.Module):
    """wrapper_lm.py's WrapperLayer: the block (if any) on the conditioned image features, then the layer."""

    def __init__(self, cross_attn_layer, decoder_layer):
        super().__init__()
        self.cross_attn_layer, self.decoder_layer, self.vis_x = cross_attn_layer, decoder_layer, None

    def forward(self, x, *args, **kwargs):
        if self.cross_attn_layer is not None:
            x = self.cross_attn_layer(x, self.vis_x)
        return self.decoder_layer(x, *args, **kwargs)


def release_model(level, first_level, interval=2, vocab=320):
    from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(image_size=S_VIT, patch_size=8, hidden_size=D_VIT, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    vit = CLIPVisionModel(vcfg)  # transformers 5: the modules of 4.37's CLIPVisionTransformer, at the top level
    vision_model = vit
    if level > 1:
        adapters = {"second": (16, 32)} | ({"first": (8, 16)} if first_level else {})
        for name, m in list(vit.named_modules()):
            if name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"):
                parent, _, child = name.rpartition(".")
                setattr(vit.get_submodule(parent), child, PeftLoRA(m, adapters))
        vision_model = Holder(base_model=Holder(model=vit))
    connector = nn.LayerNorm(D_VIT) if level == 1 else Holder(embedding=nn.Embedding(21, D_VIT))
    encoder = Holder(vision_model=vision_model, norm_lvl_1=nn.LayerNorm(D_VIT), norm_lvl_2=nn.LayerNorm(D_VIT),
                     norm_lvl_3=nn.LayerNorm(D_VIT), connector=connector)
    lcfg = PhiConfig(vocab_size=vocab, hidden_size=D_LM, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.5,
                     tie_word_embeddings=False)
    lm = PhiForCausalLM(lcfg)
    lm.old_decoder_blocks = lm.model.layers
    lm.cross_attn_layers = nn.ModuleList([ReleaseBlock(D_LM, D_VIT) if (i + 1) % interval == 0 else None
                                          for i in range(4)])
    lm.model.layers = nn.ModuleList([Wrapper(x, layer) for x, layer in zip(lm.cross_attn_layers, lm.old_decoder_blocks)])
    root = Holder(vision_encoder=encoder, lang_encoder=lm).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in root.parameters():  # every tensor distinct and away from its init (LoRA B, LayerNorms included)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return root, vcfg, lcfg


def release_forward(root, image, ids, level, first_level):
    """phEYE.forward with encoder.py's preprocessing, on a PIL image."""
    from PIL.Image import BICUBIC
    enc, n = root.vision_encoder, {1: 1, 2: 2, 3: 3}[level]
    vit = enc.vision_model.base_model.model if level > 1 else enc.vision_model
    lora = [m for m in vit.modules() if isinstance(m, PeftLoRA)]
    transform = lambda im: data.clip_normalize(torch.from_numpy(np.array(im)).permute(2, 0, 1))  # ToTensor, Normalize
    for m in lora:
        m.active = "first" if first_level else None  # disable_adapter() unless first_level
    feats = [enc.norm_lvl_1(vit(pixel_values=transform(image.resize((S_VIT, S_VIT), BICUBIC))[None]).last_hidden_state)]
    if level > 1:
        big = image.resize((n * S_VIT, n * S_VIT), BICUBIC)
        crops = [big.crop((x, y, x + S_VIT, y + S_VIT)) for x in range(0, n * S_VIT, S_VIT)  # cut_image_patches:
                 for y in range(0, n * S_VIT, S_VIT)]                                        # columns outer
        for m in lora:
            m.active = "second"
        tiles = vit(pixel_values=torch.stack([transform(c) for c in crops])).last_hidden_state
        feats.append(enc.norm_lvl_2(tiles.reshape(1, -1, D_VIT)))
    vision = torch.cat(feats, dim=1)
    if level > 1:  # Position: row k on every token of sub-image k
        P = 1 + n * n
        vision = vision + enc.connector.embedding.weight[:P].repeat_interleave(vision.shape[1] // P, 0)
    else:
        vision = enc.connector(vision)
    for layer in root.lang_encoder.model.layers:
        layer.vis_x = vision
    return root.lang_encoder(input_ids=ids).logits


def write_tokenizer(d):
    """A small byte-level BPE in Phi-1.5's tokenizer format (CodeGenTokenizer, <|endoftext|> as bos/eos)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    tk = HFTokenizer(BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = [data.PHEYE_SYSTEM, "Instruction: What is written in the top left cell?\nOutput: a red square"] * 4
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(tk.to_str())["model"]
    (d / "vocab.json").write_text(json.dumps(state["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False,
                                                         "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                         "unk_token": "<|endoftext|>"}))


def write_release(tmp, level=2, first_level=True, interval=2):
    """tmp/release (config.json + checkpoint.pt), tmp/vit (config.json), tmp/llm (config.json + tokenizer)."""
    root, vcfg, lcfg = release_model(level, first_level, interval)
    dirs = {k: tmp / k for k in ("release", "vit", "llm")}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    vcfg.save_pretrained(dirs["vit"])
    lcfg.save_pretrained(dirs["llm"])
    write_tokenizer(dirs["llm"])
    config = {"encoder": "tiny/clip", "decoder": "tiny/phi", "tokenizer": "tiny/phi", "cross_interval": interval,
              "level": level, "first_level": first_level, "reduce": 1, "from_layer": 0,
              "encoder_dtype": "torch.float32", "decoder_dtype": "torch.float32", "other_params_dtype": "torch.float32"}
    assert list(config) == list(RELEASE_FIELDS)  # generate.py reads exactly these
    (dirs["release"] / "config.json").write_text(json.dumps(config))
    torch.save(root.state_dict(), dirs["release"] / "checkpoint.pt")
    return root, dirs


def release_image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))


@pytest.mark.parametrize("level, first_level", [(2, True), (2, False), (3, False), (1, False)])
def test_release_checkpoint_loads_and_equals_the_release(tmp_path, level, first_level):
    root, dirs = write_release(tmp_path, level, first_level)
    state = root.state_dict()
    assert "lang_encoder.model.layers.1.cross_attn_layer.attn.to_kv.weight" in state  # the layout really is the release's
    assert ("vision_encoder.vision_model.base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.second.weight"
            in state) == (level > 1)
    model = Pheye.from_release(dirs["release"], dirs["vit"], dirs["llm"])
    c = model.config
    assert (c.tiles, c.local, c.global_lora, c.interval) == ({1: 1, 2: 2, 3: 3}[level], level > 1,
                                                             "frozen" if first_level else "none", 2)
    assert model.xattn["1"].attn.n_head == 2  # max(64, 128) / 64
    # every tensor's round trip: each of the release's tensors is in our model, whole, in halves (to_kv) or its
    # first P rows (the 21-row table); what is left is named: second names of shared modules, norm_lvl_3 (and
    # norm_lvl_2 at level 1), never run by the release
    ours, used = model.state_dict(), 0
    for key, (how, names) in pheye.release_layout(model).items():
        t = state[key]
        got = {"copy": lambda: ours[names[0]], "kv": lambda: torch.cat([ours[names[0]], ours[names[1]]]),
               "rows": lambda: ours[names[0]]}.get(how, lambda: None)()
        if how == "rows":
            t = t[:1 + c.tiles ** 2]
        if got is None:
            assert re.match(r"vision_encoder\.norm_lvl_[23]\.", key) and (level == 1 or "lvl_3" in key), key
            continue
        assert torch.equal(got, t), key
        used += t.numel()
    assert used == sum(t.numel() for t in ours.values())  # and nothing of ours comes from elsewhere
    # the forward pass, from a PIL image with the release's preprocessing, equals the release's maths
    img = release_image()
    pixels, view = pheye.release_views(img, c)
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    with torch.no_grad():
        want = release_forward(root, img, ids, level, first_level)
        got = model(pixels[None], ids, global_view=view[None])
        assert want.abs().max() > 0.1 and (want - model.llm(ids)).abs().max() > 1e-3  # the image matters here
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_release_prompt_demo_and_conversion(tmp_path):
    """The release prompt token for token (transformers' CodeGen tokenizer on the same files, and data.py's pheye
    template), the demo command end to end on the tiny release directory, greedy tokens equal to the release's
    maths, and the safetensors conversion loading the same model."""
    from transformers import CodeGenTokenizer
    from llm import Tokenizer
    root, dirs = write_release(tmp_path, level=2, first_level=True)
    tok = Tokenizer.from_pretrained(dirs["llm"])
    q = "What is written in the top left cell?"
    ids = tok.encode(release_prompt(q))
    assert ids == CodeGenTokenizer.from_pretrained(dirs["llm"])(release_prompt(q)).input_ids
    assert ids == data.tokenize_conversation(tok, [{"from": "human", "value": q}], "pheye")[0]
    assert release_prompt(q).endswith("\n\nInstruction: What is written in the top left cell?\nOutput:")
    img = release_image()
    img.save(tmp_path / "x.png")
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(6):  # the release's greedy decoding, recomputed from scratch each step
            x = torch.cat([x, release_forward(root, img, x, 2, True)[:, -1].argmax(-1, keepdim=True)], 1)
    want = x[0, len(ids):].tolist()
    model = Pheye.from_release(dirs["release"], dirs["vit"], dirs["llm"])
    pixels, view = (t[None] for t in pheye.release_views(tmp_path / "x.png", model.config))
    assert model.generate(pixels, torch.tensor([ids]), max_new_tokens=6, global_view=view)[0].tolist() == want
    cmd = [sys.executable, os.path.join(ROOT, "pheye.py"), "--release", str(dirs["release"]), "--vit", str(dirs["vit"]),
           "--llm", str(dirs["llm"]), "--image", str(tmp_path / "x.png"), "--prompt", q, "--max_new_tokens", "6"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"Response: {data.answer_text(tok, want)}"
    # conversion: checkpoint.safetensors, without the second names; from_release prefers it
    path = release_to_safetensors(dirs["release"], dirs["vit"], dirs["llm"])
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert keys == {k for k in root.state_dict() if not k.startswith(("lang_encoder.old_decoder_blocks.",
                                                                      "lang_encoder.cross_attn_layers."))}
    os.remove(dirs["release"] / "checkpoint.pt")
    converted = Pheye.from_release(dirs["release"], dirs["vit"], dirs["llm"])
    for (k, a), (_, b) in zip(model.state_dict().items(), converted.state_dict().items()):
        assert torch.equal(a, b), k


def test_release_errors_name_the_problem(tmp_path):
    root, dirs = write_release(tmp_path, level=2, first_level=False)
    model = Pheye.from_release(dirs["release"], dirs["vit"], dirs["llm"])
    state = root.state_dict()
    block = "lang_encoder.model.layers.1.cross_attn_layer."

    def check(change, match):
        s = dict(state)
        change(s)
        with pytest.raises(ValueError, match=match):
            check_release(model, s, "checkpoint.pt")

    check(lambda s: s.pop("vision_encoder.norm_lvl_1.weight"), r"missing: \['vision_encoder.norm_lvl_1.weight'\]")
    check(lambda s: s.pop("lang_encoder.cross_attn_layers.1.ff.fc1.bias"),
          r"missing: \['lang_encoder.cross_attn_layers.1.ff.fc1.bias'\]")
    check(lambda s: s.update({"vision_encoder.extra": torch.zeros(1)}), r"unexpected: \['vision_encoder.extra'\]")
    check(lambda s: s.update({block + "attn.to_kv.weight": torch.zeros(128, 128)}),
          r"to_kv.weight: file \(128, 128\) vs model \(256, 128\)")
    check(lambda s: s.update({"lang_encoder.cross_attn_layers.1.attn.to_q.bias": torch.zeros(128)}),
          "to_q.bias: differs from " + re.escape(block + "attn.to_q.bias"))
    (tmp_path / "first").mkdir()
    first = write_release(tmp_path / "first", level=2, first_level=True)[0]
    with pytest.raises(ValueError, match=r"unexpected: \[.*lora_A\.first\.weight"):  # an adapter the config does not name
        check_release(model, first.state_dict(), "checkpoint.pt")
    base = json.loads((dirs["release"] / "config.json").read_text())
    for change, match in [({"level": 4}, "level=4"), ({"reduce": 2}, "reduce=2"), ({"from_layer": 3}, "from_layer=3"),
                          ({"level": 1, "first_level": True}, "first_level with level 1"),
                          ({"decoder_dtype": "torch.int8"}, "decoder_dtype='torch.int8'"),
                          ({"resolution": 448}, r"unknown fields \['resolution'\]")]:
        (dirs["release"] / "config.json").write_text(json.dumps(base | change))
        with pytest.raises(ValueError, match=match):
            release_config(dirs["release"], dirs["vit"], dirs["llm"])
    (dirs["release"] / "config.json").write_text(json.dumps({k: v for k, v in base.items() if k != "level"}))
    with pytest.raises(ValueError, match=r"missing fields \['level'\]"):
        release_config(dirs["release"], dirs["vit"], dirs["llm"])
