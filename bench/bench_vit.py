"""Forward+backward step time: our ViT vs transformers' CLIPVisionModel, same config and weights, same process.

    python bench/bench_vit.py [--width 768 --layers 6 --heads 12 --size 224 --patch 16 --batch 4 --reps 7]

Prints median wall and CPU (process) time per step and the ratios theirs/ours (>= 1.0: ours is not slower).
On a shared machine the CPU time of a 1-thread run is the steadier figure: waiting for a core isn't counted.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from vit import ViT  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--width", type=int, default=768)
ap.add_argument("--layers", type=int, default=6)
ap.add_argument("--heads", type=int, default=12)
ap.add_argument("--size", type=int, default=224)
ap.add_argument("--patch", type=int, default=16)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--device", default="cpu")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

cfg = CLIPVisionConfig(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, image_size=args.size, patch_size=args.patch)
theirs = CLIPVisionModel(cfg)  # default attention implementation (sdpa)
with tempfile.TemporaryDirectory() as d:
    theirs.save_pretrained(d)
    ours = ViT.from_pretrained(d)
theirs.to(args.device).train()
ours.to(args.device).train()
x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)


def sync():
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def step_ours():
    ours.zero_grad(set_to_none=True)
    ours(x).float().square().mean().backward()  # last layer, before post-norm


def step_theirs():
    theirs.zero_grad(set_to_none=True)
    theirs(pixel_values=x).last_hidden_state.float().square().mean().backward()


with torch.no_grad():  # same numbers first, so we time the same computation
    diff = (ours(x) - theirs(pixel_values=x).last_hidden_state).abs().max().item()
wall, cpu = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}
for i in range(args.warmup + args.reps):
    for name, step in (("ours", step_ours), ("theirs", step_theirs)):  # interleaved: fair under shared load
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        if i >= args.warmup:
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

print(f"ViT fwd+bwd, width {args.width}, {args.layers} layers, {args.heads} heads, {args.size}px/{args.patch}, "
      f"batch {args.batch}, fp32, {args.device}, {torch.get_num_threads()} threads, max |diff| {diff:.1e}")
for label, times in (("wall", wall), ("cpu", cpu)):
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {label:4s} {k:6s} median {1000 * med[k]:8.1f} ms  (min {1000 * min(v):.1f}, max {1000 * max(v):.1f}, "
              f"n={len(v)})")
    print(f"  {label:4s} ratio theirs/ours = {med['theirs'] / med['ours']:.3f}")
