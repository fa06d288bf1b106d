"""
HIRE's cost against the models it is measured against, on this CPU: the paper's claim that a shallow enricher
replaces S2's extra ViT passes at a fraction of the time (HIRE Sec. 3: TextVQA inference, S2 > 2x LLaVA-1.5, HIRE
+0.1%), at paper scale and in miniature.

    python bench/bench_hire.py                      # paper scale at 672, then the tiny presets; 2 threads
    python bench/bench_hire.py --size=1008          # S2 [336, 672, 1008]: 14 ViT passes
    python bench/bench_hire.py --part=tiny --threads=1
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python bench/bench_hire.py --part=paper
                                                    # glibc keeps freed memory: far fewer fresh pages (README)

Paper scale (CLIP-L/336 width, one image, fp32, random weights, a tiny LM: the vision side never touches it): one
ViT-L/336 forward, the enricher (UNet + 5 JBU layers + pool) forward and forward + backward, and the vision side
(everything before the LLM) of LLaVA-1.5, LLaVA-1.5-S2 and LLaVA-1.5-HIRE. Tiny presets (the shipped tiny ViT and
LM, batch 8): greedy answers to the same 200 synthetic questions (8 new tokens each, no early stop, so every model
generates the same tokens' worth), and an alignment-stage training step (forward, backward, AdamW).
Every variant runs once per round, the rounds interleaved (fair under shared load). At paper scale the forwards'
rounds come first, then forward + backward's own (a backward's freed memory would serve the forwards after it); in
the tiny answering a round is one batch of LLaVA-1.5 and one of the model it is compared with, and a pass over the
200 questions is reported. Medians over the rounds (passes) with their min-max, wall time and this process's CPU time
(steadier on a shared machine: waiting for a core is not counted). Peak memory is the rise of the resident high-water
mark over one more call after the rounds (Linux clear_refs), with the pages of freed blocks handed back first (glibc
malloc_trim). Faults: minor page faults per call in the rounds, median (min-max).
"""
import argparse
import itertools
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import hire  # noqa: E402
import train  # noqa: E402
from llm import LLMConfig, Tokenizer  # noqa: E402

from common import peak_rss  # noqa: E402  (bench/, this script's folder)


def rounds(fns, n, warmup=1, memory=False):
    """{name: (wall list, cpu list, peak MiB, minor page faults list)} over n interleaved rounds of every fn, after
    `warmup` rounds. memory: the peak from one more call of each fn after them, with the freed pages handed back
    first (common.peak_rss(trim=True)): memory that earlier calls left with the process would otherwise hide it."""
    out = {k: ([], [], 0.0, []) for k in fns}
    for r in range(warmup + n):
        for k, fn in fns.items():
            t, c, f = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
            if r >= warmup:
                wl, cl, peak, fl = out[k]
                out[k] = (wl + [wall], cl + [cpu], peak, fl + [faults])
    for k, fn in fns.items() if memory else ():
        with peak_rss(trim=True) as mem:
            fn()
        wl, cl, _, fl = out[k]
        out[k] = (wl, cl, mem["peak"], fl)
    return out


def table(res, base=None, unit="s"):
    """Median (min-max) wall and CPU per row, the CPU ratio to row `base`, and the minor page faults per call, median
    (min-max): fresh memory the kernel maps in, up to ~3 us each on this VM."""
    print(f"{'':46s} {'wall ' + unit:>20s} {'cpu ' + unit:>20s} {'peak MiB':>9s} {'cpu ratio':>9s} {'faults':>20s}")
    med = {k: statistics.median(v[1]) for k, v in res.items()}
    spread = lambda v: f"{statistics.median(v):7.3f} ({min(v):.2f}-{max(v):.2f})"
    counts = lambda v: f"{statistics.median(v):.0f} ({min(v)}-{max(v)})"
    for k, (wall, cpu, peak, faults) in res.items():
        ratio = f"x{med[k] / med[base]:.2f}" if base else ""
        print(f"{k:46s} {spread(wall):>20s} {spread(cpu):>20s} {peak:9.0f} {ratio:>9s} {counts(faults):>20s}")
    return med


def paper_scale(size, repeats):
    torch.manual_seed(0)
    tiny_lm = LLMConfig.preset("tiny")
    scales = [s for s in (336, 672, 1008) if s <= size]
    models = {}
    for name in ("none", "s2", "hire"):
        cfg = hire.HIREConfig(llm=tiny_lm, image_size=size, enricher=name, s2_scales=scales)
        models[name] = hire.HIRE(cfg, vit=models["none"].vit if models else None).eval()
    vit, enr = models["none"].vit, models["hire"].enricher
    px = {s: torch.randn(1, 3, s, s) for s in (336, size)}
    feats = torch.randn(1, 1024, 24, 24)

    def fwd_bwd():
        with torch.enable_grad():
            enr.train()
            enr(px[size], feats).square().sum().backward()
            enr.eval()
            enr.zero_grad(set_to_none=True)

    vit_row, enr_row, enr_bwd = "ViT-L/336 forward (layer -2)", f"enricher forward ({size})", \
        f"enricher forward + backward ({size})"
    s2_row, hire_row = f"vision side LLaVA-1.5-S2 {scales}", f"vision side LLaVA-1.5-HIRE ({size})"
    fns = {vit_row: lambda: vit(px[336], layer=-2),
           enr_row: lambda: enr(px[size], feats),
           "vision side LLaVA-1.5 (336)": lambda: models["none"].encode_images(px[336]),
           s2_row: lambda: models["s2"].encode_images(px[size]),
           hire_row: lambda: models["hire"].encode_images(px[size])}
    # the forwards first, as a process that only answers runs them; then forward + backward in rounds of its own (a
    # backward's memory, once freed, stays with glibc's heap and would serve the forwards after it)
    with torch.no_grad():
        res = rounds(fns, repeats, memory=True)
    res |= rounds({enr_bwd: fwd_bwd}, repeats, memory=True)
    print(f"paper scale: one image, fp32, random weights, {torch.get_num_threads()} threads, {repeats} rounds; "
          f"enricher {sum(p.numel() for p in enr.parameters()) / 1e6:.3f} M parameters")
    med = table(res, base=vit_row)
    x_en = 1024 * size * size * 4 / 2 ** 20  # the enricher's output map x_en (Eq. 2) at full size, fp32
    print(f"HIRE / S2 {med[hire_row] / med[s2_row]:.2f}, HIRE / LLaVA-1.5 "
          f"{med[hire_row] / med['vision side LLaVA-1.5 (336)']:.2f}, enricher / ViT {med[enr_row] / med[vit_row]:.2f}"
          f", enricher fwd+bwd / ViT fwd {med[enr_bwd] / med[vit_row]:.2f} (cpu medians); enricher forward peak "
          f"{res[enr_row][2]:.0f} MiB = {res[enr_row][2] / x_en:.2f}x its output map x_en (1024 x {size}^2, "
          f"{x_en:.0f} MiB), fwd+bwd {res[enr_bwd][2]:.0f} MiB")


def tiny(repeats, n_questions=200, batch=8, steps=10):
    # glibc raises its mmap threshold (and, twice that, its trim threshold) to the size of a large block when it is
    # freed, up to 32 MiB; a process that has run anything large has done so. Do it here, or which model's blocks are
    # mapped afresh depends on what ran before (LLaVA-1.5's answers faulted 0 to 256,000 times a pass across runs).
    torch.empty(31 << 20, dtype=torch.uint8)  # made and freed at once
    vit_dir, lm_dir = train.tiny_base()
    tok = Tokenizer.from_pretrained(lm_dir)
    models = {}
    for name, label in (("none", "LLaVA-1.5"), ("s2", "LLaVA-1.5-S2"), ("hire", "LLaVA-1.5-HIRE")):
        torch.manual_seed(0)
        cfg = hire.HIREConfig.preset("tiny")
        cfg.enricher, cfg.vit_path, cfg.llm_path, cfg.jbu_dropout = name, vit_dir, lm_dir, 0.0
        m = hire.HIRE.from_pretrained(cfg)
        models[f"{label} ({m.config.image_size} px)"] = m
    # the same 200 questions, rendered at each model's input size once (data loading is not model time)
    answers = {}
    for k, m in models.items():
        c = m.config
        qa = data.SyntheticDataset(tok, n=n_questions, split="test", image_size=c.image_size,
                                   template=c.template).qa_set(n_questions)
        batches = list(torch.utils.data.DataLoader(qa, batch_size=batch, collate_fn=qa.collate))

        def answer(m=m, it=itertools.cycle(batches)):  # the next batch of questions
            b = next(it)
            m.eval().generate(b["pixels"], b["ids"], max_new_tokens=8, mask=b["mask"])
        answers[k] = answer
    keys, n = list(models), -(-n_questions // batch)  # n: batches per pass over the questions
    print(f"\ntiny presets (shipped tiny ViT + LM), {torch.get_num_threads()} threads, {repeats} passes: "
          f"greedy answers to {n_questions} questions, batch {batch}, 8 new tokens each; LLaVA-1.5 against each")
    passes = lambda v: [sum(v[i:i + n]) for i in range(0, len(v), n)]  # the batches' times summed per pass
    extra = {}
    for other in (keys[2], keys[1]):  # HIRE, then S2: S2's large maps would leave the heap churned for the next
        with torch.no_grad():  # one batch of each in turn: the host's noise falls on both alike
            res = rounds({keys[0]: answers[keys[0]], other: answers[other]}, n * repeats, warmup=n)
        med = table({k: (passes(wall), passes(cpu), peak, passes(faults)) for k, (wall, cpu, peak, faults) in
                     res.items()}, base=keys[0])
        extra[other] = (med[other] / med[keys[0]], med[keys[0]] / n * 1e3, (med[other] - med[keys[0]]) / n * 1e3)
    (hr, hl, he), (sr, sl, se) = extra[keys[2]], extra[keys[1]]
    print(f"HIRE / LLaVA-1.5 {hr:.2f}, S2 / LLaVA-1.5 {sr:.2f}; per batch (ms): HIRE +{he:.1f} on LLaVA-1.5's "
          f"{hl:.1f}, S2 +{se:.1f} on {sl:.1f} (cpu medians; the ratio moves with LLaVA-1.5's own speed)")
    # one alignment-stage ("pretrain") step: projector (+ enricher) train, ViT and LM frozen, captions
    trainers = {}
    for k, m in models.items():
        c = m.config
        ds = data.SyntheticDataset(tok, n=batch * steps, template="plain", image_size=c.image_size, task="caption")
        bs = [ds.collate([ds[i] for i in range(j * batch, (j + 1) * batch)]) for j in range(steps)]
        opt = torch.optim.AdamW(m.configure_stage("pretrain"))
        m.train()

        def step(m=m, opt=opt, it=itertools.cycle(bs)):
            b = next(it)
            _, loss = m(b["pixels"], b["ids"], b["labels"], b["mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        trainers[k] = step
    print(f"\ntiny training step (alignment stage, batch {batch}), {steps * repeats} steps each, interleaved")
    med = table(rounds(trainers, steps * repeats, warmup=2), base=keys[0])
    print(f"HIRE / S2 {med[keys[2]] / med[keys[1]]:.2f}, HIRE / LLaVA-1.5 {med[keys[2]] / med[keys[0]]:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=672)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (tiny training: x10 steps)")
    ap.add_argument("--part", default="all", choices=["all", "paper", "tiny"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    malloc = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    print(f"glibc malloc thresholds: {malloc or 'defaults'} (they change the page faults; README, notes on HIRE)")
    if args.part in ("all", "paper"):
        paper_scale(args.size, args.repeats)
    if args.part in ("all", "tiny"):
        tiny(args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
