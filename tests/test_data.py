"""data.py: label masking per template, truncation, collate, images, bad input, the synthetic set (determinism,
write-out/load-back, what each resolution can read), the tiny tokenizer, DataLoader workers."""
import collections
import json
import os
import pickle
import runpy
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import IGNORE, IMAGE_ID

from llm import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TURNS = [{"from": "human", "value": "<image>\nWhat is written in the center cell?"}, {"from": "gpt", "value": "7"},
         {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "dark red, mostly."}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return data.build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


def spans(labels):
    """Contiguous runs of supervised positions: [(start, end), ...]."""
    out, start = [], None
    for i, y in enumerate(list(labels) + [IGNORE]):
        if y != IGNORE and start is None:
            start = i
        if y == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


# ----------------------------------------------------------------------------- templates and labels
EXPECTED = {   # (full text with the image as "<image>", supervised answer texts, end-of-turn token)
    "vicuna_v1": ("<s>" + data.VICUNA_SYSTEM + " USER: <image>\nWhat is written in the center cell? ASSISTANT: 7</s>"
                  "USER: And its colour? ASSISTANT: dark red, mostly.</s>", [" 7", " dark red, mostly."], "</s>"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + data.LLAMA3_SYSTEM + "<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is written in the center cell?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n7<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAnd its colour?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\ndark red, mostly.<|eot_id|>",
               ["7", "dark red, mostly."], "<|eot_id|>"),
    "pheye": (data.PHEYE_SYSTEM + "\n\nInstruction: What is written in the center cell?\nOutput: 7</s>"
              "\n\nInstruction: And its colour?\nOutput: dark red, mostly.</s>", [" 7", " dark red, mostly."], "</s>"),
    "plain": ("<s><image>7</s>", ["7"], "</s>"),
}


@pytest.mark.parametrize("template", data.TEMPLATES)
def test_labels_supervise_exactly_the_answers(tok, template):
    turns = TURNS[:2] if template == "plain" else TURNS
    ids, labels = data.tokenize_conversation(tok, turns, template)
    full, answers, end = EXPECTED[template]
    assert len(ids) == len(labels)
    text = "".join("<image>" if i == IMAGE_ID else tok.decode([i]) for i in ids)
    assert text == full
    assert ids.count(IMAGE_ID) == (0 if template == "pheye" else 1)
    got = spans(labels)
    assert len(got) == len(answers)
    for (s, e), answer in zip(got, answers):
        assert labels[s:e] == ids[s:e]
        assert tok.decode(ids[s:e - 1]) == answer and ids[e - 1] == tok.special[end]
    assert sum(y != IGNORE for y in labels) == sum(e - s for s, e in got)


def test_mix_cycles_the_templates_with_the_image_first_for_pheye(tok):
    """template="mix" (the tiny base's pretraining): sample i in MIX[i % 4], tokenised exactly as that template
    (Pheye's, which has no image slot, gets one in front; "plain" samples are captions); labels still cover just
    the answer and its end. Its question set leaves the captions out."""
    ds = data.SyntheticDataset(tok, n=8, split="val", template="mix")
    for i in range(8):
        template = data.MIX[i % 4]
        _, ids, labels = ds[i]
        rec = ds.record(i)
        task = "caption" if template == "plain" else "qa"
        assert rec == data.synthetic_record(0, "val", i, task)[0]
        want, want_labels = data.tokenize_conversation(tok, rec["conversations"], template)
        if template == "pheye":
            want, want_labels = [IMAGE_ID] + want, [IGNORE] + want_labels
        assert (ids, labels) == (want, want_labels) and ids.count(IMAGE_ID) == 1
        (s, e), = spans(labels)
        assert tok.decode(ids[s:e - 1]).strip() == rec["conversations"][1]["value"]
    qa = ds.qa_set(8)
    assert qa.index == [0, 1, 2, 4, 5, 6] and [qa[k][4] for k in range(6)] == \
        [ds.record(i)["conversations"][1]["value"] for i in qa.index]
    with pytest.raises(data.DataError, match="'mixed'"):
        data.SyntheticDataset(tok, n=1, template="mixed")


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "pheye"])
def test_generation_prompt_is_the_training_prefix(tok, template):
    """Without its last answer, the conversation tokenises to exactly the ids that precede that answer."""
    ids, labels = data.tokenize_conversation(tok, TURNS, template)
    prompt, plabels = data.tokenize_conversation(tok, TURNS[:-1], template)
    start = spans(labels)[-1][0]
    assert prompt == ids[:start] and plabels == labels[:start]


def test_image_placeholder_rules(tok):
    ids, _ = data.tokenize_conversation(tok, [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "7"}],
                                        "vicuna_v1")
    assert ids.count(IMAGE_ID) == 1   # added when absent
    with pytest.raises(data.DataError, match="at most once"):
        data.tokenize_conversation(tok, [{"from": "human", "value": "<image><image>"}, TURNS[1]], "vicuna_v1")
    with pytest.raises(data.DataError, match="turn 1: turns must alternate"):
        data.tokenize_conversation(tok, [TURNS[0], TURNS[0]], "llama3")
    with pytest.raises(data.DataError, match="unknown chat template 'chatml'"):
        data.tokenize_conversation(tok, TURNS, "chatml")


def test_truncation_counts_cut_answers(tok):
    ids, labels = data.tokenize_conversation(tok, TURNS, "vicuna_v1")
    (s1, e1), (s2, e2) = spans(labels)
    with pytest.warns(UserWarning, match=r"truncated; 1 of 2 answers lose tokens"):
        tids, tlabels, cut = data.truncate(ids, labels, s2 + 2, "sample 3")
    assert cut and len(tids) == len(tlabels) == s2 + 2 and tids == ids[:s2 + 2]
    with pytest.warns(UserWarning, match=r"2 of 2 answers lose tokens \(no supervised token left\)"):
        data.truncate(ids, labels, s1, "sample 3")
    assert data.truncate(ids, labels, len(ids), "x") == (ids, labels, False)
    with pytest.raises(data.DataError, match="cut the image placeholder"):
        data.truncate(ids, labels, ids.index(IMAGE_ID), "x")


def test_dataset_truncation_warning_counts(tok):
    ds = data.SyntheticDataset(tok, n=3, template="vicuna_v1", max_len=40)
    with pytest.warns(UserWarning) as caught:
        ds[0], ds[1]
    assert [str(w.message).split(" [")[-1] for w in caught] == ["1 truncated so far]", "2 truncated so far]"]
    assert "sample 1 (id 'synthetic-0-train-000001'): 49 tokens > max_len=40" in str(caught[1].message)
    assert ds.n_truncated == 2
    with pytest.warns(UserWarning, match=r"sample 2 .* \[3 truncated so far\]"):
        assert len(ds[2][1]) == 40


def test_collate_pads_right_and_left():
    a = (torch.zeros(3, 2, 2), [1, IMAGE_ID, 5, 6], [IGNORE, IGNORE, 5, 6])
    b = (torch.ones(3, 2, 2), [1, 7], [IGNORE, 7])
    out = data.collate([a, b], pad_id=3)
    assert out["ids"].tolist() == [[1, IMAGE_ID, 5, 6], [1, 7, 3, 3]]
    assert out["labels"].tolist() == [[IGNORE, IGNORE, 5, 6], [IGNORE, 7, IGNORE, IGNORE]]
    assert out["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and out["pixels"].shape == (2, 3, 2, 2)
    left = data.collate([a, b], pad_id=3, left=True)
    assert left["ids"].tolist() == [[1, IMAGE_ID, 5, 6], [3, 3, 1, 7]] and left["mask"].tolist()[1] == [0, 0, 1, 1]
    assert data.count_targets(out["labels"]).item() == 3   # position 0 is never predicted


# ----------------------------------------------------------------------------- images
def norm(rgb):
    return [(v / 255 - m) / s for v, m, s in zip(rgb, data.CLIP_MEAN, data.CLIP_STD)]


def test_image_modes_to_rgb():
    mean = tuple(round(255 * m) for m in data.CLIP_MEAN)
    cases = {   # image -> the RGB its (0, 0) pixel must become
        "L": (Image.new("L", (4, 4), 77), (77, 77, 77)),
        "RGBA opaque": (Image.new("RGBA", (4, 4), (10, 200, 30, 255)), (10, 200, 30)),
        "RGBA clear": (Image.new("RGBA", (4, 4), (10, 200, 30, 0)), mean),
        "CMYK red": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        "I;16": (Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128)),
        "LA clear": (Image.new("LA", (4, 4), (0, 0)), mean),
    }
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 250, 5, 9] + [0] * 762)
    cases["P"] = (p, (250, 5, 9))
    for name, (im, rgb) in cases.items():
        x = data.load_image(im, 4, pad_square=False)
        assert x.shape == (3, 4, 4) and x.dtype == torch.float32, name
        assert torch.allclose(x[:, 0, 0], torch.tensor(norm(rgb)), atol=1e-5), name


def test_pad_square_and_exif(tmp_path):
    im = Image.new("RGB", (8, 4), (255, 255, 255))
    x = data.load_image(im, 8, pad_square=True)   # 8x4 centred on 8x8: rows 0-1 and 6-7 are the mean colour
    mean = torch.tensor(norm([round(255 * m) for m in data.CLIP_MEAN]))
    assert torch.allclose(x[:, 0, 0], mean, atol=1e-5) and torch.allclose(x[:, 7, 7], mean, atol=1e-5)
    assert torch.allclose(x[:, 4, 4], torch.tensor(norm([255] * 3)), atol=1e-5)
    assert torch.allclose(data.load_image(im, 8, pad_square=False)[:, 0, 0], torch.tensor(norm([255] * 3)))
    # EXIF orientation 6 (stored rotated): the loaded image is the upright one
    upright = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3) * 2)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "o.png", exif=exif)
    got = data.load_image(str(tmp_path / "o.png"), 6, pad_square=True)
    want = data.load_image(upright, 6, pad_square=True)
    assert torch.equal(got, want) and not torch.equal(got, data.load_image(stored, 6, pad_square=True))


def bomb_png(path, w, h):
    """A tiny PNG whose header claims w x h pixels (PIL must refuse it before decoding)."""
    Image.new("L", (1, 1)).save(path)
    b = bytearray(open(path, "rb").read())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    open(path, "wb").write(bytes(b))


def test_bad_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        data.load_image(str(tmp_path / "nope.png"), 8, True)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(data.DataError, match="junk.png: not a readable image"):
        data.load_image(str(tmp_path / "junk.png"), 8, True)
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "t.png")
    raw = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(data.DataError, match="t.png: corrupt or truncated"):
        data.load_image(str(tmp_path / "t.png"), 8, True)
    for w in (10_000, 20_000):   # over PIL's warning limit, over its error limit
        bomb_png(tmp_path / f"b{w}.png", w, w)
        with pytest.raises(data.DataError, match=f"b{w}.png: decompression bomb"):
            data.load_image(str(tmp_path / f"b{w}.png"), 8, True)
    Image.new("RGB", (40, 30)).save(tmp_path / "ok.png")
    with pytest.raises(data.DataError, match=r"ok.png: decompression bomb refused: 40x30 = 1200 pixels"):
        data.load_image(str(tmp_path / "ok.png"), 8, True, max_pixels=1000)


# ----------------------------------------------------------------------------- LLaVA JSON: bad input
def write_json(tmp_path, records, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_bad_json_inputs(tmp_path, tok):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    good = {"id": "g", "image": "a.png", "conversations": TURNS[:2]}
    make = lambda path, **kw: data.LlavaJsonDataset(path, tok, **kw)
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.json"):
        make(str(tmp_path / "missing.json"))
    with pytest.raises(data.DataError, match=r"d.json: expected a JSON list of records, got a dict"):
        make(write_json(tmp_path, {"records": [good]}))
    with pytest.raises(data.DataError, match=r"record 1 \(id 'x'\): no 'conversations' field"):
        make(write_json(tmp_path, [good, {"id": "x", "image": "a.png"}]))
    bad_role = [TURNS[0], {"from": "robot", "value": "7"}]
    with pytest.raises(data.DataError, match=r"record 0 \(id 'r'\), turn 1: unknown role 'from'='robot'"):
        make(write_json(tmp_path, [{"id": "r", "image": "a.png", "conversations": bad_role}]))
    with pytest.raises(FileNotFoundError, match=r"record 1 \(id 'm'\): image file not found: .*gone.png"):
        make(write_json(tmp_path, [good, dict(good, id="m", image="gone.png")]))
    with pytest.raises(data.DataError, match=r"d.json: empty dataset"):
        make(write_json(tmp_path, []))
    (tmp_path / "junk.png").write_bytes(b"junk")
    ds = make(write_json(tmp_path, [good, dict(good, id="j", image="junk.png")]))
    with pytest.raises(data.DataError, match="junk.png: not a readable image"):
        ds[1]
    # skip_bad: bad records are dropped (counted) when the dataset is built, bad images when read
    recs = [good, dict(good, id="m", image="gone.png"), {"id": "x"}, dict(good, id="j", image="junk.png")]
    ds = make(write_json(tmp_path, recs), skip_bad=True)
    assert len(ds) == 2 and ds.n_skipped == 2
    pixels, ids, labels = ds[1]   # junk.png -> the next sample, good
    assert ds.n_skipped == 3 and torch.allclose(pixels[:, 0, 0], torch.tensor(norm([1, 2, 3])), atol=1e-5)
    with pytest.raises(data.DataError, match="empty dataset"):
        make(write_json(tmp_path, recs[1:3]), skip_bad=True)


# ----------------------------------------------------------------------------- the synthetic set
def test_synthetic_deterministic_and_split(tok):
    a = data.SyntheticDataset(tok, n=4, seed=5, image_size=64)
    b = data.SyntheticDataset(tok, n=4, seed=5, image_size=64)
    for i in range(4):
        (pa, ia, la), (pb, ib, lb) = a[i], b[i]
        assert torch.equal(pa, pb) and ia == ib and la == lb
    assert [a.record(i)["detail"] for i in range(4)] == ["large", "medium", "small", "large"]
    other_seed = data.SyntheticDataset(tok, n=4, seed=6, image_size=64)
    test = data.SyntheticDataset(tok, n=4, seed=5, split="test", image_size=64)
    for other in (other_seed, test):
        assert not any(torch.equal(a[i][0], other[i][0]) for i in range(4))
    assert a[0][0].shape == (3, 64, 64) and data.SyntheticDataset(tok, n=1, image_size=128)[0][0].shape == (3, 128, 128)
    with pytest.raises(data.DataError, match="synthetic split='dev'"):
        data.SyntheticDataset(tok, n=4, split="dev")
    with pytest.raises(data.DataError, match=r"empty \(n=0\)"):
        data.SyntheticDataset(tok, n=0)


def test_one_item_scenes_are_the_full_scenes_without_the_other_items():
    """others=0 (the miniature's task) and any others <= OTHERS draw exactly what the full scene draws and keep
    fewer of the non-target items: the same question, answer, background and noise. The full scenes themselves
    are pinned (a checksum of 50 records, taken before `others` existed): the shipped tiny ViT and tokenizer were
    built from them (patch_example, tiny_corpus), so their draws must never change."""
    full_records = [data.synthetic_record(0, "train", i, "caption") for i in range(50)]
    assert zlib.crc32(json.dumps(full_records, sort_keys=True).encode()) == 3749529943
    for i in range(50):
        rec, full = data.synthetic_record(0, "train", i)
        for others in (0.0, 0.4):
            one_rec, one = data.synthetic_record(0, "train", i, others=others)
            assert one_rec == rec and (one["target"], one["background"], one["noise_seed"]) == (
                full["target"], full["background"], full["noise_seed"])
            for k, (a, b) in enumerate(zip(one["cells"], full["cells"])):
                assert a == b or (a is None and k != full["target"] and others < data.OTHERS)
            assert others or sum(c is not None for c in one["cells"]) == 1
    kept = [sum(c is not None for c in data.synthetic_record(0, "train", i, others=0.4)[1]["cells"]) for i in range(90)]
    assert 1 + 8 * 0.25 < sum(kept) / 90 < 1 + 8 * 0.55  # about 1 + 8 x 0.4
    one = data.synthetic_record(0, "train", 3, "caption", others=0)[0]["conversations"][1]["value"]
    assert one.count(":") == 1 and one.startswith("A 3 by 3 grid. ")  # the caption names the one item
    with pytest.raises(data.DataError, match=r"others=1.5: expected a chance in \[0, 1\]"):
        data.synthetic_record(0, "train", 0, others=1.5)


def test_write_out_loads_back_identically(tmp_path, tok):
    out = tmp_path / "syn"
    argv = sys.argv
    try:   # the command line, run in this process: python data.py --out DIR --n 5 --seed 3 --split val
        sys.argv = ["data.py", "--out", str(out), "--n", "5", "--seed", "3", "--split", "val"]
        runpy.run_path(os.path.join(ROOT, "data.py"), run_name="__main__")
    finally:
        sys.argv = argv
    for template in ("vicuna_v1", "pheye"):
        syn = data.SyntheticDataset(tok, n=5, split="val", seed=3, template=template, image_size=128)
        disk = data.LlavaJsonDataset(str(out / "data.json"), tok, template=template, image_size=128)
        assert len(disk) == 5
        for i in range(5):
            assert disk.record(i) == syn.record(i)
            (p1, i1, l1), (p2, i2, l2) = syn[i], disk[i]
            assert torch.equal(p1, p2) and i1 == i2 and l1 == l2


def test_qa_set_and_caption_task(tok):
    ds = data.make_dataset("synthetic", tok, "llama3", 64, False, split="val", n=6, seed=0)
    qa = ds.qa_set(4)
    batch = qa.collate([qa[i] for i in range(3)])
    assert batch["detail"] == ["large", "medium", "small"]
    for i in range(3):
        rec = ds.record(i)
        full_ids, labels = data.tokenize_conversation(tok, rec["conversations"], "llama3")
        prompt = batch["ids"][i][batch["mask"][i] == 1].tolist()
        assert prompt == full_ids[:spans(labels)[0][0]]
        assert batch["answer"][i] == rec["conversations"][1]["value"]
        assert batch["question"][i] == rec["conversations"][0]["value"].replace("<image>\n", "")
    cap = data.make_dataset("synthetic", tok, "plain", 64, True, n=2)
    rec, scene = data.synthetic_record(0, "train", 1, "caption")
    assert cap.record(1)["conversations"][1]["value"] == data.caption(scene) == rec["conversations"][1]["value"]
    ids, labels = cap[1][1:]
    assert tok.decode([y for y in labels if y != IGNORE][:-1]) == data.caption(scene)
    assert data.normalize_answer(" Circle. ") == "circle"
    assert data.answer_text(tok, tok.encode(" 7") + [tok.eos_id] + tok.encode("junk")) == "7"


# Pixel-level readers: what a resolution still shows of an item, given its cell (the question names the cell).
def view(im, r):
    x = data.load_image(im, r, pad_square=False)   # exactly what a model at r px receives, back to 0..255
    x = x * torch.tensor(data.CLIP_STD).view(3, 1, 1) + torch.tensor(data.CLIP_MEAN).view(3, 1, 1)
    return (x * 255).permute(1, 2, 0).double().numpy()


GLYPHS = {c: np.array([b == "#" for b in g], float).reshape(5, 3) for c, g in data.FONT.items()}


def components(m):
    """Number of 4-connected components of a boolean mask."""
    seen, n = np.zeros_like(m), 0
    for y, x in zip(*np.nonzero(m)):
        if seen[y, x]:
            continue
        n, stack, seen[y, x] = n + 1, [(y, x)], True
        while stack:
            a, b = stack.pop()
            for u, v in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= u < m.shape[0] and 0 <= v < m.shape[1] and m[u, v] and not seen[u, v]:
                    seen[u, v] = True
                    stack.append((u, v))
    return n


def read(img, k, kind):
    """Ink = pixels of cell k farther from the background than half the cell's largest contrast. char: the ink
    box area-resampled to the 3x5 font grid, nearest glyph; shape: ink fill ratio of its box (square 1, circle
    pi/4, triangle 1/2); dots: connected components."""
    r = img.shape[0]
    c0, c1 = (k % 3) * r / 3, (k // 3) * r / 3
    crop = img[int(np.ceil(c1)):int(c1 + r / 3), int(np.ceil(c0)):int(c0 + r / 3)]
    border = np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])
    dist = np.linalg.norm(crop - np.median(border, 0), axis=-1)
    soft = dist / max(dist.max(), 1e-9)
    m = soft > 0.5
    ys, xs = np.nonzero(m)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    if kind == "char":
        grid = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(soft[box])[None, None], (5, 3))[0, 0] > 0.5
        return min(GLYPHS, key=lambda c: (np.abs(GLYPHS[c] - grid.numpy()).sum(), c))
    if kind == "shape":
        fill = m[box].mean()
        return min((abs(f - fill), s) for s, f in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)))[1]
    return str(components(m))


def test_detail_size_decides_what_each_resolution_can_read():
    """Every item of 40 test-split scenes, read at 64/128/192 px. Measured (this seed): large 0.98 at 64 px;
    medium 0.47 at 64, 0.95 at 128; small 0.17 at 64 (chance: 1/17 chars, 1/3 shapes), 0.60 at 128, 0.59 at 192
    (small characters 0.06 -> 0.87; small dots stay unread by this reader: 0.00 / 0.07 / 0.14, the noise breaks
    them into specks)."""
    hits = collections.defaultdict(list)
    for i in range(40):
        rec, scene = data.synthetic_record(0, "test", i)
        im = data.render(scene)
        for r in (64, 128, 192):
            img = view(im, r)
            for k, item in enumerate(scene["cells"]):
                if item is not None:
                    ok = read(img, k, item["kind"]) == item["value"]
                    hits[item["size"], r].append(ok), hits[item["kind"], item["size"], r].append(ok)
    acc = {key: float(np.mean(v)) for key, v in hits.items()}
    assert min(len(hits["small", 64]), len(hits["medium", 64]), len(hits["large", 64])) >= 60
    assert acc["large", 64] >= 0.95
    assert acc["medium", 64] <= 0.6 and acc["medium", 128] >= 0.9 and acc["medium", 192] >= 0.9
    assert acc["small", 64] <= 0.25 and acc["small", 128] >= 0.5 and acc["small", 192] >= 0.5
    assert acc["char", "small", 64] <= 0.15 and acc["char", "small", 192] >= 0.8
    assert acc["small", 64] < acc["medium", 64] < acc["large", 64]


def test_patch_labels_cover_exactly_the_ink(monkeypatch):
    """The tiny ViT's pretraining labels (data.patch_example): every strongly inked pixel lies in a patch labelled
    with an item, every item in the tile labels one of its patches with its class, tiles come from all three
    scales, and the character 3 is not three dots. The ink is found on the same tiles without sensor noise."""
    scales, labelled = collections.Counter(), 0
    for i in range(48):
        noisy, labels, items = data.patch_example(0, "test", i)
        assert noisy.shape == (64, 64, 3) and labels.shape == (64,)
        assert np.array_equal(data.patch_example(0, "test", i)[0], noisy)  # deterministic, noise included
        with monkeypatch.context() as m:
            m.setattr(data, "NOISE", 0.0)
            im, clean_labels, _ = data.patch_example(0, "test", i)
        assert np.array_equal(clean_labels, labels) and np.abs(im.astype(float) - noisy).mean() > 5
        scene = data.synthetic_record(0, "test", i)[1]
        dist = np.linalg.norm(im.astype(float) - np.array(scene["background"]), axis=-1)
        ink = dist > 0.5 * dist.max()
        ink_per_patch = ink.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64).sum(1)
        assert ink_per_patch[labels == 0].sum() == 0, i
        for cls, size, s, patches in items:
            assert cls > 0 and size in data.SIZES and (labels[patches] == cls).any(), (i, cls, patches)
            scales[s] += 1
        labelled += (labels > 0).sum()
    assert set(scales) == {1, 2, 3} and labelled > 48 * 4
    three = data.ITEM_CLASSES.index("3")
    assert data.item_class({"kind": "char", "value": "3"}) == three
    assert data.item_class({"kind": "dots", "value": "3"}) == data.ITEM_CLASSES.index("3 dots") != three
    assert len(set(data.ITEM_CLASSES)) == len(data.ITEM_CLASSES) == 1 + len(data.FONT) + len(data.SHAPES) + 5


# ----------------------------------------------------------------------------- tokenizer and workers
def test_tiny_tokenizer(tok, tok_dir, tmp_path):
    """data.build_tiny_tokenizer is deterministic; what it builds and the copy the tiny presets use (shipped with
    the tiny LM, trained on the corpus of the generator the LM learnt on) both put the specials where the
    templates expect them and encode every line of today's corpus, and any plain text, without <unk>."""
    import train
    again = data.build_tiny_tokenizer(str(tmp_path / "again"))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert open(os.path.join(tok_dir, name), "rb").read() == open(os.path.join(again, name), "rb").read()
    for t in (tok, Tokenizer.from_pretrained(train.tiny_tokenizer())):
        assert t.vocab_size == 512 and (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 3)
        assert [t.special[s] for s in ["<unk>", *data.TINY_SPECIALS]] == [0, 4, 5, 6, 7]
        for line in data.tiny_corpus(200) + ["Any text: ~{}|`^_ 0123456789, AZ az!"]:
            ids = t.encode(line)
            assert 0 not in ids and t.decode(ids) == line, line


def test_dataloader_workers_match_main_process(tok):
    ds = data.SyntheticDataset(tok, n=6, template="pheye", image_size=64)
    again = pickle.loads(pickle.dumps(ds))
    assert again[5][1] == ds[5][1] and torch.equal(again[5][0], ds[5][0])
    main = [ds.collate([ds[i] for i in range(j, j + 3)]) for j in (0, 3)]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ds.collate)
    for got, want in zip(loader, main):
        assert all(torch.equal(got[k], want[k]) for k in ("pixels", "ids", "labels", "mask"))
