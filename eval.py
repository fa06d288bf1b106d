"""
Score a checkpoint on the papers' benchmarks, the way their authors scored them: LLaVA-1.5's question files and
prompts, greedy answers, and each benchmark's official metric.

    python eval.py --bench=textvqa --ckpt=out/llava/ckpt --questions=llava_textvqa_val_v051_ocr.jsonl \
        --images=train_images --annotations=TextVQA_0.5.1_val.json
    python eval.py --bench=synthetic --ckpt=out/pheye/ckpt          # the built-in fine-detail set, no files

The answers go to --answers (LLaVA's answers format, one JSON line per question, written batch by batch: an
interrupted run started again continues after the last written answer); the score is printed and written beside
them (.score.json). Every field of EvalConfig is an option --key=value. README.md, "Evaluate on the papers'
benchmarks", gives each benchmark's command and files.
"""
import dataclasses
import json
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from difflib import SequenceMatcher
from importlib import import_module
from statistics import mean

import torch
from tqdm import tqdm

import data
import train
from llm import Tokenizer


@dataclass
class EvalConfig:
    bench: str = "synthetic"      # one of BENCHMARKS
    ckpt: str = ""                # a checkpoint of train.py (OUT_DIR/ckpt) or any Model.save directory
    release: str = ""             # a released checkpoint's directory, read by <Model>.from_release (needs --model)
    vit: str = ""                 # --release: the vision tower's directory, where the release does not hold it
    llm: str = ""                 # --release of Pheye: the decoder's directory (its config.json and tokenizer)
    model: str = ""               # one of train.MODELS; default: the checkpoint's train_state.pt says
    tokenizer: str = ""           # default: the checkpoint's (train.py copies it in) or the release's directory
    template: str = ""            # chat template; default: the one the checkpoint's last stage trained with
    questions: str = ""           # LLaVA-1.5 question file (.jsonl; ScienceQA: its .json list)
    images: str = ""              # image folder the question file's "image" fields are relative to
    annotations: str = ""         # the benchmark's own ground truth (file, or folder for POPE and MME)
    areas: str = ""               # scores by tertile of answer area (Pheye Table 2) from TextVQA's Rosetta OCR
                                  # file (textvqa) or COCO's instances_val2014.json (vqav2)
    answers: str = ""             # answers file; default out/eval/<checkpoint name>-<bench>.jsonl
    suffix: str = "llava"         # "llava": LLaVA-1.5's answer-format line; "none": the bare question; else this
    ocr: bool = True              # keep TextVQA's "Reference OCR token:" line (LLaVA-1.5); Pheye reads without
    limit: int = 0                # score only the first N questions (0: all)
    batch_size: int = 8
    max_new_tokens: int = 128     # LLaVA's model_vqa_loader default; short answers stop at the end-of-turn
    device: str = "auto"          # auto | cpu | cuda
    dtype: str = "auto"           # auto (bf16 on a GPU that has it, else fp32) | float32 | bfloat16 | float16
    num_workers: int = 2          # DataLoader workers decoding images
    n: int = 300                  # synthetic: questions, split and seed (bench/miniature.py's test set)
    split: str = "test"
    seed: int = 0
    others: float = 0.0           # synthetic: chance that each non-target cell holds an item (train.py's --others)


# ----------------------------------------------------------------------------- prompts (LLaVA-1.5 conventions)
SHORT = "Answer the question using a single word or phrase."            # short answers (VQAv2, GQA, TextVQA...)
LETTER = "Answer with the option's letter from the given choices directly."  # multiple choice (ScienceQA)
OCR_LINE = "Reference OCR token:"                                        # llava_textvqa_val_v051_ocr.jsonl


def make_prompt(text, suffix="llava", ocr=True):
    """A question file's text ("question[\\nReference OCR token: ...]\\nSUFFIX") as the model is asked it:
    suffix "llava" keeps LLaVA's answer-format line, "none" drops it, any other text replaces it; ocr=False
    drops TextVQA's OCR-token line."""
    lines = text.split("\n")
    if suffix != "llava" and lines[-1] in (SHORT, LETTER):
        lines = lines[:-1]
    if not ocr:
        lines = [line for line in lines if not line.startswith(OCR_LINE)]
    if suffix not in ("llava", "none"):
        lines.append(suffix)
    return "\n".join(lines)


def question_of(text):
    """The question itself: the first line that is neither an OCR-token line nor the answer-format line."""
    return next((line for line in text.split("\n") if not line.startswith(OCR_LINE)), text).strip()


# ----------------------------------------------------------------------------- answer normalisation
# The VQA evaluators' normalisation (GT-Vision-Lab/VQA vqaEval.py, also VizWiz's): punctuation, then number
# words, articles and contractions. EvalAI's answer processor (LLaVA's m4c_evaluator.py, used for TextVQA and
# applied to VQAv2/VizWiz answers before upload) first lower-cases, drops "," and "?" and splits off "'s".
CONTRACTIONS = dict(pair.split("=") for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
    "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've "
    "shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've "
    "somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've "
    "someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd "
    "somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's "
    "thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd "
    "theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't "
    "wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's "
    "whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've "
    "who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't "
    "wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all "
    "yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've "
    "youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've").split())
NUMBERS = {w: str(k) for k, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCT = ';/[]"{}()=+\\_-><@`,?!'
# sic: the official "(?!<=" is a lookahead, not a lookbehind: every full stop not followed by a digit goes
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def process_punctuation(s):
    """vqaEval.processPunctuation: a mark next to a blank (or any mark, when a comma sits between digits) is
    deleted, else it becomes a blank; then full stops not followed by a digit go."""
    out = s
    for p in PUNCT:
        if p + " " in s or " " + p in s or COMMA_DIGITS.search(s):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out, count=re.UNICODE)  # sic: the official passes re.UNICODE (32) as the count


def process_digit_article(s):
    """vqaEval.processDigitArticle: lower case, number words to digits, articles dropped, contractions fixed."""
    words = [NUMBERS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_normalize(s):
    return process_digit_article(process_punctuation(s))


def evalai_normalize(s):
    """EvalAI's answer processor (LLaVA's m4c_evaluator.EvalAIAnswerProcessor)."""
    s = s.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(s.replace("\n", " ").replace("\t", " ").strip())


# ----------------------------------------------------------------------------- metrics
def vqa_accuracy(pred, answers, rule="vqav2"):
    """VQA accuracy of one answer against the annotators' answers: min(#matching / 3, 1) averaged over the
    subsets that leave one annotator out (10 choose 9). Normalisation per rule, as each official evaluator:
    "vqav2" (vqaEval.py) normalises both sides only when the annotators disagree; "vizwiz" always the prediction
    and never the (pre-normalised) annotations; "textvqa" (m4c TextVQAAccuracyEvaluator) both, always, with
    EvalAI's processor."""
    if rule not in ("vqav2", "vizwiz", "textvqa"):
        raise ValueError(f"vqa_accuracy: unknown rule {rule!r} (vqav2, vizwiz or textvqa)")
    if not answers:
        raise ValueError("vqa_accuracy: no annotator answers")
    clean = lambda s: s.replace("\n", " ").replace("\t", " ").strip()
    if rule == "textvqa":
        pred, answers = evalai_normalize(pred), [evalai_normalize(a) for a in answers]
    else:
        pred, answers = clean(pred), [clean(a) for a in answers]
        if rule == "vizwiz" or len(set(answers)) > 1:
            pred = vqa_normalize(pred)
        if rule == "vqav2" and len(set(answers)) > 1:
            answers = [vqa_normalize(a) for a in answers]
    return mean(min(1.0, sum(a == pred for k, a in enumerate(answers) if k != j) / 3) for j in range(len(answers)))


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(pred, answers, threshold=0.5):
    """Average Normalized Levenshtein Similarity of one answer (DocVQA/InfoVQA, the RRC's official script):
    1 - the least edit distance to an answer (case and runs of blanks ignored) over the longer string's length;
    a similarity below threshold scores 0."""
    norm = lambda s: " ".join(s.strip().lower().split())
    dist = [levenshtein(norm(a), norm(pred)) / max(len(a), len(pred)) if max(len(a), len(pred)) else 0.0
            for a in answers]
    score = 1 - min(dist)
    return 0.0 if score < threshold else score


def pope_says_yes(text):
    """LLaVA's eval_pope.py reading: the first sentence, commas dropped; "no" if a word is No, no or not."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ({"No", "no", "not"} & set(words))


def yes_no_metrics(said_yes, truth_yes):
    """POPE's accuracy, precision, recall, F1 and yes-ratio (in %) of yes/no answers; nan where undefined."""
    tp = sum(s and t for s, t in zip(said_yes, truth_yes))
    fp = sum(s and not t for s, t in zip(said_yes, truth_yes))
    tn = sum(not s and not t for s, t in zip(said_yes, truth_yes))
    fn = len(said_yes) - tp - fp - tn
    div = lambda a, b: a / b if b else float("nan")
    p, r = div(tp, tp + fp), div(tp, tp + fn)
    return {"accuracy": 100 * (tp + tn) / len(said_yes), "precision": 100 * p, "recall": 100 * r,
            "f1": 100 * div(2 * p * r, p + r), "yes_ratio": 100 * (tp + fp) / len(said_yes),
            "n": len(said_yes), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def gqa_answer(text):
    """LLaVA's convert_gqa_for_eval.py: a final full stop dropped, lower case; GQA's eval.py compares exactly."""
    return text.rstrip(".").lower()


def sqa_letter(text, options="ABCDE"):
    """LLaVA's eval_science_qa.py: the letter itself, "A. ..." or one "The answer is A."; else FAILED."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def mme_yes_no(text):
    """MME's eval_tool/calculation.py: "yes"/"no", else whichever of them the first four characters hold."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    return "yes" if "yes" in t[:4] else "no" if "no" in t[:4] else "other"


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(rows):
    """rows: (category, image, truth "yes"/"no", answer text). Per category 100 * (accuracy + acc+), acc+ being
    the share of images whose two questions are both right; perception and cognition are sums over categories."""
    by_cat = {}
    for cat, image, truth, said in rows:
        by_cat.setdefault(cat, {}).setdefault(image, []).append(mme_yes_no(said) == truth.lower())
    out = {}
    for cat, images in by_cat.items():
        bad = [im for im, hits in images.items() if len(hits) != 2]
        if bad:
            raise ValueError(f"MME: every image has two questions; {cat}/{bad[0]} has {len(images[bad[0]])}")
        acc = mean(h for hits in images.values() for h in hits)
        acc_plus = mean(all(hits) for hits in images.values())
        out[cat] = 100 * (acc + acc_plus)
    return {"perception": sum(out.get(c, 0.0) for c in MME_PERCEPTION),
            "cognition": sum(out.get(c, 0.0) for c in MME_COGNITION), "categories": out}


def exact_match(said, truth):
    """The synthetic set's exact match (data.normalize_answer: case, blanks and a final full stop ignored)."""
    return data.normalize_answer(said) == data.normalize_answer(truth)


# ----------------------------------------------------------------------------- answer area (Pheye Table 2)
def answer_area(texts, candidates):
    """Pheye Sec. 3.3: of the image's (name, relative area) candidates, the area of the one whose name has the
    highest mean similarity to the texts (the annotators' answers), by difflib's longest-contiguous-matching-
    subsequence ratio. None when there is no candidate. TextVQA: its OCR tokens and boxes; VQAv2: its COCO
    objects' category names and segmentation areas, matched to the question for yes/no and number answers."""
    if not candidates:
        return None
    sim = lambda name: mean(SequenceMatcher(None, name.lower(), t.lower()).ratio() for t in texts)
    return max(candidates, key=lambda c: sim(c[0]))[1]


def by_tertile(scores, areas):
    """Mean score (%) in each third of the samples ordered by relative answer area (Pheye Table 2: bottom =
    the finest details); samples without an area are left out."""
    known = sorted(((a, s) for s, a in zip(scores, areas) if a is not None), key=lambda x: x[0])  # ties: in order
    cut = [round(len(known) * k / 3) for k in range(4)]
    return {name: 100 * mean(s for _, s in known[cut[k]:cut[k + 1]]) if cut[k + 1] > cut[k] else float("nan")
            for k, name in enumerate(("bottom", "middle", "top"))}


# ----------------------------------------------------------------------------- benchmarks
# Each reader turns the question file (+ annotations) into samples: {"question_id", "image" (a path), "text"
# (the question file's prompt text), "truth" (what its scorer needs), optional "group", "area"}.
def read_json(path, what):
    if not path:
        raise ValueError(f"--{what} is needed for this benchmark")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{what}: {path} does not exist")
    with open(path) as f:
        if not path.endswith(".jsonl"):
            return json.load(f)
        rows = []
        for k, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {k}: not valid JSON ({e})") from None
        return rows


def llava_questions(cfg):
    """LLaVA-1.5 question lines {"question_id", "image", "text"[, "category"]} as samples without truth."""
    rows = read_json(cfg.questions, "questions")
    for k, r in enumerate(rows):
        missing = {"question_id", "image", "text"} - set(r)
        if missing:
            raise ValueError(f"{cfg.questions}: question {k} has no {', '.join(sorted(missing))}")
    return [{"question_id": r["question_id"], "image": os.path.join(cfg.images, r["image"]), "text": r["text"],
             "group": r.get("category"), "area": r.get("area")} for r in rows]  # area: optional, for tertiles


def lookup(table, key, sample, what):
    if key not in table:
        raise KeyError(f"question {sample['question_id']!r}: no ground truth for {key!r} in {what}")
    return table[key]


def read_textvqa(cfg):
    """TextVQA val: LLaVA's llava_textvqa_val_v051_ocr.jsonl + TextVQA_0.5.1_val.json, matched as LLaVA's
    eval_textvqa.py does, on (image id, lower-cased question); --areas (the Rosetta OCR file, boxes in image
    fractions) adds each answer's area."""
    samples = llava_questions(cfg)
    table = {}
    for a in read_json(cfg.annotations, "annotations")["data"]:
        for key in (a["image_id"], a["question_id"]):
            table[(str(key), a["question"].lower())] = a
    ocr = {}
    if cfg.areas:
        ocr = {o["image_id"]: [(w["word"], w["bounding_box"]["width"] * w["bounding_box"]["height"])
                               for w in o.get("ocr_info", [])] for o in read_json(cfg.areas, "areas")["data"]}
    for s in samples:
        a = lookup(table, (str(s["question_id"]), question_of(s["text"]).lower()), s, cfg.annotations)
        s["truth"] = a["answers"]
        if cfg.areas:
            s["area"] = answer_area(a["answers"], ocr.get(a["image_id"], []))
    return samples


def read_vqav2(cfg):
    """VQAv2: LLaVA's llava_vqav2_mscoco_*.jsonl; with --annotations (v2_mscoco_val2014_annotations.json) also
    scored (test-dev has its answers on the EvalAI server only: upload the -upload.json file); --areas
    (COCO's instances file) adds each answer's area."""
    samples = llava_questions(cfg)
    if cfg.annotations:
        table = {a["question_id"]: a for a in read_json(cfg.annotations, "annotations")["annotations"]}
        for s in samples:
            a = lookup(table, s["question_id"], s, cfg.annotations)
            s["truth"] = [x["answer"] for x in a["answers"]]
            s["image_id"], s["answer_type"] = a["image_id"], a.get("answer_type")
    if cfg.areas:
        if not cfg.annotations:
            raise ValueError("--areas for vqav2 needs --annotations (they give each question's image)")
        coco = read_json(cfg.areas, "areas")
        names = {c["id"]: c["name"] for c in coco["categories"]}
        size = {im["id"]: im["width"] * im["height"] for im in coco["images"]}
        objects = {}
        for o in coco["annotations"]:
            objects.setdefault(o["image_id"], []).append((names[o["category_id"]], o["area"] / size[o["image_id"]]))
        for s in samples:  # yes/no and number answers name no object: the question is matched instead
            texts = [question_of(s["text"])] if s["answer_type"] in ("yes/no", "number") else s["truth"]
            s["area"] = answer_area(texts, objects.get(s["image_id"], []))
    return samples


def read_vizwiz(cfg):
    """VizWiz: LLaVA's llava_test.jsonl (or a val question file); --annotations (val.json) matched by image."""
    samples = llava_questions(cfg)
    if cfg.annotations:
        table = {a["image"]: [x["answer"] for x in a["answers"]] for a in read_json(cfg.annotations, "annotations")}
        for s in samples:
            s["truth"] = lookup(table, os.path.basename(s["image"]), s, cfg.annotations)
    return samples


def read_docvqa(cfg):
    """DocVQA / InfographicVQA val: their own annotation file ({"data": [{"questionId", "question", "image" or
    "image_local_name", "answers"}]}), asked with LLaVA's short-answer line; or a LLaVA question file whose
    question_id is the questionId."""
    table = {a["questionId"]: a for a in read_json(cfg.annotations, "annotations")["data"]}
    if cfg.questions:
        samples = llava_questions(cfg)
    else:
        samples = [{"question_id": q, "image": os.path.join(cfg.images, a.get("image") or a["image_local_name"]),
                    "text": a["question"] + "\n" + SHORT} for q, a in table.items()]
    for s in samples:
        s["truth"] = lookup(table, s["question_id"], s, cfg.annotations)["answers"]
    return samples


def read_gqa(cfg):
    """GQA testdev-balanced: LLaVA's llava_gqa_testdev_balanced.jsonl + testdev_balanced_questions.json."""
    samples = llava_questions(cfg)
    table = read_json(cfg.annotations, "annotations")
    for s in samples:
        s["truth"] = lookup(table, str(s["question_id"]), s, cfg.annotations)["answer"]
    return samples


def read_pope(cfg):
    """POPE: LLaVA's llava_pope_test.jsonl (a "category" per question) + POPE's coco_pope_<category>.json label
    files, paired in order within a category as LLaVA's eval_pope.py does (checked on the question text)."""
    samples = llava_questions(cfg)
    if any(s["group"] is None for s in samples):
        raise ValueError(f"{cfg.questions}: POPE questions need a 'category' (random, popular or adversarial)")
    for cat in sorted({s["group"] for s in samples}):
        mine = [s for s in samples if s["group"] == cat]
        labels = _read_lines(os.path.join(cfg.annotations, f"coco_pope_{cat}.json"))
        if len(labels) != len(mine):
            raise ValueError(f"POPE {cat}: {len(mine)} questions but {len(labels)} labels")
        for s, lab in zip(mine, labels):
            if " ".join(question_of(s["text"]).lower().split()) != " ".join(lab["text"].lower().split()):
                raise ValueError(f"POPE {cat}: question {s['question_id']!r} reads {question_of(s['text'])!r} "
                                 f"but its label line is for {lab['text']!r}")
            s["truth"] = lab["label"] == "yes"
    return samples


def _read_lines(path):
    """A JSON-lines file whatever its extension (POPE's coco_pope_*.json)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_sqa(cfg):
    """ScienceQA-IMG: LLaVA's llava_test_CQM-A.json (conversations) + ScienceQA's problems.json; the questions
    with an image, asked as LLaVA's model_vqa_science.py --single-pred-prompt does."""
    problems = read_json(cfg.annotations, "annotations")
    samples = []
    for r in read_json(cfg.questions, "questions"):
        if "image" not in r:
            continue  # IMG accuracy counts the questions with an image; ours all need one
        text = r["conversations"][0]["value"].replace(data.IMAGE_TOKEN, "").strip() + "\n" + LETTER
        s = {"question_id": r["id"], "image": os.path.join(cfg.images, r["image"]), "text": text}
        p = lookup(problems, r["id"], s, cfg.annotations)
        s["truth"] = (p["answer"], len(p["choices"]))
        samples.append(s)
    return samples


YES_NO = "Please answer yes or no."


def read_mme(cfg):
    """MME: LLaVA's llava_mme.jsonl + the MME_Benchmark_release_version folder, whose <category>/[questions_
    answers_YN/]<image>.txt files hold "question<TAB>answer" lines."""
    samples = llava_questions(cfg)
    for s in samples:
        cat = s["group"] or str(s["question_id"]).split("/")[0]
        name = os.path.splitext(os.path.basename(s["image"]))[0] + ".txt"
        path = next((p for p in (os.path.join(cfg.annotations, cat, "questions_answers_YN", name),
                                 os.path.join(cfg.annotations, cat, name)) if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"MME: no ground truth {cat}/{name} for question {s['question_id']!r} "
                                    f"under {cfg.annotations}")
        with open(path) as f:
            table = dict(line.strip().split("\t") for line in f if line.strip())
        # LLaVA's file replaced MME's "Please answer yes or no." by its short-answer line; its
        # convert_answer_to_mme.py puts it back (with the two blanks some of MME's files have) to find the truth
        q = question_of(s["text"])
        keys = [q] if q.endswith(YES_NO) else [f"{q} {YES_NO}", f"{q}  {YES_NO}"]
        key = next((k for k in keys if k in table), keys[0])
        s["group"], s["truth"] = cat, lookup(table, key, s, path).strip()
    return samples


def score(bench, samples, said):
    """The benchmark's score (in %, or MME's points) of the answers `said` (one per sample, in order)."""
    truth = [s.get("truth") for s in samples]
    if bench in ("textvqa", "vqav2", "vizwiz"):
        if any(t is None for t in truth):
            return {"note": "no --annotations: answers written, nothing to score (upload the -upload.json file)"}
        rule = "textvqa" if bench == "textvqa" else bench  # VQAv2/VizWiz answers are uploaded EvalAI-processed
        pred = said if bench == "textvqa" else [evalai_normalize(a) for a in said]
        acc = [vqa_accuracy(p, t, rule) for p, t in zip(pred, truth)]
        out = {"accuracy": 100 * mean(acc), "n": len(acc)}
        if any(s.get("area") is not None for s in samples):
            out["by_area_tertile"] = by_tertile(acc, [s.get("area") for s in samples])
        return out
    if bench in ("docvqa", "infovqa"):
        return {"anls": 100 * mean(anls(a, t) for a, t in zip(said, truth)), "n": len(said)}
    if bench == "gqa":
        return {"accuracy": 100 * mean(gqa_answer(a) == t for a, t in zip(said, truth)), "n": len(said)}
    if bench == "sqa":
        hits = [sqa_letter(a) == "ABCDE"[k] for a, (k, n) in zip(said, truth)]  # a letter past the choices: wrong
        return {"img_accuracy": 100 * mean(hits), "n": len(hits)}
    if bench == "pope":
        out = {}
        for cat in sorted({s["group"] for s in samples}):
            rows = [(pope_says_yes(a), t) for a, t, s in zip(said, truth, samples) if s["group"] == cat]
            out[cat] = yes_no_metrics(*zip(*rows))
        return out
    if bench == "mme":
        return mme_scores([(s["group"], s["image"], t, a) for s, t, a in zip(samples, truth, said)])
    raise ValueError(f"--bench={bench!r}: one of {', '.join(BENCHMARKS)}")


BENCHMARKS = {"textvqa": read_textvqa, "vqav2": read_vqav2, "vizwiz": read_vizwiz, "docvqa": read_docvqa,
              "infovqa": read_docvqa, "gqa": read_gqa, "pope": read_pope, "sqa": read_sqa, "mme": read_mme,
              "synthetic": None}


# ----------------------------------------------------------------------------- generation
class Prompts(torch.utils.data.Dataset):
    """Samples as generation prompts in a chat template: (pixels, prompt ids, labels) items, left-padded batches."""

    def __init__(self, samples, tok, template, image_size, pad_square, suffix="llava", ocr=True):
        self.samples, self.tok, self.template = samples, tok, template
        self.image_size, self.pad_square, self.suffix, self.ocr = image_size, pad_square, suffix, ocr

    def __len__(self):
        return len(self.samples)

    def prompt(self, i):
        return make_prompt(self.samples[i]["text"], self.suffix, self.ocr)

    def __getitem__(self, i):
        s = self.samples[i]
        ids, _ = data.tokenize_conversation(self.tok, [{"from": "human", "value": self.prompt(i)}], self.template,
                                            where=f"question {s['question_id']!r}")
        return data.load_image(s["image"], self.image_size, self.pad_square), ids, [data.IGNORE] * len(ids)

    def collate(self, batch):
        return data.collate(batch, data.pad_id_of(self.tok), left=True)


@torch.no_grad()
def generate_answers(model, tok, dataset, eos_id, batch_size=8, max_new_tokens=128, start=0, num_workers=0,
                     progress=False):
    """Greedy answers to dataset[start:], in order, as (batch, answer texts) per batch: prompts left-padded,
    the KV cache, every row stopping at the template's end of turn (eos_id)."""
    p = next(model.parameters())
    # weights in bf16/fp16: pixels stay fp32 (image resizing has no bf16 kernel everywhere), autocast casts
    ctx = torch.autocast(p.device.type, dtype=p.dtype) if p.dtype != torch.float32 else nullcontext()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=range(start, len(dataset)),
                                         collate_fn=dataset.collate, num_workers=num_workers)
    for b in tqdm(loader, initial=start // batch_size, total=-(-len(dataset) // batch_size), disable=not progress,
                  dynamic_ncols=True):
        with ctx:
            out = model.generate(b["pixels"].to(p.device), b["ids"].to(p.device), mask=b["mask"].to(p.device),
                                 max_new_tokens=max_new_tokens, eos_id=eos_id)
        yield b, [data.answer_text(tok, row) for row in out.tolist()]


def read_answers(path, ids):
    """The answers already in `path` (a previous, interrupted run), checked against the question ids in order.
    A last line cut by a crash is dropped from the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    keep = raw[:raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):  # a partial line: the crash happened while writing it
        with open(path, "wb") as f:
            f.write(keep)
    said = []
    for k, line in enumerate(keep.decode().splitlines()):
        rec = json.loads(line)
        if k >= len(ids) or rec.get("question_id") != ids[k]:
            raise ValueError(f"{path}, line {k + 1}: answers question {rec.get('question_id')!r} but question "
                             f"{k + 1} of this run is {ids[k] if k < len(ids) else 'none'!r}: answers of another "
                             f"run? Delete the file or pass another --answers")
        said.append(rec["text"])
    return said


def answer_all(model, tok, dataset, ids, eos_id, path, batch_size=8, max_new_tokens=128, num_workers=0):
    """Every question's answer, appended to the answers file `path` batch by batch (LLaVA's format:
    question_id, prompt, text); a rerun after an interruption resumes after the last written answer."""
    said = read_answers(path, ids)
    if said:
        print(f"{path}: {len(said)} of {len(ids)} questions already answered, resuming")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for b, texts in generate_answers(model, tok, dataset, eos_id, batch_size, max_new_tokens, len(said),
                                         num_workers, progress=True):
            for text in texts:
                k = len(said)
                f.write(json.dumps({"question_id": ids[k], "prompt": dataset.prompt(k), "text": text}) + "\n")
                said.append(text)
            f.flush()
            os.fsync(f.fileno())
    return said


# ----------------------------------------------------------------------------- the synthetic fine-detail set
class SyntheticPrompts:
    """The synthetic set's questions (data.QASet) with the Prompts interface: prompt(i), question ids, records."""

    def __init__(self, net, tok, template, n, split="test", seed=0, others=0.0):
        c = net.config
        self.qa = data.SyntheticDataset(tok, n=n, split=split, seed=seed, template=template,
                                        image_size=c.image_size, pad_square=c.pad_square, others=others).qa_set(n)
        self.records = [self.qa.base.record(i) for i in self.qa.index]

    def __len__(self):
        return len(self.qa)

    def __getitem__(self, i):
        return self.qa[i]

    def collate(self, batch):
        return self.qa.collate(batch)

    def prompt(self, i):
        return self.records[i]["conversations"][0]["value"]


def score_synthetic(said, records):
    """Exact match (%) overall, per detail size and by tertile of the answer's relative area (the synthetic
    "area" field: the same path as TextVQA's OCR boxes)."""
    hits = [exact_match(s, r["conversations"][1]["value"]) for s, r in zip(said, records)]
    sizes = [r["detail"] for r in records]
    out = {"accuracy": 100 * mean(hits), "n": len(hits)}
    out.update({f"{size}": 100 * mean(h for h, z in zip(hits, sizes) if z == size) for size in data.SIZES
                if size in sizes})
    out["by_area_tertile"] = by_tertile(hits, [r["area"] for r in records])
    return out


@torch.no_grad()
def detail_accuracy(net, tok, template, n, split="test", seed=0, batch_size=32, max_new_tokens=8, others=0.0):
    """train.detail_accuracy (bench/miniature.py's scorer): ({"large", "medium", "small", "overall"} exact
    match, counts, mean prompt length in text tokens, a few (truth, said, size) samples)."""
    ds = SyntheticPrompts(net, tok, template, n, split, seed, others)
    sizes = tuple(data.SIZES)
    right, total, prompt_tokens, samples = dict.fromkeys(sizes, 0), dict.fromkeys(sizes, 0), [], []
    for b, said in generate_answers(net, tok, ds, data.end_of_turn(tok, template), batch_size, max_new_tokens):
        for s, answer, size, m, ids in zip(said, b["answer"], b["detail"], b["mask"], b["ids"]):
            if len(samples) < 6:
                samples.append(dict(truth=answer, said=s, size=size))
            right[size] += exact_match(s, answer)
            total[size] += 1
            prompt_tokens.append(int(m.sum()) - int((ids == data.IMAGE_ID).sum()))  # text tokens of the prompt
    acc = {s: right[s] / total[s] for s in sizes if total[s]}
    acc["overall"] = sum(right.values()) / sum(total.values())
    return acc, dict(total, overall=sum(total.values())), round(sum(prompt_tokens) / len(prompt_tokens)), samples


# ----------------------------------------------------------------------------- models
def pick_device_dtype(cfg):
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device=cuda but no CUDA device is visible")
    device = torch.device("cuda" if want_cuda else "cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if want_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={cfg.dtype!r}: auto, float32, bfloat16 or float16")
    return device, getattr(torch, cfg.dtype)


def load_model(cfg, device="cpu", dtype=torch.float32):
    """(model, tokenizer, template) from --ckpt (read as train.py and bench/miniature.py read checkpoints) or
    --release (the model class's from_release, for the published weights)."""
    if bool(cfg.ckpt) == bool(cfg.release):
        raise ValueError("pass exactly one of --ckpt (a train.py checkpoint) and --release (published weights)")
    state_path = os.path.join(cfg.ckpt, "train_state.pt")
    state = torch.load(state_path, map_location="cpu", weights_only=False) if cfg.ckpt and \
        os.path.isfile(state_path) else None
    name = cfg.model or (state["train_config"]["model"] if state else "")
    if name not in train.MODELS:
        raise ValueError(f"--model={name!r}: name the model, one of {', '.join(train.MODELS)}"
                         + ("" if state else f" ({cfg.ckpt or cfg.release} has no train_state.pt that says)"))
    file, cls_name, _ = train.MODELS[name]
    Model = getattr(import_module(file), cls_name)
    if cfg.release:
        if not hasattr(Model, "from_release"):
            raise NotImplementedError(f"{cls_name}.from_release does not exist yet: released {cls_name} weights "
                                      f"cannot be read (train.py checkpoints load with --ckpt)")
        paths = {k: v for k, v in (("vit", cfg.vit), ("llm", cfg.llm)) if v}  # Pheye needs both, LLaVA maybe vit
        net = Model.from_release(cfg.release, dtype=dtype, **paths)
    else:
        net = Model.load(cfg.ckpt, dtype=dtype)
    net = net.to(device).eval()
    tok = Tokenizer.from_pretrained(cfg.tokenizer or cfg.ckpt or (cfg.llm if name == "pheye" else "") or cfg.release)
    template = cfg.template
    if not template:  # the template the last stage trained with; captioning stages answer in the config's
        template = Model.STAGES[state["stage"]].get("template", net.config.template) if state else net.config.template
        template = net.config.template if template in ("plain", "mix") else template
    return net, tok, template


# ----------------------------------------------------------------------------- the command
def parse_args(argv):
    cfg = EvalConfig()
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nEvalConfig (defaults):\n" + "\n".join(
            f"  --{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)))
        sys.exit(0)
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
        train.set_field(cfg, key, value if eq else "True")
    if cfg.bench not in BENCHMARKS:
        raise ValueError(f"--bench={cfg.bench!r} is not one of {', '.join(BENCHMARKS)}")
    if not cfg.answers:
        name = os.path.basename(os.path.normpath(os.path.dirname(os.path.normpath(cfg.ckpt)) if cfg.ckpt
                                                 else cfg.release))
        cfg.answers = os.path.join("out", "eval", f"{name}-{cfg.bench}.jsonl")
    return cfg


def main(argv=None):
    """Answer a benchmark's questions, score them; returns the score dict (also printed and saved)."""
    cfg = parse_args(sys.argv[1:] if argv is None else list(argv))
    device, dtype = pick_device_dtype(cfg)
    net, tok, template = load_model(cfg, device, dtype)
    c = net.config
    if cfg.bench == "synthetic":
        dataset = SyntheticPrompts(net, tok, template, cfg.n, cfg.split, cfg.seed, cfg.others)
        ids = [r["id"] for r in dataset.records]
    else:
        samples = BENCHMARKS[cfg.bench](cfg)[:cfg.limit or None]
        dataset = Prompts(samples, tok, template, c.image_size, c.pad_square, cfg.suffix, cfg.ocr)
        ids = [s["question_id"] for s in samples]
    print(f"{cfg.bench}: {len(ids)} questions, {template} template, {device} {str(dtype)[6:]}, batch "
          f"{cfg.batch_size}; answers in {cfg.answers}")
    said = answer_all(net, tok, dataset, ids, data.end_of_turn(tok, template), cfg.answers, cfg.batch_size,
                      cfg.max_new_tokens, cfg.num_workers if cfg.bench != "synthetic" else 0)
    result = score_synthetic(said, dataset.records) if cfg.bench == "synthetic" else score(cfg.bench, samples, said)
    if cfg.bench in ("vqav2", "vizwiz"):  # what the EvalAI servers take (LLaVA's convert_*_for_submission.py)
        key = "question_id" if cfg.bench == "vqav2" else "image"
        upload = [{key: s["question_id"] if key == "question_id" else os.path.basename(s["image"]),
                   "answer": evalai_normalize(a)} for s, a in zip(samples, said)]
        with open(cfg.answers.removesuffix(".jsonl") + "-upload.json", "w") as f:
            json.dump(upload, f)
    with open(cfg.answers.removesuffix(".jsonl") + ".score.json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
