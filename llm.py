"""A decoder-only language model covering LLaMA-2/Vicuna, LLaMA-3, Qwen2, Phi-1.5 and GPT-2 with config switches,
KV-cache generation, and loading/saving of Hugging Face checkpoints (safetensors only); LLaVA's splice of image
tokens into the prompt (splice_image); and the tokenizers of those families (SentencePiece, tiktoken, byte-level
BPE) behind one small Tokenizer class. Released multimodal checkpoints (LLaVA-style) are read here too: any
layout through a key table, pickles with weights_only=True.

    model = LLM.from_pretrained("path/to/hf_dir", dtype=torch.bfloat16)
    out = model.generate(idx, max_new_tokens=32)          # greedy; left-padded batches via mask=
"""
import base64
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass

import sentencepiece
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LLMConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4              # < n_head: grouped-query attention (LLaMA-3, Qwen2)
    d_ff: int = 384
    max_seq_len: int = 512
    head_dim: int | None = None     # None: d_model // n_head
    norm: str = "rms"               # "rms" (LLaMA, Qwen2) | "layer" (Phi, GPT-2)
    mlp: str = "swiglu"             # "swiglu" | "gelu" (plain two-layer MLP with config.act)
    act: str = "silu"               # one of ACTS: "silu" | "gelu" | "gelu_new" | "gelu_pytorch_tanh"
    pos: str = "rope"               # "rope" | "learned" (GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...} as in HF configs
    rotary_dim: int | None = None   # partial rotary (Phi): rotate only the first rotary_dim dims of each head
    parallel: bool = False          # Phi: attention and MLP both read one LayerNorm and are summed
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    head_bias: bool = False
    scale_attn: bool = True         # False: scores q.k without the 1/sqrt(hs) (GPT-2's scale_attn_weights=False)
    eps: float = 1e-5
    family: str = "llama"           # HF layout used by save_pretrained: "llama" | "qwen2" | "phi" | "gpt2"

    @property
    def hd(self):
        return self.head_dim or self.d_model // self.n_head

    @staticmethod
    def preset(name):
        presets = {
            "tiny": LLMConfig(),
            "vicuna-7b": LLMConfig(32000, 4096, 32, 32, 32, 11008, 4096),
            "llama3-8b": LLMConfig(128256, 4096, 32, 32, 8, 14336, 8192, rope_theta=500000.0),
            "qwen2-0.5b": LLMConfig(151936, 896, 24, 14, 2, 4864, 32768, rope_theta=1000000.0, qkv_bias=True,
                                    tie_embeddings=True, eps=1e-6, family="qwen2"),
            "phi-1.5": LLMConfig(51200, 2048, 24, 32, 32, 8192, 2048, norm="layer", mlp="gelu", act="gelu_new",
                                 rotary_dim=32, parallel=True, qkv_bias=True, out_bias=True, mlp_bias=True,
                                 head_bias=True, family="phi"),
            "gpt2": LLMConfig(50257, 768, 12, 12, 12, 3072, 1024, norm="layer", mlp="gelu", act="gelu_new",
                              pos="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                              family="gpt2"),
        }
        if name not in presets:
            raise ValueError(f"unknown LLM preset {name!r}; choose from {sorted(presets)}")
        return presets[name]

    @staticmethod
    def from_hf(cfg: dict) -> "LLMConfig":
        """Translate a HF config.json (as a dict) of a supported model_type."""
        family = cfg.get("model_type")
        if family not in HF_ARCH:
            raise ValueError(f"unsupported model_type {family!r}; supported: {sorted(HF_ARCH)}")
        if family == "gpt2":
            for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
                if cfg.get(flag):
                    raise ValueError(f"GPT-2 option {flag}=True is not supported")
            d = cfg["n_embd"]
            return LLMConfig(cfg["vocab_size"], d, cfg["n_layer"], cfg["n_head"], cfg["n_head"],
                             cfg.get("n_inner") or 4 * d, cfg["n_positions"], norm="layer", mlp="gelu",
                             act=_act(cfg, "activation_function", "gelu_new"), pos="learned", qkv_bias=True,
                             out_bias=True, mlp_bias=True, tie_embeddings=cfg.get("tie_word_embeddings", True),
                             scale_attn=cfg.get("scale_attn_weights", True),
                             eps=cfg.get("layer_norm_epsilon", 1e-5), family="gpt2")
        # transformers >= 5 writes rope settings into `rope_parameters`; older files have top-level
        # rope_theta / rope_scaling / partial_rotary_factor. Read both.
        rope = dict(cfg.get("rope_parameters") or {})
        rope.update({k: v for k, v in (cfg.get("rope_scaling") or {}).items() if k not in rope})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        # PhiConfig's default is 0.5 (a file without the field rotates half of each head); the others rotate all
        partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5 if family == "phi" else 1.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        n_head = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim")  # kept only when it differs from hidden_size // n_head (newer files write it)
        head_dim = None if head_dim == cfg["hidden_size"] // n_head else head_dim
        common = dict(vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"],
                      n_head=n_head, n_kv_head=cfg.get("num_key_value_heads") or n_head,
                      d_ff=cfg["intermediate_size"], max_seq_len=cfg["max_position_embeddings"],
                      head_dim=head_dim, act=_act(cfg, "hidden_act", "silu"), rope_theta=theta,
                      rope_scaling=scaling, tie_embeddings=cfg.get("tie_word_embeddings", False), family=family)
        if family == "phi":
            if cfg.get("qk_layernorm"):
                raise ValueError("Phi option qk_layernorm=True is not supported")
            hd = head_dim or cfg["hidden_size"] // n_head
            return LLMConfig(**common, norm="layer", mlp="gelu", rotary_dim=int(hd * partial), parallel=True,
                             qkv_bias=True, out_bias=True, mlp_bias=True, head_bias=True,
                             eps=cfg.get("layer_norm_eps", 1e-5))
        if family == "qwen2":
            if cfg.get("use_sliding_window"):
                raise ValueError("Qwen2 use_sliding_window=True is not supported")
            return LLMConfig(**common, qkv_bias=True, eps=cfg.get("rms_norm_eps", 1e-6))
        bias = cfg.get("attention_bias", False)  # llama: one flag for q, k, v and o
        return LLMConfig(**common, qkv_bias=bias, out_bias=bias, mlp_bias=cfg.get("mlp_bias", False),
                         eps=cfg.get("rms_norm_eps", 1e-6))

    def to_hf(self) -> dict:
        """The config.json transformers writes for this family (inverse of from_hf)."""
        c, f = self, self.family
        rope = {"rope_theta": c.rope_theta, "rope_type": "default", **(c.rope_scaling or {})}
        if f == "gpt2":
            return {"architectures": [HF_ARCH[f]], "model_type": f, "vocab_size": c.vocab_size, "n_embd": c.d_model,
                    "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.d_ff, "n_positions": c.max_seq_len,
                    "activation_function": c.act, "layer_norm_epsilon": c.eps, "tie_word_embeddings": c.tie_embeddings,
                    "scale_attn_weights": c.scale_attn, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
        out = {"architectures": [HF_ARCH[f]], "model_type": f, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
               "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
               "num_key_value_heads": c.n_kv_head, "head_dim": c.hd, "max_position_embeddings": c.max_seq_len,
               "hidden_act": c.act, "tie_word_embeddings": c.tie_embeddings, "rope_parameters": rope}
        if f == "phi":
            rope["partial_rotary_factor"] = (c.rotary_dim or c.hd) / c.hd
            return {**out, "layer_norm_eps": c.eps, "qk_layernorm": False}
        out["rms_norm_eps"] = c.eps
        if f == "llama":
            if c.qkv_bias != c.out_bias:
                raise ValueError("the llama layout has one attention_bias flag: qkv_bias must equal out_bias")
            out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
        return out


HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM",
           "gpt2": "GPT2LMHeadModel"}


def _act(cfg, field, default):
    act = cfg.get(field, default)
    if act not in ACTS:
        raise ValueError(f"{cfg.get('model_type')} config {field}={act!r} is not supported; supported: {sorted(ACTS)}")
    return act


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al., RoFormer, Eq. 34): pairs (x_i, x_{i+d/2}) of each head are rotated by
# angle pos * theta^(-2i/d). HF checkpoints use this "half split" pairing, not interleaved pairs.

def rope_inv_freq(config, device=None):
    d = config.rotary_dim or config.hd
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    s = config.rope_scaling or {}
    if s.get("rope_type") == "linear":  # position interpolation (Chen et al. 2023): pos / factor
        inv_freq = inv_freq / s["factor"]
    elif s.get("rope_type") == "llama3":
        # LLaMA-3.1: long wavelengths (> ctx/low_freq_factor) are slowed by `factor`, short ones (< ctx/high)
        # kept, and the band in between blended linearly in ctx/wavelength.
        ctx, lo, hi, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                               s["factor"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > ctx / lo, inv_freq / factor, torch.where(wavelen < ctx / hi, inv_freq, blended))
    return inv_freq


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs); cos, sin (B, 1, T, rd/2). Rotates the first rd dims, passes the rest (partial rotary)."""
    rd = 2 * cos.shape[-1]
    x1, x2, rest = x[..., : rd // 2], x[..., rd // 2: rd], x[..., rd:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def make_norm(config):
    return nn.RMSNorm(config.d_model, eps=config.eps) if config.norm == "rms" else nn.LayerNorm(config.d_model, config.eps)


class KVCache:
    """Keys and values of every layer, each (B, n_kv_head, S, hs); every forward appends its T new positions."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    @property
    def length(self):  # the last layer is updated last, so this stays put during a forward pass
        return 0 if self.k[-1] is None else self.k[-1].shape[2]

    def update(self, i, k, v):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.hd = c.n_head, c.n_kv_head, c.hd
        self.scale = None if c.scale_attn else 1.0  # None: SDPA's 1/sqrt(hs)
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.hd, c.d_model, bias=c.out_bias)

    def forward(self, x, rope, attn_mask, cache, i):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)     # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(i, k, v)                                         # (B, nkv, S, hs)
        # no mask and no past: plain causal; one new token after a cache with no padding: sees everything
        causal = attn_mask is None and k.shape[2] == T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scale,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        if c.act not in ACTS:
            raise ValueError(f"LLMConfig.act={c.act!r} is not supported; supported: {sorted(ACTS)}")
        self.act = ACTS[c.act]
        # SwiGLU (Shazeer 2020, "GLU Variants", FFN_SwiGLU = (Swish(xW) * xV) W2): gate_proj=W, up_proj=V
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias) if c.mlp == "swiglu" else None
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=c.mlp_bias)

    def forward(self, x):
        h = self.up_proj(x)
        h = self.act(self.gate_proj(x)) * h if self.gate_proj is not None else self.act(h)
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm decoder layer. Sequential: x + attn(norm1 x), then + mlp(norm2 x).
    Parallel (Phi-1.5, GPT-J style): x + attn(norm x) + mlp(norm x) with a single norm."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = None if config.parallel else make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, attn_mask, cache, i):
        h = self.input_layernorm(x)
        a = self.self_attn(h, rope, attn_mask, cache, i)
        if self.post_attention_layernorm is None:
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


IMAGE_ID = -200   # LLaVA's IMAGE_TOKEN_INDEX: one prompt position the model expands into its image tokens
IGNORE = -100     # label of every token that is not supervised


def next_token_loss(logits, labels, reduction="mean"):
    """Cross-entropy of position t predicting labels[t+1] (labels aligned with the input, IGNORE skipped), in
    fp32. reduction "sum" lets a training loop divide by the supervised tokens of a whole effective batch."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction=reduction)


def splice_image(idx, embed, image_embeds, labels=None, mask=None):
    """LLaVA's splice, the input side of HIRE's and INF-LLaVA's forward: each row's single IMAGE_ID position
    becomes the N image tokens. embed maps ids to (B, T, D) token embeddings (LLM.embed); returns embeds
    (B, T-1+N, D), and labels / mask stretched to match (IGNORE and 1 on the image positions)."""
    B, T = idx.shape
    N = image_embeds.shape[1]
    is_image = idx == IMAGE_ID
    counts = is_image.sum(1)
    for b in range(B):
        if counts[b] != 1:
            raise ValueError(f"prompt {b} has {int(counts[b])} <image> placeholders; every row needs exactly one "
                             f"IMAGE_ID ({IMAGE_ID})")
    p = is_image.int().argmax(1, keepdim=True)  # (B, 1)
    t = torch.arange(T - 1 + N, device=idx.device).expand(B, -1)  # output positions
    # gather index into cat([text (T), image (N)]): text before p, the image tokens, then the rest of the text
    src = torch.where(t < p, t, torch.where(t < p + N, T + t - p, t - N + 1))
    text = embed(idx.masked_fill(is_image, 0))
    both = torch.cat([text, image_embeds.to(text.dtype)], dim=1)
    embeds = both.gather(1, src.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
    if labels is not None:
        labels = torch.cat([labels, labels.new_full((B, N), IGNORE)], dim=1).gather(1, src)
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(B, N)], dim=1).gather(1, src)
    return embeds, labels, mask


class LLM(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_positions = nn.Embedding(c.max_seq_len, c.d_model) if c.pos == "learned" else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = make_norm(c)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=c.head_bias)
        self.apply(self._init_weights)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(m):  # GPT-2 style init for training from scratch (tiny presets)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, idx):
        """(B, T) token ids -> (B, T, D) token embeddings (positions are added in forward)."""
        V = self.config.vocab_size
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
            bad = idx[(idx < 0) | (idx >= V)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V})")
        return self.embed_tokens(idx)

    def hidden_states(self, idx=None, embeds=None, mask=None, cache=None, before_layer=None):
        """Final-norm hidden states (B, T, D); arguments as in forward."""
        if (idx is None) == (embeds is None):
            raise ValueError("pass exactly one of idx / embeds")
        x = self.embed(idx) if idx is not None else embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if S > self.config.max_seq_len:
            raise ValueError(f"{S} positions ({past} cached + {T} new) exceed the context "
                             f"max_seq_len={self.config.max_seq_len}")
        dev = x.device
        if mask is None:
            pos = torch.arange(past, S, device=dev).expand(B, T)
            # a chunk after a cache needs the offset causal mask; T == 1 or no past need none (see Attention)
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=dev).tril(past) if past and T > 1 else None
        else:
            if mask.shape != (B, S):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, cached + new) = {(B, S)}")
            mask = mask.to(device=dev, dtype=torch.bool)
            # as HF: position = number of real tokens before it, so left padding doesn't shift positions
            pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)[:, past:]
            causal = torch.ones(T, S, dtype=torch.bool, device=dev).tril(past)
            diag = torch.arange(S, device=dev) == torch.arange(past, S, device=dev)[:, None]
            # a padding query sees only itself: a fully masked row would make softmax NaN
            attn_mask = ((causal & mask[:, None, None, :]) | diag)  # (B, 1, T, S)
        rope = None
        if self.config.pos == "rope":
            freqs = pos[..., None].float() * rope_inv_freq(self.config, dev)  # (B, T, rd/2), fp32 like HF
            rope = (freqs.cos()[:, None].to(x.dtype), freqs.sin()[:, None].to(x.dtype))
        else:
            x = x + self.embed_positions(pos)
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                x = before_layer(i, x)
            x = layer(x, rope, attn_mask, cache, i)
        return self.norm(x)

    def forward(self, idx=None, embeds=None, mask=None, cache=None, before_layer=None):
        """Logits (B, T, V). Exactly one of idx (B, T) / embeds (B, T, D). mask (B, cached + T): 1 real, 0 padding
        (left padding). cache: a KVCache, extended in place. before_layer(i, x) -> x runs before decoder layer i."""
        return self.lm_head(self.hidden_states(idx, embeds, mask, cache, before_layer))

    @torch.no_grad()
    def generate(self, idx=None, max_new_tokens=32, temperature=0.0, top_k=None, eos_id=None, mask=None,
                 embeds=None, before_layer=None):
        """Greedy (temperature 0) or top-k sampling with a KV cache. Returns (B, T + new) when idx is given,
        (B, new) when only embeds are. eos_id: an id or a list of ids; a finished row is padded with eos."""
        if (idx is None) == (embeds is None):
            raise ValueError("pass exactly one of idx / embeds")
        B, T = idx.shape if idx is not None else embeds.shape[:2]
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds the context "
                             f"max_seq_len={self.config.max_seq_len}")
        dev = idx.device if idx is not None else embeds.device
        eos = None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=dev)
        cache = KVCache(self.config.n_layer)
        h = self.hidden_states(idx, embeds, mask, cache, before_layer)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out = []
        for step in range(max_new_tokens):
            logits = self.lm_head(h).float()
            if temperature > 0:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)[:, 0]
            else:
                nxt = logits.argmax(-1)
            if eos is not None:
                nxt = nxt.masked_fill(done, eos[0])
                done |= torch.isin(nxt, eos)
            out.append(nxt)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            h = self.hidden_states(nxt[:, None], mask=mask, cache=cache, before_layer=before_layer)[:, -1]
        new = torch.stack(out, dim=1) if out else torch.zeros(B, 0, dtype=torch.long, device=dev)
        return torch.cat([idx, new], dim=1) if idx is not None else new

    # ------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> "LLM":
        """Load a HF LlamaForCausalLM / Qwen2ForCausalLM / PhiForCausalLM / GPT2LMHeadModel directory.
        Tensors go straight from safetensors into `dtype` (default float32) on a model built on the meta device,
        so a bf16 checkpoint loaded as bf16 needs about its own size in RAM."""
        from safetensors import safe_open
        dtype = dtype or torch.float32
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
        with open(cfg_path) as f:
            config = LLMConfig.from_hf(json.load(f))
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(t.shape) for k, t in _to_hf(config, model.state_dict()).items()}
        found = {}  # HF key -> (file, key as stored, shape)
        for file in _weight_files(path):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    found[_hf_key(config, key)] = (file, key, tuple(f.get_slice(key).get_shape()))
        ignored = [k for k in found if k not in expected and _ignorable(config, k)]
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected) - set(ignored))
        wrong = [f"{k}: file {found[k][2]} vs model {expected[k]}" for k in sorted(set(expected) & set(found))
                 if found[k][2] != expected[k]]
        if missing or unexpected or wrong:
            raise ValueError(f"checkpoint {path} does not fit {HF_ARCH[config.family]} built from its config.json:\n"
                             + "".join(f"  {what}: {keys}\n" for what, keys in
                                       (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                                       if keys))
        state = {}
        for k in expected:
            # safetensors hands out tensors backed by a memory map of the whole file, whose pages stay resident
            # while it is open: copy each tensor into its own memory in the target dtype and close the file
            # again, so peak RAM is the loaded model plus one tensor (and weights never alias the file on disk)
            with safe_open(found[k][0], "pt") as f:
                t = f.get_tensor(found[k][1]).to(dtype, copy=True)
            state.update(_from_hf(config, k, t))
        if config.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_embeddings:  # assign=True replaced both Parameters: tie them again to one object
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, path):
        """Write config.json (HF format of config.family) and model.safetensors with HF key names."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        hf = self.config.to_hf()
        hf["dtype"] = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        state = {k: t.detach().contiguous().cpu() for k, t in _to_hf(self.config, self.state_dict()).items()}
        tmp = os.path.join(path, "model.safetensors.tmp")  # write then rename: a kill leaves no half file
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, "model.safetensors"))


# HF key layout per family: the model's prefix, and our module path -> HF module path (whole dotted segments).
HF_PREFIX = {"llama": "model.", "qwen2": "model.", "phi": "model.", "gpt2": "transformer."}
HF_RENAME = {
    "llama": {}, "qwen2": {},
    "phi": {"self_attn.o_proj": "self_attn.dense", "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2",
            "norm": "final_layernorm"},
    "gpt2": {"embed_tokens": "wte", "embed_positions": "wpe", "layers": "h", "input_layernorm": "ln_1",
             "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc",
             "mlp.down_proj": "mlp.c_proj", "norm": "ln_f"},
}


def _rename(name, table):
    name = f".{name}."
    for a, b in table.items():
        name = name.replace(f".{a}.", f".{b}.")
    return name[1:-1]


def _to_hf(config, state):
    """Our state dict -> HF state dict (works on meta tensors, so it also gives the expected HF shapes)."""
    fam, out = config.family, {}
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: HF files store only the embedding
        hf = name if name.startswith("lm_head.") else HF_PREFIX[fam] + _rename(name, HF_RENAME[fam])
        if fam == "gpt2" and ".self_attn." in name and "o_proj" not in name:
            if ".q_proj." not in name:
                continue
            # GPT-2 fuses q, k, v into one c_attn projection
            kv = [state[name.replace("q_proj", p)] for p in ("k_proj", "v_proj")]
            t, hf = torch.cat([t, *kv]), hf.replace("self_attn.q_proj", "attn.c_attn")
        if fam == "gpt2" and t.dim() == 2 and not name.startswith(("embed_", "lm_head.")):
            # GPT-2 uses Conv1D (HF pytorch_utils.Conv1D, kept from OpenAI's TF code, which computed x @ W with
            # W of shape (in, out)): its weights are stored transposed relative to nn.Linear's (out, in). The
            # embeddings and an untied lm_head (an nn.Linear in GPT2LMHeadModel) are stored as ours.
            t = t.t()
        out[hf] = t
    return out


def _from_hf(config, hf, t):
    """One HF tensor -> [(our name, tensor)]; the inverse of _to_hf."""
    fam = config.family
    if hf.startswith("lm_head."):
        return [(hf, t)]
    name = _rename(hf.removeprefix(HF_PREFIX[fam]), {b: a for a, b in HF_RENAME[fam].items()})
    if fam != "gpt2":
        return [(name, t)]
    if t.dim() == 2 and not name.startswith("embed_"):
        t = t.t()  # Conv1D (in, out) -> Linear (out, in); see _to_hf
    if ".attn.c_attn." in name:
        q = config.n_head * config.hd
        kv = config.n_kv_head * config.hd
        return [(name.replace("attn.c_attn", f"self_attn.{p}"), part.contiguous())
                for p, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv]))]
    return [(name, t.contiguous())]


def _hf_key(config, key):
    # the original GPT-2 files store keys without the "transformer." prefix
    prefix = HF_PREFIX[config.family]
    return key if key.startswith(prefix) or key.startswith("lm_head.") else prefix + key


def _ignorable(config, key):
    # derived buffers some older files contain: GPT-2's causal-mask "attn.bias"/"attn.masked_bias", LLaMA's
    # "rotary_emb.inv_freq"; and lm_head.weight when the head is tied (transformers ties it regardless)
    return (key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
            or (key == "lm_head.weight" and config.tie_embeddings))


def _weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {path}: {absent}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    pickles = [f for f in sorted(os.listdir(path)) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ValueError(f"{path} holds only {pickles}: only safetensors checkpoints are loaded, because "
                         "unpickling .bin/.pt files can execute arbitrary code. Convert them to safetensors first.")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


# -----------------------------------------------------------------------------
# Released multimodal checkpoints (LLaVA-1.5 in its two layouts, INF-LLaVA): a LLaMA checkpoint plus vision modules,
# each release's keys renamed by the small table its model file gives (hire.py, inf_llava.py). The original LLaVA
# releases are PyTorch pickles (pytorch_model-*.bin), and unpickling can run arbitrary code: they are read only with
# torch.load(weights_only=True), which rebuilds tensors and plain containers and refuses everything else.
# `python llm.py --to_safetensors DIR` rewrites them once as safetensors, which hold nothing but tensors.
RELEASE_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
RELEASE_SKIP = ("rotary_emb.inv_freq", "embeddings.position_ids")   # derived buffers older transformers saved


def release_files(path):
    """A release directory's weight files: its safetensors (sharded or single) if it has them, else its
    pytorch_model .bin files (sharded or single)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"release directory {path!r} does not exist")
    for index in RELEASE_INDEXES:
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if absent:
                raise FileNotFoundError(f"{path}/{index} lists shards that are not there: {absent}")
            return [os.path.join(path, s) for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin, or an index of their shards")


def _read_pickle(file):
    try:   # weights_only: tensors and plain containers only; mmap: the file is paged in, not copied
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{file}: torch.load(weights_only=True) refused it ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{file}: expected a flat dict of tensors (a state dict), got {type(state).__name__}")
    return state


def read_release(path):
    """{key: (shape, read)} over every weight file of a release directory; read() returns the tensor."""
    from safetensors import safe_open
    out = {}
    for file in release_files(path):
        if file.endswith(".safetensors"):
            def read(key, file=file):
                with safe_open(file, "pt") as f:
                    return f.get_tensor(key)
            with safe_open(file, "pt") as f:
                items = {k: (tuple(f.get_slice(k).get_shape()), lambda k=k, read=read: read(k)) for k in f.keys()}
        else:
            items = {k: (tuple(t.shape), lambda t=t: t) for k, t in _read_pickle(file).items()}
        twice = sorted(set(items) & set(out))
        if twice:
            raise ValueError(f"{path}: keys stored in more than one file, e.g. {twice[:3]}")
        out.update(items)
    return out


def load_release(model, tensors, table, path, dtype=None, exclude=()):
    """Load read_release(path)'s tensors into `model` (built on the meta device): `table` is [(release prefix,
    ours)], the longest matching prefix renames a key, and ours is our prefix or a function of the rest of the key.
    Every model tensor except those under `exclude` (loaded elsewhere) must come from exactly one release tensor
    of its shape, and every release tensor must land somewhere; otherwise a ValueError names each of them."""
    dtype = dtype or torch.float32
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items() if not k.startswith(tuple(exclude))}
    targets = dict(table)
    found, unexpected, twice = {}, [], []
    for key, (shape, read) in tensors.items():
        prefix = max((p for p in targets if key.startswith(p)), key=len, default=None)
        to = targets.get(prefix)
        ours = None if prefix is None else to(key[len(prefix):]) if callable(to) else to + key[len(prefix):]
        if ours not in expected:
            if not key.endswith(RELEASE_SKIP):
                unexpected.append(key)
        elif ours in found:
            twice.append(f"{found[ours][0]} and {key} (both -> {ours})")
        else:
            found[ours] = (key, shape, read)
    missing = sorted(set(expected) - set(found))
    wrong = [f"{key} {shape} -> {ours} {expected[ours]}" for ours, (key, shape, _) in found.items()
             if shape != expected[ours]]
    problems = [("missing (our names)", missing), ("unexpected", sorted(unexpected)), ("wrong shape", wrong),
                ("twice", twice)]
    if any(v for _, v in problems):
        raise ValueError(f"{path} does not fit the {type(model).__name__} its config describes:\n" + "".join(
            f"  {what}: {v[:12]}{f' ... ({len(v)} in all)' if len(v) > 12 else ''}\n" for what, v in problems if v))
    state = {ours: read().to(dtype, copy=True) for ours, (_, _, read) in found.items()}
    left = model.load_state_dict(state, strict=False, assign=True)
    assert not left.unexpected_keys and all(k.startswith(tuple(exclude)) for k in left.missing_keys), left
    return model


# config.json of LLaVA's own releases (LlavaLlamaForCausalLM, also INF-LLaVA's): the LLaMA fields plus these, read
# as llava/model/llava_arch.py and builder.py read them. field -> (LLaVA's default when absent, what we implement)
LLAVA_FIELDS = {
    "mm_projector_type": ("linear", ("mlp2x_gelu",)),
    "mm_vision_select_feature": ("patch", ("patch",)),      # the class token dropped
    "mm_patch_merge_type": ("flat", ("flat",)),
    "image_aspect_ratio": (None, ("pad",)),                 # pad to square with the mean colour, then resize
    "mm_use_im_start_end": (False, (False,)),
    "mm_use_im_patch_token": (True, (False,)),
    "mm_resampler_type": (None, (None,)),
}
# read elsewhere (tower, layer) or without effect on inference (training switches, learning rates)
LLAVA_OTHER = {"mm_vision_tower", "mm_vision_select_layer", "mm_hidden_size", "use_mm_proj", "tune_mm_mlp_adapter",
               "freeze_mm_mlp_adapter", "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "mm_projector_lr",
               "mm_vision_tower_lr", "tokenizer_padding_side", "tokenizer_model_max_length", "image_grid_pinpoints"}


def llava_config(cfg, path=""):
    """A LLaVA release's config.json (as a dict) -> (LLMConfig of its LLaMA, CLIP tower name, select layer).
    Vision settings we do not implement are refused by name; so is any unknown mm_* / image_* field."""
    bad = [f"{k}={cfg.get(k, default)!r}" + ("" if k in cfg else " (absent: LLaVA's default)")
           for k, (default, ok) in LLAVA_FIELDS.items() if cfg.get(k, default) not in ok]
    unknown = sorted(k for k in cfg if k.startswith(("mm_", "image_")) and k not in {*LLAVA_FIELDS, *LLAVA_OTHER})
    if bad or unknown:
        raise ValueError(f"{path}/config.json: not implemented here: {', '.join(bad + unknown)} (implemented: "
                         + ", ".join(f"{k} in {ok}" for k, (_, ok) in LLAVA_FIELDS.items()) + ")")
    for k in ("mm_vision_tower", "mm_vision_select_layer"):
        if k not in cfg:
            raise ValueError(f"{path}/config.json has no {k}: not a LLaVA release config")
    return LLMConfig.from_hf({**cfg, "model_type": "llama"}), cfg["mm_vision_tower"], cfg["mm_vision_select_layer"]


def convert_to_safetensors(path):
    """Rewrite a directory's pytorch_model*.bin files (read with torch.load(weights_only=True)) as
    model-*.safetensors shards plus model.safetensors.index.json, each written to a temporary name and renamed.
    The .bin files are left in place; loaders prefer the safetensors from then on."""
    from safetensors.torch import save_file
    bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not bins:
        raise FileNotFoundError(f"{path}: no pytorch_model*.bin files to convert")
    weight_map, n = {}, len(bins)
    for i, name in enumerate(bins, 1):
        state, seen = _read_pickle(os.path.join(path, name)), set()
        out = {}
        for k, t in state.items():   # safetensors refuses tensors that share memory: copy the second one
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
            out[k] = t.contiguous() if ptr not in seen else t.clone()
            seen.add(ptr)
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(out, os.path.join(path, shard + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, shard + ".tmp"), os.path.join(path, shard))
        weight_map.update({k: shard for k in out})
        print(f"{name} -> {shard} ({len(out)} tensors)")
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index + ".tmp", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    os.replace(index + ".tmp", index)


# -----------------------------------------------------------------------------
# Tokenizer: SentencePiece (LLaMA-2/Vicuna), tiktoken files (LLaMA-3) and byte-level BPE
# (GPT-2, Phi-1.5, Qwen2, tokenizer.json of LLaMA-3) behind one small class.
# Byte-level BPE runs on tiktoken: its merge-by-rank loop equals HF's merge-by-merge-index loop once
# every merged token's rank is the index of the merge that made it (see _ranks_from_merges).


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
        self._sp_cont = None                                      # SentencePiece without the dummy prefix
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
        # The same model without the dummy prefix, for text that continues a sequence (encode(prefix=False)).
        # Protobuf merges a repeated message field, so one appended normalizer_spec {add_dummy_prefix: false}
        # (field 3 {field 3 = 0}) overrides just that flag.
        if add_dummy_prefix:
            tok._sp_cont = sentencepiece.SentencePieceProcessor()
            tok._sp_cont.LoadFromSerializedProto(data + b"\x1a\x02\x18\x00")
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
        """bos/eos/pad as transformers resolves them: the token files first, then generation_config.json and
        config.json ids, then the format's defaults. A tokenizer_config.json with added_tokens_decoder is read
        alone; an older one without it is overridden by special_tokens_map.json wherever the map names a role
        (Vicuna: pad_token null in the config, "<unk>" in the map -> pad 0). A named role, even a null, wins."""
        tc, sm, gc, cfg = (configs[k] for k in ("tokenizer_config", "special_tokens_map", "generation_config",
                                                "config"))
        files = [("tokenizer_config.json", tc)]
        if "added_tokens_decoder" not in tc:
            files.insert(0, ("special_tokens_map.json", sm))
        for role in ("bos", "eos", "pad"):
            key = role + "_token"
            where, c = next(((file, c) for file, c in files if key in c), (None, None))
            if where is not None:
                name = _token_content(c[key])
                value = None if name is None else self._token_id(name)
                if name is not None and value is None:
                    raise ValueError(f"{where} names {key}={name!r}, which is not in the vocabulary")
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
    def encode(self, text: str, bos: bool = False, prefix: bool = True) -> list[int]:
        """prefix=False: text that continues a sequence, e.g. after a special token, gets no SentencePiece dummy
        prefix "▁" (what HF's LLaMA tokenizers with legacy=False do to the text after a special token). Byte-level
        BPE has no dummy prefix: there it changes nothing."""
        if bos and self.bos_id is None:
            raise ValueError("encode(bos=True): this tokenizer has no bos token")
        ids = [self.bos_id] if bos else []
        chunks = self._parsed_re.split(text) if self._parsed_re else [text]
        for k, chunk in enumerate(chunks):
            if k % 2:                                      # odd chunks are the added tokens that re.split kept
                ids.append(self._parsed[chunk])
            elif chunk:
                ids.extend(self._encode_plain(chunk, prefix))
        return ids

    def _encode_plain(self, text, prefix=True):
        if self._sp is not None:
            return (self._sp if prefix or self._sp_cont is None else self._sp_cont).encode(text)
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


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Greedy generation from an LLM: a HF directory (model + tokenizer), "
                                            "or random weights of a preset.")
    p.add_argument("--ckpt", default=None, help="HF directory; default: random weights of --preset")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt", default="The capital of France is", help="text (needs --ckpt with a tokenizer)")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--to_safetensors", default=None, metavar="DIR",
                   help="convert DIR's pytorch_model*.bin (a LLaVA release) to safetensors and exit")
    args = p.parse_args()
    if args.to_safetensors:
        convert_to_safetensors(args.to_safetensors)
        raise SystemExit
    torch.manual_seed(0)
    model = LLM.from_pretrained(args.ckpt) if args.ckpt else LLM(LLMConfig.preset(args.preset)).eval()
    print(f"{model.config}\n{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    if args.ckpt:
        tok = Tokenizer.from_pretrained(args.ckpt)
        idx = torch.tensor([tok.encode(args.prompt, bos=tok.bos_id is not None)])
        out = model.generate(idx, max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id)[0, idx.shape[1]:]
        print(args.prompt + tok.decode(out.tolist()))
    else:  # no tokenizer: a few token ids in, token ids out
        out = model.generate(torch.tensor([[1, 15, 27, 100]]), max_new_tokens=args.max_new_tokens)
        print("random weights, generated ids:", out[0].tolist())
