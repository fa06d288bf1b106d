"""INF-LLaVA: DCM crops and recombination, DEM's windowed attention, switches, stages, save/load (tiny, CPU)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import inf_llava as inf
from data import IGNORE, IMAGE_ID
from inf_llava import INFLLaVA, INFLLaVAConfig, crop_global, crop_local, merge_global, merge_local
from llm import splice_image


def tiny(**kw):
    """The tiny preset with a 2-layer ViT (layer -2 runs one block) and a 2-layer LM: same shapes, faster."""
    cfg = INFLLaVAConfig.preset("tiny")
    cfg = dataclasses.replace(cfg, vit=dataclasses.replace(cfg.vit, layers=2),
                              llm=dataclasses.replace(cfg.llm, n_layer=2))
    return dataclasses.replace(cfg, **kw)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return INFLLaVA(tiny()).eval()


def pixels(B=1, size=192, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- DCM
@pytest.mark.parametrize("n_h,n_w", [(3, 3), (2, 3), (1, 4), (1, 1)])
def test_dcm_crops_recombine_pixel_perfect(n_h, n_w):
    img = torch.randint(0, 256, (2, 3, 8 * n_h, 8 * n_w)).float()
    for crop, merge in [(crop_local, merge_local), (crop_global, merge_global)]:
        subs = crop(img, n_h, n_w)
        assert subs.shape == (2, n_h * n_w, 3, 8, 8)
        assert torch.equal(merge(subs, n_h, n_w), img)
    # Eq. 13: local sub-image i is the contiguous tile at row i // n_w, column i % n_w
    loc = crop_local(img, n_h, n_w)
    for i in range(n_h * n_w):
        r, c = i // n_w, i % n_w
        assert torch.equal(loc[:, i], img[:, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8])


@pytest.mark.parametrize("n_h,n_w", [(3, 3), (2, 3)])
def test_global_crop_is_eq17(n_h, n_w):
    H, W = 5 * n_h, 7 * n_w  # sub-images 5x7: non-square too
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.stack([xs, ys, xs * 0]).float()[None]  # channel 0 holds x, channel 1 holds y
    glo = crop_global(img, n_h, n_w)  # (1, N, 3, 5, 7)
    v, u = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    for i in range(n_h):
        for j in range(n_w):
            sub = glo[0, i * n_w + j]
            assert torch.equal(sub[0], (j + u * n_w).float())  # I_ij(u, v) = I(j + u n_W, i + v n_H)
            assert torch.equal(sub[1], (i + v * n_h).float())


def test_feature_recombination_inverts_feature_crops():
    feats = torch.randn(2, 6, 32, 5, 5)  # (B, N=6 sub-features of 5x5, d=32): a 2x3 grid
    for crop, merge in [(crop_local, merge_local), (crop_global, merge_global)]:
        full = merge(feats, 2, 3)
        assert full.shape == (2, 32, 10, 15)
        assert torch.equal(crop(full, 2, 3), feats)
    # the two recombinations are different maps (Fig. 3): strided vs tiled placement
    assert not torch.equal(merge_local(feats, 2, 3), merge_global(feats, 2, 3))
    with pytest.raises(ValueError, match="10x15"):
        crop_local(torch.zeros(1, 3, 10, 15), 3, 3)


# ----------------------------------------------------------------------------- DEM
def window_ids(H, W, n_h, n_w, window):
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    if window == "local":
        ids = (ys // (H // n_h)) * n_w + xs // (W // n_w)
    else:
        ids = (ys % n_h) * n_w + xs % n_w
    return ids.flatten()


def full_attention_with_block_mask(attn, queries, context, window, n_h, n_w):
    """Reference: one attention over all H*W tokens; each query may only see keys of its own sub-feature."""
    B, d, H, W = queries.shape
    ids = window_ids(H, W, n_h, n_w, window)
    out = attn(queries.flatten(2).transpose(1, 2), context.flatten(2).transpose(1, 2),
               mask=ids[:, None] == ids[None, :])  # (B, HW, d)
    return out.transpose(1, 2).reshape(B, d, H, W)


@pytest.mark.parametrize("mode", ["paper", "release"])
@pytest.mark.parametrize("n_h,n_w", [(3, 3), (2, 3)])
def test_dem_windowed_attention_equals_block_masked_full_attention(mode, n_h, n_w):
    torch.manual_seed(0)
    cfg = tiny(**(inf.RELEASE if mode == "release" else {}))
    dem = inf.DEM(cfg)
    d = cfg.vit.width
    f_loc, f_glo = torch.randn(2, d, 4 * n_h, 4 * n_w), torch.randn(2, d, 4 * n_h, 4 * n_w)
    # the paper crops V_glo's maps with C_glo (Eq. 18-19) and V_loc's with C_loc (Eq. 22-23); the release swaps
    win_glo, win_loc = ("global", "local") if mode == "paper" else ("local", "global")
    ref_glo = full_attention_with_block_mask(dem.attn[0], f_glo, f_loc, win_glo, n_h, n_w)
    ref_loc = full_attention_with_block_mask(dem.attn[-1], f_loc, f_glo, win_loc, n_h, n_w)
    v_glo, v_loc = dem.enhance_global(f_loc, f_glo, n_h, n_w), dem.enhance_local(f_loc, f_glo, n_h, n_w)
    torch.testing.assert_close(v_glo, ref_glo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_loc, ref_loc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dem(f_loc, f_glo, n_h, n_w), dem.fusion(ref_glo, ref_loc), atol=1e-5, rtol=1e-5)
    # and the windows matter: unmasked full attention gives something else
    full = dem.attn[0](f_glo.flatten(2).transpose(1, 2), f_loc.flatten(2).transpose(1, 2))
    assert (full.transpose(1, 2).reshape_as(v_glo) - v_glo).abs().max() > 1e-3


def test_paper_attention_is_eq20_21():
    torch.manual_seed(0)
    attn = inf.CrossAttention(16, release=False)
    G, L = torch.randn(1, 9, 16), torch.randn(1, 9, 16)
    A = torch.softmax((attn.q_proj(G) @ attn.k_proj(L).transpose(1, 2)) / 16 ** 0.5, dim=-1)  # Eq. 20
    torch.testing.assert_close(attn(G, L), A @ attn.v_proj(L), atol=1e-6, rtol=1e-5)  # Eq. 21


# the release's SpatialEmbed parameters (name -> shape at d=1024) and the names they have here
RELEASE_SHAPES = {
    **{f"attention.linears.{i}.{p}": (1024, 1024) if p == "weight" else (1024,)
       for i in range(4) for p in ("weight", "bias")},
    "attention.ln.weight": (1024,), "attention.ln.bias": (1024,),
    **{f"{f}.0.weight": (64, 1024) for f in ("ffn_crop", "ffn_stride")},
    **{f"{f}.0.bias": (64,) for f in ("ffn_crop", "ffn_stride")},
    **{f"{f}.2.weight": (512, 64) for f in ("ffn_crop", "ffn_stride")},
    **{f"{f}.2.bias": (512,) for f in ("ffn_crop", "ffn_stride")},
    "ln_fuse.weight": (1024,), "ln_fuse.bias": (1024,),
}
OURS = {"attn.0.q_proj": "attention.linears.0", "attn.0.k_proj": "attention.linears.1",
        "attn.0.v_proj": "attention.linears.2", "attn.0.out_proj": "attention.linears.3",
        "attn.0.norm": "attention.ln", "fusion.ffn_loc": "ffn_crop", "fusion.ffn_glo": "ffn_stride",
        "fusion.norm": "ln_fuse"}


def rename(key):
    for ours, theirs in OURS.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    return key


def test_release_and_paper_dem_parameter_shapes():
    release = inf.DEM(INFLLaVAConfig.preset("paper-release"))
    shapes = {rename(k): tuple(v.shape) for k, v in release.state_dict().items()}
    assert shapes == RELEASE_SHAPES
    assert sum(p.numel() for p in release.parameters()) == 4 * (1024 * 1024 + 1024) + 4 * 1024 + 2 * (
        1024 * 64 + 64 + 64 * 512 + 512)
    paper = inf.DEM(INFLLaVAConfig.preset("paper"))
    assert {k: tuple(v.shape) for k, v in paper.state_dict().items()} == {
        **{f"attn.{i}.{p}_proj.weight": (1024, 1024) for i in (0, 1) for p in "qkv"},  # Eq. 20-25, no bias
        "fusion.w_glo.weight": (512, 1024), "fusion.w_loc.weight": (512, 1024)}  # Eq. 26
    shared = inf.DEM(dataclasses.replace(INFLLaVAConfig.preset("paper"), share_attention=True))
    assert sum(p.numel() for p in shared.parameters()) == 3 * 1024 * 1024 + 2 * 512 * 1024  # one W_q/W_k/W_v
    unshared = inf.DEM(dataclasses.replace(INFLLaVAConfig.preset("paper-release"), share_attention=False))
    assert sum(p.numel() for p in unshared.parameters()) == sum(p.numel() for p in release.parameters()) + (
        4 * (1024 * 1024 + 1024) + 2 * 1024)  # a second release attention


def test_shared_attention_serves_both_directions():
    torch.manual_seed(0)
    dem = inf.DEM(tiny(share_attention=True))
    assert len(dem.attn) == 1
    d = dem.attn[0].q_proj.in_features
    f_loc, f_glo = torch.randn(1, d, 12, 12), torch.randn(1, d, 12, 12)
    ref_loc = full_attention_with_block_mask(dem.attn[0], f_loc, f_glo, "local", 3, 3)  # Eq. 22-25 with the
    torch.testing.assert_close(dem.enhance_local(f_loc, f_glo, 3, 3), ref_loc, atol=1e-5, rtol=1e-5)  # same W


# ----------------------------------------------------------------------------- the model
def test_one_vit_call_with_all_crops(base):
    seen = []
    hook = base.vit.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        base.image_features(pixels(B=2))
        single = INFLLaVA(tiny(dual=False, dcm="local", dem="none"), vit=base.vit, llm=base.llm)
        single.image_features(pixels(B=1))
    finally:
        hook.remove()
    assert seen == [(2 * 19, 3, 64, 64), (9, 3, 64, 64)]  # 9 local + 9 global + the 64-px view, per image


def test_pooling_dcm_branches_and_dual_combine_are_exact(base):
    x = pixels(B=2)
    feats = lambda crops: base.vit(crops.flatten(0, 1), layer=-2)[:, 1:].view(2, 9, 8, 8, -1).permute(0, 1, 4, 2, 3)
    f_loc = merge_local(feats(crop_local(x, 3, 3)), 3, 3)  # (2, d, 24, 24)
    f_glo = merge_global(feats(crop_global(x, 3, 3)), 3, 3)
    tokens = lambda m: m.flatten(2).transpose(1, 2)
    with torch.no_grad():
        for kw, expect in [
            (dict(dcm="local"), F.avg_pool2d(f_loc, 3)),  # Eq. 7 average pooling over each 3x3 block
            (dict(dcm="global"), F.avg_pool2d(f_glo, 3)),
            (dict(dcm="both"), F.avg_pool2d(f_loc + f_glo, 3)),  # Table 6 "w/ DCM": added, no DEM
            (dict(dcm="local", downsample="bilinear"), f_loc[..., 1::3, 1::3]),  # release at n=3: centre tokens
        ]:
            m = INFLLaVA(tiny(dual=False, dem="none", **kw), vit=base.vit, llm=base.llm)
            torch.testing.assert_close(m.image_features(x), tokens(expect), atol=1e-5, rtol=1e-5)
        s = INFLLaVA(tiny(dual=True, dual_combine="sum"), vit=base.vit, llm=base.llm)
        single = INFLLaVA(tiny(dual=False), vit=base.vit, llm=base.llm)
        single.dem.load_state_dict(s.dem.state_dict())
        low = base.vit(F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False), layer=-2)[:, 1:]
        torch.testing.assert_close(s.image_features(x), single.image_features(x) + low, atol=1e-5, rtol=1e-5)
        for dcm, f in (("local", f_loc), ("global", f_glo)):  # Table 6 "w/ DCM local/global": DEM on one view
            m = INFLLaVA(tiny(dual=False, dcm=dcm), vit=base.vit, llm=base.llm)
            torch.testing.assert_close(m.image_features(x), tokens(F.avg_pool2d(m.dem(f, f, 3, 3), 3)),
                                       atol=1e-5, rtol=1e-5)
        mean = INFLLaVA(tiny(dual_combine="mean"), vit=base.vit, llm=base.llm)
        mean.dem.load_state_dict(s.dem.state_dict())
        torch.testing.assert_close(mean.image_features(x), s.image_features(x) / 2, atol=1e-5, rtol=1e-5)


ABLATIONS = [dict(dem="global"), dict(dem="local"), dict(dem="none"), dict(dcm="local", dem="none"),
             dict(dcm="global", dem="none"), dict(dcm="local"), dict(dcm="global"), dict(windows="release"),
             dict(attention="release"), dict(share_attention=True),
             dict(downsample="bilinear"), dict(dual_combine="mean"), dict(dual=False),
             *[dict(fusion=f) for f in inf.CHOICES["fusion"] if f != "linear_concat"],
             inf.RELEASE]


@pytest.mark.parametrize("kw", ABLATIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_each_switch_runs_and_changes_the_output(base, kw):
    torch.manual_seed(0)
    m = INFLLaVA(tiny(**kw), vit=base.vit, llm=base.llm).eval()
    m.projector.load_state_dict(base.projector.state_dict())
    if m.dem is not None and kw.keys() <= {"windows", "downsample", "dual_combine", "dual"}:
        m.dem.load_state_dict(base.dem.state_dict())  # same DEM weights: only the switch differs
    x = pixels()
    with torch.no_grad():
        out, ref = m.encode_images(x), base.encode_images(x)
    assert out.shape == ref.shape == (1, 64, m.config.llm.d_model)
    assert (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize("size,dual,calls", [(64, False, 2), (64, True, 3), (128, True, 9), (256, False, 32)])
def test_single_and_dual_resolutions(size, dual, calls):
    torch.manual_seed(0)
    m = INFLLaVA(tiny(image_size=size, dual=dual)).eval()
    seen = []
    m.vit.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        assert m.encode_images(pixels(size=size)).shape == (1, 64, m.config.llm.d_model)  # the ViT's 8x8 grid
    assert seen == [calls]


def test_non_square_grid_runs(base):
    with torch.no_grad():
        assert base.image_features(torch.randn(1, 3, 128, 192)).shape == (1, 64, 128)  # 2x3 tiles


def test_bad_inputs_are_refused_with_their_size(base):
    for shape, msg in [((1, 3, 50, 50), "50x50"), ((1, 3, 200, 192), "200x192"), ((1, 1, 192, 192), "RGB"),
                       ((1, 4, 192, 192), "RGB")]:
        with pytest.raises(ValueError, match=msg):
            base.image_features(torch.zeros(shape))
    with pytest.raises(ValueError, match="image_size=100"):
        INFLLaVA(tiny(image_size=100))
    with pytest.raises(ValueError, match="fusion"):
        INFLLaVA(tiny(fusion="concat"))
    with pytest.raises(ValueError, match="exactly one IMAGE_ID"):
        base(pixels(), torch.tensor([[1, 5, 6]]))


def test_inputs_the_config_cannot_crop_are_refused(base):
    # a 64-px (the ViT's own size) or 128-px image into a 192 model would run DCM/DEM on a 1x1 or 2x2 grid
    for size in (64, 128):
        with pytest.raises(ValueError, match=f"pixels of {size}x{size}: this INF-LLaVA crops 192x192 images into "
                                             f"tiles of the ViT's 64.*resize_input=True"):
            base.image_features(pixels(size=size))
    with pytest.raises(ValueError, match="downsample='bilinear'.*3x3 grid.*image_size=256"):
        INFLLaVA(tiny(image_size=256, downsample="bilinear"))
    bilinear = INFLLaVA(tiny(downsample="bilinear"), vit=base.vit, llm=base.llm)
    with pytest.raises(ValueError, match="pixels of 128x192: downsample='bilinear'"):
        bilinear.image_features(torch.zeros(1, 3, 128, 192))


def test_resize_input_is_the_releases_encode_images(base):
    """The release's inference: a 64-px (its 336) image is resized bicubically to 192 (its 1008) for DCM/DEM, and
    is its own low-res view."""
    torch.manual_seed(0)
    m = INFLLaVA(tiny(resize_input=True, **inf.RELEASE), vit=base.vit, llm=base.llm).eval()
    x = pixels(size=64)
    high = F.interpolate(x, size=(192, 192), mode="bicubic", align_corners=False)
    feats = lambda crops: base.vit(crops.flatten(0, 1), layer=-2)[:, 1:].view(1, 9, 8, 8, -1).permute(0, 1, 4, 2, 3)
    with torch.no_grad():
        f_loc = merge_local(feats(crop_local(high, 3, 3)), 3, 3)
        f_glo = merge_global(feats(crop_global(high, 3, 3)), 3, 3)
        dual = F.interpolate(m.dem(f_loc, f_glo, 3, 3), size=(8, 8), mode="bilinear", align_corners=False)
        ref = (dual.flatten(2).transpose(1, 2) + base.vit(x, layer=-2)[:, 1:]) / 2  # torch.mean of the two
        torch.testing.assert_close(m.image_features(x), ref, atol=1e-5, rtol=1e-5)
        big = pixels(size=192)  # a training-size input is not resized: the same as without the switch
        plain = INFLLaVA(tiny(**inf.RELEASE), vit=base.vit, llm=base.llm).eval()
        plain.dem.load_state_dict(m.dem.state_dict())
        torch.testing.assert_close(m.image_features(big), plain.image_features(big), rtol=0, atol=0)


def test_small_grayscale_rgba_images_are_resized_like_the_release(base):
    import data
    from PIL import Image
    for im in (Image.new("L", (30, 20), 90), Image.new("RGBA", (500, 130), (10, 200, 30, 0))):
        px = data.load_image(im, base.config.image_size, base.config.pad_square)  # pad to square, resize
        assert px.shape == (3, 192, 192)
        with torch.no_grad():
            assert base.image_features(px[None]).shape == (1, 64, 128)


def batch():
    idx = torch.tensor([[1, 17, IMAGE_ID, 30, 31, 32, 2], [1, IMAGE_ID, 40, 41, 42, 3, 3]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 30, 31, 32, 2], [IGNORE, IGNORE, 40, 41, 42, IGNORE, IGNORE]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    return idx, labels, mask


def test_splice_and_loss(base):
    idx, labels, mask = batch()
    x = pixels(B=2)
    with torch.no_grad():
        img = base.encode_images(x)  # (2, 64, D)
        embeds, lab, m = splice_image(idx, base.llm.embed, img, labels, mask)
        assert embeds.shape == (2, 7 - 1 + 64, base.config.llm.d_model)
        torch.testing.assert_close(embeds[0, 2:66], img[0], rtol=0, atol=0)
        torch.testing.assert_close(embeds[1, 1:65], img[1], rtol=0, atol=0)
        torch.testing.assert_close(embeds[0, 66:], base.llm.embed(idx[0, 3:]), rtol=0, atol=0)
        assert m[1].tolist() == [1] * 68 + [0] * 2
        assert lab[0].tolist() == [IGNORE] * 66 + [30, 31, 32, 2]
        logits, loss = base(x, idx, labels, mask)
        _, total = base(x, idx, labels, mask, reduction="sum")
    targets = lab[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(total, ref * (targets != IGNORE).sum())


def test_generate_matches_stepwise_argmax(base):
    x = pixels(B=2)
    rows = [torch.tensor([1, 17, IMAGE_ID, 30, 31]), torch.tensor([1, IMAGE_ID, 40])]
    idx = torch.tensor([[1, 17, IMAGE_ID, 30, 31], [0, 0, 1, IMAGE_ID, 40]])  # left padding
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    out = base.generate(x, idx, max_new_tokens=4, mask=mask)
    for b, row in enumerate(rows):
        ids = row.clone()
        with torch.no_grad():
            for _ in range(4):
                ids = torch.cat([ids, base(x[b:b + 1], ids[None])[0, -1].argmax()[None]])
        assert out[b].tolist() == ids[len(row):].tolist()


def test_stage_gradients():
    torch.manual_seed(0)
    m = INFLLaVA(tiny())
    idx, labels, mask = batch()
    named = lambda part: list(getattr(m, part).named_parameters())
    for stage, trained in [("pretrain", {"dem", "projector"}), ("finetune", {"dem", "projector", "llm"})]:
        m.zero_grad(set_to_none=True)
        groups = m.configure_stage(stage)
        assert {g["name"]: g["lr"] for g in groups} == INFLLaVA.STAGES[stage]["train"]
        assert {g["name"] for g in groups} == trained
        m(pixels(B=2), idx, labels, mask)[1].backward()
        for part in ("vit", "dem", "projector", "llm"):
            grads = [p.grad for _, p in named(part)]
            if part in trained:
                assert all(g is not None for g in grads), part
                assert sum(g.abs().sum() for g in grads) > 0, part
            else:
                assert all(g is None for g in grads), part
    assert INFLLaVA.STAGES["pretrain"]["train"] == {"dem": 1e-3, "projector": 1e-3}
    assert INFLLaVA.STAGES["finetune"]["train"] == {"dem": 2e-5, "projector": 2e-5, "llm": 2e-5}


def test_pretrain_centre_crops_finetune_pads_as_the_release(monkeypatch, tmp_path):
    """INF-LLava_pretrain.sh has no --image_aspect_ratio pad (CLIP's processor: shortest side, centre crop);
    INF-LLava_finetune.sh pads. train.py builds each stage's data that way."""
    import data
    import train

    class Built(Exception):
        pass

    seen = {}

    def make_dataset(*args, pad_square, center_crop, **kw):
        seen[stage] = (pad_square, center_crop)
        raise Built

    monkeypatch.setattr(data, "make_dataset", make_dataset)
    for stage in ("pretrain", "finetune"):
        with pytest.raises(Built):
            train.main(["--model=inf_llava", "--from_scratch=True", f"--stage={stage}", "--max_iters=1",
                        f"--out_dir={tmp_path / stage}"], distributed=False)
    assert seen == {"pretrain": (False, True), "finetune": (True, False)}


def test_save_load_roundtrip(base, tmp_path):
    idx, labels, mask = batch()
    base.save(tmp_path / "ckpt")
    loaded = INFLLaVA.load(tmp_path / "ckpt").eval()
    assert loaded.config == base.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels(B=2), idx, mask=mask), base(pixels(B=2), idx, mask=mask),
                                   rtol=0, atol=0)
    release = INFLLaVA(tiny(**inf.RELEASE), vit=base.vit, llm=base.llm)
    release.save(tmp_path / "rel")
    assert INFLLaVA.load(tmp_path / "rel").config.fusion == "release"


def test_presets():
    paper, tiny_cfg = INFLLaVAConfig.preset("paper"), INFLLaVAConfig.preset("tiny")
    assert (paper.vit.image_size, paper.vit.width, paper.image_size, paper.dual) == (336, 1024, 1008, True)
    assert paper.llm == inf.LLMConfig.preset("llama3-8b") and paper.template == "llama3"
    assert (tiny_cfg.vit.image_size, tiny_cfg.image_size) == (64, 192)
    assert tiny_cfg.vit == inf.ViTConfig.preset("tiny") and tiny_cfg.llm == inf.LLMConfig.preset("tiny")
    rel = INFLLaVAConfig.preset("paper-release")
    assert {k: getattr(rel, k) for k in inf.RELEASE} == inf.RELEASE
    with pytest.raises(ValueError, match="paper-x"):
        INFLLaVAConfig.preset("paper-x")


def test_tiny_inf_llava_trains_loss_falls():
    import data
    import train
    from llm import Tokenizer
    tok = Tokenizer.from_pretrained(train.tiny_tokenizer())
    torch.manual_seed(0)
    cfg = tiny()
    model = INFLLaVA(cfg)
    ds = data.SyntheticDataset(tok, n=8, template=cfg.template, image_size=cfg.image_size, pad_square=cfg.pad_square)
    batches = [ds.collate([ds[i] for i in range(k, k + 4)]) for k in (0, 4)]
    groups = model.configure_stage("finetune")  # DEM + projector + LLM; the ViT stays frozen
    opt = torch.optim.AdamW([{"params": g["params"], "lr": 2e-3} for g in groups], weight_decay=0.0)

    def loss_of(b):
        return model(b["pixels"], b["ids"], b["labels"], b["mask"])[1]

    with torch.no_grad():
        before = sum(loss_of(b) for b in batches).item() / 2
    vit_before = [p.clone() for p in model.vit.parameters()]
    for step in range(20):
        opt.zero_grad(set_to_none=True)
        loss_of(batches[step % 2]).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_of(b) for b in batches).item() / 2
    assert before > 5.0  # ~ln(512) at random initialisation
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(vit_before, model.vit.parameters()))
