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
    "llama3": ("<s><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + data.LLAMA3_SYSTEM + "<|eot_id|>"
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
    assert "sample 1 (id 'synthetic-0-train-000001'): 50 tokens > max_len=40" in str(caught[1].message)
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
    mean = (122, 116, 104)  # LLaVA's pad colour, tuple(int(x * 255) for x in image_mean)
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


def test_center_crop_and_pad_match_clip_processor():
    """center_crop: CLIP's processor (shortest side to size, centre crop), what LLaVA-style training does without
    --image_aspect_ratio pad; pad_square: LLaVA's expand2square, then the same processor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    clip = CLIPImageProcessorPil(size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12})
    g = np.random.default_rng(0)
    for w, h in [(31, 17), (17, 31), (40, 13), (13, 13)]:
        im = Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = torch.from_numpy(clip(im, return_tensors="np")["pixel_values"][0])
        assert (data.load_image(im, 12, pad_square=False, center_crop=True) - ref).abs().max() < 1e-5, (w, h)
        squashed = data.load_image(im, 12, pad_square=False)  # Pheye's plain resize is another image
        assert w == h or (squashed - ref).abs().max() > 0.1
        canvas = Image.new("RGB", (max(w, h),) * 2, tuple(int(255 * m) for m in clip.image_mean))
        canvas.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))  # LLaVA train.py's expand2square
        ref = torch.from_numpy(clip(canvas, return_tensors="np")["pixel_values"][0])
        assert (data.load_image(im, 12, pad_square=True) - ref).abs().max() < 1e-5, (w, h)


def test_pad_square_and_exif(tmp_path):
    im = Image.new("RGB", (8, 4), (255, 255, 255))
    x = data.load_image(im, 8, pad_square=True)   # 8x4 centred on 8x8: rows 0-1 and 6-7 are the mean colour
    assert data.PAD_COLOUR == (122, 116, 104)   # LLaVA's expand2square colour: the CLIP mean, truncated
    mean = torch.tensor(norm(data.PAD_COLOUR))
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


# ----------------------------------------------------------------------------- the releases' tokenization
# Reference: each release's own rules, written from its code and run with transformers' tokenizers on real-format
# tokenizer files: the conversation string as get_prompt builds it, LLaVA's tokenizer_image_token, and the label
# masking of preprocess_v1 (LLaVA-1.5) / preprocess_llama3 (INF-LLaVA).
CONV = [{"from": "human", "value": "What is written in the center cell?\n<image>"}, {"from": "gpt", "value": "7"},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "The dark red, mostly."},
        {"from": "human", "value": "Where is the blue square?"}, {"from": "gpt", "value": "Top left."}]


def release_prompt(template, turns):
    """conv.get_prompt() after preprocess_multimodal moved <image> to the front; an unanswered last question ends
    with the assistant's role, as at inference."""
    qa = [t["value"] for t in turns]
    qa[0] = "<image>\n" + qa[0].replace("<image>", "").strip()
    if template == "vicuna_v1":   # SeparatorStyle.TWO, sep " ", sep2 "</s>"
        out = data.VICUNA_SYSTEM + " "
        for j, m in enumerate(qa):
            out += ("USER: " + m + " ", "ASSISTANT: " + m + "</s>")[j % 2]
        return out + ("ASSISTANT:" if len(qa) % 2 else "")
    roles = ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an "
           "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
           "user's questions.<|eot_id|>")   # INF-LLaVA conv_llama3, SeparatorStyle.MPT, sep "<|eot_id|>"
    for j, m in enumerate(qa):
        out += roles[j % 2] + m + "<|eot_id|>"
    return out + (roles[1] if len(qa) % 2 else "")


def tokenizer_image_token(hf, prompt):
    """LLaVA's mm_utils.tokenizer_image_token: each <image>-separated chunk tokenised by its own call; the BOS of
    the first kept, the later ones' dropped."""
    chunks = [hf(c).input_ids for c in prompt.split("<image>")]
    offset = int(bool(chunks[0]) and chunks[0][0] == hf.bos_token_id)
    ids = chunks[0][:offset]
    for k, c in enumerate(chunks):
        ids += ([IMAGE_ID] if k else []) + c[offset:]
    return ids


def release_labels(hf, template, prompt, ids):
    """preprocess_v1 (with its correction for legacy=False tokenizers) and preprocess_llama3: mask each round's
    instruction by its separately tokenised length; a tokenization mismatch (LLaVA drops the sample) fails."""
    n = lambda s: len(tokenizer_image_token(hf, s))
    target = list(ids)
    if template == "vicuna_v1":
        cur = 1
        target[:1] = [IGNORE]
        for i, rou in enumerate(prompt.split("</s>")):
            parts = rou.split(" ASSISTANT: ")
            if rou == "" or len(parts) != 2:
                break
            round_len, instruction_len = n(rou), n(parts[0] + " ASSISTANT: ") - 2
            if i != 0 and not hf.legacy:   # LLaVA subtracts 1: on LLaMA's vocabulary "▁USER" (round alone) is one
                # piece more than "USER" (after </s>, no dummy prefix); on this vocabulary we measure the difference
                d = n(rou) - 1 - (len(hf("</s>" + rou, add_special_tokens=False).input_ids) - 1)
                round_len, instruction_len = round_len - d, instruction_len - d
            target[cur:cur + instruction_len] = [IGNORE] * instruction_len
            cur += round_len
    else:
        rounds = prompt.split("<|eot_id|>")
        rounds = (["<|eot_id|>".join(rounds[:3])]
                  + ["<|eot_id|>".join(rounds[k:k + 2]) for k in range(3, len(rounds), 2)])
        cur, sep = 0, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        for i, rou in enumerate(rounds):
            parts = rou.split(sep)
            if rou == "" or len(parts) != 2:
                break
            round_len, instruction_len = n(rou) + 1 - (i > 0), n(parts[0] + sep) - (i > 0)
            target[cur:cur + instruction_len] = [IGNORE] * instruction_len
            cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    assert cur == len(ids), "LLaVA would report a tokenization mismatch and drop this sample"
    return target


def conversation_corpus():
    lines = data.tiny_corpus(300) + [release_prompt(t, CONV).replace("<image>", "") for t in ("vicuna_v1", "llama3")]
    return lines + [data.PHEYE_SYSTEM + "\n\nInstruction: what?\nOutput: The dark red"]


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory):
    """A LLaMA-format SentencePiece model (BPE, byte fallback, dummy prefix, identity normalisation, split digits),
    with LLaVA-1.5's tokenizer_config (legacy=False)."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("llama_sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(conversation_corpus()), model_prefix=str(d / "tokenizer"), vocab_size=700,
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        character_coverage=1.0, pad_id=-1, minloglevel=2, num_threads=1)
    with open(d / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "legacy": False,
                   "add_bos_token": True}, f)
    return d


@pytest.mark.parametrize("n_turns", [1, 2, 6, 5])
def test_vicuna_v1_is_llava_tokenization(llama_sp, monkeypatch, n_turns):
    """Our vicuna_v1 ids are LLaVA-1.5's tokenization of the whole prompt string and our labels its preprocess_v1
    masks, token for token, with transformers' LLaMA tokenizer (legacy=False, as vicuna-v1.5) on a LLaMA-format
    SentencePiece model. No stray "▁" after the system prompt or before an answer (a lone "▁" before an answer's
    digit is the release's own: split digits); "USER: " ends in one and the chunk after <image> starts with one,
    as in LLaVA (29871, -200, 29871, 13 on LLaMA)."""
    from test_tokenizer import hf_llama
    hf = hf_llama(llama_sp, monkeypatch, user=(), legacy=False)
    ours = Tokenizer.from_pretrained(llama_sp)
    turns = CONV[:n_turns]
    prompt = release_prompt("vicuna_v1", turns)
    want = tokenizer_image_token(hf, prompt)
    ids, labels = data.tokenize_conversation(ours, turns, "vicuna_v1")
    assert ids == want
    lone = ours._sp.piece_to_id("\u2581")
    p = ids.index(IMAGE_ID)
    assert ids[p - 1] == lone and ours._sp.id_to_piece(ids[p + 1]).startswith("\u2581")   # "▁" or "▁\n"
    assert ours.decode(ids[1:p]) == data.VICUNA_SYSTEM + " USER: " and lone not in ids[1:p - 1]
    if n_turns % 2 == 0:
        assert labels == release_labels(hf, "vicuna_v1", prompt, want)
        answers = [ours.decode(ids[s:e - 1]) for s, e in spans(labels)]
        assert answers == [t["value"] for t in turns[1::2]] and all(ids[e - 1] == 2 for s, e in spans(labels))
    else:   # the generation prompt: the training ids up to the answer
        full_ids, full_labels = data.tokenize_conversation(ours, CONV[:n_turns + 1], "vicuna_v1")
        assert (ids, labels) == (full_ids[:len(ids)], full_labels[:len(ids)]) and prompt.endswith(" ASSISTANT:")
    # the separately encoded segments of the old template differ: "▁" after the system prompt, "▁" + answer
    assert ours.encode(data.VICUNA_SYSTEM + " ")[-1] == lone and ours.encode(" 7")[0] == lone


def byte_bpe_dir(d, pattern, specials, bos=None, eos="<|endoftext|>"):
    """A byte-level BPE tokenizer.json trained on the conversations (pattern None: GPT-2's regex, as Phi-1.5);
    bos: the token its post-processor adds (LLaMA-3 adds <|begin_of_text|>; GPT-2/Phi-1.5 add nothing)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    tk = HFTokenizer(BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
    tk.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(conversation_corpus(), trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials,
        show_progress=False))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    tk.save(str(d / "tokenizer.json"))
    with open(d / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}, f)
    return d


@pytest.mark.parametrize("n_turns", [2, 6, 5])
def test_llama3_is_inf_llava_tokenization(tmp_path, n_turns):
    """INF-LLaVA's conv_llama3 on a LLaMA-3-format tokenizer (byte-level BPE with LLaMA-3's regex, a post-processor
    that adds <|begin_of_text|>): our ids are tokenizer_image_token of the whole prompt, the BOS written twice as
    the release has it (the tokenizer's and the template's), and our labels are preprocess_llama3's."""
    from llm import LLAMA3_PATTERN
    from transformers import PreTrainedTokenizerFast
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    d = byte_bpe_dir(tmp_path, LLAMA3_PATTERN, specials, bos="<|begin_of_text|>", eos="<|eot_id|>")
    hf, ours = PreTrainedTokenizerFast.from_pretrained(d), Tokenizer.from_pretrained(d)
    turns = CONV[:n_turns]
    prompt = release_prompt("llama3", turns)
    want = tokenizer_image_token(hf, prompt)
    ids, labels = data.tokenize_conversation(ours, turns, "llama3")
    assert ids == want and ids[:2] == [ours.special["<|begin_of_text|>"]] * 2
    if n_turns % 2 == 0:
        assert labels == release_labels(hf, "llama3", prompt, want)
        answers = [ours.decode(ids[s:e - 1]) for s, e in spans(labels)]
        assert answers == [t["value"] for t in turns[1::2]]
    else:
        full_ids, full_labels = data.tokenize_conversation(ours, CONV[:n_turns + 1], "llama3")
        assert (ids, labels) == (full_ids[:len(ids)], full_labels[:len(ids)])
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_pheye_is_phi_tokenization(tmp_path):
    """Pheye's prompt on a Phi-1.5-format tokenizer (GPT-2 byte-level BPE, no BOS): our ids are the tokenization
    of the whole string "{SYSTEM}\\n\\nInstruction: {q}\\nOutput: {a}" + eos, the space inside the answer's first
    token (" The"), and exactly " {a}" + eos is supervised."""
    from transformers import PreTrainedTokenizerFast
    d = byte_bpe_dir(tmp_path, None, ["<|endoftext|>"])
    hf, ours = PreTrainedTokenizerFast.from_pretrained(d), Tokenizer.from_pretrained(d)
    turns = [{"from": "human", "value": "<image>\nWhere is it?"}, {"from": "gpt", "value": "The dark red"}]
    prompt = data.PHEYE_SYSTEM + "\n\nInstruction: Where is it?\nOutput:"
    ids, labels = data.tokenize_conversation(ours, turns, "pheye")
    assert ids == hf(prompt + " The dark red<|endoftext|>").input_ids
    n = len(hf(prompt).input_ids)
    assert labels == [IGNORE] * n + ids[n:] and hf.decode(ids[n:n + 1]) == " The"
    assert data.tokenize_conversation(ours, turns[:1], "pheye")[0] == hf(prompt).input_ids
