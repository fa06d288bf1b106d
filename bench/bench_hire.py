"""
Speed and memory of HIRE's enricher against the ViT passes it replaces, on this CPU, one image, random weights.

    python bench/bench_hire.py                 # CLIP-L width, 672 input, 2 threads
    python bench/bench_hire.py --size=1008     # S2 then runs 1 + 4 + 9 = 14 ViT passes

Reports: one ViT-L/336 forward (LLaVA-1.5's vision side), the enricher forward (UNet + 5 JBU layers + pool), and the
vision side of LLaVA-1.5 / LLaVA-1.5-S2 / LLaVA-1.5-HIRE (everything before the LLM) as ratios to LLaVA-1.5, all
in one run. Peak memory is the rise of the process's resident high-water mark over the call (Linux clear_refs).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hire  # noqa: E402
from llm import LLMConfig  # noqa: E402

from common import peak_rss  # noqa: E402  (bench/, this script's folder)


def measure(fn, repeats):
    """(best wall seconds, peak resident MiB above the level before the call)."""
    fn()  # warm-up
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        with peak_rss() as mem:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        peak = max(peak, mem["peak"])
    return best, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=672)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--direct", action="store_true", help="also time the direct path (1024 channels through J)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiny_lm = LLMConfig.preset("tiny")  # the vision side never touches the LM; keep it small
    scales = [s for s in (336, 672, 1008) if s <= args.size]
    models = {}
    for name in ("none", "s2", "hire"):
        cfg = hire.HIREConfig(llm=tiny_lm, image_size=args.size, enricher=name, s2_scales=scales)
        models[name] = hire.HIRE(cfg, vit=models["none"].vit if models else None).eval()
    vit = models["none"].vit
    px = {s: torch.randn(1, 3, s, s) for s in (336, args.size)}
    feats = torch.randn(1, 1024, 24, 24)
    enr = models["hire"].enricher
    rows = {}
    with torch.no_grad():
        rows["ViT-L/336 forward (layer -2)"] = measure(lambda: vit(px[336], layer=-2), args.repeats)
        rows[f"enricher forward ({args.size}, basis path)"] = measure(lambda: enr(px[args.size], feats), args.repeats)
        if args.direct:
            rows[f"enricher forward ({args.size}, direct path)"] = measure(
                lambda: enr(px[args.size], feats, "direct"), 1)
        rows["enricher kernels only (UNet + 5 JBU kernels)"] = measure(
            lambda: enr.kernels(px[args.size], (24, 24)), args.repeats)
        vision = {}
        for name, label in (("none", "LLaVA-1.5 (336)"), ("s2", f"LLaVA-1.5-S2 {scales}"),
                            ("hire", f"LLaVA-1.5-HIRE ({args.size})")):
            m = models[name]
            x = px[m.config.image_size]
            vision[label] = measure(lambda: m.encode_images(x), args.repeats)
    print(f"threads {args.threads}, one image, fp32, random weights, enricher "
          f"{sum(p.numel() for p in enr.parameters()) / 1e6:.3f} M parameters")
    print(f"{'':52s} {'wall s':>8s} {'peak MiB':>9s}")
    for k, (t, mem) in rows.items():
        print(f"{k:52s} {t:8.2f} {mem:9.0f}")
    base = vision["LLaVA-1.5 (336)"][0]
    print("vision side (ViT [+ enricher] + projector), ratio to LLaVA-1.5:")
    for k, (t, mem) in vision.items():
        print(f"{k:52s} {t:8.2f} {mem:9.0f}   x{t / base:.2f}")


if __name__ == "__main__":
    main()
