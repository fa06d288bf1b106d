"""
Data for nanoHiRes: images, conversations, chat templates, datasets, and the synthetic fine-detail set.

    images         load_image: EXIF orientation, any PIL mode to RGB, LLaVA's pad-to-square or CLIP's centre
                   crop, resize, CLIP norm
    conversations  tokenize_conversation: vicuna_v1 (LLaVA-1.5, HIRE), llama3 (INF-LLaVA), pheye, plain;
                   labels supervise only the assistant's answers and their end-of-turn token
    datasets       LlavaJsonDataset (LLaVA JSON + image folder), SyntheticDataset (rendered on the fly), collate
    tokenizer      build_tiny_tokenizer: a 512-piece SentencePiece BPE trained on the synthetic corpus

    python data.py --out DIR --n N       # writes the synthetic set as a LLaVA-format folder
"""
import argparse
import io
import json
import logging
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from llm import IGNORE, IMAGE_ID  # the prompt's image slot and the unsupervised label, which the models define

log = logging.getLogger("nanohires.data")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA pads with tuple(int(x * 255) for x in image_processor.image_mean): the mean truncated, not rounded
PAD_COLOUR = tuple(int(255 * m) for m in CLIP_MEAN)   # (122, 116, 104)
IMAGE_TOKEN = "<image>"
MAX_PIXELS = 89_478_485   # PIL's own decompression-bomb limit (1024 * 1024 * 1024 // 4 // 3)


class DataError(ValueError):
    """Bad input data: the message names the file, sample, field or turn."""


# ----------------------------------------------------------------------------- images
def _to_rgb(im, name):
    """Any PIL mode to RGB. Transparency is composited on the CLIP mean colour (what padding uses too), so a
    transparent region reads as the normalised zero, not as whatever colour happens to sit under alpha 0."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16/32-bit greyscale: rescale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info or im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        back = Image.new("RGBA", im.size, PAD_COLOUR + (255,))
        im = Image.alpha_composite(back, im)
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")   # L, 1, P, CMYK, YCbCr, LAB, HSV
        except ValueError as e:
            raise DataError(f"image {name}: cannot convert mode {im.mode} to RGB ({e})") from None
    return im


def expand2square(im, colour):
    """LLaVA-1.5's pad-to-square: the image centred on a square canvas of the CLIP mean colour (PAD_COLOUR)."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new("RGB", (side, side), colour)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def open_image(path_or_pil, max_pixels=MAX_PIXELS):
    """An RGB PIL image with its EXIF orientation applied. Errors name the file: missing, not an image,
    truncated, or larger than max_pixels (a decompression bomb: checked from the header, before decoding)."""
    if isinstance(path_or_pil, Image.Image):
        im, name = path_or_pil, "<PIL image>"
    else:
        name = str(path_or_pil)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"image file not found: {name}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(name)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"image {name}: decompression bomb refused ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"image {name}: not a readable image ({e})") from None
    if im.width * im.height > max_pixels:
        raise DataError(f"image {name}: decompression bomb refused: {im.width}x{im.height} = "
                        f"{im.width * im.height} pixels > max_pixels {max_pixels}")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {name}: corrupt or truncated ({e})") from None
    return _to_rgb(im, name)


def load_image(path_or_pil, size, pad_square, max_pixels=MAX_PIXELS, center_crop=False):
    """(3, size, size) float32, CLIP-normalised; bicubic, as CLIP's preprocessing. pad_square: LLaVA's pad to a
    square with the mean colour, then resize. Else center_crop: CLIP's processor alone (resize the shortest side to
    size, crop the centre; LLaVA-style training without --image_aspect_ratio pad, e.g. INF-LLaVA's pretraining),
    or neither: a plain aspect-changing resize (Pheye)."""
    im = open_image(path_or_pil, max_pixels)
    if pad_square and max(im.size) ** 2 > max_pixels:   # a 60000x10 strip would pad to 3.6 gigapixels
        name = "<PIL image>" if isinstance(path_or_pil, Image.Image) else path_or_pil
        raise DataError(f"image {name}: padding {im.width}x{im.height} to a square makes {max(im.size) ** 2} "
                        f"pixels > max_pixels {max_pixels}")
    if pad_square:
        im = expand2square(im, PAD_COLOUR)
    elif center_crop and im.width != im.height:
        w, h = im.size  # as CLIPImageProcessor: the long side int(size * long / short), the crop's corner floored
        w, h = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return clip_normalize(torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1))  # (3, S, S), a copy


def clip_normalize(x):
    """uint8 RGB (..., 3, H, W) -> float32 CLIP-normalised."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- chat templates
# Each template writes the conversation as one string, exactly as its release does, and tokenize_conversation
# reads that string as the release's tokenizer does (see there).
# LLaVA-1.5 conv_vicuna_v1 (llava/conversation.py; sep " ", sep2 "</s>"):
#   "{SYSTEM} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# INF-LLaVA conv_llama3 (INF_llava/conversation.py; MPT style, sep "<|eot_id|>"). Its system turn holds the
# vicuna sentence, not LLaVA-NeXT's:
#   "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
#   "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{q1}<|eot_id|>"
#   "<|start_header_id|>assistant<|end_header_id|>\n\n{a1}<|eot_id|>..."
LLAMA3_SYSTEM = VICUNA_SYSTEM
# Pheye release (miguelscarv/pheye generate.py): f"{SYSTEM_PROMPT}\n\nInstruction: {prompt}\nOutput:"; the answer
# is read back after "Output:" with its leading space stripped, so we train " {a}" + eos after it.
PHEYE_SYSTEM = ("You are an AI visual assistant and you are seeing a single image. You will receive an instruction "
                "regarding that image. Your goal is to follow the instruction as faithfully as you can.")
TEMPLATES = ("vicuna_v1", "llama3", "pheye", "plain")
# Datasets also take template="mix": sample i in MIX[i % 4], so that one run teaches a language model the three
# instruction formats and, as "plain" samples (captions in the synthetic set), plain descriptive text: what a
# pretrained LM brings to each paper's recipe (the tiny base, train.tiny_base). Pheye's format has no image
# slot; in a mix the image goes first, so that a LLaVA-style model still sees it.
MIX = ("vicuna_v1", "llama3", "pheye", "plain")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def check_turns(turns, where="conversation"):
    """Turns must be dicts {"from": human|gpt, "value": str}, alternating and starting with the human."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns, got {turns!r:.80}")
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise DataError(f"{where}, turn {j}: needs a string 'value', got {t!r:.80}")
        role = ROLES.get(t.get("from"))
        if role is None:
            raise DataError(f"{where}, turn {j}: unknown role 'from'={t.get('from')!r} "
                            f"(expected one of {sorted(ROLES)})")
        if role != ("user", "assistant")[j % 2]:
            raise DataError(f"{where}, turn {j}: turns must alternate human/gpt starting with human, "
                            f"got {t.get('from')!r}")


def _special(tok, s):
    if s not in tok.special:
        raise DataError(f"the tokenizer has no special token {s!r} that this template needs")
    return tok.special[s]


def tokenize_conversation(tok, turns, template, where="conversation"):
    """LLaVA-format turns -> (ids, labels), two lists of equal length. labels = ids on each assistant answer and
    its end-of-turn token, IGNORE elsewhere. A final human turn without answer ends the ids with the assistant's
    prompt (for generation): exactly the ids that precede the answer in training.

    The ids are the release's tokenization of the whole conversation string (_encode): text between special
    tokens is encoded in one piece, so the space after "ASSISTANT:" or "Output:" belongs to the answer's first
    token ("▁The", " The") and no stray "▁" appears. "<image>" is moved to the front of the first human
    turn, followed by "\n" (LLaVA's preprocess_multimodal), and becomes one IMAGE_ID position; as in LLaVA's
    tokenizer_image_token, the text after it is a fresh tokenizer call (LLaMA: "▁", "\n" = 29871, 13).
    Pheye has no placeholder: its images enter by cross-attention.

    What is supervised: an answer's tokens start at len(tokens of everything before the answer), which is LLaVA's
    instruction_len rule; counted on the whole prefix it needs no correction for legacy=False tokenizers (LLaVA's
    `round_len -= 1` for rounds after the first). So vicuna_v1 supervises "▁{a}" and "</s>", llama3 "{a}" and
    "<|eot_id|>" (everything through the assistant header's "\n\n" is masked, as preprocess_llama3 does), pheye
    " {a}" and eos. Differences from the releases: plain ends the caption with eos (LLaVA's pretraining ends it
    with "\n"), so that generation stops; a mismatch is never silently dropped (LLaVA masks the whole sample)."""
    if template not in TEMPLATES:
        raise DataError(f"unknown chat template {template!r} (one of {', '.join(TEMPLATES)})")
    check_turns(turns, where)
    texts = [t["value"] for t in turns]
    n_img = sum(s.count(IMAGE_TOKEN) for s in texts)
    if n_img > 1 or any(IMAGE_TOKEN in s for s in texts[1:]):
        raise DataError(f"{where}: '{IMAGE_TOKEN}' must appear at most once, in the first human turn")
    if template == "pheye":
        texts[0] = texts[0].replace(IMAGE_TOKEN, "").strip()
    elif template != "plain":
        texts[0] = IMAGE_TOKEN + "\n" + texts[0].replace(IMAGE_TOKEN, "").strip()
    bos = [tok.bos_id] if tok.bos_id is not None and template != "pheye" else []  # Phi-1.5 adds no BOS
    eos = tok.eos_id
    parts = []   # (piece, supervised): the conversation string as text pieces and token ids

    if template == "plain":   # LLaVA pretraining: image, caption, end; the human text is not used
        if len(texts) != 2:
            raise DataError(f"{where}: the plain template takes one human + one gpt turn, got {len(texts)} turns")
        parts = [(IMAGE_ID, False), (texts[1], True), (eos, True)]
    elif template == "vicuna_v1":
        for j in range(0, len(texts), 2):
            parts.append(((VICUNA_SYSTEM + " " if j == 0 else "") + f"USER: {texts[j]} ASSISTANT:", False))
            if j + 1 < len(texts):
                parts += [(" " + texts[j + 1], True), (eos, True)]
    elif template == "llama3":
        begin, eot = _special(tok, "<|begin_of_text|>"), _special(tok, "<|eot_id|>")
        start, end = _special(tok, "<|start_header_id|>"), _special(tok, "<|end_header_id|>")
        header = lambda role: [(start, False), (role, False), (end, False), ("\n\n", False)]
        # the release's tokenizer adds <|begin_of_text|> and the template writes it again: two, as INF-LLaVA has
        parts = [(begin, False), *header("system"), (LLAMA3_SYSTEM, False), (eot, False)]
        for j in range(0, len(texts), 2):
            parts += [*header("user"), (texts[j], False), (eot, False), *header("assistant")]
            if j + 1 < len(texts):
                parts += [(texts[j + 1], True), (eot, True)]
    else:   # pheye: later rounds (ours; the release is single-turn) repeat Instruction/Output
        for j in range(0, len(texts), 2):
            parts.append(((PHEYE_SYSTEM + "\n\n" if j == 0 else "\n\n") + f"Instruction: {texts[j]}\nOutput:", False))
            if j + 1 < len(texts):
                parts += [(" " + texts[j + 1], True), (eos, True)]

    pieces = [p for p, _ in parts]
    ids = bos + _encode(tok, pieces)
    labels = [IGNORE] * len(ids)
    for k, (_, supervised) in enumerate(parts):
        if supervised and (k == 0 or not parts[k - 1][1]):                 # an answer starts here; find where it ends
            e = next((m for m in range(k, len(parts)) if not parts[m][1]), len(parts))
            a = len(bos) + len(_encode(tok, pieces[:k]))
            b = len(ids) if e == len(parts) else len(bos) + len(_encode(tok, pieces[:e]))
            labels[a:b] = ids[a:b]
    return ids, labels


def _encode(tok, pieces):
    """Text pieces and token ids -> ids, as a release's tokenizer reads the string they spell: adjacent text is
    joined and encoded whole; text right after a special token gets no SentencePiece dummy prefix (HF's LLaMA
    tokenizer, legacy=False, as LLaVA-1.5's vicuna-v1.5 config sets); "<image>" splits the string into chunks that
    are tokenised separately (tokenizer_image_token), so the text after it starts afresh, with the prefix."""
    ids, run, fresh = [], [], True
    for p in pieces + [None]:
        if isinstance(p, str):
            run.append(p)
            continue
        for k, chunk in enumerate("".join(run).split(IMAGE_TOKEN)):
            if k:
                ids.append(IMAGE_ID)
                fresh = True
            if chunk:
                ids += tok.encode(chunk, prefix=fresh)
                fresh = False
        run = []
        if p is not None:
            ids.append(p)
            fresh = p == IMAGE_ID
    return ids


def truncate(ids, labels, max_len, where="sample"):
    """Cut to max_len tokens (the image counts as one), warning with how many answers lost tokens.
    Returns (ids, labels, truncated?). Cutting the image itself is an error: the model needs it."""
    if max_len is None or len(ids) <= max_len:
        return ids, labels, False
    if IMAGE_ID in ids and ids.index(IMAGE_ID) >= max_len:
        raise DataError(f"{where}: max_len={max_len} would cut the image placeholder at position "
                        f"{ids.index(IMAGE_ID)}")
    starts = [i for i, y in enumerate(labels) if y != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
    cut = sum(_span_end(labels, s) > max_len for s in starts)   # answers that run past the limit
    warnings.warn(f"{where}: {len(ids)} tokens > max_len={max_len}, truncated; {cut} of {len(starts)} "
                  f"answers lose tokens" + (" (no supervised token left)" if all(s >= max_len for s in starts)
                                            else ""), stacklevel=2)
    return ids[:max_len], labels[:max_len], True


def _span_end(labels, s):
    e = s
    while e < len(labels) and labels[e] != IGNORE:
        e += 1
    return e


# ----------------------------------------------------------------------------- batches
def collate(batch, pad_id, left=False):
    """[(pixels, ids, labels), ...] -> {"pixels" (B,3,S,S), "ids" (B,T), "labels" (B,T), "mask" (B,T)}.
    Right padding (training); left=True pads on the left (batched generation). Padding: pad_id, IGNORE, 0."""
    T = max(len(b[1]) for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, (_, x, y) in enumerate(b[:3] for b in batch):
        sl = slice(T - len(x), T) if left else slice(0, len(x))
        ids[i, sl], labels[i, sl], mask[i, sl] = torch.tensor(x), torch.tensor(y), 1
    return {"pixels": torch.stack([b[0] for b in batch]), "ids": ids, "labels": labels, "mask": mask}


def pad_id_of(tok):
    return next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)


def count_targets(labels):
    """Tokens the loss counts: the model predicts labels[:, 1:] from the positions before them."""
    return (labels[..., 1:] != IGNORE).sum()


def end_of_turn(tok, template):
    """The token that ends an answer in this template: <|eot_id|> for llama3, else eos (generation stops there)."""
    return _special(tok, "<|eot_id|>") if template == "llama3" else tok.eos_id


def answer_text(tok, ids):
    """A generated row of ids -> its text, up to the first end-of-turn token (eos or <|eot_id|>)."""
    stops = {tok.eos_id, tok.special.get("<|eot_id|>"), tok.pad_id} - {None}
    ids = list(ids)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode(ids[:end]).strip()


def normalize_answer(s):
    """Exact-match comparison key: lower case, no surrounding blanks or final full stop."""
    return s.strip().lower().rstrip(".").strip()


class _Samples(torch.utils.data.Dataset):
    """What both datasets share: record(i) + image(i) -> (pixels, ids, labels); collate; qa_set.
    Picklable (no lambdas, no open files): DataLoader workers get a copy."""

    def _init(self, tok, template, image_size, pad_square, max_len, center_crop=False):
        self.tok, self.template, self.image_size = tok, template, image_size
        self.pad_square, self.center_crop, self.max_len, self.n_truncated = pad_square, center_crop, max_len, 0
        self.max_pixels = MAX_PIXELS
        if template not in TEMPLATES + ("mix",):
            raise DataError(f"unknown chat template {template!r} (one of {', '.join(TEMPLATES)}, mix)")

    def sample(self, i, prompt_only=False):
        """(pixels, ids, labels, record) of sample i; prompt_only drops the last answer (for generation)."""
        rec = self.record(i)
        where = f"sample {i} (id {rec.get('id')!r})"
        turns = rec["conversations"][:-1] if prompt_only else rec["conversations"]
        template = self.template_of(i)
        ids, labels = tokenize_conversation(self.tok, turns, template, where)
        if self.template == "mix" and template == "pheye":
            ids, labels = [IMAGE_ID] + ids, [IGNORE] + labels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, labels, cut = truncate(ids, labels, self.max_len, where)
        if cut:   # counted per process (each DataLoader worker counts its own)
            self.n_truncated += 1
            warnings.warn(f"{caught[0].message} [{self.n_truncated} truncated so far]", stacklevel=2)
        return (load_image(self.image(i), self.image_size, self.pad_square, self.max_pixels, self.center_crop), ids,
                labels, rec)

    def template_of(self, i):
        return MIX[i % len(MIX)] if self.template == "mix" else self.template

    def __getitem__(self, i):
        return self.sample(i)[:3]

    def collate(self, batch):
        return collate(batch, pad_id_of(self.tok))

    def qa_set(self, n):
        """The first n samples as generation prompts: the conversation minus its last answer."""
        return QASet(self, min(n, len(self)))


class QASet(torch.utils.data.Dataset):
    """Items (pixels, prompt ids, question, answer, detail); collate left-pads for batched generation and adds
    the lists "question", "answer", "detail" (the detail-size bucket, or None)."""

    def __init__(self, base, n):  # captions ("plain" samples of a mix) are not questions: left out
        self.base = base
        self.index = [i for i in range(len(base)) if base.template_of(i) != "plain"][:n]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        pixels, ids, _, rec = self.base.sample(self.index[i], prompt_only=True)
        turns = rec["conversations"]
        question = turns[-2]["value"].replace(IMAGE_TOKEN, "").strip()
        return pixels, ids, [IGNORE] * len(ids), question, turns[-1]["value"], rec.get("detail")

    def collate(self, batch):
        out = collate(batch, pad_id_of(self.base.tok), left=True)
        out.update(question=[b[3] for b in batch], answer=[b[4] for b in batch], detail=[b[5] for b in batch])
        return out


# ----------------------------------------------------------------------------- LLaVA JSON datasets
def read_llava_json(path):
    """The records of a LLaVA-format JSON file: [{"id", "image", "conversations": [{"from", "value"}, ...]}]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:   # JSON is UTF-8 (RFC 8259), whatever the locale says
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); JSON files are "
                        f"UTF-8: re-save it so (e.g. from Latin-1: iconv -f latin1 -t utf-8)") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


class LlavaJsonDataset(_Samples):
    """A LLaVA-format JSON file + image folder. Records are checked when the dataset is built (structure, roles,
    image file present, an answer to learn) and images when read; skip_bad=True skips bad ones with a logged
    count instead of raising. split: None (all records), "val"/"test" (a val_fraction of the records, spread
    evenly: record k when floor((k+1) f) > floor(k f), every 50th at 0.02; at most n of them), "train" (the rest)."""

    def __init__(self, path, tok, template="vicuna_v1", image_size=64, pad_square=True, max_len=None,
                 image_dir=None, skip_bad=False, split=None, n=None, val_fraction=0.02, max_pixels=MAX_PIXELS,
                 center_crop=False):
        self._init(tok, template, image_size, pad_square, max_len, center_crop)
        self.path, self.skip_bad, self.max_pixels = path, skip_bad, max_pixels
        self.image_dir = image_dir or os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        records = all_records = read_llava_json(path)
        held_out = lambda k: int((k + 1) * val_fraction + 1e-9) > int(k * val_fraction + 1e-9)
        if split in ("val", "test"):
            records = [r for k, r in enumerate(records) if held_out(k)][:n]
        elif split == "train":
            records = [r for k, r in enumerate(records) if not held_out(k)]
        elif split is not None:
            raise DataError(f"split={split!r}: expected None, 'train', 'val' or 'test'")
        self.records, bad = [], []
        for k, rec in enumerate(records):
            try:
                self._check(k, rec)
                self.records.append(rec)
            except (DataError, FileNotFoundError) as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
        self.n_skipped = len(bad)
        if bad:
            log.warning("%s: skipped %d bad record(s) of %d, first: %s", path, len(bad), len(records), bad[0])
        if not self.records and split in ("val", "test") and not bad:
            n_all = len(all_records)
            raise DataError(f"{path}: no {split} records: {val_fraction:g} of its {n_all} records is less than one; "
                            f"hold out a larger share (train.py --val_fraction={min(0.5, 2 / max(n_all, 1)):.2g}) "
                            f"or train without validation (train.py --n_val=0)")
        if not self.records:
            raise DataError(f"{path}: empty dataset (split={split}, {len(records)} records, {len(bad)} bad)")

    def _check(self, k, rec):
        where = f"{self.path}: record {k} (id {rec.get('id') if isinstance(rec, dict) else None!r})"
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise DataError(f"{where}: no 'conversations' field")
        check_turns(rec["conversations"], where)
        turns = rec["conversations"]
        if len(turns) % 2:   # training data: every question has its answer (generation prompts are built later)
            raise DataError(f"{where}: the last turn is a question without an answer (turns alternate human/gpt "
                            f"and must end with gpt's)")
        empty = [j for j in range(1, len(turns), 2) if not turns[j]["value"].strip()]
        if empty:
            raise DataError(f"{where}, turn {empty[0]}: empty answer (nothing to learn from)")
        if not isinstance(rec.get("image"), str):
            raise DataError(f"{where}: no 'image' field (every nanoHiRes sample has one image)")
        if not os.path.isfile(os.path.join(self.image_dir, rec["image"])):
            raise FileNotFoundError(f"{where}: image file not found: {os.path.join(self.image_dir, rec['image'])}")

    def __len__(self):
        return len(self.records)

    def record(self, i):
        return self.records[i]

    def image(self, i):
        return os.path.join(self.image_dir, self.records[i]["image"])

    def sample(self, i, prompt_only=False):
        for k in range(len(self)):   # skip_bad: a bad image hands over to the next sample
            j = (i + k) % len(self)
            try:
                return super().sample(j, prompt_only)
            except (DataError, OSError) as e:
                if not self.skip_bad:
                    raise
                self.n_skipped += 1
                log.warning("skipped sample %d (%d skipped so far): %s", j, self.n_skipped, e)
        raise DataError(f"{self.path}: every sample is bad")


# ----------------------------------------------------------------------------- the synthetic fine-detail set
# A 3x3 grid of cells on a light background, rendered at RENDER = 384 px. Each cell may hold one item: a character
# drawn in a 3x5 pixel font, a shape, or a group of dots, in one of three detail sizes. The scale s (canonical
# pixels per font pixel) sets the size: "large" (s=12) keeps 2 px per font pixel in the 64-px low-resolution
# view; "medium" (s=5) 0.83 px at 64 and 1.7 px at 128; "small" (s=3) 0.5 px at 64, 1 px at 128, 1.5 px at 192.
# Size alone does not hide a detail from a learned reader: on noise-free renders a small MLP told where the item
# is reads small items from the 64-px view at 99%, from the grey levels of the few pixels they blur into. So the
# image is also what a camera gives: each item's ink is faded towards the background by a random fraction (up
# to FADE, so its darkness does not give away its area), and sensor noise is drawn per pixel at SENSOR = 192 px
# (the sharpest view) and upsampled, so that averaging it away takes pixels the low-resolution views do not
# have. tests/test_data.py measures what thresholding pixel readers still read at each resolution and
# tests/test_train.py what the pretrained tiny ViT reads. Every question is about one item; its size is the
# sample's "detail" (like Pheye's tertiles of relative answer area). `others` is the chance that each other cell
# holds an item too: OTHERS = 0.8 gives the full scenes the tiny ViT and tokenizer were built from
# (patch_example, tiny_corpus); 0 gives one item per image on the same canvas (the miniature's task, train.py's
# default: the same sizes, fade and noise, so the same control, without the clutter that tiny models take
# thousands of steps to see through). The draws do not depend on it: only which cells are kept.
RENDER = 384
CELL = RENDER // 3
SIZES = {"large": 12, "medium": 5, "small": 3}
FADE = 0.4     # each item's ink is mixed with up to this fraction of the background colour
SENSOR = 192   # the sensor's resolution: its noise is drawn per pixel at the sharpest view and upsampled to RENDER
NOISE = 32.0   # std of the sensor noise, in 0-255 levels per channel
OTHERS = 0.8   # chance that each non-target cell holds an item (the full scenes)
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")
COLOURS = {"red": (205, 30, 30), "green": (20, 135, 45), "blue": (35, 60, 210), "purple": (125, 40, 165),
           "orange": (225, 115, 0), "black": (25, 25, 25)}
SHAPES = ("square", "circle", "triangle")
FONT = {   # 3x5 bitmaps, rows top to bottom; every glyph touches all four sides of its box
    "0": "###" "#.#" "#.#" "#.#" "###", "1": ".#." "##." ".#." ".#." "###", "2": "###" "..#" "###" "#.." "###",
    "3": "###" "..#" "###" "..#" "###", "4": "#.#" "#.#" "###" "..#" "..#", "5": "###" "#.." "###" "..#" "###",
    "6": "###" "#.." "###" "#.#" "###", "7": "###" "..#" ".#." ".#." "#..", "8": "###" "#.#" "###" "#.#" "###",
    "9": "###" "#.#" "###" "..#" "###", "A": ".#." "#.#" "###" "#.#" "#.#", "C": "###" "#.." "#.." "#.." "###",
    "E": "###" "#.." "###" "#.." "###", "H": "#.#" "#.#" "###" "#.#" "#.#", "L": "#.." "#.." "#.." "#.." "###",
    "P": "###" "#.#" "###" "#.." "#..", "U": "#.#" "#.#" "#.#" "#.#" "###",
}
QUESTIONS = {"char": "What character is written in the {} cell?", "shape": "What shape is in the {} cell?",
             "dots": "How many dots are in the {} cell?"}
CAPTION_PROMPT = "Describe the image in detail."
MARGIN = 8   # canonical pixels kept free at each cell border, so items never touch across cells


def _item(rng, size):
    """One item of a given detail size, placed at a random integer offset inside its cell (relative box)."""
    s = SIZES[size]
    kind = rng.choice(("char", "shape", "dots"))
    item = {"kind": kind, "size": size, "colour": rng.choice(sorted(COLOURS)), "fade": rng.uniform(0, FADE)}
    if kind == "char":
        item["value"], (w, h) = rng.choice(sorted(FONT)), (3 * s, 5 * s)
    elif kind == "shape":
        item["value"], (w, h) = rng.choice(SHAPES), (4 * s, 4 * s)
    else:   # n dots of diameter d = s on n random sites of a 3 x 3 lattice of pitch 2d (gaps of d)
        n, d = rng.randint(1, 5), s
        pts = [(2 * d * (j % 3), 2 * d * (j // 3)) for j in rng.sample(range(9), n)]
        x0, y0 = min(p[0] for p in pts), min(p[1] for p in pts)
        item["value"], item["dots"] = str(n), [(x - x0, y - y0) for x, y in pts]
        w, h = max(p[0] for p in pts) - x0 + d, max(p[1] for p in pts) - y0 + d
    item["offset"] = (rng.randint(MARGIN, CELL - MARGIN - w), rng.randint(MARGIN, CELL - MARGIN - h))
    item["wh"] = (w, h)
    return item


def make_scene(rng, detail, others=OTHERS):
    """A scene dict: background colour, 9 cells (an item or None), and the target cell whose item (of size
    `detail`) the question asks about. Each other cell holds an item with chance `others`; for others <= OTHERS
    the draws are the full scene's, so the scene is the full one with fewer of the other items kept."""
    if not 0 <= others <= 1:
        raise DataError(f"synthetic others={others}: expected a chance in [0, 1]")
    cells = []
    for _ in POSITIONS:
        u = rng.random()
        item = _item(rng, rng.choice(sorted(SIZES))) if u < max(others, OTHERS) else None
        cells.append(item if u < others else None)
    target = rng.randrange(len(POSITIONS))
    cells[target] = _item(rng, detail)
    background = tuple(rng.randint(215, 250) for _ in range(3))
    return {"background": background, "cells": cells, "target": target, "noise_seed": rng.getrandbits(32)}


def item_box(scene, k):
    """Canonical (x0, y0, x1, y1) of the item in cell k."""
    item = scene["cells"][k]
    x = (k % 3) * CELL + item["offset"][0]
    y = (k // 3) * CELL + item["offset"][1]
    return x, y, x + item["wh"][0], y + item["wh"][1]


def render(scene):
    """The scene as a RENDER x RENDER RGB PIL image: hard-edged items (the detail is what resolution keeps),
    then the scene's sensor noise."""
    im = Image.new("RGB", (RENDER, RENDER), scene["background"])
    draw = ImageDraw.Draw(im)
    for k, item in enumerate(scene["cells"]):
        if item is None:
            continue
        x, y, x1, y1 = item_box(scene, k)
        s, fade = SIZES[item["size"]], item["fade"]
        c = tuple(round(v + fade * (b - v)) for v, b in zip(COLOURS[item["colour"]], scene["background"]))
        if item["kind"] == "char":
            for j, bit in enumerate(FONT[item["value"]]):
                if bit == "#":
                    px, py = x + (j % 3) * s, y + (j // 3) * s
                    draw.rectangle((px, py, px + s - 1, py + s - 1), fill=c)
        elif item["value"] == "square":
            draw.rectangle((x, y, x1 - 1, y1 - 1), fill=c)
        elif item["value"] == "circle":
            draw.ellipse((x, y, x1 - 1, y1 - 1), fill=c)
        elif item["value"] == "triangle":
            draw.polygon(((x + (x1 - x - 1) / 2, y), (x1 - 1, y1 - 1), (x, y1 - 1)), fill=c)
        else:
            for dx, dy in item["dots"]:
                draw.ellipse((x + dx, y + dy, x + dx + s - 1, y + dy + s - 1), fill=c)
    n = RENDER // SENSOR
    noise = np.random.default_rng(scene["noise_seed"]).normal(0, NOISE, (SENSOR, SENSOR, 3)).astype(np.float32)
    pixels = np.asarray(im, np.float32) + noise.repeat(n, 0).repeat(n, 1)
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def describe(item):
    what = {"char": f"character {item['value']}", "shape": item["value"],
            "dots": f"group of {item['value']} dot{'s' * (item['value'] != '1')}"}[item["kind"]]
    return f"{item['size']} {item['colour']} {what}"


def caption(scene):
    """Every item, cell by cell: what a captioning stage learns to say (details of every size)."""
    parts = [f"{POSITIONS[k]}: {describe(it)}." for k, it in enumerate(scene["cells"]) if it is not None]
    return "A 3 by 3 grid. " + " ".join(parts)


def synthetic_record(seed, split, i, task="qa", others=OTHERS):
    """Sample i of a split: (LLaVA record, scene). Deterministic in (seed, split, i, others); splits use disjoint
    seed streams. The detail size cycles large/medium/small so every split is balanced by size."""
    if split not in ("train", "val", "test"):
        raise DataError(f"synthetic split={split!r}: expected 'train', 'val' or 'test'")
    if task not in ("qa", "caption"):
        raise DataError(f"synthetic task={task!r}: expected 'qa' or 'caption'")
    rng = random.Random(f"nanohires-synthetic-{seed}-{split}-{i}")   # str seeds hash with sha512: stable
    detail = tuple(SIZES)[i % len(SIZES)]
    scene = make_scene(rng, detail, others)
    k, item = scene["target"], scene["cells"][scene["target"]]
    if task == "qa":
        question, answer = QUESTIONS[item["kind"]].format(POSITIONS[k]), item["value"]
    else:
        question, answer = CAPTION_PROMPT, caption(scene)
    box = item_box(scene, k)
    rec = {"id": f"synthetic-{seed}-{split}-{i:06d}", "image": f"images/{split}-{i:06d}.png",
           "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                             {"from": "gpt", "value": answer}],
           "detail": detail, "kind": item["kind"], "cell": POSITIONS[k], "box": list(box),
           "area": round((box[2] - box[0]) * (box[3] - box[1]) / RENDER ** 2, 6)}
    return rec, scene


class SyntheticDataset(_Samples):
    """The default dataset: n samples rendered on the fly, deterministic in (seed, split, i), no downloads.
    task "qa" (one question per image, answer needs the item's detail) or "caption" (all items); others: the
    chance that each non-target cell holds an item (OTHERS: the full scenes; 0: one item per image)."""

    def __init__(self, tok, n=1000, split="train", seed=0, template="vicuna_v1", image_size=64, pad_square=True,
                 max_len=None, task="qa", center_crop=False, others=OTHERS):
        self._init(tok, template, image_size, pad_square, max_len, center_crop)
        if n < 1:
            raise DataError(f"synthetic dataset: empty (n={n})")
        synthetic_record(seed, split, 0, task, others)   # validates split, task and others now, not in a worker
        self.n, self.split, self.seed, self.task, self.others = n, split, seed, task, others

    def __len__(self):
        return self.n

    def task_of(self, i):  # a mix's "plain" samples are captions
        return "caption" if self.template == "mix" and self.template_of(i) == "plain" else self.task

    def record(self, i):
        return synthetic_record(self.seed, self.split, i, self.task_of(i), self.others)[0]

    def image(self, i):
        return render(synthetic_record(self.seed, self.split, i, self.task_of(i), self.others)[1])


def write_synthetic(out, n, split="train", seed=0, task="qa", others=OTHERS):
    """Write the synthetic set as a LLaVA-format folder: out/data.json + out/images/*.png (lossless)."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records = []
    for i in range(n):
        rec, scene = synthetic_record(seed, split, i, task, others)
        render(scene).save(os.path.join(out, rec["image"]))
        records.append(rec)
    path = os.path.join(out, "data.json")
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------- the tiny ViT's pretraining task
# Tiny presets have no CLIP to start from. The tiny ViT is pretrained as a dense classifier instead: every patch
# token names the item its patch shows (none, one of the 17 characters, 3 shapes, 1-5 dots), on 64-px crops of
# scenes rendered at 64, 128 and 192 px: the views the tiny models feed their ViT (the low-resolution view, S2's
# and Pheye's tiles, INF-LLaVA's local crops). bench/tiny_base.py's pretrain_tiny_vit trains on it; tokens are where the LMs read.
ITEM_CLASSES = ["none", *sorted(FONT), *SHAPES, *(f"{n} dots" for n in range(1, 6))]


def item_class(item):
    """Index of an item in ITEM_CLASSES (the character "3" and three dots are different things to see)."""
    return ITEM_CLASSES.index(item["value"] + " dots" * (item["kind"] == "dots"))


def patch_example(seed, split, i, view=64, patch=8, scales=(1, 1, 2, 3), others=OTHERS, target_tile=False):
    """One pretraining example: (uint8 image (view, view, 3), labels (g*g,) int64, items). The scene of synthetic
    sample i is rendered at view * s px (s drawn from `scales`) and a view-sized tile of it is kept (the tiles
    S2 and Pheye cut). Each patch is labelled with the item that covers most of it (0: none). items: (class,
    detail size, s, patches it covers) for every item whose centre lies in the tile, for per-item scoring.
    others: as synthetic_record (the tiny ViT was pretrained on the full scenes, OTHERS). target_tile: keep the
    tile that holds the centre of the question's item instead of a random one (the same draws otherwise)."""
    _, scene = synthetic_record(seed, split, i, others=others)
    rng = random.Random(f"nanohires-patches-{seed}-{split}-{i}")
    s = rng.choice(scales)
    x0, y0 = rng.randrange(s) * view, rng.randrange(s) * view
    if target_tile:
        bx0, by0, bx1, by1 = (v * view * s / RENDER for v in item_box(scene, scene["target"]))
        x0, y0 = int((bx0 + bx1) / 2 // view) * view, int((by0 + by1) / 2 // view) * view
    im = render(scene).resize((view * s, view * s), Image.BICUBIC).crop((x0, y0, x0 + view, y0 + view))
    g, f = view // patch, view * s / RENDER
    labels, best, items = np.zeros(g * g, np.int64), np.zeros(g * g), []
    for k, item in enumerate(scene["cells"]):
        if item is None:
            continue
        bx0, by0, bx1, by1 = (v * f - o for v, o in zip(item_box(scene, k), (x0, y0, x0, y0)))
        covered = []
        for j in range(g * g):
            px, py = (j % g) * patch, (j // g) * patch
            area = max(0, min(bx1, px + patch) - max(bx0, px)) * max(0, min(by1, py + patch) - max(by0, py))
            if area > 0:
                covered.append(j)
                if area > best[j]:
                    best[j], labels[j] = area, item_class(item)
        if 0 <= (bx0 + bx1) / 2 < view and 0 <= (by0 + by1) / 2 < view:
            items.append((item_class(item), item["size"], s, covered))
    return np.asarray(im, np.uint8), labels, items


def make_dataset(data, tok, template, image_size, pad_square, max_len=None, split="train", n=1000, seed=0,
                 image_dir=None, skip_bad=False, task=None, val_fraction=0.02, center_crop=False, others=OTHERS):
    """train.py's entry: "synthetic" (task: captions for the plain template, else QA; others: as
    SyntheticDataset) or a LLaVA JSON path."""
    if data == "synthetic":
        task = task or ("caption" if template == "plain" else "qa")
        return SyntheticDataset(tok, n=n, split=split, seed=seed, template=template, image_size=image_size,
                                pad_square=pad_square, max_len=max_len, task=task, center_crop=center_crop,
                                others=others)
    return LlavaJsonDataset(data, tok, template=template, image_size=image_size, pad_square=pad_square,
                            max_len=max_len, image_dir=image_dir or None, skip_bad=skip_bad, split=split,
                            n=n if split not in ("train", None) else None, val_fraction=val_fraction,
                            center_crop=center_crop)


# ----------------------------------------------------------------------------- the tiny tokenizer
TINY_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_corpus(n=3000):
    """Lines of text the tiny tokenizer is trained on: synthetic questions, answers, captions, the templates'
    fixed text, and every printable ASCII character (so any plain text encodes without <unk>)."""
    lines = [VICUNA_SYSTEM, LLAMA3_SYSTEM, PHEYE_SYSTEM, "USER: ASSISTANT: Instruction: Output: system user assistant",
             "".join(chr(c) for c in range(33, 127)), CAPTION_PROMPT]
    for i in range(n):
        rec, scene = synthetic_record(0, "train", i)
        lines += [rec["conversations"][0]["value"].replace(IMAGE_TOKEN + "\n", ""), caption(scene)]
    return lines


def build_tiny_tokenizer(dir):
    """SentencePiece BPE, exactly 512 pieces, trained deterministically (one thread, no sampling) on the
    synthetic corpus: <unk>=0 <s>=1 </s>=2 <pad>=3, then the LLaMA-3 header/turn tokens and "\\n" as
    user-defined pieces. Writes dir/tokenizer.model and dir/tokenizer_config.json; returns dir."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=model, model_type="bpe", vocab_size=512,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=TINY_SPECIALS + ["\n"],
        character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    os.makedirs(dir, exist_ok=True)
    with open(os.path.join(dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + TINY_SPECIALS
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 512,
              "added_tokens_decoder": {str(i): {"content": s, "special": True} for i, s in enumerate(specials)}}
    with open(os.path.join(dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dir


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write the synthetic fine-detail set as a LLaVA-format folder.")
    p.add_argument("--out", required=True, help="output folder (data.json + images/)")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="qa", choices=("qa", "caption"))
    p.add_argument("--others", type=float, default=OTHERS, help="chance that each other cell holds an item")
    a = p.parse_args()
    print(f"wrote {a.n} samples to {write_synthetic(a.out, a.n, a.split, a.seed, a.task, a.others)}")
