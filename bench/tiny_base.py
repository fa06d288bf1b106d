"""
The tiny base that the tiny presets start from (assets/): what CLIP and Vicuna / LLaMA-3 / Phi-1.5 are to the
papers' models, built on the synthetic fine-detail set (data.py). Asset-building code, not the training loop.

    python bench/tiny_base.py vit                  # assets/tiny-vit: the ViT, pretrained as a patch classifier
    python bench/tiny_base.py lm                   # assets/tiny-lm: a text-only LM, with the shipped tokenizer
    python bench/tiny_base.py tokenizer --out DIR  # data.build_tiny_tokenizer (assets/tiny-lm holds the shipped one)

The ViT (pretrain_tiny_vit) learns to name the item under every patch, on 64-px tiles of the full 3x3 scenes
rendered at 64, 128 and 192 px (data.patch_example): it sees at the base resolution, and small items only in
the high-resolution tiles. The LM (pretrain_tiny_lm) learns text only: the chat templates, questions, answers and
captions of the synthetic set, never an image token, as the papers' LLMs start. Each directory's
pretraining.json records the recipe, the minutes it took and held-out metrics.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from llm import LLM, LLMConfig, Tokenizer, next_token_loss  # noqa: E402
from train import TINY_LM, TINY_VIT  # noqa: E402


# ----------------------------------------------------------------------------- the tiny ViT
def patch_tensors(n, split, seed=0, scales=(1, 1, 2, 3), others=data.OTHERS, target_tile=False):
    """n examples of data.patch_example (its arguments) as (uint8 images (n, 64, 64, 3), labels (n, 64), items)."""
    ex = [data.patch_example(seed, split, i, scales=scales, others=others, target_tile=target_tile)
          for i in range(n)]
    return (torch.from_numpy(np.stack([e[0] for e in ex])), torch.from_numpy(np.stack([e[1] for e in ex])),
            [e[2] for e in ex])


def vit_pixels(images):
    """uint8 (B, H, W, 3) -> CLIP-normalised float (B, 3, H, W), as data.load_image."""
    return data.clip_normalize(images.permute(0, 3, 1, 2))


def patch_logits(vit, heads, pixels):
    """Item-class logits of every patch token from the penultimate layer (read by LLaVA-1.5, S2, HIRE and
    INF-LLaVA) and the last (read by Pheye): two (B, N, classes) tensors."""
    penultimate = vit(pixels, layer=-2)
    last = vit.layers[-1](penultimate)
    return heads[0](penultimate[:, 1:]), heads[1](last[:, 1:])


@torch.no_grad()
def patch_accuracy(vit, heads, images, items, batch_size=250):
    """Held-out accuracy per (detail size, render scale) of the penultimate layer's reading of each item: the
    argmax over item classes of its patches' mean logits."""
    logits = torch.cat([patch_logits(vit, heads, vit_pixels(images[i:i + batch_size]))[0]
                        for i in range(0, len(images), batch_size)])
    hits = {}
    for row, its in zip(logits, items):
        for cls, size, scale, patches in its:
            hits.setdefault((list(data.SIZES).index(size), scale), []).append(
                row[patches].mean(0)[1:].argmax().item() + 1 == cls)
    return {f"{list(data.SIZES)[k[0]]}@{64 * k[1]}": round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}


def patch_classifier(width):
    """The pretraining heads: one linear item classifier for the penultimate layer's tokens, one for the last's."""
    return torch.nn.ModuleList(torch.nn.Linear(width, len(data.ITEM_CLASSES)) for _ in range(2))


def load_tiny_vit(path=TINY_VIT):
    """A pretrained tiny ViT and its patch classifier, as pretrain_tiny_vit wrote them."""
    from safetensors.torch import load_file
    from vit import ViT
    vit = ViT.from_pretrained(path)
    heads = patch_classifier(vit.config.width)
    heads.load_state_dict(load_file(os.path.join(path, "classifier.safetensors")))
    return vit.eval(), heads


def pretrain_tiny_vit(out, steps=4000, batch_size=64, lr=2e-3, n_train=40000, n_val=1000, seed=0):
    """Pretrain the tiny presets' ViT on data.patch_example (what CLIP is to the papers' models): a linear item
    classifier on the patch tokens of its penultimate and last layers, AdamW (weight decay 0.05), 100 warm-up
    steps then cosine to 0, gradient clipping at 1. Writes the ViT to `out` (HF CLIP layout), the classifier to
    out/classifier.safetensors and the recipe with the held-out accuracies to out/pretraining.json.
    The shipped assets/tiny-vit came from `python bench/tiny_base.py vit` (then train.pretrain_tiny_vit)."""
    from vit import ViT, ViTConfig
    t0 = time.time()
    images, labels, _ = patch_tensors(n_train, "train", seed)
    val_images, _, val_items = patch_tensors(n_val, "val", seed)
    print(f"tiny ViT pretraining: {n_train} + {n_val} crops rendered in {time.time() - t0:.0f} s")
    torch.manual_seed(seed)
    vit = ViT(ViTConfig.preset("tiny"))
    heads = patch_classifier(vit.config.width)
    params = [*vit.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order = torch.Generator().manual_seed(seed)
    for step in (bar := tqdm(range(steps), desc="tiny ViT", dynamic_ncols=True)):
        idx = torch.randint(0, n_train, (batch_size,), generator=order)
        target = labels[idx].flatten()
        loss = sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), target)
                   for lg in patch_logits(vit, heads, vit_pixels(images[idx]))) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    accuracy = patch_accuracy(vit.eval(), heads, val_images, val_items)
    vit.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, os.path.join(out, "classifier.safetensors"))
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, n_train=n_train, n_val=n_val, seed=seed,
                  final_loss=round(loss.item(), 4), minutes=round((time.time() - t0) / 60, 1),
                  val_accuracy=accuracy, classes=data.ITEM_CLASSES)
    with open(os.path.join(out, "pretraining.json"), "w") as f:
        json.dump(recipe, f, indent=1)
    print(f"tiny ViT pretrained in {recipe['minutes']} min, held-out item accuracy {accuracy}")
    return accuracy




# ----------------------------------------------------------------------------- the tiny text-only LM
ANSWERS = {"char": set(data.FONT), "shape": set(data.SHAPES), "dots": {str(n) for n in range(1, 6)}}


READ = 0.5  # share of the LM's text samples that carry a passage in the image's slot (the rest: none)


def passage(scene, seed):
    """What the image shows, as text: each item's position, size, colour and what it is, four word groups in a
    random order (an unordered bag, as an image's tokens are: the LM must find a word by what it is, not by where
    it stands), items in cell order. Deterministic in (scene, seed)."""
    rng = random.Random(f"nanohires-passage-{seed}-{scene['noise_seed']}")
    words = []
    for k, item in enumerate(scene["cells"]):
        if item is not None:
            groups = [data.POSITIONS[k], *data.describe(item).split(" ", 2)]  # position, size, colour, what
            rng.shuffle(groups)
            words += groups
    return " ".join(words)


def text_sample(tok, seed, split, i, others=0.0, prompt_only=False, read=None):
    """Sample i of the synthetic set as text alone, in data.MIX's template i % 4 (a caption for "plain"): (ids,
    answer labels, template, record). The image's slot holds the scene's passage when `read` (default: for a READ
    share of the samples, (i // 4) % 2 == 0, so every template gets both) and nothing otherwise; Pheye's template
    has no slot (its images enter by cross-attention): never a passage. prompt_only: without the answer (QA)."""
    template = data.MIX[i % len(data.MIX)]
    rec, scene = data.synthetic_record(seed, split, i, "caption" if template == "plain" else "qa", others)
    turns = rec["conversations"][:-1] if prompt_only else rec["conversations"]
    ids, labels = data.tokenize_conversation(tok, turns, template)
    read = (i // len(data.MIX)) % round(1 / READ) == 0 if read is None else read
    text = tok.encode(passage(scene, seed)) if read else []
    out_ids, out_labels = [], []
    for t, y in zip(ids, labels):
        if t == data.IMAGE_ID:
            out_ids += text
            out_labels += [data.IGNORE] * len(text)
        else:
            out_ids.append(t)
            out_labels.append(y)
    return out_ids, out_labels, template, rec


def text_batch(samples, pad_id, left=False):
    """[(ids, labels), ...] -> ids, labels (every real token for a text LM: "all"; answers only: "answer"), mask."""
    T = max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), T), pad_id)
    every, answer, mask = torch.full_like(ids, data.IGNORE), torch.full_like(ids, data.IGNORE), torch.zeros_like(ids)
    for b, (x, y) in enumerate(samples):
        sl = slice(T - len(x), T) if left else slice(0, len(x))
        ids[b, sl], every[b, sl], answer[b, sl], mask[b, sl] = torch.tensor(x), torch.tensor(x), torch.tensor(y), 1
    return ids, every, answer, mask


@torch.no_grad()
def lm_metrics(lm, tok, n_val=512, n_questions=240, seed=0, others=0.0, batch_size=48):
    """Held-out (val split) metrics of a text-only LM: token loss over all text and over answers alone, and its
    greedy answers to n_questions questions from the text alone: exact match (the no-image level at best) and the
    share of well-formed answers (a character, a shape or a count, as the question kind asks); and read_exact_match,
    the same questions (those whose template has an image slot) with the scene's passage in the slot: how well the
    LM reads its context, what a projector into it can use."""
    lm.eval()
    pad = data.pad_id_of(tok)
    val = [text_sample(tok, seed, "val", i, others)[:2] for i in range(n_val)]
    sums = {"all": [0.0, 0], "answer": [0.0, 0]}
    for k in range(0, n_val, batch_size):
        ids, every, answer, _ = text_batch(val[k:k + batch_size], pad)
        logits = lm(ids)
        for name, labels in (("all", every), ("answer", answer)):
            sums[name][0] += next_token_loss(logits, labels, reduction="sum").item()
            sums[name][1] += data.count_targets(labels).item()
    qa = [i for i in range(4 * n_questions) if data.MIX[i % len(data.MIX)] != "plain"][:n_questions]
    scores = {}
    for read in (False, True):
        slot = [i for i in qa if not read or data.MIX[i % len(data.MIX)] != "pheye"]  # Pheye's has no slot
        qs = [text_sample(tok, seed, "val", i, others, prompt_only=True, read=read) for i in slot]
        right = formed = 0
        for k in range(0, len(qs), batch_size):
            part = qs[k:k + batch_size]
            ids, _, _, mask = text_batch([(q[0], q[0]) for q in part], pad, left=True)
            eos = sorted({data.end_of_turn(tok, q[2]) for q in part})
            out = lm.generate(ids, max_new_tokens=6, eos_id=eos, mask=mask)[:, ids.shape[1]:]
            for row, (_, _, _, rec) in zip(out.tolist(), part):
                said = data.normalize_answer(data.answer_text(tok, row))
                right += said == data.normalize_answer(rec["conversations"][1]["value"])
                formed += said.upper() in {a.upper() for a in ANSWERS[rec["kind"]]}
        scores[read] = (right / len(qs), formed / len(qs))
    lm.train()
    return dict(val_loss=round(sums["all"][0] / sums["all"][1], 4),
                val_answer_loss=round(sums["answer"][0] / sums["answer"][1], 4),
                answers_exact_match=round(scores[False][0], 4), answers_well_formed=round(scores[False][1], 4),
                read_exact_match=round(scores[True][0], 4), n_val=n_val, n_questions=len(qa))


FORMAT_GATE = 0.9  # the least share of well-formed greedy answers for a tiny LM to be kept


def pretrain_tiny_lm(out=TINY_LM, tokenizer=TINY_LM, steps=2000, batch_size=32, lr=2e-3, n_train=20000, seed=0,
                     others=0.0, gate=FORMAT_GATE):
    """Pretrain the tiny presets' LM on text alone, what the papers' LLMs are before any image: sample i of the
    synthetic train split (seed 0, `others` as train.py's) in data.MIX's template i % 4, the image slot holding the
    scene's passage in half of them and nothing in the rest (text_sample), every token supervised, the passage's too
    (questions, answers, captions, the templates' fixed text). The passage is what makes it a reader: a real LLM
    answers from what its context says, and LLaVA's alignment stage, which trains only a projector into the frozen
    LLM, relies on that; an LM that never had to read its context has no circuit for a projector to use (the LM
    built without passages answered as well with the scene's description in front as without it). AdamW (weight
    decay 0.1), 50 warm-up steps, cosine to 0.1 x lr, gradient clipping at 1. Then lm_metrics on the val split; an
    LM whose greedy answers are well-formed less than `gate` of the time is refused (its format is not learnt).
    Writes the LM (HF LLaMA layout) with the tokenizer (from `tokenizer`; the shipped one by default) and
    pretraining.json. The shipped assets/tiny-lm came from `python bench/tiny_base.py lm` (this function with its
    defaults)."""
    t0 = time.time()
    tok = Tokenizer.from_pretrained(tokenizer)
    pad = data.pad_id_of(tok)
    pool = [text_sample(tok, seed, "train", i, others)[:2] for i in range(n_train)]
    torch.manual_seed(seed)
    lm = LLM(LLMConfig.preset("tiny"))
    decay = [p for p in lm.parameters() if p.dim() >= 2]
    rest = [p for p in lm.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    order = torch.Generator().manual_seed(seed)
    for step in (bar := tqdm(range(steps), desc="tiny LM (text)", dynamic_ncols=True)):
        idx = torch.randint(0, n_train, (batch_size,), generator=order).tolist()
        ids, every, _, _ = text_batch([pool[i] for i in idx], pad)
        loss = next_token_loss(lm(ids), every)  # right padding: causal attention never reads it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    metrics = lm_metrics(lm, tok, seed=seed, others=others)
    print(f"tiny text LM: held-out {metrics}")
    if metrics["answers_well_formed"] < gate:
        raise RuntimeError(f"the tiny LM answers in the asked form {metrics['answers_well_formed']:.0%} of the time "
                           f"(< {gate:.0%}): it has not learnt the templates; {out} not written")
    lm.save_pretrained(out)
    if os.path.abspath(tokenizer) != os.path.abspath(out):
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(os.path.join(tokenizer, name), out)
    recipe = dict(what="text only: data.MIX templates over synthetic questions, answers and captions, no image; "
                       f"in {READ:.0%} of them the scene's passage (an unordered bag of its items' words) fills the "
                       "image's slot",
                  steps=steps, batch_size=batch_size, lr=lr, n_train=n_train, seed=seed, others=others,
                  final_loss=round(loss.item(), 4), minutes=round((time.time() - t0) / 60, 1),
                  threads=torch.get_num_threads(), held_out=metrics,
                  note="1 thread on the shared 2-core CPU",
                  unchanged="assets/tiny-vit (pretrain_tiny_vit on data.patch_example: its recipe and draws did "
                            "not change) and the tokenizer were not rebuilt with this LM. The tokenizer's corpus "
                            "(data.tiny_corpus) has since changed only in how often the vicuna system line appears "
                            "(issue 16's template fix); the shipped tokenizer covers every text the LM trains on "
                            "(tests/test_data.py), and a rebuilt one would renumber the pieces for no gain")
    with open(os.path.join(out, "pretraining.json"), "w") as f:
        json.dump(recipe, f, indent=1)
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the tiny base of the tiny presets (assets/).")
    p.add_argument("what", choices=("vit", "lm", "tokenizer"))
    p.add_argument("--out", default="", help="output directory (default: assets/tiny-vit or assets/tiny-lm)")
    a = p.parse_args(argv)
    if a.what == "vit":
        pretrain_tiny_vit(a.out or TINY_VIT)
    elif a.what == "lm":
        pretrain_tiny_lm(a.out or TINY_LM)
    else:
        print(data.build_tiny_tokenizer(a.out or p.error("tokenizer: give --out DIR")))


if __name__ == "__main__":
    main()
