"""Benchmarks for llm.py (transformers is the reference; only here and in tests/).

1. forward+backward step time of our LLM vs transformers' LlamaForCausalLM, same weights, same process.
2. peak RSS while loading a synthetic ~1 GB bf16 LLaMA checkpoint in a fresh process, vs the file size.

    python bench/bench_llm.py [--threads 1] [--reps 4] [--vocab 8192] [--skip_rss] [--skip_step]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm import LLM, LLMConfig, _to_hf  # noqa: E402


def train_step(model, idx, targets):
    """One forward (logits) + cross-entropy + backward; returns (wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = model(idx)
    logits = out if torch.is_tensor(out) else out.logits
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_step(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=1024)).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LLM.from_pretrained(d).train()
    idx = torch.randint(0, args.vocab, (4, 256))
    targets = torch.randint(0, args.vocab, (4, 256))
    train_step(hf, idx, targets), train_step(ours, idx, targets)  # warm-up
    theirs_t, ours_t = [], []
    for _ in range(args.reps):  # interleaved, so that load from other processes hits both alike
        theirs_t.append(train_step(hf, idx, targets))
        ours_t.append(train_step(ours, idx, targets))
    print(f"fwd+bwd  d_model 512, 8 layers, vocab {args.vocab}, batch 4 x seq 256, fp32, {args.threads} thread(s), "
          f"medians of {args.reps}:")
    for j, what in enumerate(("wall", "CPU")):
        a, b = statistics.median(t[j] for t in theirs_t), statistics.median(t[j] for t in ours_t)
        print(f"  {what:4s} transformers {a * 1e3:.0f} ms, ours {b * 1e3:.0f} ms, ratio theirs/ours {a / b:.3f}")


LOADER = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from llm import LLM
def rss():  # current resident set, bytes
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def peak():  # high-water mark of this process image, bytes. Not ru_maxrss: Linux carries that over from the
    # forked parent across exec, so it would start at the size of the process that launched us
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
base = rss()
model = LLM.from_pretrained({path!r}, dtype=torch.bfloat16)
loaded = peak()
# read every weight once (no temporaries), in case any were still lazily memory-mapped from the file
touched = [float(p.detach().max()) for p in model.parameters()]
assert all(p.dtype == torch.bfloat16 for p in model.parameters())
print(loaded - base, peak() - base)
"""


def bench_rss(args):
    from safetensors.torch import save_file
    # a LLaMA-style config of ~0.54 B parameters: ~1.08 GB in bf16
    config = LLMConfig(vocab_size=32000, d_model=2048, n_layer=8, n_head=16, n_kv_head=16, d_ff=5632,
                       max_seq_len=2048)
    with tempfile.TemporaryDirectory() as d:
        with torch.device("meta"):
            shapes = {k: t.shape for k, t in _to_hf(config, LLM(config).state_dict()).items()}
        state = {k: torch.randn(s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
        with open(os.path.join(d, "config.json"), "w") as f:
            import json
            json.dump(config.to_hf(), f)
        save_file(state, os.path.join(d, "model.safetensors"))
        del state
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        out = subprocess.run([sys.executable, "-c", LOADER.format(root=ROOT, path=d)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        loaded, extra = map(int, out.stdout.strip().splitlines()[-1].split())
    print(f"load bf16 checkpoint of {size / 1e9:.3f} GB: peak RSS above baseline {loaded / 1e9:.3f} GB right "
          f"after from_pretrained, {extra / 1e9:.3f} GB = {extra / size:.3f}x file size once every weight was read")
    return extra / size


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--skip_rss", action="store_true")
    p.add_argument("--skip_step", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_rss:
        bench_rss(args)
    if not args.skip_step:
        bench_step(args)
