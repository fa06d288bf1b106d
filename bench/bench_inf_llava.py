"""
INF-LLaVA at the paper's width on CPU, random weights (CLIP-ViT-L/14-336, d=1024, a 1008x1008 input):
  1. ViT calls: how many sub-images go through the ViT, and in how many calls (a forward hook counts them);
  2. DEM peak memory (forward + backward, as in training) against the naive cross-attention over all 72x72
     tokens that the paper says runs out of memory, measured (peak RSS) and computed analytically;
  3. DEM forward time against one ViT-L forward of one 336 image.

    .venv/bin/python bench/bench_inf_llava.py [--reps 3] [--threads 1]

Measured (2 shared CPU cores, load average ~10, 1 thread, torch 2.13 CPU):
  ViT calls: 1 call of 19 sub-images with dual resolution (9 local + 9 global + the 336 view), 18 without.
  Peak RSS rise, DEM forward+backward, B=1, fp32 (windowed 3x3 vs naive full 72x72):
    paper   attention, fused SDPA:        535 vs  314 MiB   materialised scores: 561 vs  617 MiB
    release attention, fused SDPA:        783 vs  450 MiB   materialised scores: 965 vs 3783 MiB
  The DEM's saving is the attention-map term, 9x fewer entries (9 x 576^2 vs 5184^2 per head and direction).
  It shows where the scores are materialised, as in the release's own attention(); a fused kernel never holds
  the full map, and then the windowed version's crop/merge copies make it the larger one at B=1. Analytic,
  training as released (batch 16, bf16, 8 heads, 2 directions, scores + probabilities): 25.6 GiB vs 2.8 GiB.
  Time: one ViT-L/14-336 forward (1 image, to layer -2) 11.5 s; DEM forward 3.5 s (paper) = 0.31 ViT
  forwards, 4.1 s (release) = 0.36; INF-LLaVA's 19 ViT forwards dominate.
"""
import argparse
import dataclasses
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inf_llava import DEM, INFLLaVA, INFLLaVAConfig, RELEASE  # noqa: E402
from llm import LLMConfig  # noqa: E402
from vit import ViT  # noqa: E402

from common import median_seconds, peak_rss  # noqa: E402  (bench/, this script's folder)

MiB = 2 ** 20


@contextmanager
def materialised_attention():
    """softmax(QK^T / sqrt(d)) V with the score matrix in memory, as the release computes it (its attention())."""
    sdpa = F.scaled_dot_product_attention

    def explicit(q, k, v, attn_mask=None, is_causal=False):
        s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf"))
        return s.softmax(-1) @ v

    F.scaled_dot_product_attention = explicit
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def mem_case(mode, attn, n_side):
    """Peak RSS rise (MiB) of one DEM forward + backward at paper width on 72x72 maps, in this fresh process."""
    paper = INFLLaVAConfig.preset("paper")
    dem = DEM(dataclasses.replace(paper, **(RELEASE if mode == "release" else {})))
    f_loc, f_glo = torch.randn(1, 1024, 72, 72), torch.randn(1, 1024, 72, 72)
    with (materialised_attention() if attn == "materialised" else nullcontext()), peak_rss() as mem:
        dem(f_loc, f_glo, int(n_side), int(n_side)).sum().backward()
    return mem["peak"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mem_case", default="", help="internal: mode,attention,windows_per_side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mem_case:
        return print(mem_case(*args.mem_case.split(",")))
    torch.manual_seed(0)
    paper = INFLLaVAConfig.preset("paper")
    S, d = paper.vit.image_size, paper.vit.width
    n = paper.image_size // S
    g = n * S // paper.vit.patch_size  # 72 tokens per side of the recombined map

    # 1. ViT calls. Depth does not change the count: a 2-layer ViT-L (layer -2 runs one block), tiny LM.
    print(f"== 1. ViT calls, {paper.image_size}x{paper.image_size} input, ViT-L width {d}")
    for dual in (True, False):
        cfg = dataclasses.replace(paper, vit=dataclasses.replace(paper.vit, layers=2), llm=LLMConfig.preset("tiny"),
                                  dual=dual)
        model = INFLLaVA(cfg).eval()
        calls = []
        model.vit.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        with torch.no_grad():
            model.encode_images(torch.randn(1, 3, paper.image_size, paper.image_size))
        print(f"  dual={dual!s:5}: {len(calls)} ViT call(s), {sum(calls)} sub-images of {S}x{S} "
              f"({n * n} local + {n * n} global{' + 1 low-res view' if dual else ''})")
        del model

    # 2. DEM memory, B=1, fp32, forward + backward (the DEM is trained; ViT features arrive without grad).
    # Each case runs in a fresh process: freed memory stays in the allocator and would hide a later peak.
    print(f"\n== 2. DEM peak memory, forward+backward, B=1, fp32, {g}x{g} tokens, d={d} (peak RSS rise)")
    for mode in ("paper", "release"):
        heads = 8 if mode == "release" else 1
        for attn in ("sdpa", "materialised"):
            for windows, per_side in (("DEM 3x3 windows", n), ("naive full 72x72", 1)):
                cmd = [sys.executable, __file__, f"--mem_case={mode},{attn},{per_side}"]
                peak = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
                tokens = (g // per_side) ** 2
                scores = 2 * heads * per_side ** 2 * tokens ** 2 * 4 / MiB  # both directions, fp32, one copy
                print(f"  {mode:7} {attn:12} {windows:17}: peak +{peak:7.0f} MiB   (score matrices {scores:6.0f} "
                      f"MiB per copy: 2 dirs x {heads} heads x {per_side * per_side} x {tokens}^2)")
    print("  (a fused kernel never holds the full score map; the DEM saves the score-map term, which the release's\n"
          "   explicit softmax(QK^T)V materialises)")
    train_full = 16 * 8 * 2 * (g * g) ** 2 * 2 * 2 / 2 ** 30
    train_win = train_full / (n * n)
    print(f"  analytic, training as released (per-GPU batch 16 as in its pretraining, bf16, 8 heads, 2 directions, "
          f"scores + probabilities kept for backward): naive {train_full:.1f} GiB vs DEM {train_win:.1f} GiB "
          f"of attention maps alone ({n * n}x less)")

    # 3. time: DEM forward vs one ViT-L forward (one 336 image, through layer -2 as INF-LLaVA uses it)
    print(f"\n== 3. time, median of {args.reps}, {args.threads} thread(s)")
    vit = ViT(paper.vit).eval()
    x = torch.randn(1, 3, S, S)
    f_loc, f_glo = torch.randn(1, d, g, g), torch.randn(1, d, g, g)
    with torch.no_grad():
        t_vit = median_seconds(lambda: vit(x, layer=paper.vision_layer), args.reps)
        print(f"  ViT-L/14-336 forward, 1 image (layer -2): {t_vit * 1e3:8.0f} ms   "
              f"(INF-LLaVA runs 19 of them: {19 * t_vit:.1f} s)")
        for mode in ("paper", "release"):
            dem = DEM(dataclasses.replace(paper, **(RELEASE if mode == "release" else {}))).eval()
            t_dem = median_seconds(lambda: dem(f_loc, f_glo, n, n), args.reps)
            print(f"  DEM ({mode:7}) forward, 72x72 tokens:      {t_dem * 1e3:8.0f} ms   "
                  f"= {t_dem / t_vit:.2f} ViT forwards")


if __name__ == "__main__":
    main()
