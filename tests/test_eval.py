"""eval.py: each benchmark's metric against hand-computed cases and the official evaluators' quirks, the whole
path (question file -> answers file -> score, and resume) on tiny fixtures in each benchmark's format, batched
generation equal to one-at-a-time for every model, and the synthetic set through the same entry point."""
import json
import os

import pytest
import torch

import data
import eval as ev
import train
from llm import Tokenizer


# ----------------------------------------------------------------------------- normalisation and VQA accuracy
@pytest.mark.parametrize("raw, norm", [
    ("two", "2"), ("Ten dogs", "10 dogs"), ("none", "0"),       # number words
    ("the dog", "dog"), ("A cat", "cat"), ("an apple", "apple"),  # articles
    ("dont", "don't"), ("isnt", "isn't"), ("it's", "it's"), ("its", "its"),  # contractions: its != it's
    ("dog.", "dog"), ("yes!", "yes"), ("3.5", "3.5"), ("red, white", "red white"), ("1,000", "1000"),
    ("t-shirt", "t shirt"), ("(left)", "left"),                 # punctuation: spaced marks go, others split
])
def test_vqa_normalisation(raw, norm):
    assert ev.vqa_normalize(raw) == norm


def test_evalai_processor_splits_possessive_s():
    # LLaVA's m4c EvalAIAnswerProcessor: lower case, "," and "?" dropped, "'s" split off before the rest
    assert ev.evalai_normalize("It's") == "it 's" and ev.evalai_normalize("its") == "its"
    assert ev.evalai_normalize("The Dog's bowl?") == "dog 's bowl"
    assert ev.evalai_normalize("Two.") == "2"


def test_vqa_accuracy_is_min_of_matches_over_three_averaged_over_leave_one_out():
    # k annotators of 10 agree with the answer: leaving a matching one out leaves k-1, else k; hand-computed
    others = ["cat", "bird", "fish", "cow", "pig", "hen", "ant", "bee", "owl", "elk"]
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["dog"] * k + others[:10 - k]
        for rule in ("vqav2", "vizwiz", "textvqa"):
            assert ev.vqa_accuracy("dog", answers, rule) == pytest.approx(want), (k, rule)


def test_vqa_accuracy_normalisation_per_official_evaluator():
    agree = ["2"] * 10
    mixed = ["2"] * 9 + ["two"]  # 9 say "2" and one "two": normalised, all ten match
    # vqaEval.py normalises only when the annotators disagree: "two" against ten "2" scores 0 ...
    assert ev.vqa_accuracy("two", agree, "vqav2") == 0.0
    assert ev.vqa_accuracy("two", mixed, "vqav2") == 1.0
    # ... which is why LLaVA uploads EvalAI-processed answers (eval.score does the same)
    assert ev.vqa_accuracy(ev.evalai_normalize("two"), agree, "vqav2") == 1.0
    # VizWiz normalises the answer always, the (pre-normalised) annotations never; TextVQA both, always
    assert ev.vqa_accuracy("two", agree, "vizwiz") == 1.0 and ev.vqa_accuracy("2", ["two"] * 10, "vizwiz") == 0.0
    assert ev.vqa_accuracy("The Dog.", ["dog"] * 10, "textvqa") == 1.0
    assert ev.vqa_accuracy("it's", ["its"] * 10, "textvqa") == 0.0
    assert ev.vqa_accuracy("its", ["its"] * 3 + ["it"] * 7, "textvqa") == pytest.approx(0.9)
    with pytest.raises(ValueError, match="unknown rule"):
        ev.vqa_accuracy("a", ["a"], "okvqa")


# ----------------------------------------------------------------------------- the other metrics
def test_anls():
    # worked examples of the DocVQA (RRC) definition: case and blank runs ignored, distance / longer length
    assert ev.anls("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 1.0
    assert ev.anls("12/15/89", ["12/15/88"]) == pytest.approx(1 - 1 / 8)
    assert ev.anls("  Denver   Broncos ", ["denver broncos"]) == 1.0
    assert ev.anls("ab", ["ac"]) == 0.5          # similarity exactly at the threshold is kept
    assert ev.anls("abc", ["axy"]) == 0.0        # 1/3 < 0.5 scores 0
    assert ev.anls("kitten", ["sitting", "mitten"]) == pytest.approx(1 - 1 / 6)  # best answer counts
    assert ev.levenshtein("kitten", "sitting") == 3


def test_pope_reading_and_metrics():
    said = ["Yes", "Yes, there is.", "No", "There is not a dog.", "None", "No.", "yes", "no"]
    said_yes = [ev.pope_says_yes(s) for s in said]
    assert said_yes == [True, True, False, False, True, False, True, False]  # "None" is a yes (official quirk)
    truth = [True, False, False, True, True, False, False, True]
    m = ev.yes_no_metrics(said_yes, truth)
    # TP 2 (0, 4), FP 2 (1, 6), TN 2 (2, 5), FN 2 (3, 7)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 2)
    assert m["accuracy"] == 50.0 and m["precision"] == 50.0 and m["recall"] == 50.0 and m["f1"] == 50.0
    assert m["yes_ratio"] == 50.0
    m = ev.yes_no_metrics([True, True, True, False], [True, True, False, False])
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == 100.0 and m["f1"] == pytest.approx(80.0)
    assert m["accuracy"] == 75.0 and m["yes_ratio"] == 75.0


def test_gqa_sqa_mme_answer_extraction():
    assert ev.gqa_answer("Yes.") == "yes" and ev.gqa_answer("left side") == "left side"
    assert ev.sqa_letter("B") == "B" and ev.sqa_letter("C. the moon") == "C"
    assert ev.sqa_letter("I think the answer is A") == "FAILED"
    assert ev.sqa_letter("The answer is D.") == "D" and ev.sqa_letter("The answer is A. The answer is B.") == "FAILED"
    assert [ev.mme_yes_no(s) for s in ["Yes", "no", "No, it is not.", "Not sure", "Maybe", "yes\n"]] == \
        ["yes", "no", "no", "no", "other", "yes"]


def test_mme_scores_accuracy_plus_acc_plus():
    rows = [("existence", "a", "Yes", "yes"), ("existence", "a", "No", "no"),    # both right
            ("existence", "b", "Yes", "yes"), ("existence", "b", "No", "yes"),   # one right
            ("code_reasoning", "c", "Yes", "no"), ("code_reasoning", "c", "No", "maybe")]
    s = ev.mme_scores(rows)
    assert s["categories"]["existence"] == pytest.approx(100 * (3 / 4 + 1 / 2))
    assert s["categories"]["code_reasoning"] == 0.0
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == 0.0
    with pytest.raises(ValueError, match="two questions"):
        ev.mme_scores(rows[:3])


def test_answer_area_and_tertiles():
    ocr = [("STOP", 0.02), ("coca", 0.25), ("cola", 0.03)]
    assert ev.answer_area(["stop"] * 9 + ["stops"], ocr) == pytest.approx(0.02)
    assert ev.answer_area(["cola"], ocr) == pytest.approx(0.03)
    assert ev.answer_area(["x"], []) is None
    scores, areas = [1, 0, 1, 1, 0, 0, 1], [0.5, 0.1, 0.2, 0.4, 0.05, 0.3, None]
    # by area: 0.05 (0) 0.1 (0) | 0.2 (1) 0.3 (0) | 0.4 (1) 0.5 (1); the sample without an area is left out
    assert ev.by_tertile(scores, areas) == {"bottom": 0.0, "middle": 50.0, "top": 100.0}
    # equal areas (the synthetic set has many) split in sample order, not by score
    assert ev.by_tertile([1, 1, 0, 0, 0, 1], [0.1] * 6) == {"bottom": 100.0, "middle": 0.0, "top": 50.0}


def test_prompt_suffix_and_ocr_switches():
    text = "what is written?\nReference OCR token: STOP, sign\n" + ev.SHORT
    assert ev.make_prompt(text) == text
    assert ev.make_prompt(text, "none") == "what is written?\nReference OCR token: STOP, sign"
    assert ev.make_prompt(text, "none", ocr=False) == "what is written?"
    assert ev.make_prompt(text, "Answer briefly.", ocr=False) == "what is written?\nAnswer briefly."
    assert ev.question_of(text) == "what is written?"


# ----------------------------------------------------------------------------- end to end on tiny fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A train.py checkpoint of the tiny LLaVA-1.5 (two finetune steps) and four synthetic images."""
    root = tmp_path_factory.mktemp("eval")
    train.main(["--model=llava", "--stage=finetune", "--max_iters=2", "--batch_size=2", "--n_train=8",
                "--n_val=2", "--eval_answers=2", "--num_workers=0", f"--out_dir={root / 'run'}"], distributed=False)
    data.write_synthetic(str(root / "data"), 4, split="test")
    return root


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


IMAGES = [f"images/test-{i:06d}.png" for i in range(4)]


def fixtures(root, bench):
    """(options, the answers an oracle gives, the score those answers must get, computed by hand)."""
    d = root / bench
    d.mkdir(exist_ok=True)
    q = lambda texts, **extra: write_jsonl(d / "q.jsonl", [dict(question_id=i, image=IMAGES[i], text=t, **{
        k: v[i] for k, v in extra.items()}) for i, t in enumerate(texts)])
    base = [f"--images={root / 'data'}"]
    if bench == "textvqa":
        qs = ["what brand?", "what number?", "what word?", "what sign?"]
        ann = {"data": [{"image_id": f"img{i}", "question_id": i, "question": qq.upper(), "answers": a}
                        for i, (qq, a) in enumerate(zip(qs, [["coca cola"] * 10, ["2"] * 10,
                                                             ["stop"] * 2 + ["go"] * 8, ["exit"] * 10]))]}
        (d / "ann.json").write_text(json.dumps(ann))
        words = [[("coca", 0.4), ("pepsi", 0.05)], [("2", 0.1)], [("go", 0.9), ("stop", 0.2)], [("exit", 0.3)]]
        ocr = {"data": [{"image_id": f"img{i}", "ocr_info": [
            {"word": w, "bounding_box": {"width": a, "height": 1, "top_left_x": 0, "top_left_y": 0}} for w, a in ws]}
            for i, ws in enumerate(words)]}
        (d / "ocr.json").write_text(json.dumps(ocr))
        texts = [f"{qq}\nReference OCR token: x\n{ev.SHORT}" for qq in qs]
        rows = [dict(question_id=f"img{i}", image=IMAGES[i], text=t) for i, t in enumerate(texts)]
        opts = [f"--questions={write_jsonl(d / 'q.jsonl', rows)}", f"--annotations={d / 'ann.json'}",
                f"--areas={d / 'ocr.json'}"]
        said = ["Coca Cola.", "two", "stop", "no idea"]  # 1, 1 (number word), 0.6, 0
        # areas, the best-matching word's (image 2: 8 of 10 say "go"): 0.4, 0.1, 0.9, 0.3; thirds of 4 (cuts at
        # round(4/3), round(8/3)): [0.1: 1] [0.3: 0, 0.4: 1] [0.9: 0.6]
        return base + opts, said, {"accuracy": 65.0, "n": 4,
                                   "by_area_tertile": {"bottom": 100.0, "middle": 50.0, "top": 60.0}}
    if bench == "vqav2":
        kinds = [("2", "number"), ("yes", "yes/no"), ("red", "other"), ("dog", "other")]
        ann = {"annotations": [{"question_id": i, "image_id": 100 + i, "answers": [{"answer": a}] * 10,
                                "answer_type": kind} for i, (a, kind) in enumerate(kinds)]}
        (d / "ann.json").write_text(json.dumps(ann))
        # COCO objects (category, share of the 10 x 10 image); yes/no and number questions match the question
        objects = [[("dog", 0.1), ("cat", 0.5)], [("person", 0.3)], [("car", 0.2), ("bed", 0.6)],
                   [("dog", 0.05), ("frisbee", 0.01)]]
        cats = sorted({c for objs in objects for c, _ in objs})
        coco = {"images": [{"id": 100 + i, "width": 10, "height": 10} for i in range(4)],
                "categories": [{"id": k, "name": c} for k, c in enumerate(cats)],
                "annotations": [{"image_id": 100 + i, "category_id": cats.index(c), "area": 100 * a}
                                for i, objs in enumerate(objects) for c, a in objs]}
        (d / "coco.json").write_text(json.dumps(coco))
        opts = [f"--questions={q(['how many dogs?', 'is it?', 'what colour?', 'what animal?'])}",
                f"--annotations={d / 'ann.json'}", f"--areas={d / 'coco.json'}"]
        # right, right, wrong, right at areas 0.1 ("dog" is in the question), 0.3, 0.6 ("bed" ~ "red"), 0.05
        return base + opts, ["Two", "Yes.", "blue", "the dog"], \
            {"accuracy": 75.0, "n": 4, "by_area_tertile": {"bottom": 100.0, "middle": 100.0, "top": 0.0}}
    if bench == "vizwiz":
        ann = [{"image": os.path.basename(IMAGES[i]), "answers": [{"answer": a}] * 10}
               for i, a in enumerate(["unanswerable", "pepsi", "10", "blue"])]
        (d / "ann.json").write_text(json.dumps(ann))
        opts = [f"--questions={q(['a?', 'b?', 'c?', 'd?'])}", f"--annotations={d / 'ann.json'}"]
        return base + opts, ["Unanswerable", "Coke", "ten", "blue!"], {"accuracy": 75.0, "n": 4}
    if bench == "docvqa":  # no LLaVA question file: the prompts are built from DocVQA's own annotation
        ann = {"data": [{"questionId": 10 + i, "question": f"q{i}?", "image": IMAGES[i], "answers": a}
                        for i, a in enumerate([["12/15/88"], ["Dear Dr. Lobo", "Dr. Lobo"], ["abc"], ["x"]])]}
        (d / "ann.json").write_text(json.dumps(ann))
        return base + [f"--annotations={d / 'ann.json'}"], ["12/15/89", "dear dr. lobo", "xyz", "x"], \
            {"anls": pytest.approx(100 * (0.875 + 1 + 0 + 1) / 4), "n": 4}
    if bench == "gqa":
        truth = {str(i): {"answer": a} for i, a in enumerate(["yes", "left", "red", "no"])}
        (d / "ann.json").write_text(json.dumps(truth))
        opts = [f"--questions={q(['a?', 'b?', 'c?', 'd?'])}", f"--annotations={d / 'ann.json'}"]
        return base + opts, ["Yes.", "left.", "Red car", "yes"], {"accuracy": 50.0, "n": 4}
    if bench == "pope":
        qs = [f"Is there a {w} in the image?" for w in ("dog", "cat", "car", "cup")]
        cats = ["random", "random", "adversarial", "adversarial"]
        q([t + "\n" + ev.SHORT for t in qs], category=cats)
        for cat, idx, labels in (("random", [0, 1], ["yes", "no"]), ("adversarial", [2, 3], ["no", "yes"])):
            write_jsonl(d / f"coco_pope_{cat}.json", [{"text": qs[i], "label": lab} for i, lab in zip(idx, labels)])
        said = ["Yes", "No", "Yes", "Yes, there is."]  # random: both right; adversarial: TP 1, FP 1
        random = {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 50.0,
                  "n": 2, "tp": 1, "fp": 0, "tn": 1, "fn": 0}
        adv = {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": pytest.approx(200 / 3),
               "yes_ratio": 100.0, "n": 2, "tp": 1, "fp": 1, "tn": 0, "fn": 0}
        return base + [f"--questions={d / 'q.jsonl'}", f"--annotations={d}"], said, \
            {"random": random, "adversarial": adv}
    if bench == "sqa":
        qs = [{"id": str(i), "image": IMAGES[i], "conversations": [
            {"from": "human", "value": f"Context: none\nQuestion: q{i}?\nOptions: (A) x (B) y (C) z\n<image>"},
            {"from": "gpt", "value": "A"}]} for i in range(4)]
        qs.insert(2, {"id": "text-only", "conversations": [{"from": "human", "value": "no image?"},
                                                           {"from": "gpt", "value": "A"}]})
        (d / "q.json").write_text(json.dumps(qs))
        (d / "problems.json").write_text(json.dumps({str(i): {"answer": k, "choices": ["x", "y", "z"]}
                                                     for i, k in enumerate([0, 1, 2, 2])}))
        return base + [f"--questions={d / 'q.json'}", f"--annotations={d / 'problems.json'}"], \
            ["A", "B. y", "The answer is C.", "D"], {"img_accuracy": 75.0, "n": 4}  # D: not an option
    if bench == "mme":  # two questions per image; MME's <category>/<image>.txt ground truth files
        qa = [("existence", 0, "Is there a dog?", "Yes"), ("existence", 0, "Is there a cat?", "No"),
              ("OCR", 1, "Is the word STOP?", "Yes"), ("OCR", 1, "Is the word GO?", "No")]
        yes_no = {"existence": " Please answer yes or no.", "OCR": "  Please answer yes or no."}  # as MME's files
        for cat, i in {(c, i) for c, i, _, _ in qa}:
            (d / cat / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
            where = d / cat / ("questions_answers_YN" if cat == "OCR" else "") / f"test-{i:06d}.txt"
            where.write_text("".join(f"{qq}{yes_no[c]}\t{a}\n" for c, k, qq, a in qa if (c, k) == (cat, i)))
        rows = [dict(question_id=f"{cat}/test-{i:06d}.png", image=IMAGES[i], category=cat, text=f"{qq}\n{ev.SHORT}")
                for cat, i, qq, _ in qa]
        opts = [f"--questions={write_jsonl(d / 'q.jsonl', rows)}", f"--annotations={d}"]
        # existence: both right (100 * (1 + 1)); OCR: one of two right, no image with both (100 * (0.5 + 0))
        return base + opts, ["Yes", "no", "Yes", "Yes"], \
            {"perception": 250.0, "cognition": 0.0, "categories": {"existence": 200.0, "OCR": 50.0}}
    raise AssertionError(bench)


def oracle(tok, said, calls):
    """A generate() that answers the questions in order with the given texts (then an end of turn)."""
    queue = list(said)

    def generate(self, pixels, idx, max_new_tokens=32, mask=None, temperature=0.0, eos_id=None):
        calls.append(len(idx))
        rows = [tok.encode(" " + queue.pop(0)) + [eos_id] for _ in range(len(idx))]
        width = max(map(len, rows))
        return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])
    return generate


@pytest.mark.parametrize("bench", ["textvqa", "vqav2", "vizwiz", "docvqa", "gqa", "pope", "sqa", "mme"])
def test_benchmark_end_to_end_scores_the_answers(ckpt, bench, monkeypatch):
    import hire
    opts, said, want = fixtures(ckpt, bench)
    tok = Tokenizer.from_pretrained(str(ckpt / "run" / "ckpt"))
    calls = []
    monkeypatch.setattr(hire.HIRE, "generate", oracle(tok, said, calls))
    answers = ckpt / f"{bench}.jsonl"
    got = ev.main([f"--bench={bench}", f"--ckpt={ckpt / 'run' / 'ckpt'}", f"--answers={answers}",
                   "--batch_size=3", "--num_workers=0", *opts])
    assert got == want
    assert calls == [3, 1]
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["text"] for r in lines] == [s.strip() for s in said]
    assert json.loads((ckpt / f"{bench}.score.json").read_text()) == want
    if bench == "vqav2":  # the EvalAI upload: LLaVA's processed answers
        upload = json.loads((ckpt / "vqav2-upload.json").read_text())
        assert upload == [{"question_id": i, "answer": a} for i, a in enumerate(["2", "yes", "blue", "dog"])]


def test_answers_file_resumes_after_an_interruption(ckpt, monkeypatch):
    """A real tiny model: a run cut after its first batch (and in the middle of writing a line) continues at
    the next question and ends with the same answers file and score as an uninterrupted run."""
    opts, _, _ = fixtures(ckpt, "textvqa")
    args = ["--bench=textvqa", f"--ckpt={ckpt / 'run' / 'ckpt'}", "--batch_size=2", "--num_workers=0",
            "--max_new_tokens=6", *opts]
    whole = ev.main(args + [f"--answers={ckpt / 'whole.jsonl'}"])
    full = (ckpt / "whole.jsonl").read_text().splitlines(keepends=True)
    assert len(full) == 4
    (ckpt / "cut.jsonl").write_text("".join(full[:2]) + full[2][:15])  # killed while writing line 3
    import hire
    seen = []
    real = hire.HIRE.generate
    monkeypatch.setattr(hire.HIRE, "generate",
                        lambda self, px, idx, **kw: seen.append(len(idx)) or real(self, px, idx, **kw))
    resumed = ev.main(args + [f"--answers={ckpt / 'cut.jsonl'}"])
    assert seen == [2]  # only questions 3 and 4 were asked again
    assert (ckpt / "cut.jsonl").read_text() == "".join(full) and resumed == whole
    # answers of another question file are refused, not mixed in
    (ckpt / "other.jsonl").write_text(json.dumps({"question_id": "elsewhere", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="another run"):
        ev.main(args + [f"--answers={ckpt / 'other.jsonl'}"])


def test_missing_ground_truth_is_named(ckpt):
    opts, _, _ = fixtures(ckpt, "gqa")
    (ckpt / "gqa" / "ann.json").write_text(json.dumps({"0": {"answer": "yes"}}))
    with pytest.raises(KeyError, match="question 1"):
        ev.main(["--bench=gqa", f"--ckpt={ckpt / 'run' / 'ckpt'}", *opts])


def test_synthetic_bench_is_train_detail_accuracy(ckpt):
    """--bench=synthetic and train.detail_accuracy (bench/miniature.py's scorer) are one code path."""
    import hire
    run = str(ckpt / "run" / "ckpt")
    got = ev.main(["--bench=synthetic", f"--ckpt={run}", "--n=9", "--batch_size=4", "--max_new_tokens=8",
                   f"--answers={ckpt / 'syn.jsonl'}"])
    net, tok = hire.HIRE.load(run).eval(), Tokenizer.from_pretrained(run)
    acc, n, _, _ = train.detail_accuracy(net, tok, "vicuna_v1", 9, "test", 0, 4, 8)
    assert got["accuracy"] == pytest.approx(100 * acc["overall"]) and got["n"] == n["overall"] == 9
    for size in data.SIZES:
        assert got[size] == pytest.approx(100 * acc[size])
    said = [json.loads(line)["text"] for line in (ckpt / "syn.jsonl").read_text().splitlines()]
    records = [data.synthetic_record(0, "test", i)[0] for i in range(9)]
    hits = [ev.exact_match(s, r["conversations"][1]["value"]) for s, r in zip(said, records)]
    assert got["by_area_tertile"] == ev.by_tertile(hits, [r["area"] for r in records])


def test_release_hook(ckpt, monkeypatch):
    import hire
    cfg = ev.EvalConfig(release=str(ckpt / "run" / "ckpt"), model="llava")
    monkeypatch.delattr(hire.HIRE, "from_release", raising=False)  # whether or not the release loader exists
    with pytest.raises(NotImplementedError, match="from_release"):
        ev.load_model(cfg)
    seen = []
    monkeypatch.setattr(hire.HIRE, "from_release", classmethod(
        lambda cls, path, dtype=None: seen.append((path, dtype)) or cls.load(path)), raising=False)
    net, tok, template = ev.load_model(cfg)
    assert seen == [(cfg.release, torch.float32)] and template == "vicuna_v1"
    with pytest.raises(ValueError, match="exactly one"):
        ev.load_model(ev.EvalConfig())


# ----------------------------------------------------------------------------- batched = one at a time
@pytest.mark.parametrize("name", ["llava", "llava_s2", "hire", "inf_llava", "pheye"])
def test_batched_generation_equals_one_at_a_time(name):
    """Left-padded batches with the KV cache give every prompt the tokens it gets alone, up to its end of turn."""
    import importlib
    file, cls_name, variant = train.MODELS[name]
    module = importlib.import_module(file)
    config = getattr(module, cls_name + "Config").preset("tiny")
    for k, v in variant.items():
        setattr(config, k, v)
    config.vit_path, config.llm_path = train.tiny_base()
    torch.manual_seed(0)
    net = getattr(module, cls_name).from_pretrained(config).eval()
    tok = Tokenizer.from_pretrained(train.TINY_LM)
    ds = ev.SyntheticPrompts(net, tok, net.config.template, 5, "val")
    lengths = {len(ds[i][1]) for i in range(len(ds))}
    assert len(lengths) > 1, "the prompts must differ in length for padding to matter"
    eos = data.end_of_turn(tok, net.config.template)
    batch = [row for _, texts in ev.generate_answers(net, tok, ds, eos, batch_size=5, max_new_tokens=8)
             for row in texts]
    b = ds.collate([ds[i] for i in range(5)])
    ids = net.generate(b["pixels"], b["ids"], mask=b["mask"], max_new_tokens=8, eos_id=eos)
    for i in range(5):
        x = ds.collate([ds[i]])
        alone = net.generate(x["pixels"], x["ids"], mask=x["mask"], max_new_tokens=8, eos_id=eos)[0].tolist()
        row = ids[i].tolist()
        assert row[:len(alone)] == alone, (name, i)
        assert all(t == eos for t in row[len(alone):]), (name, i)  # finished rows only pad with the end of turn
    assert batch == [data.answer_text(tok, row) for row in ids.tolist()]
    # bf16 (what a GPU runs) goes through the same path
    net16 = net.to(torch.bfloat16)
    out = list(ev.generate_answers(net16, tok, ds, eos, batch_size=5, max_new_tokens=4))
    assert len(out[0][1]) == 5


def test_pheye_checkpoint_is_asked_in_its_own_prompt(ckpt, monkeypatch):
    """A Pheye checkpoint answers in Pheye's template; --suffix=none and --ocr=False give the bare question."""
    import shutil

    import pheye
    config = pheye.PheyeConfig.preset("tiny")
    config.vit_path, config.llm_path = train.tiny_base()
    out = ckpt / "pheye"
    pheye.Pheye.from_pretrained(config).save(str(out))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(train.TINY_LM, name), out)
    opts, said, _ = fixtures(ckpt, "textvqa")
    tok = Tokenizer.from_pretrained(str(out))
    prompts = []
    answer = oracle(tok, said, [])
    monkeypatch.setattr(pheye.Pheye, "generate", lambda self, px, idx, mask=None, **kw: prompts.extend(
        tok.decode([t for t, m in zip(row, mk) if m]) for row, mk in zip(idx.tolist(), mask.tolist()))
        or answer(self, px, idx, mask=mask, **kw))
    got = ev.main(["--bench=textvqa", f"--ckpt={out}", "--model=pheye", "--suffix=none", "--ocr=False",
                   f"--answers={ckpt / 'pheye.jsonl'}", "--num_workers=0", *opts])
    assert got["accuracy"] == 65.0
    assert prompts[0].endswith("Instruction: what brand?\nOutput:") and data.PHEYE_SYSTEM in prompts[0]
    lines = [json.loads(line) for line in (ckpt / "pheye.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["what brand?", "what number?", "what word?", "what sign?"]
