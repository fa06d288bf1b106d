# -----------------------------------------------------------------------------
# Tokenizer: SentencePiece (LLaMA-2/Vicuna), tiktoken files (LLaMA-3) and byte-level BPE
# (GPT-2, Phi-1.5, Qwen2, tokenizer.json of LLaMA-3) behind one small class.
# Byte-level BPE runs on tiktoken: its merge-by-rank loop equals HF's merge-by-merge-index loop once
# every merged token's rank is the index of the merge that made it (see _ranks_from_merges).

import base64
import json
import os
import re
import unicodedata

import sentencepiece
import tiktoken

# Pre-tokenisation regexes: BPE never merges across the pieces they cut.
# GPT-2 (openai/gpt-2 encoder.py), also used by Phi-1.5's CodeGen tokenizer.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# LLaMA-3 (meta-llama/llama3 tokenizer.py): case-insensitive contractions, digits in groups of up to 3.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2 (transformers Qwen2Tokenizer): LLaMA-3's pattern with single digits; text is NFC-normalised first.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# Special tokens of Meta's LLaMA-3 tokenizer, numbered from the end of the tiktoken file; used only when the
# directory has no tokenizer config naming them.
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])

TOKENIZER_FILES = ("tokenizer.model (SentencePiece or tiktoken)", "vocab.json + merges.txt (byte-level BPE)",
                   "tokenizer.json (byte-level BPE)")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json/merges.txt: bytes that are
    printable latin-1 stand for themselves, the other 68 are shifted to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _ranks_from_merges(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """vocab.json + merges -> (mergeable ranks for tiktoken, rank -> id table or None, leftover tokens).

    HF's BPE repeatedly applies the adjacent merge with the lowest index; tiktoken repeatedly merges the adjacent
    pair whose concatenation has the lowest rank. The two agree when each merged token's rank is the index of the
    merge that first made it, so only single bytes and merge results become mergeable ranks. If the vocab ids
    already grow with merge order (GPT-2, Qwen2 and files trained by `tokenizers` do) the ids are the ranks;
    otherwise ranks are 256 + merge index and `rank_to_id` maps them back. Vocab entries that are neither a byte
    nor a merge result (GPT-2's <|endoftext|>) are returned as leftovers, to be treated as special tokens."""
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token):
        return bytes(char_to_byte[c] for c in token)

    by_merge = {}                                          # token bytes -> (merge index, vocab id)
    for index, (left, right) in enumerate(merges):
        merged = left + right
        if merged not in vocab:
            raise ValueError(f"merge {left!r} + {right!r} makes {merged!r}, which is not in the vocabulary")
        by_merge.setdefault(to_bytes(merged), (index, vocab[merged]))
    byte_ids = {}
    for token, i in vocab.items():
        if len(token) == 1 and token in char_to_byte:
            byte_ids[to_bytes(token)] = i
    if len(byte_ids) != 256:
        raise ValueError(f"a byte-level BPE vocabulary needs all 256 byte tokens; found {len(byte_ids)}")
    ids_in_merge_order = [i for _, i in sorted(by_merge.values())]
    if all(a < b for a, b in zip(ids_in_merge_order, ids_in_merge_order[1:])):  # byte ranks never compete
        ranks, rank_to_id = {**byte_ids, **{t: i for t, (_, i) in by_merge.items()}}, None
    else:
        ranks = {bytes([b]): b for b in range(256)} | {t: 256 + k for t, (k, _) in by_merge.items()}
        rank_to_id = [0] * (256 + len(merges))
        for t, r in ranks.items():
            rank_to_id[r] = byte_ids[t] if len(t) == 1 else by_merge[t][1]
    known = set(byte_ids.values()) | {i for _, i in by_merge.values()}
    leftovers = {token: i for token, i in vocab.items() if i not in known}
    return ranks, rank_to_id, leftovers


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value):
    """A special-token entry in an HF config: "str", {"content": "str", ...} or null."""
    return value.get("content") if isinstance(value, dict) else value


def _read_sentencepiece_proto(data: bytes):
    """Piece types and add_dummy_prefix from a SentencePiece ModelProto, read with a minimal protobuf walker
    (the protobuf package is not a dependency). Types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte. ModelProto: pieces = field 1 {piece 1, score 2, type 3}, normalizer_spec = field 3 {add_dummy_prefix 3}."""
    def fields(buf):
        pos = 0
        while pos < len(buf):
            key, pos = varint(buf, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = varint(buf, pos)
            elif wire == 2:
                n, pos = varint(buf, pos)
                value, pos = buf[pos:pos + n], pos + n
            elif wire in (1, 5):
                n = 8 if wire == 1 else 4
                value, pos = buf[pos:pos + n], pos + n
            else:
                raise ValueError(f"unexpected protobuf wire type {wire} in SentencePiece model")
            yield field, value

    def varint(buf, pos):
        result = shift = 0
        while True:
            b = buf[pos]
            result |= (b & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if b < 0x80:
                return result, pos

    types, add_dummy_prefix = [], True
    for field, value in fields(data):
        if field == 1:
            types.append(dict(fields(value)).get(3, 1))
        elif field == 3:
            add_dummy_prefix = bool(dict(fields(value)).get(3, 1))
    return types, add_dummy_prefix


def _byte_fallback_text(raw: bytearray) -> str:
    # HF's ByteFallback decoder: a run of <0xNN> pieces that is not valid UTF-8 becomes one U+FFFD per byte
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(raw)


class Tokenizer:
    """Text <-> token ids for the LLM families we load.

    bos_id, eos_id, pad_id: int | None. eos_ids: every stop id (eos_id first, then generation_config's).
    special: every special, control or added token, name -> id. vocab_size: 1 + the largest id.
    encode() reads text as plain text: special-token strings such as "<|eot_id|>" are NOT turned into their ids
    (add those ids yourself); only non-special added tokens (e.g. Phi-1.5's runs of spaces) are matched, as HF
    does. For SentencePiece models, user-defined pieces are matched by SentencePiece itself."""

    def __init__(self, *, sp=None, encoding=None, rank_to_id=None, id_to_bytes=None, nfc=False,
                 special=None, parsed=None, vocab_size=0):
        self._sp, self._enc, self._rank_to_id, self._nfc = sp, encoding, rank_to_id, nfc
        self.special = dict(special or {})
        self.vocab_size = vocab_size
        self._id_to_bytes = id_to_bytes                          # tiktoken backend: id -> bytes (None = no token)
        self._id_to_special = {i: s for s, i in self.special.items()}
        # non-special added tokens are cut out of the text before BPE, longest first (as HF's added-token trie)
        parsed = dict(parsed or {})
        self._parsed = parsed
        self._parsed_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(parsed, key=len, reverse=True))
                                     + ")") if parsed else None
        self.bos_id = self.eos_id = self.pad_id = None
        self.eos_ids = []

    # ---- loading
    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """A tokenizer directory as published on the HF hub (or Meta's tiktoken tokenizer.model)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
        configs = {name: _read_json(os.path.join(path, name + ".json")) for name in
                   ("config", "tokenizer_config", "special_tokens_map", "generation_config")}
        model_file = os.path.join(path, "tokenizer.model")
        vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        json_file = os.path.join(path, "tokenizer.json")
        if os.path.isfile(model_file):
            with open(model_file, "rb") as f:
                first_line = f.readline().strip()
            if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first_line):
                tok = cls._from_tiktoken_file(model_file, configs)
            else:
                tok = cls._from_sentencepiece(model_file, configs)
        elif os.path.isfile(vocab_file) and os.path.isfile(merges_file):
            with open(merges_file, encoding="utf-8") as f:
                merges = [tuple(line.split(" ")) for line in f.read().split("\n")
                          if line and not line.startswith("#version")]
            qwen = cls._bpe_family(configs) == "qwen2"
            tok = cls._from_byte_bpe(_read_json(vocab_file), merges, QWEN2_PATTERN if qwen else GPT2_PATTERN,
                                     qwen, configs, _read_json(json_file).get("added_tokens", []))
        elif os.path.isfile(json_file):
            tok = cls._from_tokenizer_json(json_file, configs)
        else:
            raise FileNotFoundError(f"no tokenizer files in {path!r}: looked for " + ", ".join(TOKENIZER_FILES))
        tok._resolve_ids(configs)
        return tok

    @staticmethod
    def _bpe_family(configs) -> str:
        """Which pre-tokenisation a vocab.json + merges.txt pair was trained with: Qwen2's or GPT-2's."""
        cfg = configs["config"]
        names = [cfg.get("model_type", ""), cfg.get("text_config", {}).get("model_type", ""),
                 configs["tokenizer_config"].get("tokenizer_class", "")]
        return "qwen2" if any("qwen" in (n or "").lower() for n in names) else "gpt2"

    @staticmethod
    def _added_tokens(configs, json_added=()) -> dict[int, tuple[str, bool]]:
        """id -> (content, special) from tokenizer.json's added_tokens and tokenizer_config's added_tokens_decoder."""
        added = {int(t["id"]): (t["content"], bool(t.get("special", True))) for t in json_added}
        for i, t in configs["tokenizer_config"].get("added_tokens_decoder", {}).items():
            added[int(i)] = (_token_content(t), bool(t.get("special", True)) if isinstance(t, dict) else True)
        return added

    @classmethod
    def _from_sentencepiece(cls, model_file, configs):
        sp = sentencepiece.SentencePieceProcessor()
        with open(model_file, "rb") as f:
            data = f.read()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception as e:
            raise ValueError(f"{model_file} is neither a SentencePiece model nor a tiktoken file: {e}") from e
        types, add_dummy_prefix = _read_sentencepiece_proto(data)
        n = sp.get_piece_size()
        special = {sp.id_to_piece(i): i for i in range(n) if types[i] in (2, 3, 4)}
        parsed = {}
        for i, (content, is_special) in cls._added_tokens(configs).items():
            if i >= n or content not in special:
                special[content] = i
                if not is_special and i >= n:          # SentencePiece matches its own user-defined pieces
                    parsed[content] = i
        tok = cls(sp=sp, special=special, parsed=parsed, vocab_size=max([n - 1, *special.values()]) + 1)
        # decode tables: byte pieces <0xNN> -> int, others -> text with SentencePiece's "▁" as a space
        tok._sp_byte = [int(sp.id_to_piece(i)[3:5], 16) if types[i] == 6 else None for i in range(n)]
        tok._sp_text = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(n)]
        tok._strip_space = add_dummy_prefix
        tok._defaults = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
        return tok

    @classmethod
    def _from_ranks(cls, ranks, pattern, configs, specials, rank_to_id=None, leftovers=None, nfc=False,
                    json_added=()):
        """Shared tail of the tiktoken-backed loaders. specials: default special tokens (name -> id)."""
        special, parsed = dict(specials), {}
        for token, i in (leftovers or {}).items():
            special[token] = i
        for i, (content, is_special) in cls._added_tokens(configs, json_added).items():
            special[content] = i
            if not is_special:
                parsed[content] = i
        ids = list(ranks.values()) if rank_to_id is None else rank_to_id
        vocab_size = max([*ids, *special.values()]) + 1
        id_to_bytes = [None] * vocab_size
        for token, r in ranks.items():
            id_to_bytes[r if rank_to_id is None else rank_to_id[r]] = token
        # tiktoken checks nothing about the ids it returns; it only needs ranks for the merge priority
        encoding = tiktoken.Encoding("nanohires", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        tok = cls(encoding=encoding, rank_to_id=rank_to_id, id_to_bytes=id_to_bytes, nfc=nfc,
                  special=special, parsed=parsed, vocab_size=vocab_size)
        tok._defaults = {}
        return tok

    @classmethod
    def _from_tiktoken_file(cls, model_file, configs):
        ranks = {}
        with open(model_file, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        n = len(ranks)
        has_config = bool(configs["tokenizer_config"].get("added_tokens_decoder"))
        specials = {} if has_config else {s: n + k for k, s in enumerate(LLAMA3_SPECIALS)}
        tok = cls._from_ranks(ranks, LLAMA3_PATTERN, configs, specials)
        if not has_config:
            tok._defaults = {"bos": n, "eos": n + 1}         # Meta: <|begin_of_text|>, <|end_of_text|>
        return tok

    @classmethod
    def _from_byte_bpe(cls, vocab, merges, pattern, qwen, configs, json_added=()):
        ranks, rank_to_id, leftovers = _ranks_from_merges(vocab, merges)
        tok = cls._from_ranks(ranks, pattern, configs, {}, rank_to_id, leftovers, qwen, json_added)
        # HF's class defaults when no config names them: GPT-2 bos = eos = <|endoftext|>, Qwen2 eos = pad (no bos)
        eot = tok.special.get("<|endoftext|>")
        tok._defaults = {"eos": eot, "pad": eot} if qwen else {"bos": eot, "eos": eot}
        return tok

    @classmethod
    def _from_tokenizer_json(cls, json_file, configs):
        """A byte-level BPE tokenizer.json (LLaMA-3, Qwen2 and Phi repos ship one): vocab, merges and the
        pre-tokenisation regex are all in the file."""
        tj = _read_json(json_file)
        model = tj.get("model") or {}
        pre = json.dumps(tj.get("pre_tokenizer"))
        if model.get("type") != "BPE" or "ByteLevel" not in pre:
            raise ValueError(f"{json_file}: only byte-level BPE tokenizer.json files are supported "
                             f"(found model {model.get('type')!r}); SentencePiece models need tokenizer.model")
        regexes = re.findall(r'"Regex": ("(?:[^"\\]|\\.)*")', pre)
        pattern = json.loads(regexes[0]) if regexes else GPT2_PATTERN   # plain ByteLevel uses GPT-2's regex
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        qwen = "NFC" in json.dumps(tj.get("normalizer"))        # Qwen2's tokenizer.json normalises to NFC
        return cls._from_byte_bpe(model["vocab"], merges, pattern, qwen, configs, tj.get("added_tokens", []))

    def _token_id(self, name):
        if name in self.special:
            return self.special[name]
        if self._sp is not None:
            i = self._sp.piece_to_id(name)
            return i if self._sp.id_to_piece(i) == name else None
        ids = self.encode(name)
        return ids[0] if len(ids) == 1 else None

    def _resolve_ids(self, configs):
        """bos/eos/pad: tokenizer_config.json, then special_tokens_map.json, then generation_config.json and
        config.json ids, then the format's defaults."""
        tc, sm, gc, cfg = (configs[k] for k in ("tokenizer_config", "special_tokens_map", "generation_config",
                                                "config"))
        for role in ("bos", "eos", "pad"):
            key = role + "_token"
            if key in tc:                                  # present, even as null, in tokenizer_config: it wins
                name = _token_content(tc[key])
                value = None if name is None else self._token_id(name)
                if name is not None and value is None:
                    raise ValueError(f"tokenizer_config.json names {key}={name!r}, which is not in the vocabulary")
            elif _token_content(sm.get(key)) is not None:
                value = self._token_id(_token_content(sm[key]))
            else:
                value = next((c[role + "_token_id"] for c in (gc, cfg) if c.get(role + "_token_id") is not None),
                             self._defaults.get(role))
                if isinstance(value, list):
                    value = value[0]
            setattr(self, role + "_id", value if value is None or value >= 0 else None)
        gen_eos = gc.get("eos_token_id", [])
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = list(dict.fromkeys(i for i in [self.eos_id, *gen_eos] if i is not None))
        for s in sm.get("additional_special_tokens", []):
            i = self._token_id(_token_content(s))
            if i is not None:
                self.special.setdefault(_token_content(s), i)
                self._id_to_special.setdefault(i, _token_content(s))

    # ---- encode / decode
    def encode(self, text: str, bos: bool = False) -> list[int]:
        if bos and self.bos_id is None:
            raise ValueError("encode(bos=True): this tokenizer has no bos token")
        ids = [self.bos_id] if bos else []
        chunks = self._parsed_re.split(text) if self._parsed_re else [text]
        for k, chunk in enumerate(chunks):
            if k % 2:                                      # odd chunks are the added tokens that re.split kept
                ids.append(self._parsed[chunk])
            elif chunk:
                ids.extend(self._encode_plain(chunk))
        return ids

    def _encode_plain(self, text):
        if self._sp is not None:
            return self._sp.encode(text)
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        ranks = self._enc.encode_ordinary(text)
        return ranks if self._rank_to_id is None else [self._rank_to_id[r] for r in ranks]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for this tokenizer (vocab_size {self.vocab_size})")
        if self._sp is not None:
            return self._decode_sentencepiece(ids)
        out = []
        for i in ids:
            b = self._id_to_special[i].encode() if i in self._id_to_special else self._id_to_bytes[i]
            if b is None:
                raise ValueError(f"token id {i} has no token in this tokenizer (a gap in the vocabulary)")
            out.append(b)
        return b"".join(out).decode("utf-8", errors="replace")

    def _decode_sentencepiece(self, ids):
        # As HF's LLaMA decoder: "▁" -> " ", byte pieces joined by ByteFallback, then one leading space stripped
        parts, raw, n = [], bytearray(), len(self._sp_text)
        for i in ids:
            if i < n and self._sp_byte[i] is not None:
                raw.append(self._sp_byte[i])
                continue
            if raw:
                parts.append(_byte_fallback_text(raw))
                raw = bytearray()
            if i < n:
                parts.append(self._sp_text[i])
            elif i in self._id_to_special:
                parts.append(self._id_to_special[i])
            else:
                raise ValueError(f"token id {i} has no token in this tokenizer (a gap in the vocabulary)")
        if raw:
            parts.append(_byte_fallback_text(raw))
        text = "".join(parts)
        return text[1:] if self._strip_space and text.startswith(" ") else text
