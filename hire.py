"""
HIRE (Aradhya et al., "Lightweight High-Resolution Image Feature Enrichment for Multimodal LLMs") and the two
models it measures itself against, in one class: LLaVA-1.5 (enricher="none"), LLaVA-1.5-S2 (enricher="s2") and
LLaVA-1.5-HIRE (enricher="hire").

    python hire.py --image cat.jpg --prompt "What is in the image?" [--ckpt out/hire/ckpt]
    python hire.py --release llava-1.5-7b-hf --image cat.jpg --prompt "..."   # released LLaVA-1.5 (from_release)

HIRE has no public code. Where the paper is silent we follow LLaVA-1.5 (projector, splice, recipe), FeatUp's
JBULearnedRange (the enriching layer) and S2's s2wrapper (the baseline), and say so in a comment.
"""
import dataclasses
import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

import data
import llm as llmlib
import vit as vitlib
from llm import LLM, LLMConfig, next_token_loss, splice_image
from vit import ViT, ViTConfig


@dataclass
class HIREConfig:
    vit: ViTConfig = field(default_factory=lambda: ViTConfig.preset("clip-vit-l-14-336"))
    llm: LLMConfig = field(default_factory=lambda: LLMConfig.preset("vicuna-7b"))
    # Side of the square pixels forward() takes. For "hire" the high-res I of Eq. (1) (a multiple of the ViT
    # size); resolve_config sets it to the ViT size for "none" and to max(s2_scales) for "s2" (LLaVA-S2 feeds
    # its largest scale), so a preset switches variants with the one field `enricher`.
    image_size: int = 672
    pad_square: bool = True  # LLaVA-1.5 pads to square with the CLIP mean colour (data.load_image)
    template: str = "vicuna_v1"  # instruction-stage chat template (data.tokenize_conversation)
    vit_path: str | None = None
    llm_path: str | None = None
    enricher: str = "hire"  # "hire" | "s2" | "none"
    vit_layer: int = -2  # LLaVA-1.5: penultimate ViT layer, class token dropped
    s2_scales: list[int] = field(default_factory=lambda: [336, 672, 1008])
    # the enricher (Sec. 2.2). The paper gives no widths, only "5 stages", "5 JBU layers" and "only 250k parameters";
    # ours: 0.230 M for any ViT width (HIRE.describe prints it; tests/test_hire.py counts it)
    unet_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 64, 64])  # encoder at 1 .. 1/16
    guide_dim: int = 32  # UNet decoder width = guidance channels of every JBU layer
    jbu_layers: int = 5
    jbu_radius: int = 3  # FeatUp: 7x7 kernels
    jbu_key_dim: int = 32  # FeatUp
    jbu_dropout: float = 0.1  # FeatUp's Dropout2d in the range and fix-up projections
    jbu_chunk: int = 64  # path="direct": channels pushed through the JBU stack at a time (memory, not maths)
    # JBU output sizes: "decoder" = the UNet decoder's S/16 ... S (x_en at the image size, Eq. 1; the paper's
    # reading), "doubling" = FeatUp's 2x per layer from E(i) (24 -> 768 at any S). See Enricher.
    jbu_sizes: str = "decoder"
    # the UNet decoder stops at S / enricher_stride, and with jbu_sizes="decoder" so does x_en: 1 = the image size, as
    # Eq. (1) says (every paper preset). A power of two. ("doubling" keeps its sizes, guided by the maps left.) The
    # tiny preset's 2: see there
    enricher_stride: int = 1

    @staticmethod
    def preset(name: str) -> "HIREConfig":
        qwen7b = dataclasses.replace(  # Qwen2-7B: the paper's "LLaVA1.5-7B-Qwen" LM; its HF config wins on load
            LLMConfig.preset("qwen2-0.5b"), vocab_size=152064, d_model=3584, n_layer=28, n_head=28, n_kv_head=4,
            d_ff=18944, tie_embeddings=False)
        presets = {
            "paper": lambda: HIREConfig(),  # CLIP-L/336 + Vicuna-7B-v1.5, I at 672 (Table 3)
            "paper-1008": lambda: HIREConfig(image_size=1008),  # Table 1's 1008 row
            # Table 1, row by row (first-token FLOPs: flops.py)
            "llava-336": lambda: HIREConfig(enricher="none"),
            "s2-672": lambda: HIREConfig(enricher="s2", s2_scales=[336, 672]),
            "s2-1008": lambda: HIREConfig(enricher="s2", s2_scales=[336, 672, 1008]),
            "hire-672": lambda: HIREConfig(image_size=672),
            "hire-1008": lambda: HIREConfig(image_size=1008),
            "qwen": lambda: HIREConfig(llm=qwen7b),
            # the tiny sizes every model shares: ViT 64 px, HIRE 128, S2 [64, 128, 192]. The enricher is scaled to the
            # tiny image as the paper's is to 672 px: 3x3 kernels (FeatUp's 7 of 768 px is 0.9% of the side, so is 1
            # px of 128), widths the paper's / 8, as the tiny ViT's 128 is CLIP-L's 1024 / 8 (UNet 2 ... 8, guide and
            # keys 4), and near the paper's share of the ViT's cost: its enricher is 9.5% of CLIP-L/336's
            # multiply-adds (17.4 of 183 G, flops.py). A stack up to 128 px (4 JBU layers, x_en at the image size as
            # Eq. (1) says) was 34% of the tiny ViT's (14.9 of 43.2 M) and answered in 1.8x LLaVA-1.5's time, against
            # the paper's +0.1% (Sec. 3, TextVQA inference). So the tiny stack stops at S/2 = 64: 3 JBU layers,
            # 8 -> 16 -> 32 -> 64, guided by the decoder's S/8 ... S/2; the UNet still reads the 128-px image in its
            # first stage. 5.9 M per image, 14% of the ViT's (flops.py), 3570 parameters; answering takes 1.21-1.25x
            # LLaVA-1.5's time, a training step 0.58-0.60x S2's (bench/bench_hire.py --part=tiny, 1 thread; the
            # README's notes on HIRE). The two readings of the stack's sizes agree here: the decoder's 16 ... 64 are
            # 8 * 2^k
            "tiny": lambda: HIREConfig(vit=ViTConfig.preset("tiny"), llm=LLMConfig.preset("tiny"), image_size=128,
                                       s2_scales=[64, 128, 192], unet_widths=[2, 4, 8, 8, 8], guide_dim=4,
                                       jbu_layers=3, jbu_radius=1, jbu_key_dim=4, enricher_stride=2),
        }
        if name not in presets:
            raise ValueError(f"unknown HIRE preset {name!r}; choose from {sorted(presets)}")
        return presets[name]()

    @staticmethod
    def from_dict(d: dict) -> "HIREConfig":
        return llmlib.model_config_from_dict(HIREConfig, "HIRE", d, vit=ViTConfig, llm=LLMConfig)


# ----------------------------------------------------------------------------- the HIRE enricher
def max_pool2(x):
    """F.max_pool2d(x, 2) as the maximum of the four strided quarters: the same values, 9x faster on this CPU (8 x 2 x
    128^2: 0.14 vs 1.26 ms). Ties split the gradient where max_pool2d gives it all to one input. The UNet pools ReLU
    outputs: tied zeros get no gradient through ReLU either way, and tied positive values (flat image regions) come
    from equal inputs, so the parameters' gradients agree; the gradient on the image itself may be spread."""
    x = x[..., :x.shape[-2] // 2 * 2, :x.shape[-1] // 2 * 2]
    return torch.maximum(torch.maximum(x[..., ::2, ::2], x[..., 1::2, ::2]),
                         torch.maximum(x[..., ::2, 1::2], x[..., 1::2, 1::2]))


def conv_relu_pool2(conv, x):
    """max_pool2(relu(conv(x))) for a 3x3 conv with padding 1, as one stride-2 conv: the 3x3 kernel placed at each
    of the pool's four offsets in a 4x4 one, so a pooled pixel's four conv outputs are four channel groups of one
    output pixel, and the pool is a maximum over the groups. The same products and sums, plus 7 of every 16 taps
    multiplying exact zeros (torch's FLOP counter counts them: the tiny HIRE forward counts 0.54% over flops.py's
    count of the maths). 4x the output channels, which oneDNN fills far better when a stage is narrow (tiny preset,
    3 -> 2 channels at 8 x 128^2: 0.88 ms, against 1.77 with the channels-last copy of the image the plain stage
    needs; the tiny enricher's forward 10.8 -> 10.0 ms, with backward 40.3 -> 37.3, same values). A forward hook on
    the stage's modules does not fire: they are not called."""
    w = torch.stack([F.pad(conv.weight, (j, 1 - j, i, 1 - i)) for i in (0, 1) for j in (0, 1)])  # (4, out, in, 4, 4)
    y = F.conv2d(x, w.flatten(0, 1), conv.bias.repeat(4), stride=2, padding=1).unflatten(1, (4, -1))
    return torch.maximum(torch.maximum(y[:, 0], y[:, 1]), torch.maximum(y[:, 2], y[:, 3])).relu_()


class UNet(nn.Module):
    """U of Eq. (2): an encoder of 5 stages at 1, 1/2, 1/4, 1/8, 1/16 of I and a decoder of the same depth with
    skip connections back to full resolution. Its decoder maps, coarse to fine, guide the JBU layers.
    The paper says only "a standard UNet" with these 5 scales and ~250k parameters for the enricher. Our choices:
    one 3x3 conv + ReLU per stage (a "standard" UNet has two; one keeps the enricher at 0.230 M), no normalisation
    layers, max-pooling down and bilinear upsampling up (no transposed convs), and a 1x1 bottleneck conv without
    activation that maps the coarsest encoder stage to the guide width and is itself the coarsest guide.
    stride > 1 (HIREConfig.enricher_stride): the decoder stops at S/stride, its finer stages left out; the encoder
    stages finer than S/stride then feed only the pool below them, and each runs as conv_relu_pool2."""

    def __init__(self, widths: list[int], guide_dim: int, stride: int = 1):
        super().__init__()
        if stride < 1 or stride & (stride - 1) or stride > 1 << (len(widths) - 1):
            raise ValueError(f"enricher_stride={stride}: expected a power of two, at most {1 << (len(widths) - 1)} "
                             f"(the UNet's coarsest stage is S/{1 << (len(widths) - 1)})")
        chans = [3] + list(widths)
        self.channels_last = min(widths) < 8  # see forward
        # in-place ReLUs: a fresh map fewer per stage (on this machine a fresh page costs up to 3 us on first touch)
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(inplace=True))
                                  for a, b in zip(chans, widths))
        self.bottleneck = nn.Conv2d(widths[-1], guide_dim, 1)  # ours: 1x1, no activation; the coarsest guide
        skips = list(reversed(widths[:-1]))[:len(widths) - stride.bit_length()]  # S/8 ... S/stride
        self.up = nn.ModuleList(nn.Sequential(nn.Conv2d(guide_dim + w, guide_dim, 3, padding=1), nn.ReLU(inplace=True))
                                for w in skips)
        self.pooled_only = len(widths) - 1 - len(skips)  # stages finer than S/stride: no skip reads them, only the pool

    def forward(self, image):
        # A narrow UNet runs channels-last (one copy of its first module stage's input): oneDNN then skips the
        # reorders of each NCHW map to and from its channel blocks of 8 or 16, most of the work at 2-8 channels (tiny
        # preset, batch 8, before conv_relu_pool2: forward 6.4 -> 5.0 ms, with backward 25.6 -> 21.1). From 16
        # channels up (the paper's widths) NCHW is faster (at 672: channels-last 1.11x slower, with backward 1.08x).
        # Same maths, other rounding. The guides leave as NCHW maps.
        cl = self.channels_last and image.device.type == "cpu"  # measured with oneDNN; on a GPU cuDNN chooses
        x = image
        for stage in self.down[:self.pooled_only]:  # no skip reads their full-size maps: make the pooled maps at once
            x = conv_relu_pool2(stage[0], x)
        x, skips = x.contiguous(memory_format=torch.channels_last) if cl else x, []
        for i, stage in enumerate(self.down[self.pooled_only:]):
            x = stage(max_pool2(x) if i else x)  # (the first takes the image, or the map pooled above)
            skips.append(x)
        d = self.bottleneck(x)  # (B, G, S/16, S/16)
        guides = [d]
        for stage, skip in zip(self.up, reversed(skips[:-1])):
            d = F.interpolate(d, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # ours: bilinear
            d = stage(torch.cat([d, skip], dim=1))
            guides.append(d)
        return [g.contiguous() for g in guides]  # 5 maps, S/16 ... S (fewer with stride: S/16 ... S/stride)


class AdaptiveConv(torch.autograd.Function):
    """out[b,c,h,w] = sum_{i,j} kernel[b, i*d+j, h, w] * xp[b, c, h+i, w+j]  (FeatUp's AdaptiveConv), xp padded by r.
    The readable reference: tap by tap over the whole map, forward and backward; the unfolded (B, C, d*d, H, W)
    tensor is never built, and the hand-written backward accumulates into one gradient buffer instead of
    autograd's zero-filled copy per tap. At paper sizes each tap streams the whole map through memory (49 passes):
    the model runs FusedAdaptiveConv, these same loops tile by tile; a test holds the two equal."""

    @staticmethod
    def forward(ctx, xp, kernel, radius):
        d, (H, W) = 2 * radius + 1, kernel.shape[-2:]
        out = kernel[:, :1] * xp[:, :, :H, :W]
        for t in range(1, d * d):
            i, j = divmod(t, d)
            out.addcmul_(kernel[:, t:t + 1], xp[:, :, i:i + H, j:j + W])
        ctx.save_for_backward(xp, kernel)
        ctx.radius = radius
        return out

    @staticmethod
    def backward(ctx, grad):
        # Exact. FeatUp's CUDA backward for the kernel weights (adaptive_conv_kernel.cu) indexes the tap as
        # blockIdx.z * blockIdx.z + threadIdx.z and launches one thread in z, so only taps {0, 1, 4, 9, 16, 25, 36}
        # of 49 get a gradient (the rest stay zero); emulated on the CPU this moves the JBU parameter gradients by
        # 42-104%. A model trained with FeatUp's CUDA op trained with that gradient, not this one.
        xp, kernel = ctx.saved_tensors
        d, (H, W) = 2 * ctx.radius + 1, kernel.shape[-2:]
        grad_x = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        grad_k = torch.empty_like(kernel) if ctx.needs_input_grad[1] else None
        for t in range(d * d):
            i, j = divmod(t, d)
            if grad_x is not None:
                grad_x[:, :, i:i + H, j:j + W].addcmul_(grad, kernel[:, t:t + 1])
            if grad_k is not None:
                torch.sum(grad * xp[:, :, i:i + H, j:j + W], 1, out=grad_k[:, t])
        return grad_x, grad_k, None


class NeighbourSimilarity(torch.autograd.Function):
    """sim[b, i*d+j, h, w] = <qp[b, :, h+r, w+r], qp[b, :, h+i, w+j]>: each pixel's key against its d x d neighbours'
    in the padded key map qp, tap by tap, with the same one-buffer backward as AdaptiveConv (4x autograd's).
    The readable reference of FusedNeighbourSimilarity."""

    @staticmethod
    def forward(ctx, qp, radius):
        r, d = radius, 2 * radius + 1
        H, W = qp.shape[-2] - 2 * r, qp.shape[-1] - 2 * r
        centre = qp[:, :, r:r + H, r:r + W]
        sim = qp.new_empty(qp.shape[0], d * d, H, W)
        for t in range(d * d):
            i, j = divmod(t, d)
            torch.sum(qp[:, :, i:i + H, j:j + W] * centre, 1, out=sim[:, t])
        ctx.save_for_backward(qp)
        ctx.radius = radius
        return sim

    @staticmethod
    def backward(ctx, grad):
        qp, = ctx.saved_tensors
        r, d, (H, W) = ctx.radius, 2 * ctx.radius + 1, grad.shape[-2:]
        grad_qp = torch.zeros_like(qp)
        centre, grad_centre = qp[:, :, r:r + H, r:r + W], grad_qp[:, :, r:r + H, r:r + W]
        for t in range(d * d):
            i, j = divmod(t, d)
            grad_qp[:, :, i:i + H, j:j + W].addcmul_(grad[:, t:t + 1], centre)
            grad_centre.addcmul_(grad[:, t:t + 1], qp[:, :, i:i + H, j:j + W])
        return grad_qp, None


# The fused ops: the reference loops above, run on tiles (a band of rows x a chunk of channels) small enough that
# a tile's input (with its r-row halo) stays in cache while all d*d taps read it. Each neighbourhood then comes from
# memory once instead of d*d times (49 for FeatUp's 7x7). Same arithmetic, same order per output value; only the
# backward's accumulation into the overlapping halos changes order. On a GPU one tile is the whole map (the
# elementwise kernels stream it anyway). A torch.compile of the tap loop fuses it too (on this CPU, one 64 x 336 x 336
# map, 7x7: compiled 0.072 s, tiled 0.078 s, the reference loop 0.131 s) but costs ~22 s of compiling per shape on
# the first call and needs a C++ compiler, which torch's CPU wheel does not bring.
TILE_BYTES = 1 << 20  # a tile's padded input: about one core's L2 cache


def tiles(x, rows_out, radius, split_channels=True):
    """(channel slices, (first row, end row) bands) of x (B, C, rows_out + 2r, Wp) whose tiles' padded slabs hold
    about TILE_BYTES."""
    B, C, _, Wp = x.shape
    if x.device.type != "cpu":
        return [slice(0, C)], [(0, rows_out)]
    budget = max(1, TILE_BYTES // (x.element_size() * B * Wp))  # channel-rows per slab
    c = min(C, max(1, budget // (8 + 2 * radius))) if split_channels else C  # leave room for >= 8 rows
    rows = max(1, budget // c - 2 * radius)
    return ([slice(a, a + c) for a in range(0, C, c)],
            [(h, min(h + rows, rows_out)) for h in range(0, rows_out, rows)])


class FusedAdaptiveConv(torch.autograd.Function):
    """AdaptiveConv tile by tile (see tiles): what the JBU layers run."""

    @staticmethod
    def forward(ctx, xp, kernel, radius):
        r, d, (H, W) = radius, 2 * radius + 1, kernel.shape[-2:]
        out = xp.new_empty(*xp.shape[:2], H, W)
        chans, bands = tiles(xp, H, r)
        for h0, h1 in bands:
            n, k = h1 - h0, kernel[:, :, h0:h1]
            for cs in chans:
                x, o = xp[:, cs, h0:h1 + 2 * r], out[:, cs, h0:h1]
                torch.mul(k[:, :1], x[:, :, :n, :W], out=o)
                for t in range(1, d * d):
                    i, j = divmod(t, d)
                    o.addcmul_(k[:, t:t + 1], x[:, :, i:i + n, j:j + W])
        ctx.save_for_backward(xp, kernel)
        ctx.radius = radius
        return out

    @staticmethod
    def backward(ctx, grad):
        xp, kernel = ctx.saved_tensors  # exact gradient: see the note in AdaptiveConv.backward on FeatUp's CUDA op
        r, d, (H, W) = ctx.radius, 2 * ctx.radius + 1, kernel.shape[-2:]
        grad_x = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(kernel) if ctx.needs_input_grad[1] else None
        chans, bands = tiles(xp, H, r)
        for h0, h1 in bands:
            n, k = h1 - h0, kernel[:, :, h0:h1]
            for cs in chans:
                g, x = grad[:, cs, h0:h1], xp[:, cs, h0:h1 + 2 * r]
                for t in range(d * d):
                    i, j = divmod(t, d)
                    if grad_x is not None:
                        grad_x[:, cs, h0 + i:h0 + i + n, j:j + W].addcmul_(g, k[:, t:t + 1])
                    if grad_k is not None:
                        grad_k[:, t, h0:h1] += (g * x[:, :, i:i + n, j:j + W]).sum(1)
        return grad_x, grad_k, None


class FusedNeighbourSimilarity(torch.autograd.Function):
    """NeighbourSimilarity band by band (all key channels at once: there are few)."""

    @staticmethod
    def forward(ctx, qp, radius):
        r, d = radius, 2 * radius + 1
        H, W = qp.shape[-2] - 2 * r, qp.shape[-1] - 2 * r
        sim = qp.new_empty(qp.shape[0], d * d, H, W)
        for h0, h1 in tiles(qp, H, r, split_channels=False)[1]:
            n, q = h1 - h0, qp[:, :, h0:h1 + 2 * r]
            centre = q[:, :, r:r + n, r:r + W]
            for t in range(d * d):
                i, j = divmod(t, d)
                torch.sum(q[:, :, i:i + n, j:j + W] * centre, 1, out=sim[:, t, h0:h1])
        ctx.save_for_backward(qp)
        ctx.radius = radius
        return sim

    @staticmethod
    def backward(ctx, grad):
        qp, = ctx.saved_tensors
        r, d, (H, W) = ctx.radius, 2 * ctx.radius + 1, grad.shape[-2:]
        grad_qp = torch.zeros_like(qp)
        for h0, h1 in tiles(qp, H, r, split_channels=False)[1]:
            n, q, gq, g = h1 - h0, qp[:, :, h0:h1 + 2 * r], grad_qp[:, :, h0:h1 + 2 * r], grad[:, :, h0:h1]
            centre, grad_centre = q[:, :, r:r + n, r:r + W], gq[:, :, r:r + n, r:r + W]
            for t in range(d * d):
                i, j = divmod(t, d)
                gq[:, :, i:i + n, j:j + W].addcmul_(g[:, t:t + 1], centre)
                grad_centre.addcmul_(g[:, t:t + 1], q[:, :, i:i + n, j:j + W])
        return grad_qp, None


def apply_kernel(x, kernel, radius):
    """x (B, C, H, W), kernel (B, d*d, H, W) -> (B, C, H, W): each pixel a weighted sum of its reflect-padded
    d x d neighbourhood, weights shared by all channels."""
    return FusedAdaptiveConv.apply(F.pad(x, [radius] * 4, mode="reflect"), kernel, radius)


# The pooled enricher as one matrix. Once the kernels are fixed, J and the pool of Eq. (4) are linear in E(i) and
# act on every channel alike: pool(J(E))[c] = M E[c], with M (h*w x h*w). Row P of M (what output block P reads)
# is the pool's weights on block P pulled back through the layers: through each adaptive convolution (transposed:
# every tap scatters back), its reflect padding and its bicubic upsampling (both separable: one matrix per axis).
# Each block's weights live in a small window of each level (CLIP-L at 672: 28, 20, 17, 15, 14 and 18 pixels wide
# from 672 down to E(i)), so M costs 0.16 G multiply-adds where pushing the 1024 channels through J costs 30 G.
def upsample_matrix(n_in, n_out, radius):
    """(n_out + 2r, n_in): bicubic upsampling n_in -> n_out along one axis (align_corners=False), then reflect
    padding by r, as a matrix (fp64, CPU). Both are separable, so pad(up(X)) = R X R^T for a map X."""
    eye = torch.eye(n_in, dtype=torch.float64).view(1, n_in, n_in, 1)  # the basis vectors as channels
    up = F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=False)
    return F.pad(up, (0, 0, radius, radius), mode="reflect").view(n_in, n_out + 2 * radius).T


@functools.lru_cache(maxsize=128)
@torch.inference_mode(False)  # cached: made while answering, it must still be savable for a training backward
def pull_back_axis(n_in, n_out, radius, starts, length):
    """One axis of one JBU layer, backwards. Block c's weights cover the padded upsampled map on [starts[c],
    + length) (padded coordinates). Returns (A (cells, length, L) fp64, the blocks' input windows' starts, L):
    block c's weights on the layer's input are A[c]^T Z A[c'] on [start, + L). Depends on sizes only (cached)."""
    R = upsample_matrix(n_in, n_out, radius)  # (n_out + 2r, n_in)
    lo, hi = max(0, -min(starts)), max(0, max(starts) + length - R.shape[0])
    R = F.pad(R, (0, 0, lo, hi))  # zero rows: window parts outside the padded map read nothing
    rows = torch.stack([R[s + lo:s + lo + length] for s in starts])  # (cells, length, n_in)
    used, pos = rows.ne(0).any(1), torch.arange(n_in)
    first = torch.where(used, pos, n_in).min(1).values
    last = torch.where(used, pos, -1).max(1).values
    cells = len(starts)
    if n_in % cells == 0:  # evenly spaced windows (some reaching past the border): windows() takes strided views
        step = n_in // cells
        first = step * torch.arange(cells) - int((step * torch.arange(cells) - first).max())
    L = int((last + 1 - first).max())
    lo = max(0, -int(first.min()))
    rows = F.pad(rows, (lo, L))  # zero columns before the start and past the end
    A = torch.stack([rows[c, :, f + lo:f + lo + L] for c, f in enumerate(first.tolist())])
    return A, tuple(first.tolist()), L


def even_step(starts):
    """The common step of evenly spaced starts (1 for a single one), else 0."""
    steps = {b - a for a, b in zip(starts, starts[1:])} or {1}
    return steps.pop() if len(steps) == 1 and min(steps) > 0 else 0


def windows(t, starts_y, starts_x, Ly, Lx):
    """t (B, T, H, W) -> (B, T, h, w, Ly, Lx): the window of every block (starts per axis), zero outside."""
    H, W = t.shape[-2:]
    p = max(0, -min(starts_y + starts_x), max(starts_y) + Ly - H, max(starts_x) + Lx - W)
    t = F.pad(t, [p] * 4) if p else t  # (no copy when every window fits)
    sy, sx = even_step(starts_y), even_step(starts_x)
    if sy and sx:  # evenly spaced windows: strided views, no copy
        t = t[..., starts_y[0] + p:, starts_x[0] + p:]
        return t.unfold(2, Ly, sy).unfold(3, Lx, sx)[:, :, :len(starts_y), :len(starts_x)]
    iy = torch.tensor(starts_y, device=t.device)[:, None] + p + torch.arange(Ly, device=t.device)  # (h, Ly)
    ix = torch.tensor(starts_x, device=t.device)[:, None] + p + torch.arange(Lx, device=t.device)
    # two index_selects, not one advanced index: their backward is an index_add, not a sorting index_put
    win = t.index_select(2, iy.flatten()).index_select(3, ix.flatten())
    return win.view(*t.shape[:2], len(starts_y), Ly, len(starts_x), Lx).transpose(3, 4)


@functools.lru_cache(maxsize=128)
@torch.inference_mode(False)  # cached: made while answering, it must still be savable for a training backward
def place_windows(h, w, starts_y, starts_x, Ly, Lx, device):
    """Where the windows' weights (h, w, Ly, Lx) go in M (h*w, h*w): (source, destination) flat indices of the
    window cells that fall on E(i)'s h x w grid. Cells outside it carry no weight (the zero columns of
    pull_back_axis's windows); they are dropped. Depends on sizes only (cached)."""
    y = (torch.tensor(starts_y)[:, None] + torch.arange(Ly)).view(h, 1, Ly, 1).expand(h, w, Ly, Lx)
    x = (torch.tensor(starts_x)[:, None] + torch.arange(Lx)).view(1, w, 1, Lx).expand(h, w, Ly, Lx)
    block = torch.arange(h * w).view(h, w, 1, 1)
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    src = torch.arange(h * w * Ly * Lx).view(h, w, Ly, Lx)[inside]
    dst = (block * (h * w) + y * w + x)[inside]
    return src.to(device), dst.to(device)


def conv_transpose_windows(w, k, radius):
    """The adaptive convolution transposed, per block window: w (B, h, w, Ly, Lx) weights on the output, k (B, d*d,
    h, w, Ly, Lx) the kernel at those pixels -> (B, h, w, Ly+2r, Lx+2r) weights on the padded input window. Each
    tap scatters back to where it read (F.fold of the taps sums the same, 4.5x slower on this CPU)."""
    d, (B, h, ww, Ly, Lx) = 2 * radius + 1, w.shape
    z = w.new_zeros(B, h, ww, Ly + 2 * radius, Lx + 2 * radius)
    for t, k_t in enumerate(k.unbind(1)):  # unbind: its backward is one stack, where k[:, t]'s fills all of k per tap
        i, j = divmod(t, d)
        z[..., i:i + Ly, j:j + Lx].addcmul_(w, k_t)
    return z


class JBU(nn.Module):
    """One enriching layer of J (Eq. 3): FeatUp's JBULearnedRange. It doubles the feature resolution: features are
    bicubic-upsampled to the guidance size, then each output pixel is a d x d weighted mean of its neighbours with
    kernel = normalise(range(guidance) * spatial) + 0.1 * fixup(kernel, guidance)."""

    def __init__(self, guide_dim: int, key_dim: int = 32, radius: int = 3, dropout: float = 0.1):
        super().__init__()
        self.radius, self.diameter = radius, 2 * radius + 1
        taps = self.diameter ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0))  # log temperature of the range softmax
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
        self.range_proj = nn.Sequential(nn.Conv2d(guide_dim, key_dim, 1), nn.GELU(), nn.Dropout2d(dropout),
                                        nn.Conv2d(key_dim, key_dim, 1))
        self.fixup_proj = nn.Sequential(nn.Conv2d(guide_dim + taps, taps, 1), nn.GELU(), nn.Dropout2d(dropout),
                                        nn.Conv2d(taps, taps, 1))

    def spatial_logits(self):
        """(d*d,) log of a Gaussian over offsets on a [-1, 1] grid, learned sigma. In fp32 at least, in fp64 for an fp64
        model (a 0-dim sigma would not promote an fp32 grid)."""
        s = self.sigma_spatial
        r = torch.linspace(-1, 1, self.diameter, device=s.device, dtype=torch.promote_types(s.dtype, torch.float32))
        dist2 = (r[:, None] ** 2 + r[None, :] ** 2).flatten()  # tap t = i*d + j
        return -dist2 / (2 * s ** 2)

    def kernel(self, guide, fixup=True, halo=False):
        """(B, d*d, H, W) kernel for every output pixel of guidance `guide` (B, G, H, W). halo: `guide` is a band of
        rows of a larger map with r rows more above and below (reflected where the map ends), and the kernel is for
        the rows between them: (B, d*d, H - 2r, W)."""
        r = self.radius
        q = self.range_proj(guide)  # (B, K, H, W)
        # similarity of each pixel's key to its d*d neighbours', tap by tap (no (B, K, d*d, H, W) tensor)
        sim = FusedNeighbourSimilarity.apply(F.pad(q, [r, r, 0, 0] if halo else [r] * 4, mode="reflect"), r)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        # the joint bilateral kernel, summing to one. FeatUp: softmax(temp * sim) times the spatial Gaussian g,
        # divided by its sum clamped at 1e-7; that is softmax(temp * sim + log g), one pass over the taps, not four
        # (the same unless the clamp acts: a sum below 1e-7 needs sigma_spatial far below its initial 1)
        k = F.softmax(torch.addcmul(self.spatial_logits().view(1, -1, 1, 1).to(sim.dtype), temp, sim), dim=1)
        if fixup:
            guide = guide[:, :, r:guide.shape[-2] - r] if halo else guide
            k = torch.add(k, self.fixup_proj(torch.cat([k, guide], dim=1)), alpha=0.1)  # k + 0.1 fixup
        return k

    def forward(self, x, guide):
        """x (B, C, h, w) -> (B, C, H, W) at the guidance size."""
        up = F.interpolate(x, size=guide.shape[-2:], mode="bicubic", align_corners=False)
        return apply_kernel(up, self.kernel(guide), self.radius)


# On the CPU the last layer's kernel is made in bands of block rows (Enricher.top_windows) whose widest map holds
# about BAND_BYTES. glibc's malloc serves blocks under its mmap threshold (which adapts up to 32 MiB) from memory the
# process keeps; larger ones, unless its free heap holds them, are mapped afresh and fault in page by page (up to ~3 us
# a page here).
BAND_BYTES = 16 << 20


class Enricher(nn.Module):
    """E_enr of Eq. (1)-(4): pool(J(U(I), E(i))), returned at E(i)'s grid for the concat of Eq. (4).

    J starts at E(i) (h x w); layer k is guided by the k-th of the finest `jbu_layers` UNet decoder maps.
    jbu_sizes="decoder" (the paper's reading, default): each layer outputs at its guide's size, S/16 ... S, so x_en
    is at the image size, as Eq. (1) says and Sec. 2.2's decoder "back to 672x672" implies (CLIP-L at 672:
    24 -> 42 -> 84 -> 168 -> 336 -> 672); Table 1's enricher cost agrees (flops.py). With enricher_stride the
    decoder, and this stack, end at S/stride (the tiny preset's 64 of 128). jbu_sizes="doubling" (FeatUp's
    JBUStack): each layer doubles, 24 -> 768 at every input size, with its guide resized to that size by adaptive
    average pooling as FeatUp's JBUStack does. FeatUp ends its stack with a residual 1x1 conv over the C channels;
    we leave it out: after pooling it is a CxC linear map that the projector's first Linear already spans, and at
    C = 1024 it alone would be 1 M, four times the paper's whole enricher."""

    def __init__(self, cfg: HIREConfig):
        super().__init__()
        self.unet = UNet(cfg.unet_widths, cfg.guide_dim, cfg.enricher_stride)
        maps = len(self.unet.up) + 1  # S/16 ... S/stride
        if not 1 <= cfg.jbu_layers <= maps:
            raise ValueError(f"jbu_layers={cfg.jbu_layers} needs as many UNet decoder maps ({maps}: unet_widths has "
                             f"{len(cfg.unet_widths)} stages, enricher_stride={cfg.enricher_stride})")
        if cfg.jbu_sizes not in ("decoder", "doubling"):
            raise ValueError(f"jbu_sizes={cfg.jbu_sizes!r}: expected 'decoder' or 'doubling'")
        self.chunk, self.sizes = cfg.jbu_chunk, cfg.jbu_sizes
        self.jbu = nn.ModuleList(JBU(cfg.guide_dim, cfg.jbu_key_dim, cfg.jbu_radius, cfg.jbu_dropout)
                                 for _ in range(cfg.jbu_layers))

    def guides(self, image, grid):
        """The guidance of each JBU layer, at that layer's output size."""
        maps = self.unet(image)[-len(self.jbu):]
        if self.sizes == "decoder":
            return maps
        h, w = grid
        return [F.adaptive_avg_pool2d(g, (h << k, w << k)) for k, g in enumerate(maps, start=1)]

    def kernels(self, image, grid):
        return [layer.kernel(g) for layer, g in zip(self.jbu, self.guides(image, grid))]

    def propagate(self, x, kernels):
        """pool(J(x)) with the kernels fixed, the plain way: every layer at full size, then the average pool.
        Channels go through `chunk` at a time (checkpointed under autograd): peak memory is a chunk's maps."""
        r, grid = self.jbu[0].radius, x.shape[-2:]

        def stack(xc, *ks):
            for k in ks:
                xc = F.interpolate(xc, size=k.shape[-2:], mode="bicubic", align_corners=False)
                xc = apply_kernel(xc, k, r)
            return F.adaptive_avg_pool2d(xc, grid)

        outs = []
        for xc in x.split(self.chunk, dim=1):
            if torch.is_grad_enabled() and x.shape[1] > self.chunk:
                outs.append(checkpoint(stack, xc, *kernels, use_reentrant=False))
            else:
                outs.append(stack(xc, *kernels))
        return torch.cat(outs, dim=1)

    def response(self, guides, grid):
        """M (B, h*w, h*w), M[b, P, n] = what pooled output block P takes from E(i) at n: the pool's weights pulled
        back through the JBU layers, block by block, each in its own window (see pull_back_axis). The layers' kernels
        are made here from their guides, the last layer's within top_windows."""
        (h, w), r, top = grid, self.jbu[0].radius, guides[-1].shape[-2:]
        if top[0] % h or top[1] % w:
            raise ValueError(f"the last JBU layer's output {tuple(top)} does not split into the {h}x{w} pool blocks")
        sy, sx = top[0] // h, top[1] // w
        ys, xs, Ly, Lx = tuple(range(0, top[0], sy)), tuple(range(0, top[1], sx)), sy, sx
        kernels = [layer.kernel(g) for layer, g in zip(self.jbu[:-1], guides[:-1])]  # first to last, as kernels()
        z = self.top_windows(guides[-1], grid)  # the pool's weights through the last adaptive convolution
        for i in reversed(range(len(guides))):  # z: the weights on layer i's padded upsampled map
            size_in = guides[i - 1].shape[-2:] if i else grid
            Ay, ys, Ly = pull_back_axis(size_in[0], guides[i].shape[-2], r, ys, Ly + 2 * r)
            Ax, xs, Lx = pull_back_axis(size_in[1], guides[i].shape[-1], r, xs, Lx + 2 * r)
            wt = torch.einsum("yai,nyxab->nyxib", Ay.to(z), z)  # through the bicubic upsampling and padding
            wt = torch.einsum("nyxib,xbj->nyxij", wt, Ax.to(z))  # (B, h, w, Ly, Lx) on layer i's input
            if i:  # through layer i-1's adaptive convolution, onto its padded upsampled map
                z = conv_transpose_windows(wt, windows(kernels[i - 1], ys, xs, Ly, Lx), r)
        src, dst = place_windows(h, w, ys, xs, Ly, Lx, wt.device)  # each block's window on E(i)'s grid
        M = wt.new_zeros(wt.shape[0], h * w * h * w)
        M[:, dst] = wt.flatten(1).index_select(1, src)  # (index_select: its backward is an index_add)
        return M.view(-1, h * w, h * w)

    def top_windows(self, guide, grid):
        """The average pool's weights through the last layer's adaptive convolution, onto each pool block's padded
        window: conv_transpose_windows(pool, windows(kernel)). Those windows are whole rows of pool blocks, so on the
        CPU a large map goes in bands of block rows (BAND_BYTES), each band's kernel made from its guide rows plus a
        reflected r-row halo: the same values up to rounding, without the layer's full-size keys, similarities and
        kernels (at 672: 32-81 channels, 55-139 MiB each). One gathered copy of the guide with the halos remains
        (61 MiB at 672; the backward then adds all bands into one gradient), and the halo rows' keys are made twice
        (one image at 672: bands of 56 rows, 0.6% more multiply-adds than flops.py counts)."""
        layer, r, (h, w) = self.jbu[-1], self.jbu[-1].radius, grid
        B, G, H, W = guide.shape
        sy, sx = H // h, W // w
        xs = tuple(range(0, W, sx))

        def through(k):  # the average pool (in k's dtype) through kernel k of whole block rows, block by block
            ys = tuple(range(0, k.shape[-2], sy))
            pool = k.new_full((B, len(ys), w, sy, sx), 1 / (sy * sx))
            return conv_transpose_windows(pool, windows(k, ys, xs, sy, sx), r)

        row_bytes = B * (layer.diameter ** 2 + G) * (sy + 2 * r) * W * guide.element_size()  # the fix-up's input
        n = max(1, BAND_BYTES // row_bytes)  # block rows per band
        if guide.device.type != "cpu" or n >= h:
            return through(layer.kernel(guide))
        bands = [(a, min(a + n, h)) for a in range(0, h, n)]
        rows = torch.cat([torch.arange(a * sy - r, b * sy + r) for a, b in bands])
        rows = torch.where(rows < 0, -rows, torch.where(rows >= H, 2 * (H - 1) - rows, rows))  # reflect, as F.pad
        # one gather for all bands, then views: the backward adds all bands into one gradient of the guide
        parts = guide.index_select(2, rows).split([(b - a) * sy + 2 * r for a, b in bands], dim=2)
        rng, zs = torch.get_rng_state(), []
        for g in parts:
            torch.set_rng_state(rng)  # each band draws the Dropout2d masks the whole map would: one per image, channel
            zs.append(through(layer.kernel(g, halo=True)))  # the band's kernel: (B, d*d, (b - a) * sy, W)
        return torch.cat(zs, dim=1)

    def forward(self, image, feats, path="basis"):
        """image (B, 3, S, S) = I; feats (B, C, h, w) = E(i). Returns pool(x_en) (B, C, h, w).

        path "basis" (default): pool(J(E))[c] = M E[c], M from response(), then one einsum over the channels.
        path "direct": the C channels through J at full size (what FeatUp does; tens of G multiply-adds at 672,
        kept as the plain reading and the check of "basis")."""
        B, C, h, w = feats.shape
        if path == "direct":
            return self.propagate(feats, self.kernels(image, (h, w)))
        if path != "basis":
            raise ValueError(f"unknown enricher path {path!r}: 'basis' or 'direct'")
        M = self.response(self.guides(image, (h, w)), (h, w))  # (B, P, n)
        return torch.einsum("bcn,bpn->bcp", feats.flatten(2), M).view(B, C, h, w)


# ----------------------------------------------------------------------------- S2's crops
def split_crops(x, n):
    """(B, C, n*s, n*s) -> (n*n*B, C, s, s): crop (i, j) of image b at batch index (i*n + j)*B + b (s2wrapper's
    chessboard order)."""
    B, C, H, W = x.shape
    s = H // n
    x = x.view(B, C, n, s, n, s).permute(2, 4, 0, 1, 3, 5)  # (n, n, B, C, s, s)
    return x.reshape(n * n * B, C, s, s)


def merge_crops(x, n):
    """Inverse of split_crops: (n*n*B, C, s, s) -> (B, C, n*s, n*s)."""
    _, C, s, _ = x.shape
    B = x.shape[0] // (n * n)
    x = x.view(n, n, B, C, s, s).permute(2, 3, 0, 4, 1, 5)  # (B, C, n, s, n, s)
    return x.reshape(B, C, n * s, n * s)


# ----------------------------------------------------------------------------- the model
def resolve_config(c: HIREConfig) -> HIREConfig:
    """Check the variant's sizes and set c.image_size (in place) to the pixels its forward() takes: the ViT size
    for "none", the largest scale for "s2" (LLaVA-S2 feeds that), the high-res I for "hire"."""
    v = c.vit.image_size
    if c.enricher not in ("hire", "s2", "none"):
        raise ValueError(f"enricher={c.enricher!r}: expected 'hire', 's2' or 'none'")
    if c.enricher == "none":
        c.image_size = v
    elif c.enricher == "s2":
        bad = [s for s in c.s2_scales if s % v]
        if not c.s2_scales or bad or c.s2_scales[0] != v:
            raise ValueError(f"s2_scales={c.s2_scales}: each scale must be a multiple of the ViT size {v}, "
                             f"the first being {v} itself (its grid is the output grid)")
        c.image_size = max(c.s2_scales)
    elif c.image_size % v or c.image_size < v:
        raise ValueError(f"image_size={c.image_size} (HIRE's high-res input) is not a multiple of the ViT "
                         f"image_size {v}")
    return c


class HIRE(nn.Module):
    """LLaVA-1.5 with an optional feature enricher: "none" (LLaVA-1.5), "s2" (LLaVA-1.5-S2), "hire" (HIRE)."""

    # Training recipe as data (paper Sec. 3: "exactly following the same hyperparameters as LLaVA-1.5"); train.py
    # reads it. "train": part -> peak lr. No "template": the config's instruction template.
    # So the paper stages' schedule is LLaVA-1.5's (haotian-liu/LLaVA scripts/v1_5/pretrain.sh, finetune_lora.sh):
    # warmup_ratio 0.03, cosine to 0, weight decay 0, global batch 256 then 128. No gradient clipping: the
    # scripts leave the HF Trainer's max_grad_norm at 1.0, but under DeepSpeed the Trainer does not clip, it only
    # fills a DeepSpeed "gradient_clipping": "auto", and their configs (scripts/zero2.json, zero3.json) have no
    # such key, so DeepSpeed's default, 0 (off), applies.
    LLAVA_SCHEDULE = {"warmup_ratio": 0.03, "min_lr_ratio": 0.0, "grad_clip": 0.0}
    STAGES = {
        # tiny presets only, never part of a paper recipe: everything but the ViT trains together, on QA in every
        # instruction template and captions (data.MIX), with its own schedule (20 of 5000 steps of warmup, cosine to
        # 10% of the peak, gradient clipping at 1). The tiny LM was once built this way; it is now built from text
        # alone, as the papers' LMs are (bench/tiny_base.py)
        "base": {"template": "mix", "train": {"llm": 1e-3, "projector": 1e-3, "enricher": 1e-3},
                 "warmup_ratio": 0.004, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        # stage 1: projector + enricher, lr 1e-3 (LLaVA-1.5 pretraining), ViT and LLM frozen
        "pretrain": {"template": "plain", "train": {"projector": 1e-3, "enricher": 1e-3}, **LLAVA_SCHEDULE},
        # stage 2: the same modules plus LoRA on the LLM's linears. LLaVA-1.5's LoRA script: r 128, alpha 256,
        # dropout 0.05, lr 2e-4, mm_projector_lr 2e-5 (HIRE Table 4's best enricher lr is also 2e-5)
        "finetune": {"train": {"projector": 2e-5, "enricher": 2e-5, "lora": 2e-4},
                     "lora": {"rank": 128, "alpha": 256.0, "dropout": 0.05}, **LLAVA_SCHEDULE},
    }
    LORA = "lora"  # the adapter's name inside the LLM

    def __init__(self, config: HIREConfig, vit: ViT | None = None, llm: LLM | None = None):
        super().__init__()
        c = self.config = resolve_config(config)
        self.vit = vit if vit is not None else ViT(c.vit)
        self.llm = llm if llm is not None else LLM(c.llm)
        self.enricher = Enricher(c) if c.enricher == "hire" else None
        D = c.vit.width * {"none": 1, "hire": 2, "s2": len(c.s2_scales)}[c.enricher]  # Eq. (4): [E(i), pool(x_en)]
        # LLaVA-1.5 mlp2x_gelu projector (keys mm_projector.0 / .2 there)
        self.projector = nn.Sequential(nn.Linear(D, c.llm.d_model), nn.GELU(), nn.Linear(c.llm.d_model, c.llm.d_model))
        self.vit.requires_grad_(False)
        print(f"HIRE ({c.enricher}, {c.image_size} px): {self.describe()}")

    # --- parameters -------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, list[nn.Parameter]]:
        lora = vitlib.lora_parameters(self.llm)
        lora_ids = {id(p) for p in lora}
        parts = {"vit": list(self.vit.parameters()),
                 "llm": [p for p in self.llm.parameters() if id(p) not in lora_ids],
                 "projector": list(self.projector.parameters()),
                 "enricher": list(self.enricher.parameters()) if self.enricher is not None else [],
                 "lora": lora}
        if self.enricher is not None:  # reported, not trained separately
            parts["enricher.unet"] = list(self.enricher.unet.parameters())
            parts["enricher.jbu"] = list(self.enricher.jbu.parameters())
        return parts

    def param_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in ps) for name, ps in self.parts().items()}

    def describe(self) -> str:
        return ", ".join(f"{k} {n / 1e6:.3f}M" for k, n in self.param_counts().items() if n)

    def add_lora(self, rank, alpha, dropout=0.0):
        """LoRA on every nn.Linear of the decoder blocks (LLaVA's find_all_linear_names minus the lm_head)."""
        if vitlib.lora_parameters(self.llm, self.LORA):
            return
        targets = sorted({n.rpartition(".")[2] for n, m in self.llm.layers.named_modules() if isinstance(m, nn.Linear)})
        vitlib.add_lora(self.llm.layers, targets, self.LORA, rank, alpha, dropout)
        vitlib.set_adapter(self.llm, self.LORA)

    def configure_stage(self, stage: str) -> list[dict]:
        """Freeze everything, unfreeze (adding LoRA if the stage needs it) what `stage` trains; returns the
        optimizer groups [{"name", "params", "lr"}]. The ViT never trains (the papers freeze CLIP)."""
        if stage not in self.STAGES:
            raise ValueError(f"unknown stage {stage!r}; HIRE has {list(self.STAGES)}")
        spec = self.STAGES[stage]
        if "lora" in spec:
            self.add_lora(**spec["lora"])
        self.requires_grad_(False)
        parts, groups = self.parts(), []
        for name, lr in spec["train"].items():
            if parts[name]:  # e.g. no enricher in the LLaVA-1.5 variant
                for p in parts[name]:
                    p.requires_grad_(True)
                groups.append({"name": name, "params": parts[name], "lr": lr})
        return groups

    # --- vision -----------------------------------------------------------------------------------------------
    def vit_grid(self, pixels):
        """LLaVA-1.5 features: layer vit_layer, class token dropped, as a map (B, D, g, g)."""
        x = self.vit(pixels, layer=self.config.vit_layer)[:, 1:]  # (B, N, D)
        g = int(x.shape[1] ** 0.5)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], g, g)

    def s2_features(self, pixels):
        """S2 (s2wrapper): per scale, bicubic resize, split into ViT-size crops, one ViT pass per crop, merge the
        crops' maps, area-pool to the first scale's grid; concatenate the scales along channels."""
        v, maps = self.config.vit.image_size, []
        for s in self.config.s2_scales:
            x = pixels if s == pixels.shape[-1] else F.interpolate(pixels, size=(s, s), mode="bicubic",
                                                                   align_corners=False)
            n = s // v
            f = merge_crops(self.vit_grid(split_crops(x, n)), n)  # (B, D, n*g, n*g)
            maps.append(f if not maps else F.interpolate(f, size=maps[0].shape[-2:], mode="area"))
        return torch.cat(maps, dim=1)

    def vision_features(self, pixels):
        """(B, N, D_proj) features entering the projector."""
        c, S = self.config, self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"pixels must be (B, 3, {S}, {S}) for enricher={c.enricher!r} (config.image_size), "
                             f"got {tuple(pixels.shape)}")
        if c.enricher == "s2":
            f = self.s2_features(pixels)
        else:
            v = c.vit.image_size  # i: the ViT-size view of I (antialiased bicubic, as PIL's resize)
            low = pixels if S == v else F.interpolate(pixels, size=(v, v), mode="bicubic", align_corners=False,
                                                      antialias=True)
            f = self.vit_grid(low)  # E(i)
            if self.enricher is not None:
                f = torch.cat([f, self.enricher(pixels.to(f.dtype), f)], dim=1)  # Eq. (4)
        f = f.flatten(2).transpose(1, 2)  # (B, N, D)
        want = self.projector[0].in_features
        if f.shape[-1] != want:
            raise ValueError(f"the projector takes {want} features per token but enricher={c.enricher!r} gives "
                             f"{f.shape[-1]}: projector and enricher widths do not match")
        return f

    def encode_images(self, pixels):
        """(B, N, d_model) visual tokens (576 for CLIP-L/336)."""
        return self.projector(self.vision_features(pixels))

    # --- the LLaVA splice (llm.splice_image) and the LM -------------------------------------------------------
    def forward(self, pixels, idx, labels=None, mask=None, reduction="mean"):
        """Logits (B, T-1+N, V), and the next-token loss over labels != IGNORE when labels are given."""
        if labels is not None and labels.shape != idx.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match idx {tuple(idx.shape)}")
        embeds, labels, mask = splice_image(idx, self.llm.embed, self.encode_images(pixels), labels, mask)
        logits = self.llm(embeds=embeds, mask=mask)
        if labels is None:
            return logits
        return logits, next_token_loss(logits, labels, reduction)

    @torch.no_grad()
    def generate(self, pixels, idx, max_new_tokens=32, mask=None, temperature=0.0, eos_id=None):
        """(B, new) token ids; idx left-padded (mask 0 on padding) when prompts differ in length."""
        embeds, _, mask = splice_image(idx, self.llm.embed, self.encode_images(pixels), mask=mask)
        return self.llm.generate(embeds=embeds, mask=mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                 eos_id=eos_id)

    # --- checkpoints ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, config: HIREConfig, dtype=None) -> "HIRE":
        """Build with the ViT from config.vit_path and the LLM from config.llm_path (HF directories; their configs
        replace config.vit / config.llm). The projector and enricher start random."""
        resolve_config(config)  # image_size for the variant, set on the caller's config too
        v = ViT.from_pretrained(config.vit_path, dtype) if config.vit_path else None
        m = LLM.from_pretrained(config.llm_path, dtype) if config.llm_path else None
        config = dataclasses.replace(config, vit=v.config if v else config.vit, llm=m.config if m else config.llm)
        model = cls(config, vit=v, llm=m)
        if dtype is not None:
            model.projector.to(dtype)
            if model.enricher is not None:
                model.enricher.to(dtype)
        return model

    @classmethod
    def from_release(cls, path, vit=None, dtype=None) -> "HIRE":
        """LLaVA-1.5 as released, as enricher="none": llava-hf's conversion (llava-hf/llava-1.5-7b-hf, safetensors)
        or LLaVA's own (liuhaotian/llava-v1.5-7b: its config fields, pytorch_model-*.bin read with
        torch.load(weights_only=True), or safetensors after `python llm.py --to_safetensors DIR`). vit: the CLIP
        directory of mm_vision_tower, needed when the release holds no tower weights. Every key is mapped by
        LLAVA_KEYS / LLAVA_HF_KEYS and every shape checked; unimplemented config fields are refused by name."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json (expected a LLaVA-1.5 release directory)")
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        tensors = llmlib.read_release(path)
        if "text_config" in cfg:   # llava-hf: LlavaForConditionalGeneration
            text = {**LLAMA_DEFAULTS, **cfg["text_config"]}
            got = {"text_config.model_type": text.get("model_type"),   # field -> (value, what we implement)
                   "vision_config.model_type": cfg.get("vision_config", {}).get("model_type"),
                   "projector_hidden_act": cfg.get("projector_hidden_act", "gelu"),
                   "vision_feature_select_strategy": cfg.get("vision_feature_select_strategy", "default"),
                   "multimodal_projector_bias": cfg.get("multimodal_projector_bias", True)}
            want = {"text_config.model_type": "llama", "vision_config.model_type": "clip_vision_model",
                    "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
                    "multimodal_projector_bias": True}
            bad = [f"{k}={got[k]!r} (we implement {w!r})" for k, w in want.items() if got[k] != w]
            layer = cfg.get("vision_feature_layer", -2)
            if not isinstance(layer, int):
                bad.append(f"vision_feature_layer={layer!r} (we implement one layer)")
            if bad:
                raise ValueError(f"{path}/config.json: not implemented here: {', '.join(bad)}")
            llm_cfg, table = LLMConfig.from_hf(text), LLAVA_HF_KEYS
            vit_cfg, tower = ViT.config_from_hf(cfg["vision_config"], path), None
        else:   # LLaVA's own release
            llm_cfg, name, layer = llmlib.llava_config(cfg, path)
            table = LLAVA_KEYS
            inside = any(k.startswith("model.vision_tower.vision_tower.") for k in tensors)
            vit_cfg, tower = vitlib.release_tower(name, vit, inside, path, dtype)
        config = HIREConfig(vit=vit_cfg, llm=llm_cfg, enricher="none", vit_layer=layer, pad_square=True,
                            template="vicuna_v1")
        with torch.device("meta"):
            model = cls(config, vit=tower)
        llmlib.load_release(model, tensors, table, path, dtype, exclude=("vit.",) if tower is not None else ())
        return model.to(dtype or torch.float32).eval()

    def save(self, path):
        """config.json (dataclasses.asdict) + model.safetensors; written to path.tmp, then renamed."""
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:  # the class first: --init checks it (train.py)
            json.dump({"architecture": "HIRE", **dataclasses.asdict(self.config)}, f, indent=2)
        save_file({k: t.detach().contiguous().cpu() for k, t in _unique_state(self).items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)

    @classmethod
    def load(cls, path, dtype=None) -> "HIRE":
        """Rebuild a saved HIRE (with its LoRA adapter if it was saved with one); every key and shape checked."""
        for name in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{path}: no {name} (expected a directory written by HIRE.save)")
        with open(os.path.join(path, "config.json")) as f:
            config = HIREConfig.from_dict(json.load(f))
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            keys = list(f.keys())
            model = cls(config)
            if any(".lora_A." in k for k in keys):
                ft = cls.STAGES["finetune"]["lora"]
                ranks = {f.get_slice(k).get_shape()[0] for k in keys if ".lora_A." in k}
                model.add_lora(ranks.pop(), ft["alpha"], ft["dropout"])
            expected = {k: tuple(t.shape) for k, t in _unique_state(model).items()}
            missing = sorted(set(expected) - set(keys))
            unexpected = sorted(set(keys) - set(expected))
            wrong = [f"{k}: file {tuple(f.get_slice(k).get_shape())} vs model {expected[k]}" for k in keys
                     if k in expected and tuple(f.get_slice(k).get_shape()) != expected[k]]
            if missing or unexpected or wrong:
                raise ValueError(f"{path}/model.safetensors does not fit the HIRE (enricher={config.enricher!r}) of "
                                 f"its config.json:" + "".join(f"\n  {what}: {v}" for what, v in (
                                     ("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if v))
            state = {k: f.get_tensor(k) for k in keys}
        model.load_state_dict(state, strict=False)  # tied copies (lm_head = embed_tokens) are filled by their twin
        if dtype is not None:
            model.to(dtype)
        return model


# ----------------------------------------------------------------------------- released LLaVA-1.5 checkpoints
VIT = vitlib.tower_key
# release key prefix -> our prefix (or a function of the rest); the longest matching prefix wins (llm.load_release)
LLAVA_KEYS = [   # liuhaotian/llava-v1.5-7b: LlavaLlamaForCausalLM (llava/model/llava_arch.py)
    ("model.", "llm."), ("lm_head.", "llm.lm_head."),
    ("model.mm_projector.0.", "projector.0."), ("model.mm_projector.2.", "projector.2."),
    ("model.vision_tower.vision_tower.vision_model.", VIT)]
LLAVA_HF_KEYS = [   # llava-hf/llava-1.5-7b-hf as on the hub (transformers 4), as saved by transformers >= 4.52, and
    # as saved by transformers 5 (the tower without its vision_model. level)
    ("language_model.model.", "llm."), ("model.language_model.", "llm."),
    ("language_model.lm_head.", "llm.lm_head."), ("lm_head.", "llm.lm_head."),
    ("vision_tower.vision_model.", VIT), ("model.vision_tower.vision_model.", VIT), ("vision_tower.", VIT),
    ("model.vision_tower.", VIT),
    ("multi_modal_projector.linear_1.", "projector.0."), ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."), ("model.multi_modal_projector.linear_2.", "projector.2.")]
# LlamaConfig's defaults: llava-hf's config.json writes only the text_config fields that differ from them
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                  "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _unique_state(model):
    """state_dict without the second name of a tied tensor (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[k] = t
    return out


# ----------------------------------------------------------------------------- demo
def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="Answer a question about an image with LLaVA-1.5 / -S2 / -HIRE.")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--ckpt", default=None, help="a HIRE.save directory (with its tokenizer); else a random tiny")
    ap.add_argument("--release", default=None, help="a released LLaVA-1.5 directory (HIRE.from_release)")
    ap.add_argument("--vit", default=None, help="with --release: the CLIP directory its config names, if needed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--enricher", default=None, choices=["hire", "s2", "none"])
    ap.add_argument("--max_new_tokens", type=int, default=32)
    args = ap.parse_args(argv)
    from llm import Tokenizer
    torch.manual_seed(0)
    if args.release:
        model, tok_dir = HIRE.from_release(args.release, args.vit, getattr(torch, args.dtype)), args.release
    elif args.ckpt:
        model, tok_dir = HIRE.load(args.ckpt), args.ckpt
    else:
        config = HIREConfig.preset(args.preset)
        if args.enricher:
            config.enricher = args.enricher
        model = HIRE.from_pretrained(config)
        tok_dir = config.llm_path
        if tok_dir is None:  # random tiny model: the shared tiny tokenizer
            import tempfile
            tok_dir = data.build_tiny_tokenizer(tempfile.mkdtemp())
    tok = Tokenizer.from_pretrained(tok_dir)
    model.eval()
    c = model.config
    pixels = data.load_image(args.image, c.image_size, c.pad_square)[None]
    prompt = args.prompt if data.IMAGE_TOKEN in args.prompt else data.IMAGE_TOKEN + "\n" + args.prompt
    ids, _ = data.tokenize_conversation(tok, [{"from": "human", "value": prompt}], c.template)
    out = model.generate(pixels, torch.tensor([ids]), max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id)
    print(data.answer_text(tok, out[0].tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
