"""Pheye Sec. 2.2 on a CPU: the LM's cost of reading N_I = 2305 image tokens through dense cross-attention every
I layers, against LLaVA-style concatenation of the same image tokens into the LM's input.

The LM is Phi-1.5 shrunk in width only (D = 2048 / scale, D_ViT = 1280 / scale, heads of 64, 4x MLP, parallel
block, partial rotary) so that one forward takes about a second, while the token counts stay the paper's:
N_T = 65 text tokens, N_I = 2305 image tokens. Timed: the LM body (hidden states, no LM head, as Eq. 3/4 leave
the head out); for Pheye also every block's K/V projection of the image tokens (Eq. 4's 2 N_I D_ViT D); the ViT
is not timed (the same for both). Both run in one process, interleaved, and are reported as a ratio next to
the analytic ratios of flops.py: Eq. 3 / Eq. 4 as the paper writes them, and the full multiply-add count
(both attention products) of flops.lm_layer / flops.dense_cross_attention, at the benchmark's sizes.

    python bench/bench_pheye.py [--scale 4] [--layers 4] [--reps 3] [--threads 1]
"""
import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import flops  # noqa: E402
from llm import LLMConfig  # noqa: E402
from pheye import Pheye, PheyeConfig  # noqa: E402
from vit import ViTConfig  # noqa: E402

from common import median_seconds  # noqa: E402  (bench/, this script's folder)

N_T, N_I = 65, 2305  # Sec. 2.2: a captioning prompt; a 672 px ViT-L/14-style image (48^2 + 1 tokens)


def proportioned(scale, layers, interval):
    """A Pheye whose LM is Phi-1.5 with every width divided by `scale` (ViT width likewise)."""
    phi = LLMConfig.preset("phi-1.5")
    d = phi.d_model // scale
    lm = dataclasses.replace(phi, vocab_size=512, d_model=d, n_head=d // 64, n_kv_head=d // 64, d_ff=4 * d,
                             n_layer=layers, max_seq_len=4096)
    vit = dataclasses.replace(ViTConfig.preset("tiny"), width=1280 // scale, heads=1280 // scale // 64 or 1)
    return Pheye(PheyeConfig(vit=vit, llm=lm, image_size=2 * vit.image_size, tiles=2, interval=interval)).eval()


@torch.no_grad()
def pheye_lm(model, vision, idx):
    """Eq. 4's work: K/V of the image tokens for every block, then the LM over the text with the blocks."""
    kv = {i: block.attn.keys_values(vision) for i, block in model.xattn.items()}
    return model.llm.hidden_states(idx, before_layer=model._before_layer(kv))


@torch.no_grad()
def llava_lm(model, image_embeds, idx):
    """Eq. 3's work: the same LM over [image tokens; text tokens]."""
    return model.llm.hidden_states(embeds=torch.cat([image_embeds, model.llm.embed(idx)], dim=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=4, help="widths = Phi-1.5 / ViT-H widths divided by this")
    ap.add_argument("--layers", type=int, default=4, help="LM layers (a multiple of 4 keeps both I exact)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {I: proportioned(args.scale, args.layers, I) for I in (2, 4)}
    d, d_vit = models[2].config.llm.d_model, models[2].config.vit.width
    models[4].llm.load_state_dict(models[2].llm.state_dict())  # one LM; only the blocks differ
    idx = torch.randint(4, 512, (1, N_T))
    vision = torch.randn(1, N_I, d_vit)
    image_embeds = 0.02 * torch.randn(1, N_I, d)
    print(f"LM: Phi-1.5 / {args.scale} (D = {d}, D_ViT = {d_vit}, {d // 64} heads of 64, {args.layers} layers), "
          f"N_T = {N_T}, N_I = {N_I}, batch 1, fp32, {args.threads} thread(s), medians of {args.reps}")

    # interleave the three measurements so that load from other processes hits them alike
    t_cat, t_x = [], {2: [], 4: []}
    for _ in range(2):
        t_cat.append(median_seconds(lambda: llava_lm(models[2], image_embeds, idx), args.reps))
        for I, model in models.items():
            t_x[I].append(median_seconds(lambda: pheye_lm(model, vision, idx), args.reps))
    cat = min(t_cat)
    print(f"  concatenation (LLaVA-style, {N_T + N_I} tokens): {cat * 1e3:8.1f} ms")

    lm = dataclasses.replace(models[2].config.llm)
    for I in (2, 4):
        x = min(t_x[I])
        eq = flops.pheye_eq3(N_T, N_I, d) / flops.pheye_eq4(N_T, N_I, d, d_vit, I)
        full = (flops.lm_layer(N_T + N_I, lm).macs /
                (flops.lm_layer(N_T, lm).macs + flops.dense_cross_attention(N_T, N_I, d, d_vit).macs / I))
        paper = flops.pheye_eq3(N_T, N_I, 2048) / flops.pheye_eq4(N_T, N_I, 2048, 1280, I)
        print(f"  dense cross-attention, I = {I} ({len(models[I].xattn)} blocks): {x * 1e3:8.1f} ms   "
              f"measured ratio {cat / x:5.2f}   analytic: Eq.3/Eq.4 {eq:5.2f}, full MAC count {full:5.2f}   "
              f"(paper sizes D = 2048, D_ViT = 1280: Eq.3/Eq.4 {paper:5.2f})")


if __name__ == "__main__":
    main()
