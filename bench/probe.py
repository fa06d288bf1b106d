"""
What the language model is given to read: a linear probe of each trained grid checkpoint's visual tokens.

    python bench/probe.py                      # every run of out/miniature/runs (the grid's), 2 at a time
    python bench/probe.py --only llava,hire --seeds 1    # re-probe some rows; probe.json keeps the others

The miniature's answers mix two things: whether an item's identity reaches the LM's visual input at all, and
whether the LM learnt to read it there within the budget. This separates them. For each checkpoint the visual
tokens the LM attends to are computed for held-out one-item images (LLaVA-1.5, S2, HIRE and INF-LLaVA: the
projector's output, the tokens spliced into the prompt; Pheye: encode_image's tokens, which its cross-attention
reads), pooled over the tokens (mean and max, concatenated), and a multinomial logistic regression learns the
item's class (the answer) from them on the val split (never trained on) and is scored on the grid's test
questions, per detail size. Answers are scored as bench/miniature.py scores them (its result.json, beside).
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import data  # noqa: E402
from miniature import GRID, TEST_SEED, load_run, mean_std  # noqa: E402

SIZES = tuple(data.SIZES)


def visual_tokens(net, model, pixels):
    """(B, N, D): what the LM reads of these images (see the module docstring)."""
    return net.encode_image(pixels) if model == "pheye" else net.encode_images(pixels)


@torch.no_grad()
def pooled_features(net, model, tok, split, n, batch_size=50):
    """(features (n', 2D), answers, detail sizes) of the first n questions of a synthetic split (one item per
    image), the tokens mean- and max-pooled."""
    ds = data.SyntheticDataset(tok, n=n, split=split, seed=TEST_SEED, image_size=net.config.image_size, others=0.0)
    feats, answers, sizes = [], [], []
    for a in range(0, n, batch_size):
        samples = [ds.sample(i) for i in range(a, min(n, a + batch_size))]  # (pixels, ids, labels, record)
        t = visual_tokens(net, model, torch.stack([s[0] for s in samples])).float()
        feats.append(torch.cat([t.mean(1), t.amax(1)], dim=1))
        answers += [s[3]["conversations"][1]["value"] for s in samples]
        sizes += [s[3]["detail"] for s in samples]
    return torch.cat(feats), answers, sizes


def fit_probe(x, y, classes, steps=300, weight_decay=1e-3):
    """Multinomial logistic regression on standardised features (full-batch L-BFGS). Returns predict(x)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    z = (x - mu) / sd
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda x_new: (((x_new - mu) / sd) @ w + b).argmax(1)


def probe_run(run_dir, model, n_fit, n_test):
    """Probe accuracy per detail size (and overall) of one checkpoint."""
    net, tok = load_run(run_dir, model)
    x_fit, a_fit, _ = pooled_features(net, model, tok, "val", n_fit)
    x_test, a_test, s_test = pooled_features(net, model, tok, "test", n_test)
    names = sorted(set(a_fit) | set(a_test))
    y_fit = torch.tensor([names.index(a) for a in a_fit])
    y_test = torch.tensor([names.index(a) for a in a_test])
    hit = (fit_probe(x_fit, y_fit, len(names))(x_test) == y_test).tolist()
    acc = {s: sum(h for h, z in zip(hit, s_test) if z == s) / s_test.count(s) for s in SIZES}
    acc["overall"] = sum(hit) / len(hit)
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--runs", default=os.path.join(ROOT, "out", "miniature", "runs"))
    ap.add_argument("--only", default="", help="comma-separated grid keys (default: all)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n_fit", type=int, default=1500, help="val-split questions the probe is fit on")
    ap.add_argument("--n_test", type=int, default=300, help="test questions (the grid's)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # internal: one run directory, one thread; prints its JSON
        key = os.path.basename(args.one).rsplit("-seed", 1)[0]
        model = next(r[2] for r in GRID if r[0] == key)
        print(json.dumps(probe_run(args.one, model, args.n_fit, args.n_test)))
        return
    keys = [k for k in args.only.split(",") if k] or [r[0] for r in GRID]
    runs = [(k, s) for s in range(1, args.seeds + 1) for k in keys]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def one(job):
        run_dir = os.path.join(args.runs, f"{job[0]}-seed{job[1]}")
        out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={run_dir}", f"--n_fit={args.n_fit}",
                              f"--n_test={args.n_test}"], env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"probe of {run_dir} failed:\n{out.stderr[-2000:]}")
        with open(os.path.join(run_dir, "result.json")) as f:
            answered = json.load(f)["accuracy"]
        return job, json.loads(out.stdout.strip().splitlines()[-1]), answered

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, runs))
    pm = lambda v: "{mean:.1f} ± {std:.1f}".format(**mean_std([100 * x for x in v]))
    print(f"Linear probe of the LM's visual tokens ({args.n_fit} val questions to fit, the {args.n_test} test "
          f"questions to score), against the answers' exact match; mean ± std over seeds\n")
    print("| model | probe large | probe medium | probe small | answers large | answers medium | answers small |")
    print("|---|---|---|---|---|---|---|")
    for key, label, _, _ in GRID:
        rs = [(p, a) for (k, _), p, a in results if k == key]
        if rs:
            print(f"| {label} | " + " | ".join(pm([r[i][s] for r in rs]) for i in (0, 1) for s in SIZES) + " |")
    save_results(os.path.join(args.runs, "..", "probe.json"),
                 [dict(key=k, seed=s, probe=p, answers=a) for (k, s), p, a in results])


def save_results(path, rows):
    """Writes rows to path; rows of other (key, seed) pairs already there are kept (a run with --only re-probes some
    rows without dropping the rest)."""
    new = {(r["key"], r["seed"]) for r in rows}
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [r for r in json.load(f) if (r["key"], r["seed"]) not in new]
    with open(path + ".tmp", "w") as f:
        json.dump(kept + rows, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
