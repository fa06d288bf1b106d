"""hire.py: the JBU layer against a naive unfold/einsum reference, the enricher's exact fast paths, S2's crops,
the image splice, the stage recipe, checkpoints, bad input, and a tiny HIRE that learns."""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import hire
import vit as vitlib
from data import IGNORE, IMAGE_ID
from llm import splice_image


def small_enricher_config(**kw):
    """The paper's structure (5 UNet stages, JBU layers) at widths that run in milliseconds."""
    base = dict(unet_widths=[4, 4, 8, 8, 8], guide_dim=6, jbu_key_dim=5, jbu_radius=2, jbu_layers=3, jbu_chunk=3,
                jbu_dropout=0.0, enricher_stride=1)
    base.update(kw)
    return dataclasses.replace(hire.HIREConfig.preset("tiny"), **base)


def naive_jbu(layer, x, guide):
    """FeatUp's JBULearnedRange written the obvious way: explicit unfolds and einsums, (B, C, d*d, H, W) built."""
    B, _, H, W = guide.shape
    r, d = layer.radius, layer.diameter
    q = layer.range_proj(guide)
    K = q.shape[1]
    qn = F.unfold(F.pad(q, [r] * 4, mode="reflect"), d).view(B, K, d * d, H, W)
    logits = torch.einsum("bkthw,bkhw->bthw", qn, q) * layer.range_temp.exp()
    coords = torch.linspace(-1, 1, d)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    spatial = torch.exp(-(xx ** 2 + yy ** 2) / (2 * layer.sigma_spatial ** 2)).reshape(1, d * d, 1, 1)
    k = logits.softmax(1) * spatial
    k = k / k.sum(1, keepdim=True)
    k = k + 0.1 * layer.fixup_proj(torch.cat([k, guide], 1))
    up = F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False)
    un = F.unfold(F.pad(up, [r] * 4, mode="reflect"), d).view(B, x.shape[1], d * d, H, W)
    return torch.einsum("bcthw,bthw->bchw", un, k)


def test_jbu_matches_naive_reference_forward_and_grads():
    torch.manual_seed(0)
    layer = hire.JBU(guide_dim=6, key_dim=5, radius=3, dropout=0.0)
    with torch.no_grad():
        layer.range_temp.fill_(0.3), layer.sigma_spatial.fill_(0.7)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    g = torch.randn(2, 6, 12, 10, requires_grad=True)
    w = torch.randn(2, 4, 12, 10)
    outs, grads = [], []
    for fn in (layer, lambda a, b: naive_jbu(layer, a, b)):
        out = fn(x, g)
        params = [x, g] + list(layer.parameters())
        grads.append(torch.autograd.grad((out * w).sum(), params))
        outs.append(out)
    assert outs[0].shape == (2, 4, 12, 10)  # doubles the resolution
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius", [1, 3])
def test_fused_ops_equal_tap_by_tap_reference(dtype, radius, monkeypatch):
    """The fused (tiled) adaptive convolution and neighbour similarity against the tap-by-tap reference: values and
    gradients, odd sizes, reflect padding at the borders. Tiles of a few hundred bytes force uneven row bands and
    channel chunks, so every tile edge and halo is crossed."""
    torch.manual_seed(0)
    d, tol = 2 * radius + 1, dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 5, 11, 9, dtype=dtype, requires_grad=True)
    k = torch.randn(2, d * d, 11, 9, dtype=dtype, requires_grad=True)
    q = torch.randn(2, 4, 11, 9, dtype=dtype, requires_grad=True)
    w, ws = torch.randn(2, 5, 11, 9, dtype=dtype), torch.randn(2, d * d, 11, 9, dtype=dtype)
    pad = lambda t: F.pad(t, [radius] * 4, mode="reflect")
    results = {}
    for name, conv, sim in (("reference", hire.AdaptiveConv, hire.NeighbourSimilarity),
                            ("fused", hire.FusedAdaptiveConv, hire.FusedNeighbourSimilarity)):
        out, s = conv.apply(pad(x), k, radius), sim.apply(pad(q), radius)
        results[name] = (out, s) + torch.autograd.grad((out * w).sum() + (s * ws).sum(), [x, k, q])
    monkeypatch.setattr(hire, "TILE_BYTES", 600 if dtype == torch.float32 else 1200)
    chans, bands = hire.tiles(pad(x), 11, radius)
    assert len(chans) > 1 and len(bands) > 1  # the check below crosses tile edges
    out, s = hire.FusedAdaptiveConv.apply(pad(x), k, radius), hire.FusedNeighbourSimilarity.apply(pad(q), radius)
    results["tiled"] = (out, s) + torch.autograd.grad((out * w).sum() + (s * ws).sum(), [x, k, q])
    for name in ("fused", "tiled"):
        for a, b in zip(results[name], results["reference"]):
            torch.testing.assert_close(a, b, **tol)
    # and the reference is the naive unfold/einsum formula (values)
    un = F.unfold(pad(x), d).view(2, 5, d * d, 11, 9)
    torch.testing.assert_close(results["reference"][0], torch.einsum("bcthw,bthw->bchw", un, k), **tol)


def test_kernels_sum_to_one_before_fixup_and_layer_sizes():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 64, 64)
    # FeatUp's doubling stack: 3 -> 6 -> ... -> 96, guides resized by adaptive average pooling as its JBUStack does
    enr = hire.Enricher(small_enricher_config(jbu_layers=5, jbu_sizes="doubling"))
    guides = enr.guides(image, (3, 3))
    assert [tuple(g.shape[-2:]) for g in guides] == [(6, 6), (12, 12), (24, 24), (48, 48), (96, 96)]
    for g, m in zip(guides, enr.unet(image)):
        torch.testing.assert_close(g, F.adaptive_avg_pool2d(m, g.shape[-2:]))
    # the paper's reading (default): each layer at its UNet decoder map's size, S/16 ... S, unresized
    enr = hire.Enricher(small_enricher_config(jbu_layers=5))
    guides = enr.guides(image, (3, 3))
    assert [tuple(g.shape[-2:]) for g in guides] == [(4, 4), (8, 8), (16, 16), (32, 32), (64, 64)]
    for g, m in zip(guides, enr.unet(image)):
        assert torch.equal(g, m)
    k = enr.jbu[0].kernel(guides[2], fixup=False)
    assert k.shape == (1, 25, 16, 16)
    torch.testing.assert_close(k.sum(1), torch.ones(1, 16, 16))
    assert (k.sum(1) - enr.jbu[0].kernel(guides[2]).sum(1)).abs().max() > 1e-4  # the fix-up moves it off one


@pytest.mark.parametrize("sizes", ["decoder", "doubling"])
def test_five_layer_stack_pools_back_to_24(sizes):
    """CLIP-L geometry (24 x 24 grid, 5 JBU layers) for 336, 672 and 1008 inputs, at minimal widths: the paper's
    reading ends at the image size (x_en of Eq. 1 is H x W), FeatUp's doubling at 768 whatever the input."""
    torch.manual_seed(0)
    enr = hire.Enricher(small_enricher_config(unet_widths=[1] * 5, guide_dim=1, jbu_key_dim=1, jbu_layers=5,
                                              jbu_radius=1, jbu_chunk=2, jbu_sizes=sizes)).eval()
    for size in (336, 672, 1008):
        with torch.no_grad():
            image = torch.randn(1, 3, size, size)
            assert [g.shape[-1] for g in enr.unet(image)] == [size // 16, size // 8, size // 4, size // 2, size]
            ks = enr.kernels(image, (24, 24))
            want = [size >> k for k in (4, 3, 2, 1, 0)] if sizes == "decoder" else [48, 96, 192, 384, 768]
            assert [k.shape[-1] for k in ks] == want
            out = enr(image, torch.randn(1, 2, 24, 24))
        assert out.shape == (1, 2, 24, 24)


@pytest.mark.parametrize("sizes,S,g,layers,stride", [("decoder", 32, 2, 3, 1), ("doubling", 32, 2, 3, 1),
                                                     ("decoder", 112, 4, 5, 1), ("decoder", 64, 2, 3, 2)])
def test_basis_and_direct_paths_equal_naive_computation(sizes, S, g, layers, stride):
    """pool(J(E)) three ways: naive (unfold/einsum JBU layers at full size, then pool), direct (fused layers, channel
    chunks), basis (the pool pulled back through J block by block into M, then E @ M). Forward and parameter
    gradients. The third case has CLIP-L at 672's geometry in small (grid 4, layers at 7, 14, 28, 56, 112: the first
    two not multiples of the grid, so blocks' windows there are unevenly spaced); the last the tiny preset's stride
    (the stack ends at S/2)."""
    torch.manual_seed(0)
    enr = hire.Enricher(small_enricher_config(jbu_sizes=sizes, jbu_layers=layers, enricher_stride=stride))
    image, feats = torch.randn(2, 3, S, S), torch.randn(2, 6, g, g)

    def naive():
        x = feats
        for layer, guide in zip(enr.jbu, enr.guides(image, (g, g))):
            x = naive_jbu(layer, x, guide)
        return F.adaptive_avg_pool2d(x, (g, g))

    w = torch.randn(2, 6, g, g)
    results = []
    for fn in (naive, lambda: enr(image, feats, "direct"), lambda: enr(image, feats)):
        out = fn()
        results.append((out, torch.autograd.grad((out * w).sum(), list(enr.parameters()))))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("radius", [1, 3])
def test_banded_top_layer_equals_whole_map(radius, monkeypatch):
    """On the CPU the last JBU layer's kernel is made in bands of pool-block rows when its maps are large
    (Enricher.top_windows, BAND_BYTES). Against the whole map: training mode with Dropout2d on (every band must draw
    the whole map's channel masks, and leave the random state where the whole map does), fp64 values and the
    gradients of the image and of every parameter; bands of one block row and of two with a shorter last band, so
    the reflected halos at both ends of the map and every band edge are crossed."""
    torch.manual_seed(0)
    enr = hire.Enricher(small_enricher_config(jbu_radius=radius, jbu_dropout=0.3)).double().train()
    image = torch.randn(2, 3, 80, 80, dtype=torch.float64, requires_grad=True)  # top layer 80 x 80: 5 rows of 16
    feats, w = torch.randn(2, 6, 5, 5, dtype=torch.float64), torch.randn(2, 6, 5, 5, dtype=torch.float64)
    top, rows = enr.jbu[-1], []
    kernel = top.kernel
    def recorded(g, **kw):
        k = kernel(g, **kw)
        rows.append(k.shape[-2])
        return k
    monkeypatch.setattr(top, "kernel", recorded)
    row_bytes = 2 * (top.diameter ** 2 + 6) * (16 + 2 * radius) * 80 * 8  # a block row's fix-up input, fp64
    results = {}
    bands = (("whole", 1 << 62, [80]), ("1 row", 1, [16] * 5), ("2 rows", 2 * row_bytes, [32, 32, 16]))
    for name, budget, want in bands:
        monkeypatch.setattr(hire, "BAND_BYTES", budget)
        rows.clear()
        torch.manual_seed(1)
        out = enr(image, feats)
        after = torch.rand(3)  # the random state the forward left
        results[name] = (out, after) + torch.autograd.grad((out * w).sum(), [image] + list(enr.parameters()))
        assert rows == want
    for name in ("1 row", "2 rows"):
        for a, b in zip(results[name], results["whole"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cached_geometry_made_under_inference_mode_still_trains():
    """The windows' geometry is cached by size (pull_back_axis, place_windows). Made first under
    torch.inference_mode() (answering), it must not be an inference tensor that a later training step cannot save for
    backward. The caches are emptied first, so the geometry is made here."""
    hire.pull_back_axis.cache_clear(), hire.place_windows.cache_clear()
    torch.manual_seed(0)
    enr = hire.Enricher(small_enricher_config(jbu_layers=3))
    image, feats = torch.randn(1, 3, 48, 48), torch.randn(1, 6, 3, 3)
    with torch.inference_mode():
        answered = enr(image, feats)
    out = enr(image, feats)
    out.square().sum().backward()
    assert torch.equal(out.detach(), answered)
    assert all(p.grad is not None for p in enr.jbu.parameters())


def test_tiny_preset_sizes_agree_under_both_readings():
    """The tiny preset's 3 JBU layers take E(i) (8 x 8) to half the 128-px input (enricher_stride 2): the decoder's
    S/8 ... S/2 are 8 * 2^k, so the paper's reading and FeatUp's doubling give the same layers, and the same output."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(hire.HIREConfig.preset("tiny"), jbu_dropout=0.0)
    enr = hire.Enricher(cfg).eval()
    image, feats = torch.randn(1, 3, 128, 128), torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert [g.shape[-1] for g in enr.unet(image)] == [8, 16, 32, 64]
        assert [k.shape[-1] for k in enr.kernels(image, (8, 8))] == [16, 32, 64]
        out = enr(image, feats)
        enr.sizes = "doubling"
        assert [k.shape[-1] for k in enr.kernels(image, (8, 8))] == [16, 32, 64]
        torch.testing.assert_close(enr(image, feats), out, rtol=1e-5, atol=1e-6)


def test_table1_presets():
    """A preset for every row of HIRE Table 1: the variant, the pixels it takes, and its first-token cost (flops.py)
    next to the paper's TFLOPs."""
    import flops
    rows = {"llava-336": ("none", 336, 4.278), "s2-672": ("s2", 672, 5.013), "hire-672": ("hire", 672, 4.296),
            "s2-1008": ("s2", 1008, 6.664), "hire-1008": ("hire", 1008, 4.317)}
    for name, (enricher, size, paper) in rows.items():
        c = hire.resolve_config(hire.HIREConfig.preset(name))
        assert (c.enricher, c.image_size) == (enricher, size), name
        cost = {"none": lambda: flops.llava(), "s2": lambda: flops.s2(size),
                "hire": lambda: flops.hire(size, enricher=c)}[enricher]()
        assert abs(cost.fvcore / 1e12 - paper) < 2e-3 * paper, name
        if enricher == "s2":
            assert c.s2_scales == flops.s2_scales(size, 336)
    assert hire.HIREConfig.preset("s2-672").s2_scales == [336, 672]


def test_enricher_parameter_count_clip_l():
    cfg = hire.HIREConfig.preset("paper")
    n = sum(p.numel() for p in hire.Enricher(cfg).parameters())
    conv = lambda cin, cout, k: cin * cout * k * k + cout
    w, G, T, K = cfg.unet_widths, cfg.guide_dim, (2 * cfg.jbu_radius + 1) ** 2, cfg.jbu_key_dim
    unet = sum(conv(a, b, 3) for a, b in zip([3] + w, w)) + conv(w[-1], G, 1) + sum(conv(G + c, G, 3) for c in w[:-1])
    jbu = cfg.jbu_layers * (conv(G, K, 1) + conv(K, K, 1) + conv(G + T, T, 1) + conv(T, T, 1) + 2)
    assert n == unet + jbu == 230110
    assert 0.8 * 0.25e6 <= n <= 1.2 * 0.25e6  # the paper's "250k parameters"


def test_enricher_parameter_count_tiny():
    """The tiny preset's enricher, by hand: the paper's widths / 8 (UNet 2, 4, 8, 8, 8; guide and keys 4; 3x3 taps),
    the decoder and 3 JBU layers up to S/2."""
    cfg = hire.HIREConfig.preset("tiny")
    assert (cfg.unet_widths, cfg.guide_dim, cfg.jbu_key_dim, cfg.jbu_radius, cfg.jbu_layers,
            cfg.enricher_stride) == ([2, 4, 8, 8, 8], 4, 4, 1, 3, 2)
    n = sum(p.numel() for p in hire.Enricher(cfg).parameters())
    down = (3 * 2 * 9 + 2) + (2 * 4 * 9 + 4) + (4 * 8 * 9 + 8) + 2 * (8 * 8 * 9 + 8)  # 56 + 76 + 296 + 584 + 584
    bottleneck = 8 * 4 + 4
    up = (8 * 4 * 9 + 4) + 2 * (12 * 4 * 9 + 4)  # guide 4 + skips 4, 8, 8 (none at S: the skip of width 2)
    jbu = 3 * ((4 * 4 + 4) + (4 * 4 + 4) + (13 * 9 + 9) + (9 * 9 + 9) + 2)  # range G->K->K, fix-up G+9->9->9, 2 scalars
    assert (down, bottleneck, up, jbu) == (1596, 36, 1164, 774)
    assert n == down + bottleneck + up + jbu == 3570


def test_unet_stride_leaves_out_the_finest_decoder_stages():
    """A UNet with stride 2 or 4 is the full one without its finest decoder stages: with the full one's weights its
    guides are the full one's first ones, down to the bottleneck's map alone. Bad strides and too many JBU layers for
    the maps left are errors; a config without the field (an older checkpoint's) builds the full UNet."""
    torch.manual_seed(0)
    full = hire.UNet([2, 4, 8, 8, 8], 4)
    image = torch.randn(2, 3, 64, 64)
    guides = full(image)
    assert [g.shape[-1] for g in guides] == [4, 8, 16, 32, 64]
    for stride, n in ((2, 4), (4, 3)):
        part = hire.UNet([2, 4, 8, 8, 8], 4, stride)
        missing, unexpected = part.load_state_dict(full.state_dict(), strict=False)
        assert not missing and unexpected == [f"up.{i}.0.{p}" for i in range(n - 1, 4) for p in ("weight", "bias")]
        out = part(image)
        assert len(out) == n
        for a, b in zip(out, guides):
            assert torch.equal(a, b)
    coarsest = hire.UNet([2, 4, 8, 8, 8], 4, 16)  # the bottleneck's map alone
    coarsest.load_state_dict(full.state_dict(), strict=False)
    assert len(coarsest.up) == 0 and torch.equal(coarsest(image)[0], guides[0])
    assert len(hire.UNet([8], 4).up) == 0  # one stage: its bottleneck is the only map
    for stride in (0, 3, 32):
        with pytest.raises(ValueError, match=f"enricher_stride={stride}"):
            hire.UNet([2, 4, 8, 8, 8], 4, stride)
    with pytest.raises(ValueError, match="jbu_layers=5 needs as many UNet decoder maps \\(4"):
        hire.Enricher(small_enricher_config(jbu_layers=5, enricher_stride=2))
    old = dataclasses.asdict(hire.HIREConfig.preset("tiny"))
    del old["enricher_stride"]
    old["jbu_layers"] = 4
    assert len(hire.Enricher(hire.HIREConfig.from_dict(old)).unet.up) == 4


def test_narrow_unet_runs_channels_last_with_the_same_values_and_gradients():
    """A UNet with a stage under 8 channels runs channels-last (oneDNN's fast layout there), a wider one NCHW; both
    layouts give the same guides and gradients up to rounding, and the guides leave as plain NCHW maps."""
    assert hire.Enricher(hire.HIREConfig.preset("tiny")).unet.channels_last  # the preset the README times
    assert not hire.Enricher(hire.HIREConfig.preset("paper")).unet.channels_last
    torch.manual_seed(0)
    unet = hire.UNet([2, 4, 8, 8, 8], 4, 2)
    image = torch.randn(2, 3, 64, 64)
    weights = [torch.randn(2, 4, s, s) for s in (4, 8, 16, 32)]
    results, layouts = [], []
    for stage in (unet.down[1], unet.up[-1]):  # the first stage run as a module (stride 2: the next test), the last
        stage.register_forward_hook(
            lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    for channels_last in (True, False):
        unet.channels_last = channels_last
        guides = unet(image)
        assert len(guides) == 4 and all(g.is_contiguous() for g in guides)
        loss = sum((g * w).sum() for g, w in zip(guides, weights))
        results.append((guides, torch.autograd.grad(loss, list(unet.parameters()))))
    for a, b in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert layouts == [True, True, False, False]  # the stages really ran in each layout


def test_pooled_only_stage_runs_as_one_stride_2_conv():
    """conv_relu_pool2 is max_pool2(relu(conv(x))) for a 3x3 conv: the same values and gradients (input, weight, bias;
    fp64 to rounding, even and odd sizes), and the UNet runs it exactly for the stages no skip reads (stride 1: none;
    2: the first; 4: the first two, checked against the same UNet run the plain way)."""
    torch.manual_seed(0)
    for cin, cout, shape in ((3, 2, (2, 16, 12)), (4, 5, (1, 9, 7))):
        conv = nn.Conv2d(cin, cout, 3, padding=1).double()
        x = torch.randn(shape[0], cin, *shape[1:], dtype=torch.float64, requires_grad=True)
        w = torch.randn(shape[0], cout, shape[1] // 2, shape[2] // 2, dtype=torch.float64)
        outs = [f(x) for f in (lambda t: hire.conv_relu_pool2(conv, t), lambda t: hire.max_pool2(F.relu(conv(t))))]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        grads = [torch.autograd.grad((o * w).sum(), [x, conv.weight, conv.bias]) for o in outs]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert [hire.UNet([2, 4, 8, 8, 8], 4, s).pooled_only for s in (1, 2, 4)] == [0, 1, 2]
    unet, calls = hire.UNet([2, 4, 8, 8, 8], 4, 4), []
    for stage in unet.down:
        stage.register_forward_hook(lambda m, i, out: calls.append(out.shape[-1]))
    image = torch.randn(2, 3, 64, 64)
    guides = unet(image)
    assert calls == [16, 8, 4]  # the stages at 64 and 32 ran as stride-2 convs, not as modules
    unet.pooled_only = 0  # the plain way: every stage a module, its full-size map pooled after
    for a, b in zip(guides, unet(image), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert calls[3:] == [64, 32, 16, 8, 4]


def test_max_pool2_equals_max_pool2d_values_and_relu_gradients():
    """The UNet's pooling: max_pool2d's values at even and odd sizes, and its gradients through the ReLU before it,
    ties of zeros included (two thirds of the inputs are zeros)."""
    torch.manual_seed(0)
    for shape in ((2, 3, 8, 10), (1, 2, 7, 9)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=torch.float64)
        outs = [pool(F.relu(x - 0.4)) for pool in (hire.max_pool2, lambda t: F.max_pool2d(t, 2))]
        assert torch.equal(outs[0], outs[1])
        grads = [torch.autograd.grad((o * w).sum(), x)[0] for o in outs]
        assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


# ----------------------------------------------------------------------------- S2
def tiny_model(**kw):
    torch.manual_seed(0)
    return hire.HIRE(dataclasses.replace(hire.HIREConfig.preset("tiny"), **kw)).eval()


def test_split_merge_crops_are_exact_and_ordered():
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6).expand(2, 3, 6, 6)
    crops = hire.split_crops(x, 3)  # (18, 3, 2, 2)
    for i in range(3):
        for j in range(3):
            for b in range(2):
                assert torch.equal(crops[(i * 3 + j) * 2 + b], x[b, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2])
    assert torch.equal(hire.merge_crops(crops, 3), x)


def test_s2_single_scale_is_llava_and_two_scales_merge_exactly():
    s2 = tiny_model(enricher="s2", s2_scales=[64])
    llava = tiny_model(enricher="none")
    llava.load_state_dict(s2.state_dict())
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(s2.vision_features(px), llava.vision_features(px), rtol=0, atol=0)
        two = tiny_model(enricher="s2", s2_scales=[64, 128])
        px2 = torch.randn(1, 3, 128, 128)
        feats = two.vision_features(px2)  # (1, 64, 256): [scale 64 | scale 128]
        assert feats.shape == (1, 64, 256)
        # scale 128 by hand: each quadrant through the ViT alone, placed back, area-pooled 16 -> 8
        big = torch.zeros(1, 128, 16, 16)
        for i in range(2):
            for j in range(2):
                big[..., 8 * i:8 * i + 8, 8 * j:8 * j + 8] = two.vit_grid(px2[..., 64 * i:64 * i + 64, 64 * j:64 * j + 64])
        want = F.avg_pool2d(big, 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(feats[..., 128:], want, rtol=1e-5, atol=1e-5)
        low = F.interpolate(px2, size=(64, 64), mode="bicubic", align_corners=False)
        torch.testing.assert_close(feats[..., :128], two.vit_grid(low).flatten(2).transpose(1, 2))


# ----------------------------------------------------------------------------- splice, loss, errors
def test_image_splice_puts_visual_tokens_where_image_was():
    m = tiny_model(enricher="none")
    idx = torch.tensor([[1, 5, 6, IMAGE_ID, 7, 8, 9], [1, IMAGE_ID, 10, 11, 12, 13, 14]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, IGNORE, 7, 8, 9], [IGNORE, IGNORE, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    D = m.config.llm.d_model
    img = torch.randn(2, 64, D)
    emb, lab, msk = splice_image(idx, m.llm.embed, img, labels, mask)
    assert emb.shape == (2, 7 - 1 + 64, D)
    for b, p in enumerate([3, 1]):
        assert torch.equal(emb[b, p:p + 64], img[b])
        assert torch.equal(emb[b, :p], m.llm.embed(idx[b, :p]))
        assert torch.equal(emb[b, p + 64:], m.llm.embed(idx[b, p + 1:]))
        assert (lab[b, p:p + 64] == IGNORE).all() and (msk[b, p:p + 64] == 1).all()
        assert torch.equal(lab[b, p + 64:], labels[b, p + 1:]) and torch.equal(msk[b, p + 64:], mask[b, p + 1:])
    # forward = the LM on the spliced sequence; the loss counts exactly the supervised tokens
    px = torch.randn(2, 3, 64, 64)
    logits, loss_sum = m(px, idx, labels, mask, reduction="sum")
    emb, lab, msk = splice_image(idx, m.llm.embed, m.encode_images(px), labels, mask)
    torch.testing.assert_close(logits, m.llm(embeds=emb, mask=msk))
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=IGNORE, reduction="none")
    assert (lab[:, 1:] != IGNORE).sum() == 8
    torch.testing.assert_close(loss_sum, ce.sum())


def test_bad_inputs_give_clear_errors(tmp_path):
    m = tiny_model(enricher="hire")
    px = torch.randn(1, 3, 128, 128)
    with pytest.raises(ValueError, match="0 <image>"):
        m(px, torch.tensor([[1, 5, 6]]))
    with pytest.raises(ValueError, match="2 <image>"):
        m(px, torch.tensor([[1, IMAGE_ID, 6, IMAGE_ID]]))
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, 128, 128\)"):
        m(torch.randn(1, 3, 64, 64), torch.tensor([[1, IMAGE_ID]]))
    with pytest.raises(ValueError, match="not a multiple of the ViT"):
        hire.HIRE(dataclasses.replace(hire.HIREConfig.preset("tiny"), image_size=100))
    with pytest.raises(ValueError, match="s2_scales"):
        hire.HIRE(dataclasses.replace(hire.HIREConfig.preset("tiny"), enricher="s2", s2_scales=[64, 96]))
    D = m.config.llm.d_model
    m.projector[0] = torch.nn.Linear(128, D)  # an LLaVA-1.5 projector on the HIRE features
    with pytest.raises(ValueError, match="projector takes 128 features per token but enricher='hire' gives 256"):
        m(px, torch.tensor([[1, IMAGE_ID]]))
    # a checkpoint whose config says another enricher than its weights
    llava = tiny_model(enricher="none")
    llava.save(str(tmp_path / "ck"))
    cfg = (tmp_path / "ck" / "config.json").read_text().replace('"enricher": "none"', '"enricher": "s2"')
    (tmp_path / "ck" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=rf"projector\.0\.weight: file \({D}, 128\) vs model \({D}, 384\)"):
        hire.HIRE.load(str(tmp_path / "ck"))


def test_non_rgb_and_non_square_images_run_end_to_end():
    from PIL import Image
    m = tiny_model(enricher="hire")
    modes = ("L", "RGBA", "CMYK", "P")
    px = torch.stack([data.load_image(Image.new(mode, (90, 40)), m.config.image_size, m.config.pad_square)
                      for mode in modes])
    assert px.shape == (4, 3, 128, 128)
    with torch.no_grad():
        assert m(px, torch.tensor([[1, IMAGE_ID, 5]] * 4)).shape == (4, 2 + 64, 512)


# ----------------------------------------------------------------------------- stages and checkpoints
def grads_by_part(m, px, idx):
    m.zero_grad(set_to_none=True)
    m(px, idx, idx.masked_fill(idx == IMAGE_ID, IGNORE))[1].backward()
    return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
            for name, ps in m.parts().items() if ps}


def test_stages_train_projector_enricher_then_lora_never_vit(tmp_path):
    m = tiny_model(enricher="hire", jbu_layers=2)
    px, idx = torch.randn(1, 3, 128, 128), torch.tensor([[1, IMAGE_ID, 5, 6, 7]])
    groups = m.configure_stage("pretrain")
    assert [(g["name"], g["lr"]) for g in groups] == [("projector", 1e-3), ("enricher", 1e-3)]
    got = grads_by_part(m, px, idx)
    assert got == {"vit": False, "llm": False, "projector": True, "enricher": True, "enricher.unet": True,
                   "enricher.jbu": True}
    groups = m.configure_stage("finetune")
    assert [(g["name"], g["lr"]) for g in groups] == [("projector", 2e-5), ("enricher", 2e-5), ("lora", 2e-4)]
    lora = vitlib.lora_parameters(m.llm, "lora")
    assert len(lora) == 2 * 7 * 4 and lora[0].shape == (128, m.config.llm.d_model)  # A, B on q/k/v/o/gate/up/down of 4 blocks
    for p in lora:  # B starts at zero: make the adapter matter for the round trip below
        torch.nn.init.normal_(p, std=0.02)
    got = grads_by_part(m, px, idx)
    assert got == {"vit": False, "llm": False, "projector": True, "enricher": True, "lora": True,
                   "enricher.unet": True, "enricher.jbu": True}
    # save/load keeps everything, the adapter included
    m.save(str(tmp_path / "ck"))
    back = hire.HIRE.load(str(tmp_path / "ck")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(px, idx), m.eval()(px, idx), rtol=0, atol=0)


def test_generate_greedy_matches_step_by_step_argmax():
    m = tiny_model(enricher="none")  # the splice and the LM are shared by the three variants
    px, idx = torch.randn(1, 3, 64, 64), torch.tensor([[1, 7, IMAGE_ID, 9, 10]])
    out = m.generate(px, idx, max_new_tokens=4)
    seq = idx
    with torch.no_grad():
        for _ in range(4):
            nxt = m(px, seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq[:, -4:])


def test_tiny_hire_loss_falls_on_synthetic_data(tmp_path):
    tok_dir = data.build_tiny_tokenizer(str(tmp_path / "tok"))
    try:
        from llm import Tokenizer
    except ImportError:  # until tokenizer_part.py is merged into llm.py
        from tokenizer_part import Tokenizer
    tok = Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    m = hire.HIRE(hire.HIREConfig.preset("tiny"))
    ds = data.SyntheticDataset(tok, n=16, template="plain", image_size=m.config.image_size, task="caption")
    batch = ds.collate([ds[i] for i in range(2)])
    opt = torch.optim.AdamW([g | {"lr": 3e-3} for g in m.configure_stage("base")])
    m.train()
    losses = []
    for step in range(4):
        _, loss = m(batch["pixels"], batch["ids"], batch["labels"], batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.5  # ~ln(512) at random init
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
