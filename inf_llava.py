"""
INF-LLaVA (Ma et al., 2024): Dual-perspective Cropping (DCM) and Enhancement (DEM) for high-resolution MLLMs.
Hold the paper (Sec. 4, Eq. 2-27) in one hand and this file in the other.

    I (B,3,H_h,W_h) --DCM--> n local tiles + n strided "global" sub-images (+ the low-res view): one ViT call
        --recombine (Eq. 5-6)--> F_loc, F_glo (B,d,h_h,w_h), spatially aligned
        --DEM (Eq. 18-27): windowed cross-attention both ways, then fusion--> V_dual
        --pool to the ViT grid (Eq. 7)--> (+ the 336 view's features, Table 3) --projector--> LLM (Eq. 8)

The released code (WeihuangLin/INF-LLaVA) differs from the paper in places. The paper is the default; each
release choice sits behind a config switch, and `INFLLaVAConfig.preset("paper-release")` turns on all of them:

    | switch         | paper (default)                                  | release                                   |
    |----------------|--------------------------------------------------|-------------------------------------------|
    | windows        | V_glo: global queries in strided windows C_glo;  | swapped: global queries in contiguous     |
    |                | V_loc: local queries in contiguous windows C_loc | windows, local queries in strided ones    |
    | attention      | one head, W_q/W_k/W_v without bias, no W_o, no   | 8 heads, biases, W_o,                     |
    |                | residual (Eq. 20-21, 24-25)                      | LayerNorm(W_o(a) + q)                     |
    | share_attention| False: one W_q/W_k/W_v per direction (our        | True: one attention module serves both    |
    |                | reading; Eq. 20-21 and 24-25 reuse the symbols   | directions                                |
    |                | and never say whether they are shared)           |                                           |
    | fusion         | "linear_concat": [V_glo W_glo; V_loc W_loc],     | "release": per path Linear(d, d/16) -     |
    |                | W: d -> d/2 without bias (Eq. 26-27)             | GELU - Linear(d/16, d/2); then            |
    |                |                                                  | LayerNorm([loc; glo] + V_glo + V_loc)     |
    | downsample     | "avgpool" (Eq. 7)                                | "bilinear" to 24x24, written for n = 3    |
    |                |                                                  | only: there it picks the centre token of  |
    |                |                                                  | each 3x3 block (at n = 2 it would average |
    |                |                                                  | 2x2, at n = 4 take the mean of the        |
    |                |                                                  | central 2x2), so other grids are refused  |
    | dual_combine   | "sum" of the two feature maps (Sec. 5.5.1)       | "mean"                                    |

Input preparation (the paper does not say; the release's scripts do). Training images come at 1008: the
release scales CLIP's processor by 3 (shortest side to 1008, centre crop 1008). Its fine-tuning script pads
to a square with the CLIP mean colour first (`--image_aspect_ratio pad`), its pretraining script does not, so
STAGES["pretrain"] centre-crops and fine-tuning (and inference) pad: `pad_square=True`, data.load_image.
forward() refuses pixels the config cannot crop: sides multiples of the ViT tile, the longer one image_size,
so a 336-px image never runs DCM/DEM at n = 1. The release's inference is different: it preprocesses at 336
and its encode_images resizes every input bicubically to 1008, so its 1008 view carries only 336-level detail;
`resize_input=True` reproduces that. The low-res view is a bicubic resize of the input as given to 336 (of a
1008 training image; of a 336 inference image, the image itself), as in the release.

Released checkpoints (WeihuangLin/INF-LLaVA-sft, INF_star-LLaVA-sft): `INFLLaVA.from_release(dir)` and
`python inf_llava.py --release DIR`. The release's inference path takes the 336x336 view (padded to square, as
LLaVA) and upsamples it bicubically to 1008 inside encode_images; `resize_input=True` (set by from_release) does the
same, and its 336 view is then the input itself. Without it (the paper's reading, and our training) the image is loaded at
1008 directly, so the sub-images hold real detail above 336 px. The release hard-codes 3x3 sub-images, 1008 px, a
24x24 output grid and 1024 channels; here they follow the tower and image_size (equal for CLIP-L/336 at 1008).

Ablation switches (Tables 3-6): `image_size` with `dual` (single 336..1680 or dual [336+N]); `dem` "global" /
"local" (Table 4: V_glo or V_loc alone, no fusion projection: our reading) or "none"; `fusion` "conv3x3" /
"mul" / "weighted_add" / "maxpool" / "add" / "linear_concat" (Table 5); `dcm` "local" / "global" (Table 6's
"w/ DCM local/global": DEM with one perspective's crops only, which our reading feeds to DEM as both its
inputs; with dem="none" the plain features), and dcm="both" + dem="none" is the "w/ DCM" row (F_loc + F_glo).
"""
import argparse
import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

import llm as llmlib
import vit as vitlib
from llm import LLM, LLMConfig, next_token_loss, splice_image
from vit import ViT, ViTConfig

CHOICES = {
    "dcm": ("both", "local", "global"),
    "dem": ("both", "global", "local", "none"),
    "windows": ("paper", "release"),
    "attention": ("paper", "release"),
    "fusion": ("linear_concat", "release", "conv3x3", "mul", "weighted_add", "maxpool", "add"),
    "downsample": ("avgpool", "bilinear"),
    "dual_combine": ("sum", "mean"),
}
RELEASE = dict(windows="release", attention="release", share_attention=True, fusion="release",
               downsample="bilinear", dual_combine="mean")


@dataclass
class INFLLaVAConfig:
    vit: ViTConfig = field(default_factory=lambda: ViTConfig.preset("clip-vit-l-14-336"))
    llm: LLMConfig = field(default_factory=lambda: LLMConfig.preset("llama3-8b"))
    image_size: int = 1008        # high-res side; n = image_size // vit.image_size tiles per side (Eq. 9-10)
    resize_input: bool = False    # True: bicubic-resize any input to image_size first (the release's inference)
    pad_square: bool = True       # fine-tuning and inference pad to a square; STAGES["pretrain"] centre-crops
    template: str = "llama3"      # LLaMA-3-Instruct chat template (header ids, <|eot_id|>)
    vit_path: str | None = None
    llm_path: str | None = None
    vision_layer: int = -2        # penultimate CLIP layer, class token dropped (LLaVA-1.5)
    dual: bool = True             # add the plain low-res view's features (Table 3, [336+1008])
    dcm: str = "both"             # sub-images to encode: both perspectives, or one (Table 6)
    dem: str = "both"             # enhancement directions (Table 4); "none": no DEM (Table 6)
    windows: str = "paper"
    attention: str = "paper"
    share_attention: bool = False  # one attention module for both DEM directions (the release), or one each
    fusion: str = "linear_concat"
    downsample: str = "avgpool"
    dual_combine: str = "sum"

    @property
    def input_size(self) -> int:
        """The side of the pixels to load: the release's inference (resize_input) loads at the ViT's size."""
        return self.vit.image_size if self.resize_input else self.image_size

    @staticmethod
    def preset(name: str) -> "INFLLaVAConfig":
        """"paper": CLIP-L/336 + LLaMA-3-8B at [336+1008]; "tiny": the shared tiny ViT/LM at [64+192];
        "-release" variants switch on every choice of the released code."""
        base, _, release = name.partition("-")
        if base == "paper":
            cfg = INFLLaVAConfig()
        elif base == "tiny":
            # llama3 template as the paper; the tiny LM learnt it with the others (train.tiny_base)
            cfg = INFLLaVAConfig(vit=ViTConfig.preset("tiny"), llm=LLMConfig.preset("tiny"), image_size=192)
        else:
            cfg = None
        if cfg is None or release not in ("", "release"):
            raise ValueError(f"unknown INF-LLaVA preset {name!r}; choose from paper, paper-release, tiny, "
                             f"tiny-release")
        return dataclasses.replace(cfg, **RELEASE) if release else cfg

    def check(self):
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"INFLLaVAConfig.{key}={getattr(self, key)!r} is not one of {allowed}")
        S = self.vit.image_size
        if self.image_size < S or self.image_size % S:
            raise ValueError(f"INFLLaVAConfig.image_size={self.image_size} must be a multiple of the ViT size {S}")
        if self.downsample == "bilinear" and self.image_size != 3 * S:
            raise ValueError(f"downsample='bilinear' is the release's resize of a 3x3 grid (image_size = 3 x "
                             f"{S} = {3 * S}), not defined at image_size={self.image_size}: use 'avgpool' (Eq. 7)")
        if self.vit.width % 16:
            raise ValueError(f"vit.width={self.vit.width} must be a multiple of 16 (d/2 and d/16 fusion widths)")

    @staticmethod
    def from_dict(d: dict) -> "INFLLaVAConfig":
        d = dict(d)
        arch = d.pop("architecture", None)  # the model class (checkpoints written before it was recorded: None)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(INFLLaVAConfig)})
        if arch not in (None, "INFLLaVA") or unknown:
            raise ValueError(f"not an INFLLaVA checkpoint: its config.json is a {arch or 'another model'}'s"
                             + (f", with fields INFLLaVA does not have: {unknown}" if unknown else ""))
        return INFLLaVAConfig(**{**d, "vit": ViTConfig(**d["vit"]), "llm": LLMConfig(**d["llm"])})


# ----------------------------------------------------------------------------- DCM (Sec. 4.2) and Eq. 5-6
# One set of four functions serves pixels (C=3) and ViT features (C=d): x is (B, C, H, W), sub-images are
# (B, n_h*n_w, C, H/n_h, W/n_w), numbered row-major: index = i * n_w + j for row i, column j.

def _sub_size(x, n_h, n_w):
    B, C, H, W = x.shape
    if H % n_h or W % n_w:
        raise ValueError(f"a {H}x{W} map does not split into {n_h}x{n_w} equal sub-images")
    return B, C, H // n_h, W // n_w


def crop_local(x, n_h, n_w):
    """INF-LLaVA Eq. 11-13: contiguous tiles, I_i = I[row*H_l:(row+1)*H_l, col*W_l:(col+1)*W_l]."""
    B, C, h, w = _sub_size(x, n_h, n_w)
    x = x.view(B, C, n_h, h, n_w, w)  # y = row*h + y', x = col*w + x'
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, n_h * n_w, C, h, w)


def merge_local(t, n_h, n_w):
    """INF-LLaVA Eq. 5: tile the local sub-images (or sub-features) back in place; inverse of crop_local."""
    B, N, C, h, w = t.shape
    return t.view(B, n_h, n_w, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, n_h * h, n_w * w)


def crop_global(x, n_h, n_w):
    """INF-LLaVA Eq. 14-17: the same n_W x n_H count as the local crops (Eq. 14-15); sub-image (i, j) takes
    I_ij(u, v) = I(x = j + u*n_W, y = i + v*n_H), i.e. I[i::n_H, j::n_W]: a strided view of the whole image."""
    B, C, h, w = _sub_size(x, n_h, n_w)
    x = x.view(B, C, h, n_h, w, n_w)  # y = v*n_h + i, x = u*n_w + j
    return x.permute(0, 3, 5, 1, 2, 4).reshape(B, n_h * n_w, C, h, w)


def merge_global(t, n_h, n_w):
    """INF-LLaVA Eq. 6 / Fig. 3: feature (u, v) of global sub-feature (i, j) goes to (j + u*n_W, i + v*n_H)."""
    B, N, C, h, w = t.shape
    return t.view(B, n_h, n_w, C, h, w).permute(0, 3, 4, 1, 5, 2).reshape(B, C, h * n_h, w * n_w)


WINDOWS = {"local": (crop_local, merge_local), "global": (crop_global, merge_global)}


# ----------------------------------------------------------------------------- DEM (Sec. 4.3)
class CrossAttention(nn.Module):
    """Paper (Eq. 20-21, 24-25): A = softmax((X W_q)(Y W_k)^T / sqrt(d)), V = A (Y W_v), one head, no bias.
    Release: 8 heads with biases, an output map W_o and a post-norm residual LayerNorm(W_o(attn) + x)."""

    def __init__(self, dim: int, release: bool):
        super().__init__()
        self.heads = 8 if release else 1
        self.q_proj = nn.Linear(dim, dim, bias=release)
        self.k_proj = nn.Linear(dim, dim, bias=release)
        self.v_proj = nn.Linear(dim, dim, bias=release)
        self.out_proj = nn.Linear(dim, dim) if release else None
        self.norm = nn.LayerNorm(dim) if release else None

    def forward(self, x, y, mask=None):
        """x (B, T, d) queries, y (B, S, d) keys/values; mask (T, S) bool, True = may attend."""
        B, T, d = x.shape
        nh = self.heads
        q = self.q_proj(x).view(B, T, nh, d // nh).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(y).view(B, -1, nh, d // nh).transpose(1, 2)  # (B, nh, S, hs)
        v = self.v_proj(y).view(B, -1, nh, d // nh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)  # scale 1/sqrt(hs)
        out = out.transpose(1, 2).reshape(B, T, d)
        if self.out_proj is None:
            return out
        return self.norm(self.out_proj(out) + x)


def windowed_cross_attention(attn, queries, context, window, n_h, n_w):
    """Crop both maps (B, d, H, W) into the same n_h x n_w windows, attend within each window only (the DEM's
    memory saving: N attention maps of (hw)^2 instead of one of (N hw)^2), and put the windows back."""
    crop, merge = WINDOWS[window]
    q, c = crop(queries, n_h, n_w), crop(context, n_h, n_w)  # (B, N, d, h, w)
    B, N, d, h, w = q.shape
    out = attn(q.flatten(3).transpose(2, 3).flatten(0, 1), c.flatten(3).transpose(2, 3).flatten(0, 1))  # (BN, hw, d)
    return merge(out.view(B, N, h, w, d).permute(0, 1, 4, 2, 3), n_h, n_w)


class Fusion(nn.Module):
    """Dual-perspective fusion (Sec. 4.3.4) of V_glo and V_loc, (B, d, H, W) each, into (B, d, H, W)."""

    def __init__(self, kind: str, d: int):
        super().__init__()
        self.kind = kind
        if kind == "linear_concat":  # Eq. 26: W_glo, W_loc in R^{d x d/2}
            self.w_glo = nn.Linear(d, d // 2, bias=False)
            self.w_loc = nn.Linear(d, d // 2, bias=False)
        elif kind == "release":
            self.ffn_glo = nn.Sequential(nn.Linear(d, d // 16), nn.GELU(), nn.Linear(d // 16, d // 2))
            self.ffn_loc = nn.Sequential(nn.Linear(d, d // 16), nn.GELU(), nn.Linear(d // 16, d // 2))
            self.norm = nn.LayerNorm(d)
        elif kind == "conv3x3":  # Table 5: a 3x3 convolution over the concatenated maps (its bias: our choice)
            self.conv = nn.Conv2d(2 * d, d, 3, padding=1)
        elif kind == "weighted_add":  # Table 5: learned weights a*V_glo + b*V_loc, starting at 0.5 each (ours)
            self.weights = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, v_glo, v_loc):
        k = self.kind
        if k == "linear_concat":  # Eq. 27: V_dual = [V_glo W_glo; V_loc W_loc]
            g, l = v_glo.permute(0, 2, 3, 1), v_loc.permute(0, 2, 3, 1)  # (B, H, W, d)
            return torch.cat([self.w_glo(g), self.w_loc(l)], dim=-1).permute(0, 3, 1, 2)
        if k == "release":  # the release concatenates the local path first
            g, l = v_glo.permute(0, 2, 3, 1), v_loc.permute(0, 2, 3, 1)
            return self.norm(torch.cat([self.ffn_loc(l), self.ffn_glo(g)], dim=-1) + g + l).permute(0, 3, 1, 2)
        if k == "conv3x3":
            return self.conv(torch.cat([v_glo, v_loc], dim=1))
        if k == "weighted_add":
            return self.weights[0] * v_glo + self.weights[1] * v_loc
        if k == "mul":
            return v_glo * v_loc
        if k == "maxpool":  # element-wise max over the two perspectives
            return torch.maximum(v_glo, v_loc)
        return v_glo + v_loc  # "add"


class DEM(nn.Module):
    """Dual-perspective Enhancement Module (Sec. 4.3): F_loc, F_glo (B, d, h_h, w_h) -> (B, d, h_h, w_h)."""

    def __init__(self, config: INFLLaVAConfig):
        super().__init__()
        c, d = config, config.vit.width
        # Table 4's "DEM w/ global / w/ local": one direction, returned as it is (no fusion W): our reading
        self.directions = ("global", "local") if c.dem == "both" else (c.dem,)
        # paper: V_glo attends in global windows C_glo (Eq. 18-19), V_loc in local windows C_loc (Eq. 22-23)
        swap = c.windows == "release"
        self.window = {"global": "local" if swap else "global", "local": "global" if swap else "local"}
        n_attn = 1 if c.share_attention else len(self.directions)
        self.attn = nn.ModuleList(CrossAttention(d, release=c.attention == "release") for _ in range(n_attn))
        self.fusion = Fusion(c.fusion, d) if c.dem == "both" else None

    def enhance_global(self, f_loc, f_glo, n_h, n_w):
        """Eq. 18-21: global sub-features query their local counterparts -> V_glo."""
        return windowed_cross_attention(self.attn[0], f_glo, f_loc, self.window["global"], n_h, n_w)

    def enhance_local(self, f_loc, f_glo, n_h, n_w):
        """Eq. 22-25: local sub-features query their global counterparts -> V_loc."""
        return windowed_cross_attention(self.attn[-1], f_loc, f_glo, self.window["local"], n_h, n_w)

    def forward(self, f_loc, f_glo, n_h, n_w):
        if self.directions == ("global",):
            return self.enhance_global(f_loc, f_glo, n_h, n_w)
        if self.directions == ("local",):
            return self.enhance_local(f_loc, f_glo, n_h, n_w)
        return self.fusion(self.enhance_global(f_loc, f_glo, n_h, n_w), self.enhance_local(f_loc, f_glo, n_h, n_w))


# ----------------------------------------------------------------------------- the model
@contextmanager
def default_dtype(dtype):
    """Build modules straight in `dtype` (no fp32 detour for an 8B model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype or old)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class INFLLaVA(nn.Module):
    # Sec. 5.2. Stage 1 aligns: ViT and LLM frozen. Stage 2 (SFT) also trains the whole LLM; the ViT never.
    # Rates, cosine schedule and global batches 256 / 128 are Sec. 5.2's, as is stage 1's one epoch. The rest is
    # the release's scripts (WeihuangLin/INF-LLaVA INF-LLava_pretrain.sh, INF-LLava_finetune.sh): warmup_ratio
    # 0.03, the HF Trainer's cosine to 0, weight decay 0 (train.py's default), stage 2's one epoch, the templates,
    # and the image preparation: pretraining without --image_aspect_ratio pad (CLIP's processor: centre crop),
    # fine-tuning with it (config.pad_square). No gradient clipping: like LLaVA-1.5's
    # scripts they run DeepSpeed with LLaVA's scripts/zero2.json / zero3.json, which have no "gradient_clipping"
    # key, so the Trainer's max_grad_norm never applies and DeepSpeed's default, 0 (off), does.
    RELEASE_SCHEDULE = {"warmup_ratio": 0.03, "min_lr_ratio": 0.0, "grad_clip": 0.0}
    STAGES = {
        "pretrain": {"template": "plain", "train": {"dem": 1e-3, "projector": 1e-3}, **RELEASE_SCHEDULE,
                     "pad_square": False, "center_crop": True},
        "finetune": {"train": {"dem": 2e-5, "projector": 2e-5, "llm": 2e-5},  # template: config.template
                     **RELEASE_SCHEDULE},
    }

    def __init__(self, config: INFLLaVAConfig, vit: ViT | None = None, llm: LLM | None = None):
        super().__init__()
        config.check()
        self.config = config
        self.vit = vit if vit is not None else ViT(config.vit)
        self.llm = llm if llm is not None else LLM(config.llm)
        self.dem = DEM(config) if config.dem != "none" else None
        d, D = config.vit.width, config.llm.d_model
        self.projector = nn.Sequential(nn.Linear(d, D), nn.GELU(), nn.Linear(D, D))  # LLaVA-1.5 mlp2x_gelu

    def grid(self, pixels):
        """n_h, n_w of Eq. 9-10, refusing inputs this config cannot crop: sides multiples of the ViT tile, the
        longer one config.image_size (a smaller image would run DCM/DEM on a grid it was not built for)."""
        c, S = self.config, self.config.vit.image_size
        H, W = pixels.shape[-2:]
        if H % S or W % S or max(H, W) != c.image_size:
            raise ValueError(f"pixels of {H}x{W}: this INF-LLaVA crops {c.image_size}x{c.image_size} images into "
                             f"tiles of the ViT's {S} (sides multiples of {S}, the longer one {c.image_size}; never "
                             f"padded or cropped here). Resize the image to {c.image_size} first (data.load_image), "
                             f"or set resize_input=True to resize inside the model as the release's inference does")
        if c.downsample == "bilinear" and (H, W) != (3 * S, 3 * S):
            raise ValueError(f"pixels of {H}x{W}: downsample='bilinear' is defined on the release's 3x3 grid only "
                             f"({3 * S}x{3 * S})")
        return H // S, W // S

    def image_features(self, pixels):
        """(B, 3, H, W) -> (B, h_l*w_l, d) dual-enhanced, pooled visual features (Eq. 2-7, Table 3)."""
        c, S = self.config, self.config.vit.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W) RGB, got {tuple(pixels.shape)}; grayscale or RGBA "
                             f"images must be converted to RGB first (data.load_image does)")
        high = pixels
        if c.resize_input and pixels.shape[-2:] != (c.image_size, c.image_size):  # the release's encode_images
            high = F.interpolate(pixels.float(), size=(c.image_size, c.image_size), mode="bicubic",
                                 align_corners=False).to(pixels.dtype)
        n_h, n_w = self.grid(high)
        B, N = pixels.shape[0], n_h * n_w
        views = []  # DCM (Eq. 2): every sub-image is S x S, so all of them go through the ViT in one call
        if c.dcm in ("both", "local"):
            views.append(crop_local(high, n_h, n_w))
        if c.dcm in ("both", "global"):
            views.append(crop_global(high, n_h, n_w))
        if c.dual:  # the low-res view of the input as given (release: an S-px input is its own low view)
            low = F.interpolate(pixels.float(), size=(S, S), mode="bicubic", align_corners=False)
            views.append(low.to(pixels.dtype).unsqueeze(1))
        views = torch.cat(views, dim=1)  # (B, K, 3, S, S)
        K = views.shape[1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.vit.parameters())):
            feats = self.vit(views.flatten(0, 1), layer=c.vision_layer)[:, 1:]  # Eq. 3-4: (B*K, h*w, d), no CLS
        g = self.vit.grid
        feats = feats.view(B, K, g, g, -1).permute(0, 1, 4, 2, 3)  # (B, K, d, h_l, w_l)
        if c.dcm == "both":
            f_loc, f_glo = merge_local(feats[:, :N], n_h, n_w), merge_global(feats[:, N:2 * N], n_h, n_w)  # Eq. 5-6
            x = self.dem(f_loc, f_glo, n_h, n_w) if self.dem is not None else f_loc + f_glo  # Table 6 "w/ DCM"
        else:  # Table 6 "w/ DCM local / global": one perspective, which DEM (if any) attends with itself
            f = merge_local(feats[:, :N], n_h, n_w) if c.dcm == "local" else merge_global(feats[:, :N], n_h, n_w)
            x = self.dem(f, f, n_h, n_w) if self.dem is not None else f
        if c.downsample == "avgpool":  # Eq. 7: back to the ViT's token grid
            x = F.avg_pool2d(x, (n_h, n_w))
        else:
            x = F.interpolate(x.float(), size=(g, g), mode="bilinear", align_corners=False).to(x.dtype)
        if c.dual:  # Table 3: [336 + N], element-wise
            x = x + feats[:, -1] if c.dual_combine == "sum" else (x + feats[:, -1]) / 2
        return x.flatten(2).transpose(1, 2)  # (B, h_l*w_l, d)

    def encode_images(self, pixels):
        """Eq. 8's F_C(F_dual): (B, h_l*w_l, D) visual tokens in the LLM's embedding space."""
        return self.projector(self.image_features(pixels))

    def forward(self, pixels, idx, labels=None, mask=None, reduction="mean"):
        """Eq. 8. Logits (B, T-1+M, V); with labels also the next-token loss (image positions skipped)."""
        embeds, labels, mask = splice_image(idx, self.llm.embed, self.encode_images(pixels), labels, mask)
        logits = self.llm(embeds=embeds, mask=mask)
        if labels is None:
            return logits
        return logits, next_token_loss(logits, labels, reduction)

    @torch.no_grad()
    def generate(self, pixels, idx, max_new_tokens=32, mask=None, temperature=0.0, eos_id=None):
        """(B, new) token ids; greedy at temperature 0; left padding via mask."""
        embeds, _, mask = splice_image(idx, self.llm.embed, self.encode_images(pixels), mask=mask)
        return self.llm.generate(embeds=embeds, mask=mask, max_new_tokens=max_new_tokens,
                                 temperature=temperature, eos_id=eos_id)

    def configure_stage(self, stage: str) -> list[dict]:
        """Freeze everything, unfreeze what STAGES[stage] trains, return its optimizer groups."""
        if stage not in self.STAGES:
            raise ValueError(f"unknown stage {stage!r}; INF-LLaVA has {list(self.STAGES)}")
        self.requires_grad_(False)
        groups = []
        for name, lr in self.STAGES[stage]["train"].items():
            module = getattr(self, name)
            if module is None:  # dem="none" ablation
                continue
            module.requires_grad_(True)
            groups.append({"name": name, "params": list(module.parameters()), "lr": lr})
        return groups

    @classmethod
    def from_pretrained(cls, config: INFLLaVAConfig, dtype=None) -> "INFLLaVA":
        """Load the ViT and the LLM from config.vit_path / llm_path (their HF configs win); DEM and projector
        start from scratch."""
        vit = ViT.from_pretrained(config.vit_path, dtype=dtype) if config.vit_path else None
        llm = LLM.from_pretrained(config.llm_path, dtype=dtype) if config.llm_path else None
        config = dataclasses.replace(config, vit=vit.config if vit else config.vit,
                                     llm=llm.config if llm else config.llm)
        with default_dtype(dtype):
            return cls(config, vit=vit, llm=llm)

    @classmethod
    def from_release(cls, path, vit=None, dtype=None) -> "INFLLaVA":
        """A released INF-LLaVA (WeihuangLin/INF-LLaVA-sft, INF_star-LLaVA-sft): LLaVA's config fields (checked,
        unimplemented ones refused by name) and layout plus the DEM (model.spatial_embed.*), read through
        INF_LLAVA_KEYS with every shape checked; safetensors or pytorch_model-*.bin (torch.load(weights_only=True)).
        The release's choices: preset "paper-release", image_size 3x the tower's, resize_input=True, conv_llama3.
        vit: the CLIP directory of mm_vision_tower, needed when the release holds no tower weights."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json (expected an INF-LLaVA release directory)")
        with open(os.path.join(path, "config.json")) as f:
            llm_cfg, name, layer = llmlib.llava_config(json.load(f), path)
        tensors = llmlib.read_release(path)
        inside = any(k.startswith("model.vision_tower.vision_tower.") for k in tensors)
        vit_cfg, tower = vitlib.release_tower(name, vit, inside, path, dtype)
        config = dataclasses.replace(INFLLaVAConfig.preset("paper-release"), vit=vit_cfg, llm=llm_cfg,
                                     image_size=3 * vit_cfg.image_size, vision_layer=layer, resize_input=True,
                                     pad_square=True, template="llama3")
        with torch.device("meta"):
            model = cls(config, vit=tower)
        exclude = ("vit.",) if tower is not None else ()   # the tower was loaded from its own directory
        llmlib.load_release(model, tensors, INF_LLAVA_KEYS, path, dtype, exclude)
        return model.to(dtype or torch.float32).eval()

    def save(self, dir: str):
        """config.json + model.safetensors, each written to a temporary name and renamed."""
        os.makedirs(dir, exist_ok=True)
        path = os.path.join(dir, "config.json")
        with open(path + ".tmp", "w") as f:  # the class first: --init checks it (train.py)
            json.dump({"architecture": "INFLLaVA", **dataclasses.asdict(self.config)}, f, indent=2)
        os.replace(path + ".tmp", path)
        path = os.path.join(dir, "model.safetensors")
        save_model(self, path + ".tmp")
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, dir: str, dtype=None) -> "INFLLaVA":
        path = os.path.join(dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no INF-LLaVA checkpoint in {dir}: {path} is missing")
        with open(path) as f:
            config = INFLLaVAConfig.from_dict(json.load(f))
        with default_dtype(dtype):
            model = cls(config)
        missing, unexpected = load_model(model, os.path.join(dir, "model.safetensors"), strict=False)
        if missing or unexpected:
            raise KeyError(f"{dir}/model.safetensors does not match the config: missing {missing}, "
                           f"unexpected {unexpected}")
        return model


# release key prefix -> our prefix (or a function of the rest); the longest matching prefix wins (llm.load_release)
INF_LLAVA_KEYS = [   # LlavaLlamaForCausalLM of INF_llava/model (LLaVA's layout) with class SpatialEmbed as the DEM
    ("model.", "llm."), ("lm_head.", "llm.lm_head."),
    ("model.mm_projector.0.", "projector.0."), ("model.mm_projector.2.", "projector.2."),
    ("model.vision_tower.vision_tower.vision_model.", vitlib.tower_key),
    # SpatialEmbed.attention (MultiHeadedAttention, one for both directions): linears = W_q, W_k, W_v, W_o
    ("model.spatial_embed.attention.linears.0.", "dem.attn.0.q_proj."),
    ("model.spatial_embed.attention.linears.1.", "dem.attn.0.k_proj."),
    ("model.spatial_embed.attention.linears.2.", "dem.attn.0.v_proj."),
    ("model.spatial_embed.attention.linears.3.", "dem.attn.0.out_proj."),
    ("model.spatial_embed.attention.ln.", "dem.attn.0.norm."),
    # fusion: "crop" is the local perspective, "stride" the global one
    ("model.spatial_embed.ffn_crop.", "dem.fusion.ffn_loc."),
    ("model.spatial_embed.ffn_stride.", "dem.fusion.ffn_glo."),
    ("model.spatial_embed.ln_fuse.", "dem.fusion.norm.")]


# ----------------------------------------------------------------------------- demo
if __name__ == "__main__":
    import tempfile

    import data
    from llm import Tokenizer

    parser = argparse.ArgumentParser(description="INF-LLaVA: answer one prompt about one image")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--ckpt", default="", help="a saved INF-LLaVA directory (else a random tiny model)")
    parser.add_argument("--release", default="", help="a released INF-LLaVA directory (INFLLaVA.from_release)")
    parser.add_argument("--vit", default=None, help="with --release: the CLIP directory its config names, if needed")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.release:
        model, tok_dir = INFLLaVA.from_release(args.release, args.vit, getattr(torch, args.dtype)), args.release
    elif args.ckpt:
        model, tok_dir = INFLLaVA.load(args.ckpt), args.ckpt
    else:
        model, tok_dir = INFLLaVA(INFLLaVAConfig.preset("tiny")), tempfile.mkdtemp()
        data.build_tiny_tokenizer(tok_dir)
        print("no --ckpt: a randomly initialised tiny INF-LLaVA (the answer is noise)")
    tok = Tokenizer.from_pretrained(tok_dir)
    cfg = model.config
    pixels = data.load_image(args.image, cfg.input_size, cfg.pad_square).unsqueeze(0)
    n = cfg.image_size // cfg.vit.image_size
    print(f"image -> {cfg.input_size}x{cfg.input_size}{f' -> {cfg.image_size}' if cfg.resize_input else ''}: {n}x{n} "
          f"local + {n}x{n} global crops{' + the low-res view' if cfg.dual else ''}")
    # a last human turn without answer: the ids end with the assistant header, ready to generate
    ids, _ = data.tokenize_conversation(tok, [{"from": "human", "value": data.IMAGE_TOKEN + "\n" + args.prompt}],
                                        cfg.template)
    out = model.eval().generate(pixels, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                                eos_id=data.end_of_turn(tok, cfg.template))
    print(data.answer_text(tok, out[0].tolist()))
