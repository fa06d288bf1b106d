"""
The papers' claims in miniature: every model of nanoHiRes trained the same way on the synthetic fine-detail set,
then scored on held-out questions whose answer is a large, medium or small detail (data.py's "detail" tag).

    python bench/miniature.py                       # the grid: 7 models x 3 seeds, table + figure in out/miniature/
    python bench/miniature.py --seeds 3 --align_iters 200 --iters 600 --lr_scale 5 --batch_size 8 --jobs 2
                                                    # the same, spelled out
    python bench/miniature.py --curve               # plus the learning curve (LLaVA-1.5 and S2 at 1/4 ... 1.5x)
    python bench/miniature.py --quick               # a couple of steps per model, from scratch (smoke test)

The task (--others=0): one item per image, on the 3x3 canvas, at one of three detail sizes, faded and under
sensor noise (data.py); the question names its cell. Every model starts from the same tiny base (assets/,
train.tiny_base): the ViT pretrained on 64-px views, and a text-only LM that knows the chat templates, the
questions and the answer vocabulary and answers from a passage in its context, but has never seen an image
(bench/tiny_base.py), as the papers start from CLIP and a text LLM. Each run is two `python train.py --model M --preset tiny --seed=S ...` calls, as each paper
trains: its alignment stage (ALIGN: LLaVA-1.5/HIRE/INF-LLaVA "pretrain" on captions, Pheye "stage1") for
--align_iters steps, then its instruction stage (the model file's last) from that checkpoint (--init) for --iters
steps, with its paper's freezing recipe and learning rates times one shared --lr_scale, the same steps, batch and
seeds for every model. Then the checkpoint answers the test split greedily and the answers are scored by exact
match (data.normalize_answer), overall and per detail size. The table also gives the parameters the stage
trains, the analytic first-token cost of the tiny config (flops.py; 1 FLOP = 1 multiply-add, every one counted,
as the papers count) and the median wall time per training step (log.jsonl).
Runs go at most --jobs at a time, one thread each; a run whose result.json matches its arguments is reused.
"""
import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from importlib import import_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import data  # noqa: E402
import flops  # noqa: E402
import train  # noqa: E402

# key, label, train.py --model, model-config overrides. The switches are the model files' own: INF-LLaVA's
# dem="none" is Table 6's "w/ DCM" row (F_loc + F_glo, no DEM); Pheye's local=False reads the same 128-px input
# through its 64-px global view alone: the no-extra-resolution control for Table 2.
GRID = [
    ("llava", "LLaVA-1.5, 64 px", "llava", {}),
    ("llava_s2", "LLaVA-1.5-S2, 64+128+192", "llava_s2", {}),
    ("hire", "LLaVA-1.5-HIRE, 64 + enricher at 128", "hire", {}),
    ("inf_llava", "INF-LLaVA, 64 + DCM/DEM at 192", "inf_llava", {}),
    ("inf_llava_dcm_add", "INF-LLaVA w/o DEM (F_loc + F_glo), 64 + 192", "inf_llava", {"dem": "none"}),
    ("pheye", "Pheye, 64 global + 2x2 tiles (128)", "pheye", {}),
    ("pheye_global", "Pheye, 64 global view only", "pheye", {"local": False}),
]
# each paper's alignment stage, by model file: what runs before the instruction stage
ALIGN = {"hire": "pretrain", "inf_llava": "pretrain", "pheye": "stage1"}
SIZES = tuple(data.SIZES)  # large, medium, small
TEST_SEED = 0  # the test split is the same for every run; training data differs by seed (train.py's --seed)


# ----------------------------------------------------------------------------- what each checkpoint costs
def first_token_cost(model, config, text_tokens):
    """flops.Cost of the first generated token of this tiny config; text_tokens = prompt length without the
    image slot. Mirrors flops.py's own tiny cases (SDPA attention in the ViT, logits at every position)."""
    kw = dict(vit_cfg=config.vit, lm=config.llm, text_tokens=text_tokens)
    if model in ("llava", "llava_s2", "hire"):
        kw["vit_sdpa"] = True
        if config.enricher == "none":
            return flops.llava(**kw)
        if config.enricher == "s2":
            return flops.s2(max(config.s2_scales), **kw)
        return flops.hire(config.image_size, enricher=config, **kw)
    if model == "inf_llava":
        cost = flops.inf_llava(config.image_size, dual=config.dual, vit_sdpa=True, **kw)
        if config.dem == "none":  # Table 6 "w/ DCM": F_loc + F_glo instead of DEM (an element-wise sum)
            n, g = config.image_size // config.vit.image_size, config.vit.image_size // config.vit.patch_size
            cost = cost + flops.dem(n, g, config.vit.width) * -1
        return cost
    if model == "pheye":
        return flops.pheye(config.image_size, config.interval, lora_rank=(config.global_rank, config.local_rank),
                           local=config.local, **kw)
    raise ValueError(f"no first-token cost for --model={model!r}")


def trained_parameters(net, stage):
    """Parameters the stage's optimizer updates (train.py counts the same)."""
    seen, n = set(), 0
    for g in net.configure_stage(stage):
        for p in g["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def step_time(log_path):
    """Median wall seconds per optimizer step from train.py's log.jsonl (step 1, the warm-up, left out when
    there are later steps)."""
    with open(log_path) as f:
        t = [r["elapsed_s"] for r in map(json.loads, f) if "loss" in r]
    if not t:
        raise ValueError(f"{log_path}: no training steps logged")
    return statistics.median([b - a for a, b in zip(t, t[1:])]) if len(t) > 1 else t[0]


# ----------------------------------------------------------------------------- evaluation on the test split
def load_run(run_dir, model):
    """(the network in eval mode, its tokenizer) of RUN_DIR/ckpt; train.py copies the tokenizer into every
    checkpoint."""
    from llm import Tokenizer
    ckpt = os.path.join(run_dir, "ckpt")
    file, cls_name, _ = train.MODELS[model]
    return getattr(import_module(file), cls_name).load(ckpt).eval(), Tokenizer.from_pretrained(ckpt)


@torch.no_grad()
def evaluate_checkpoint(run_dir, model, n_test, batch_size=32, max_new_tokens=8):
    """Greedy answers of OUT_DIR/ckpt on the first n_test questions of the synthetic test split, scored by exact
    match: {"overall", "large", "medium", "small"} accuracies, counts, trained parameters, first-token cost."""
    ckpt = os.path.join(run_dir, "ckpt")
    net, tok = load_run(run_dir, model)
    state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=False)
    stage, others = state["stage"], state["train_config"]["others"]
    c = net.config
    template = net.STAGES[stage].get("template", c.template)
    acc, n, text_tokens, samples = train.detail_accuracy(net, tok, template, n_test, "test", TEST_SEED, batch_size,
                                                          max_new_tokens, others)
    cost = first_token_cost(model, c, text_tokens)
    return dict(accuracy=acc, n=n, stage=stage,
                params_trained=trained_parameters(net, stage), text_tokens=text_tokens,
                first_token_mflops=cost.macs / 1e6, first_token_mflops_fvcore=cost.fvcore / 1e6,
                s_per_step=step_time(os.path.join(run_dir, "log.jsonl")), samples=samples)


def answer_prior(n_test, others, n_train=4000, seed=1):
    """What answering without the image scores: the most frequent training answer of each question kind (char,
    shape, dots), scored on the same test questions. The floor every model should rise above."""
    counts = {}
    for i in range(n_train):
        rec = data.synthetic_record(seed, "train", i, others=others)[0]
        kind = counts.setdefault(rec["kind"], {})
        kind[rec["conversations"][1]["value"]] = kind.get(rec["conversations"][1]["value"], 0) + 1
    guess = {kind: max(c, key=c.get) for kind, c in counts.items()}
    right, total = dict.fromkeys(SIZES, 0), dict.fromkeys(SIZES, 0)
    for i in range(n_test):
        rec = data.synthetic_record(TEST_SEED, "test", i, others=others)[0]
        right[rec["detail"]] += guess.get(rec["kind"]) == rec["conversations"][1]["value"]
        total[rec["detail"]] += 1
    acc = {s: right[s] / total[s] for s in SIZES if total[s]}
    acc["overall"] = sum(right.values()) / sum(total.values())
    return acc


# ----------------------------------------------------------------------------- one run, and the grid
def train_argv(args, model, overrides, seed, run_dir, iters, extra=()):
    argv = [f"--model={model}", "--preset=tiny", f"--out_dir={run_dir}", "--overwrite=True",
            f"--max_iters={iters}", f"--batch_size={args.batch_size}", f"--seed={seed}",
            f"--lr_scale={args.lr_scale}", f"--n_train={args.n_train}", f"--n_val={args.batch_size}",
            f"--others={args.others}",
            "--eval_interval=0", "--eval_answers=1", f"--from_scratch={args.from_scratch}", *extra]
    return argv + [f"--{k}={v}" for k, v in overrides.items()]


def run_spec(args, key, seed, budget=1.0):
    """(run directory, the train.py calls in order, what a reusable result.json must have been made with).
    With --align_iters the alignment stage trains in run_dir/align and the instruction stage starts from it.
    budget: both stages' steps times this (the learning curve's runs; 1 is the grid's)."""
    _, _, model, overrides = next(r for r in GRID if r[0] == key)
    run_dir = os.path.join(args.out, "runs", f"{key}-seed{seed}" + (f"-x{budget:g}" if budget != 1 else ""))
    align_iters, iters = round(args.align_iters * budget), round(args.iters * budget)
    file, cls_name, _ = train.MODELS[model]
    instruct = f"--stage={list(getattr(import_module(file), cls_name).STAGES)[-1]}"
    calls = []
    if args.align_iters:
        align_dir = os.path.join(run_dir, "align")
        calls.append(train_argv(args, model, overrides, seed, align_dir, align_iters,
                                [f"--stage={ALIGN[file]}"]))
        calls.append(train_argv(args, model, overrides, seed, run_dir, iters,
                                [instruct, f"--init={os.path.join(align_dir, 'ckpt')}"]))
    else:
        calls.append(train_argv(args, model, overrides, seed, run_dir, iters, [instruct]))
    return run_dir, calls, dict(train_argv=calls, n_test=args.n_test)


def cached(args, key, seed, budget=1.0):
    """The run's result.json if one exists made with the same arguments (and --force is not given), else None."""
    run_dir, _, spec = run_spec(args, key, seed, budget)
    path = os.path.join(run_dir, "result.json")
    if args.force or not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result["spec"] == spec else None


def run_one(args, key, seed, budget=1.0):
    """Train one (model, seed) with train.py and evaluate it; result.json in its run directory. In-process."""
    result = cached(args, key, seed, budget)
    if result is not None:
        return result
    model = next(r for r in GRID if r[0] == key)[2]
    run_dir, calls, spec = run_spec(args, key, seed, budget)
    os.makedirs(run_dir, exist_ok=True)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train.main installs its own
    t0 = time.time()
    try:
        with open(os.path.join(run_dir, "train.out"), "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            for argv in calls:
                train.main(argv, distributed=False)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    steps = round(args.align_iters * budget) + round(args.iters * budget)  # both stages
    result = dict(key=key, seed=seed, budget=budget, steps=steps, spec=spec, train_wall_s=round(time.time() - t0, 1),
                  **evaluate_checkpoint(run_dir, model, args.n_test))
    done = os.path.join(run_dir, "result.json")
    with open(done + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(done + ".tmp", done)
    return result


def run_in_child(args, key, seed, budget=1.0):
    """run_one in a fresh single-threaded process (so that --jobs of them share the cores fairly)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={key}", f"--seed={seed}",
           f"--budget={budget}"] + args.passthrough
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"run {key} seed {seed} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stderr[-3000:]}")
    with open(os.path.join(run_spec(args, key, seed, budget)[0], "result.json")) as f:
        return json.load(f)


def mean_std(values):
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                values=values)


def summarise(results):
    """Per grid row: accuracies and step time as mean/std over seeds; parameters and FLOPs (seed-independent)."""
    rows = []
    for key, label, model, overrides in GRID:
        rs = sorted((r for r in results if r["key"] == key), key=lambda r: r["seed"])
        if not rs:
            continue
        rows.append(dict(key=key, label=label, model=model, overrides=overrides, seeds=[r["seed"] for r in rs],
                         accuracy={k: mean_std([r["accuracy"][k] for r in rs]) for k in ("overall",) + SIZES},
                         n_test=rs[0]["n"], params_trained=rs[0]["params_trained"], stage=rs[0]["stage"],
                         text_tokens=rs[0]["text_tokens"], first_token_mflops=rs[0]["first_token_mflops"],
                         first_token_mflops_fvcore=rs[0]["first_token_mflops_fvcore"],
                         s_per_step=mean_std([r["s_per_step"] for r in rs])))
    return rows


CURVE_KEYS = ("llava", "llava_s2")  # the learning curve: the base-resolution model and its S2 counterpart
CURVE_BUDGETS = (0.25, 0.5, 1, 1.5)  # x the grid's steps in both stages (1: the grid's own runs)


def learning_curve(results):
    """Per CURVE_KEYS row and budget: steps (both stages) and accuracies as mean/std over seeds."""
    out = []
    for key in CURVE_KEYS:
        for b in CURVE_BUDGETS:
            rs = [r for r in results if r["key"] == key and r["budget"] == b]
            if rs:
                out.append(dict(key=key, budget=b, steps=rs[0]["steps"], seeds=sorted(r["seed"] for r in rs),
                                accuracy={k: mean_std([r["accuracy"][k] for r in rs]) for k in ("overall",) + SIZES}))
    return out


def curve_markdown(curve, meta):
    pm = lambda a: f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f}"
    label = {k: lab for k, lab, _, _ in GRID}
    lines = ["", f"Learning curve: the same runs at {', '.join(f'{b:g}' for b in CURVE_BUDGETS)} x the steps of both "
                 f"stages (cosine schedule over each run's own length), seeds {meta['seeds']}.", "",
             "| model | steps (align + instruct) | overall | large | medium | small |", "|---|---|---|---|---|---|"]
    for c in curve:
        a = c["accuracy"]
        lines.append(f"| {label[c['key']]} | {c['steps']} | {pm(a['overall'])} | {pm(a['large'])} | "
                     f"{pm(a['medium'])} | {pm(a['small'])} |")
    return "\n".join(lines) + "\n"


def figure(rows, meta, path):
    """Accuracy by detail size for every row (bars: mean, whiskers: std over seeds), the no-image level dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width, colours = 0.26, {"large": "#4c72b0", "medium": "#dd8452", "small": "#c44e52"}
    for j, size in enumerate(SIZES):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [100 * r["accuracy"][size]["mean"] for r in rows], width,
               yerr=[100 * r["accuracy"][size]["std"] for r in rows], capsize=2, color=colours[size], label=size)
        ax.hlines(100 * meta["answer_prior"][size], xs[0] - width / 2 - 0.1, xs[-1] + width / 2 + 0.1,
                  colors=colours[size], linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(rows)), [r["label"].replace(", ", ",\n", 1) for r in rows], fontsize=7.5)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Accuracy by detail size, mean ± std over {len(meta['seeds'])} seeds; dashed: without the image",
                 fontsize=10)
    ax.legend(title="detail", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_figure(curve, meta, path):
    """Small- and large-detail accuracy against the steps of both stages, for CURVE_KEYS."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    label = {k: lab for k, lab, _, _ in GRID}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, colour in zip(CURVE_KEYS, ("#4c72b0", "#c44e52")):
        cs = [c for c in curve if c["key"] == key]
        for size, style in (("small", "-o"), ("large", "--s")):
            ax.errorbar([c["steps"] for c in cs], [100 * c["accuracy"][size]["mean"] for c in cs],
                        yerr=[100 * c["accuracy"][size]["std"] for c in cs], fmt=style, color=colour, capsize=2,
                        label=f"{label[key]}: {size}")
    for size, style in (("small", ":"), ("large", "-.")):
        ax.axhline(100 * meta["answer_prior"][size], color="grey", linestyle=style, linewidth=1,
                   label=f"without the image: {size}")
    ax.set_xscale("log")
    ax.set_xlabel("training steps (alignment + instruction)")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Learning curve", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["model", "overall", "large", "medium", "small", "params trained", "first-token MFLOPs", "s / step"]


def markdown(rows, meta):
    pm = lambda a: f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f}"
    lines = [f"Exact-match accuracy (%) of greedy answers on {meta['n_test']} held-out questions (a third per "
             f"detail size), mean ± std over seeds {meta['seeds']}. Every model, batch {meta['batch_size']}: "
             + (f"{meta['align_iters']} steps of its alignment stage, then " if meta["align_iters"] else "")
             + f"{meta['iters']} steps of its instruction stage (learning rates x {meta['lr_scale']}), the same tiny "
             f"{'random' if meta['from_scratch'] else 'pretrained'} ViT/LM and tokenizer. FLOPs: analytic "
             f"(flops.py), first token, 1 FLOP = 1 multiply-add. s / step: median wall time, {meta['jobs']} "
             f"run(s) at a time, {meta['threads']} thread(s) each.",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        a = r["accuracy"]
        lines.append(f"| {r['label']} | {pm(a['overall'])} | {pm(a['large'])} | {pm(a['medium'])} | "
                     f"{pm(a['small'])} | {r['params_trained'] / 1e6:.2f} M | {r['first_token_mflops']:.1f} | "
                     f"{r['s_per_step']['mean']:.2f} ± {r['s_per_step']['std']:.2f} |")
    prior = meta["answer_prior"]
    lines += ["", f"Without the image (the most frequent training answer of each question kind): "
                  f"{100 * prior['overall']:.1f} overall, {100 * prior['large']:.1f} / {100 * prior['medium']:.1f} / "
                  f"{100 * prior['small']:.1f} on large / medium / small.",
              "", f"Command: `{meta['command']}`; wall time {meta['wall_s'] / 60:.1f} min"
                  + (f" ({meta['reused']} of {meta['runs']} runs reused from an earlier result.json)." if meta["reused"]
                     else ".")]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Train and score every nanoHiRes model on the fine-detail set.")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N for every model")
    ap.add_argument("--align_iters", type=int, default=200,
                    help="steps of each paper's alignment stage first (ALIGN; 0: skip it), every model the same")
    ap.add_argument("--iters", type=int, default=600,
                    help="steps of the instruction stage (every model the same)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr_scale", type=float, default=5.0,
                    help="train.py's --lr_scale for every run: scales each recipe's learning rates alike")
    ap.add_argument("--n_train", type=int, default=4000)
    ap.add_argument("--others", type=float, default=0.0,
                    help="chance that each non-target cell holds an item (0: one item per image; 0.8: full scenes)")
    ap.add_argument("--n_test", type=int, default=300, help="test questions (sizes cycle large/medium/small)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, each one thread; 1: all in this process")
    ap.add_argument("--from_scratch", action="store_true", help="random ViT/LM instead of the tiny base")
    ap.add_argument("--only", default="", help="comma-separated grid keys (default: all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "miniature"))
    ap.add_argument("--force", action="store_true", help="retrain even when a run's result.json matches")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 steps of batch 2, 1 seed, 6 test questions, from scratch")
    ap.add_argument("--curve", action="store_true",
                    help=f"also the learning curve: {', '.join(CURVE_KEYS)} at {CURVE_BUDGETS} x both stages' steps")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one (key, --seed) and exit
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.align_iters, args.iters, args.batch_size, args.n_train, args.n_test = 1, 1, 2, 2, 16, 6
        args.from_scratch = True
    keys = [r[0] for r in GRID]
    args.keys = [k for k in args.only.split(",") if k] or keys
    bad = [k for k in args.keys + ([args.one] if args.one else []) if k not in keys]
    if bad:
        ap.error(f"unknown grid key(s) {bad}; the grid has {keys}")
    args.out = os.path.abspath(args.out)
    args.passthrough = [f"--align_iters={args.align_iters}", f"--iters={args.iters}", f"--batch_size={args.batch_size}",
                        f"--n_train={args.n_train}", f"--others={args.others}", f"--lr_scale={args.lr_scale}",
                        f"--n_test={args.n_test}", f"--out={args.out}"] + (["--from_scratch"] if args.from_scratch
                                                                            else []) + (["--force"] if args.force
                                                                                        else [])
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one:
        run_one(args, args.one, args.seed, args.budget)
        return None
    t0 = time.time()
    if not args.from_scratch:
        train.tiny_base()  # shipped: a missing file fails here, not in every run
    # seed by seed (a stopped grid has whole seeds done), the slowest runs of a seed first (CPU time per step
    # measured on the tiny presets), so that the --jobs workers finish together
    order = {k: i for i, k in enumerate(["hire", "pheye", "inf_llava", "inf_llava_dcm_add", "llava_s2",
                                         "pheye_global", "llava"])}
    budgets = CURVE_BUDGETS if args.curve else (1,)
    jobs = [(k, s, b) for k in args.keys for s in range(1, args.seeds + 1) for b in budgets
            if b == 1 or k in CURVE_KEYS]
    jobs.sort(key=lambda j: (j[2] != 1, j[1], order.get(j[0], 9)))  # the grid seed by seed, then the curve
    reused = sum(cached(args, *job) is not None for job in jobs)
    results = []

    def finished(r):
        results.append(r)
        print(f"[{len(results)}/{len(jobs)}] {r['key']} seed {r['seed']} x{r['budget']:g}: accuracy "
              f"{r['accuracy']['overall']:.1%}, "
              f"{r['s_per_step']:.2f} s/step, {(time.time() - t0) / 60:.1f} min", flush=True)

    if args.jobs <= 1:
        for job in jobs:
            finished(run_one(args, *job))
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            for f in as_completed([pool.submit(run_in_child, args, *job) for job in jobs]):
                finished(f.result())
    rows = summarise([r for r in results if r["budget"] == 1])
    meta = dict(command="python bench/miniature.py " + " ".join(argv), wall_s=time.time() - t0,
                seeds=list(range(1, args.seeds + 1)), align_iters=args.align_iters, iters=args.iters, batch_size=args.batch_size,
                n_test=args.n_test, lr_scale=args.lr_scale,
                from_scratch=args.from_scratch, jobs=max(1, args.jobs),
                threads=torch.get_num_threads() if args.jobs <= 1 else 1, others=args.others,
                answer_prior=answer_prior(args.n_test, args.others),
                runs=len(jobs), reused=reused)
    curve = learning_curve(results) if args.curve else []
    table = markdown(rows, meta) + (curve_markdown(curve, meta) if curve else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "miniature.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "miniature.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, curve=curve, runs=results), f, indent=1)
    figure(rows, meta, os.path.join(args.out, "miniature.png"))
    if curve:
        curve_figure(curve, meta, os.path.join(args.out, "curve.png"))
    print(table, end="")
    return rows


if __name__ == "__main__":
    main()
