"""pheye.py on tiny configs: tiling order, adapters, positions, cross-attention placement and init, training
groups, loss normalisation, cached generation, save/load, bad input."""
import dataclasses
import json
import zlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import IGNORE
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


def test_global_only_reads_the_global_view_alone():
    """local=False (the no-tiles ablation): the vision tokens are exactly the full model's global-view tokens, the
    tiles never go through the ViT, and the parts that never run (local adapter, local LayerNorm) stay frozen."""
    full, glob = tiny(), tiny(local=False)
    glob.load_state_dict(full.state_dict())
    px = pixels()
    with torch.no_grad():
        torch.testing.assert_close(glob.encode_image(px), full.encode_image(px)[:, :N_SUB], atol=0, rtol=0)
        calls = []
        hook = glob.vit.register_forward_pre_hook(lambda m, args, kw: calls.append((args[0].shape, kw["adapter"])),
                                                  with_kwargs=True)
        glob.encode_image(px)
        hook.remove()
    assert calls == [((2, 3, 64, 64), "global")]  # one ViT call, on the global view: the tiles never run
    groups = glob.configure_stage("stage3")
    trained = {id(p) for g in groups for p in g["params"]}
    assert not trained & {id(p) for p in lora_parameters(glob.vit, "local")}
    assert not trained & {id(p) for p in glob.norm_local.parameters()}
    n = lambda m: sum(p.numel() for g in m.configure_stage("stage3") for p in g["params"])
    local = sum(p.numel() for p in lora_parameters(full.vit, "local")) + 2 * 128
    assert n(full) - n(glob) == local


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
    paper = DenseCrossAttentionBlock(2048, 1280, 32, 24)
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
    assert all(s["reduction"] == "sum" for s in Pheye.STAGES.values())
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
    # The release README lists 295M (Pheye-x4) and 578M (Pheye-x2) trainable parameters: cross-attention +
    # the local LoRA (rank 16) + positions + LayerNorms. Our two-adapter model adds the global LoRA (rank 8).
    for name, millions in (("paper-x4-448", 295), ("paper-x2-672", 578)):
        with torch.device("meta"):
            model = Pheye(PheyeConfig.preset(name))
        counts = {g["name"]: sum(p.numel() for p in g["params"]) for g in model.configure_stage("stage1")}
        local = sum(p.numel() for p in lora_parameters(model.vit, "local"))
        release = counts["cross_attn"] + local + counts["pos_embed"] + counts["norms"]
        assert round(release / 1e6) == millions, (name, release)


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

    def encode(self, text, bos=False):
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
