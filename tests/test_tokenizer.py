"""Tokenizer parity: our Tokenizer against transformers' tokenizers built from the same files.
Every tokenizer here is trained offline on a small synthetic corpus (SentencePiece trainer, `tokenizers` trainer)."""
import base64
import itertools
import json
import os
import random
import types
import unicodedata

import pytest
import sentencepiece as spm
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from llm import LLAMA3_PATTERN, QWEN2_PATTERN, Tokenizer, _ranks_from_merges

TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "inner  double   spaces", "trailing spaces   ",
    "line1\nline2\n\nline4\r\n", "tab\tseparated\tvalues", "digits 1234567 and 3.14159 and 2024",
    "café naïve résumé Ünïcödé Ångström", "e\u0301 decomposed accent", "東京は日本の首都です。", "中文 and English mixed",
    "emoji 😀🚀🎉 family 👨‍👩‍👧", "I'M sure you'LL see we'd don't", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width ÿ€", "",
]
LEADING = [" leading space", "  two leading spaces", "\nnewline first", " ", "\n\n"]


def corpus(n=1500, seed=0):
    rng = random.Random(seed)
    units = ["the", "qu", "ick", "bro", "wn", "fox", "ing", "ed", "tion", "café", "naï", "ré", "sumé", "Ü", "ß", "ñ",
             "東", "京", "日本", "語", "中文", "😀", "🚀", "🎉", "12", "345", "7", "3.14", "'s", "'LL", "don't", "!",
             "...", ",", " ", " ", " ", "  ", "\n", "\t", "e\u0301"]
    return ["".join(rng.choice(units) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


# ---------------------------------------------------------------------------------------------- SentencePiece

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A LLaMA-style SentencePiece BPE (byte fallback, split digits, identity normalisation, dummy prefix) plus an
    added <pad> beyond the model's vocabulary, as some LLaVA checkpoints have."""
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(d / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, character_coverage=1.0, pad_id=-1,
        user_defined_symbols=["<|start_header_id|>", "<|eot_id|>"], minloglevel=2, num_threads=1)
    os.remove(d / "tokenizer.vocab")
    write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "added_tokens_decoder": {"0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
                                 "2": {"content": "</s>", "special": True},
                                 "500": {"content": "<pad>", "special": True}}})
    return d


def hf_llama(path, monkeypatch, user=("<|start_header_id|>", "<|eot_id|>"), **kwargs):
    """transformers' LlamaTokenizer read from tokenizer.model. transformers parses the model with protobuf, which
    is not installed here, so we hand its SentencePieceExtractor the same fields read through sentencepiece."""
    import transformers.convert_slow_tokenizer as convert
    from transformers import LlamaTokenizer

    def extractor_init(self, model_file):
        sp = spm.SentencePieceProcessor(model_file=model_file)

        def kind(i):  # sentencepiece_model.proto: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
            return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                    else 4 if sp.id_to_piece(i) in user else 1)
        pieces = [types.SimpleNamespace(piece=sp.id_to_piece(i), score=sp.get_score(i), type=kind(i))
                  for i in range(sp.get_piece_size())]
        spec = types.SimpleNamespace(unk_id=sp.unk_id(), bos_id=sp.bos_id(), eos_id=sp.eos_id(), model_type=2,
                                     unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>")
        self.proto = types.SimpleNamespace(pieces=pieces, trainer_spec=spec,
                                           normalizer_spec=types.SimpleNamespace(precompiled_charsmap=b""))

    monkeypatch.setattr(convert.SentencePieceExtractor, "__init__", extractor_init)
    return LlamaTokenizer.from_pretrained(path, **kwargs)


def test_sentencepiece_matches_transformers_llama(sp_dir, monkeypatch):
    ours, hf = Tokenizer.from_pretrained(sp_dir), hf_llama(sp_dir, monkeypatch)
    texts = TEXTS + [t for t in corpus(200, seed=1) if not t[0].isspace()]
    assert sum(len(ours.encode(t)) for t in texts) > 2000           # a real workload, byte fallback included
    assert any(ours._sp.is_byte(i) for t in texts for i in ours.encode(t))
    for t in texts:
        ids = ours.encode(t)
        assert ids == hf.encode(t, add_special_tokens=False), t
        assert ours.decode(ids) == hf.decode(ids) == t, t
    # transformers 5 drops SentencePiece's dummy prefix when the text already starts with a space; Meta's
    # reference is SentencePiece, whose pipeline is the LLaMA-2 tokenizer.json one (Prepend "▁", spaces -> "▁")
    ref = HFTokenizer.from_str(hf._tokenizer.to_str())
    ref.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    ref.pre_tokenizer = None
    for t in TEXTS + LEADING + corpus(200, seed=1):
        ids = ours.encode(t)
        assert ids == ref.encode(t, add_special_tokens=False).ids, t
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False) == t, t
    # special ids decode to their text, as transformers does; broken byte runs become one U+FFFD per byte
    ids = [1, *ours.encode("hi there"), 2, 500, 3]
    assert ours.decode(ids) == hf.decode(ids) == "<s> hi there</s><pad><|start_header_id|>"
    broken = ours.encode("龍")[-3:-1]                 # 龍 is not in the corpus: two of its three byte pieces
    assert ours.decode(broken) == hf.decode(broken) == "\ufffd\ufffd"


def test_sentencepiece_special_tokens(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 500, 501)
    assert tok.eos_ids == [2]
    assert tok.special == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|start_header_id|>": 3, "<|eot_id|>": 4, "<pad>": 500}
    assert tok.encode("hi", bos=True) == [1, *tok.encode("hi")]
    assert 1 not in tok.encode("<s>hi</s>") and 500 not in tok.encode("<pad>")    # control strings stay text
    assert 4 in tok.encode("a<|eot_id|>b")          # user-defined pieces are matched by SentencePiece itself


def test_special_tokens_map_overrides_an_old_tokenizer_config(sp_dir, tmp_path, monkeypatch):
    """Vicuna-7b-v1.5's files: tokenizer_config.json without added_tokens_decoder, pad_token null there and "<unk>"
    in special_tokens_map.json. transformers lets the map win (pad 0), for eos too."""
    os.link(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                    "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None})
    write_json(tmp_path / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                      "pad_token": "<unk>"})
    ours, hf = Tokenizer.from_pretrained(tmp_path), hf_llama(tmp_path, monkeypatch)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    write_json(tmp_path / "special_tokens_map.json", {"eos_token": "<s>", "pad_token": None})
    ours, hf = Tokenizer.from_pretrained(tmp_path), hf_llama(tmp_path, monkeypatch)
    assert (ours.eos_id, ours.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (1, None)
    write_json(tmp_path / "special_tokens_map.json", {"pad_token": "<nope>"})
    with pytest.raises(ValueError, match=r"special_tokens_map\.json names pad_token='<nope>'"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- byte-level BPE

def train_byte_bpe(pattern, vocab_size=900):
    """A byte-level BPE trained by `tokenizers`; pattern None = GPT-2's ByteLevel pre-tokenizer."""
    tk = HFTokenizer(BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
    tk.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"] if pattern != LLAMA3_PATTERN else [], show_progress=False))
    return tk


def save_vocab_merges(tk, d, vocab_order=None):
    state = json.loads(tk.to_str())["model"]
    vocab, merges = state["vocab"], [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    if vocab_order is not None:                       # renumber ids: tokens sorted by vocab_order(token)
        vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab_order))}
    write_json(d / "vocab.json", vocab)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab, merges


def check_parity(ours, hf, texts):
    n_merged = 0
    for t in texts:
        ids = ours.encode(t)
        assert ids == hf.encode(t, add_special_tokens=False), t
        assert ours.decode(ids) == hf.decode(ids), t
        n_merged += len(t.encode()) - len(ids)
    assert n_merged > 1000                            # merges really happened, multi-byte ones included


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_byte_bpe_matches_transformers(family, tmp_path):
    from transformers import GPT2Tokenizer, Qwen2Tokenizer
    tk = train_byte_bpe(None if family == "gpt2" else QWEN2_PATTERN)
    save_vocab_merges(tk, tmp_path)
    write_json(tmp_path / "config.json", {"model_type": family})
    ours = Tokenizer.from_pretrained(tmp_path)
    hf = (GPT2Tokenizer if family == "gpt2" else Qwen2Tokenizer).from_pretrained(tmp_path)
    assert ours._rank_to_id is None and ours.vocab_size == len(hf) == 900   # ids already follow merge order
    check_parity(ours, hf, TEXTS + LEADING + corpus(300, seed=2))
    for t in TEXTS + LEADING:
        assert ours.decode(ours.encode(t)) == (t if family == "gpt2" else unicodedata.normalize("NFC", t))
    # the regexes differ where they should: GPT-2 keeps digit runs whole, Qwen2 splits every digit
    digits = [ours.decode([i]) for i in ours.encode("12345")]
    assert digits == (["12345"] if family == "gpt2" else ["1", "2", "3", "4", "5"])
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == ((0, 0, None) if family == "gpt2" else (None, 0, 0))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.special == {"<|endoftext|>": 0} and ours.encode("<|endoftext|>") != [0]   # not parsed


def test_byte_bpe_ids_not_in_merge_order(tmp_path):
    """Ids that do not grow with merge order (here: sorted by token text) need ranks remapped: tiktoken ranks are
    merge indices, ids come back through rank_to_id."""
    from transformers import GPT2Tokenizer
    tk = train_byte_bpe(None)
    vocab, _ = save_vocab_merges(tk, tmp_path, vocab_order=lambda t: (t != "<|endoftext|>", t[::-1]))
    ours, hf = Tokenizer.from_pretrained(tmp_path), GPT2Tokenizer.from_pretrained(tmp_path)
    assert ours._rank_to_id is not None and sorted(ours._rank_to_id) == sorted(set(vocab.values()) - {0})
    check_parity(ours, hf, TEXTS + LEADING + corpus(300, seed=3))


def test_phi_added_whitespace_tokens(tmp_path):
    """Phi-1.5 (CodeGen tokenizer) adds non-special tokens for runs of spaces and tabs: they are matched in text,
    longest first, as transformers does; special tokens are not."""
    from transformers import AutoTokenizer
    tk = train_byte_bpe(None)
    vocab, _ = save_vocab_merges(tk, tmp_path)
    added = {"<|endoftext|>": True, "    ": False, "   ": False, "  ": False, "\t\t": False}
    n = len(vocab)
    decoder = {str(n - 1 + k if k else 0): {"content": c, "special": s} for k, (c, s) in enumerate(added.items())}
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "CodeGenTokenizer", "added_tokens_decoder":
                                                     decoder, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    write_json(tmp_path / "config.json", {"model_type": "phi"})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [0, n + 1]})
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    code = "def f(x):\n    if x:\n\t\treturn  x   +  1\n        pass"
    ids = ours.encode(code)
    assert ids == hf.encode(code, add_special_tokens=False)
    assert {n, n + 1, n + 2, n + 3} <= set(ids)
    assert ours.decode(ids) == hf.decode(ids) == code
    check_parity(ours, hf, TEXTS + corpus(300, seed=4))
    assert ours.vocab_size == n + 4 and ours.eos_ids == [0, n + 1]


# ---------------------------------------------------------------------------------------------- tiktoken / json

@pytest.fixture(scope="module")
def llama3_bpe():
    tk = train_byte_bpe(LLAMA3_PATTERN, vocab_size=1000)
    state = json.loads(tk.to_str())["model"]
    return tk, state["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]


def write_tiktoken(d, vocab, merges):
    ranks, rank_to_id, leftovers = _ranks_from_merges(vocab, merges)
    assert rank_to_id is None and not leftovers and len(ranks) == len(vocab) == 1000
    with open(d / "tokenizer.model", "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" %d\n" % rank)


def test_tiktoken_file_llama3(llama3_bpe, tmp_path, monkeypatch):
    """A LLaMA-3 style tiktoken tokenizer.model (base64 token + rank), ranks built from a trained BPE: equal to the
    BPE it came from, to transformers' own tiktoken reader, and round-trips."""
    from transformers import PreTrainedTokenizerFast
    tk, vocab, merges = llama3_bpe
    write_tiktoken(tmp_path, vocab, merges)
    ours = Tokenizer.from_pretrained(tmp_path)
    # no tokenizer config: Meta's layout of 256 special tokens after the 1000 ranks
    assert ours.vocab_size == 1256 and (ours.bos_id, ours.eos_id, ours.pad_id) == (1000, 1001, None)
    assert ours.special["<|start_header_id|>"] == 1006 and ours.special["<|eot_id|>"] == 1009
    assert ours.special["<|reserved_special_token_250|>"] == 1255
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    texts = TEXTS + LEADING + corpus(300, seed=5)
    for t in texts:
        ids = ours.encode(t)
        assert ids == tk.encode(t, add_special_tokens=False).ids == hf.encode(t, add_special_tokens=False), t
        assert ours.decode(ids) == hf.decode(ids) == t, t
    assert ours.decode([1000, *ours.encode("hi"), 1009]) == "<|begin_of_text|>hi<|eot_id|>"
    ends = itertools.accumulate(len(ours.decode([i])) for i in ours.encode("1234567"))
    assert {3, 6, 7} <= set(ends)                     # \p{N}{1,3}: no token crosses a group of three digits


def test_tokenizer_json_and_configs(llama3_bpe, tmp_path):
    """A LLaMA-3-instruct style directory: tokenizer.json only, specials from tokenizer_config.json, stop ids from
    generation_config.json; a tokenizer_config with added_tokens_decoder is read alone (special_tokens_map's eos
    and pad are ignored, as transformers does)."""
    from transformers import PreTrainedTokenizerFast
    tk, vocab, merges = llama3_bpe
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tj = json.loads(tk.to_str())
    tj["added_tokens"] = [{"id": 1000 + k, "content": s, "special": True, "single_word": False, "lstrip": False,
                           "rstrip": False, "normalized": False} for k, s in enumerate(names)]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "added_tokens_decoder": {str(1000 + k): {"content": s, "special": True} for k, s in enumerate(names)}})
    write_json(tmp_path / "special_tokens_map.json", {"eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"})
    write_json(tmp_path / "generation_config.json", {"bos_token_id": 1000, "eos_token_id": [1001, 1004]})
    ours = Tokenizer.from_pretrained(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.eos_ids) == (1000, 1004, None, [1004, 1001])
    assert ours.special == dict(zip(names, range(1000, 1005))) and ours.vocab_size == 1005
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    for t in TEXTS + LEADING + corpus(100, seed=6):
        ids = ours.encode(t)
        assert ids == hf.encode(t, add_special_tokens=False), t
        assert ours.decode(ids) == hf.decode(ids) == t
    header = "<|start_header_id|>user<|end_header_id|>"
    assert ours.encode(header) != [1002, *ours.encode("user"), 1003]     # special strings are not parsed
    assert hf.encode(header, add_special_tokens=False) == [1002, *ours.encode("user"), 1003]   # HF parses them


# ---------------------------------------------------------------------------------------------- errors

def test_errors(tmp_path, sp_dir):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*tokenizer\.model.*vocab\.json \+ merges"):
        Tokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(sp_dir)
    with pytest.raises(ValueError, match=r"token id 501 is out of range .*vocab_size 501"):
        tok.decode([5, 501])
    with pytest.raises(ValueError, match=r"token id -1 is out of range"):
        tok.decode([-1])
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match=r"tokenizer\.model is neither a SentencePiece model nor a tiktoken file"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    write_json(tmp_path / "vocab.json", {"a": 0, "b": 1})
    (tmp_path / "merges.txt").write_text("a b\n")
    with pytest.raises(ValueError, match=r"merge 'a' \+ 'b' makes 'ab', which is not in the vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


def test_sentencepiece_like_tiny_tokenizer(tmp_path, monkeypatch):
    """The layout of data.build_tiny_tokenizer: no dummy prefix, no byte fallback, <pad>=3 inside the model,
    chat markers and "\\n" as user-defined pieces."""
    markers = ["<|start_header_id|>", "<|eot_id|>"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=markers + ["\n"], character_coverage=1.0,
        byte_fallback=False, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2, num_threads=1)
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    tok, sp = Tokenizer.from_pretrained(tmp_path), spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 300)
    assert tok.special == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, markers[0]: 4, markers[1]: 5, "\n": 6}
    hf = hf_llama(tmp_path, monkeypatch, user=markers + ["\n"], add_prefix_space=False)
    texts = [t for t in TEXTS + LEADING + corpus(100, seed=7) if 0 not in tok.encode(t)]   # no byte fallback:
    assert len(texts) > 100 and tok.encode("Hello") == sp.encode("Hello") and 0 in tok.encode("Hello")  # unseen->unk
    for t in texts:
        ids = tok.encode(t)
        assert ids == hf.encode(t, add_special_tokens=False), t
        assert tok.decode(ids) == hf.decode(ids) == sp.decode(ids), t      # no leading space is stripped
    assert tok.decode([1, *tok.encode(" hi")]) == "<s> hi"
