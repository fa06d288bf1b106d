"""
Pheye (Carvalho & Martins, 2024, "Efficient Architectures for High Resolution Vision-Language Models";
shared/papers/pheye.md): a frozen CLIP ViT with two LoRA adapters reads a high-resolution image as one global
view plus n x n local tiles, and a frozen language model reads those vision tokens through dense cross-attention
blocks inserted before every I-th decoder layer. Only the new parts train (Sec. 3.1).

    image (S x S, S = n * 224)
      |-- resize to 224 ---------> ViT + LoRA "global" -> LayerNorm_g --+
      |-- cut into n*n tiles ----> ViT + LoRA "local"  -> LayerNorm_l --+-> + pos[sub-image] -> vision tokens
    text --> frozen LM; before decoder layer i, when (i+1) % I == 0:
                 x = x + CrossAttn(LN(x), vision tokens)      # Fig. 2, no tanh gate
                 x = x + FFN(LN(x))

Where the paper is silent we follow the public release (github.com/miguelscarv/pheye); comments say "release".
"""
import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from llm import LLM, LLMConfig, next_token_loss
from vit import ViT, ViTConfig, add_lora, lora_parameters

# Release: LoRA on every linear layer of the ViT and on its patch-embedding convolution.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embed"]


@dataclass
class PheyeConfig:
    vit: ViTConfig
    llm: LLMConfig
    image_size: int               # side of the square high-res image forward() takes: tiles * vit.image_size
    tiles: int = 2                # local tiles per side: 2 -> 448 px (P = 5 sub-images), 3 -> 672 px (P = 10)
    interval: int = 4             # I: a cross-attention block before decoder layer i when (i+1) % I == 0
    local: bool = True            # False: the global view alone, no tiles (the ablation behind Table 2's claim)
    pad_square: bool = False      # release: images are resized (squashed) to a square, never padded
    template: str = "pheye"       # release prompt: system prompt, then "Instruction: {q}\nOutput:"
    vit_path: str | None = None   # HF directory of the CLIP ViT (paper: CLIP-ViT-H/14 trained on DFN-5B)
    llm_path: str | None = None   # HF directory of the LM (paper: Phi-1.5 finetuned on SlimOrca)
    # Two LoRA adapters (App. B.2). The paper states rank 8 / alpha 16 / dropout 0.05; the release used
    # rank 16 / alpha 32 for the local tiles and rank 8 / alpha 16 for the global view.
    global_rank: int = 8
    global_alpha: float = 16.0
    local_rank: int = 16
    local_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    @staticmethod
    def preset(name: str) -> "PheyeConfig":
        """Presets: "tiny" (CPU, minutes) and "paper-x{I}-{448|672}", Pheye-xI at that resolution (Table 1)."""
        if name == "tiny":  # shared tiny ViT (64 px) and LM; 128 px = 2 x 2 tiles of 64
            return PheyeConfig(vit=ViTConfig.preset("tiny"), llm=LLMConfig.preset("tiny"),
                               image_size=128, tiles=2, interval=2)
        papers = {f"paper-x{I}-{S}": (I, S) for I in (4, 2) for S in (448, 672)}
        if name not in papers:
            raise ValueError(f"unknown Pheye preset {name!r}; choose from {['tiny', *papers]}")
        I, S = papers[name]
        return PheyeConfig(vit=ViTConfig.preset("clip-vit-h-14"), llm=LLMConfig.preset("phi-1.5"),
                           image_size=S, tiles=S // 224, interval=I)

    @staticmethod
    def from_dict(d: dict) -> "PheyeConfig":
        return PheyeConfig(**{**d, "vit": ViTConfig(**d["vit"]), "llm": LLMConfig(**d["llm"])})


def check_config(c: PheyeConfig):
    """Refuse inconsistent hand-made configs with a message that names the numbers."""
    if c.tiles < 1 or c.image_size != c.tiles * c.vit.image_size:
        raise ValueError(f"image_size {c.image_size} must equal tiles ({c.tiles}) x vit.image_size "
                         f"({c.vit.image_size}) = {c.tiles * c.vit.image_size}")
    if not 1 <= c.interval <= c.llm.n_layer:
        raise ValueError(f"interval {c.interval} must be in 1..{c.llm.n_layer} (the LM's layer count)")
    if c.llm.d_model % c.llm.n_head:
        raise ValueError(f"LM width {c.llm.d_model} is not divisible by its {c.llm.n_head} heads")


def cross_attention_layers(n_layer: int, interval: int) -> list[int]:
    """Decoder layers that get a dense cross-attention block right before them: i with (i+1) % I == 0 (release).
    Phi-1.5 (24 layers): I = 4 -> 3, 7, ..., 23 (6 blocks); I = 2 -> 1, 3, ..., 23 (12 blocks). When I does not
    divide the layer count, the last n_layer % I layers get none (24 layers, I = 5 -> 4, 9, 14, 19)."""
    return [i for i in range(n_layer) if (i + 1) % interval == 0]


def split_tiles(pixels: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 3, n*s, n*s) -> (B*n*n, 3, s, s) non-overlapping tiles, each image's n*n tiles consecutive and taken
    column-major as in the release: down the left column first (tile 0 top-left, tile 1 below it, ...)."""
    B, C, H, W = pixels.shape
    s = H // n
    x = pixels.view(B, C, n, s, n, s)        # (B, C, row, y, col, x)
    x = x.permute(0, 4, 2, 1, 3, 5)          # (B, col, row, C, y, x): column-major
    return x.reshape(B * n * n, C, s, s)


# -----------------------------------------------------------------------------
# Dense cross-attention (Fig. 2)

class CrossAttention(nn.Module):
    """Text queries attend to every vision token (no mask: each text token sees the whole image). Keys and values
    are projected straight from the ViT width to the LM width; the inner width is the LM's (App. B.1), with the
    LM's head count (Phi-1.5: 32 heads of 64, as the release's max(D, D_ViT) / 64)."""

    def __init__(self, d_model: int, d_vision: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_vision, d_model)
        self.v_proj = nn.Linear(d_vision, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def keys_values(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N_I, D_vit) -> keys, values (B, nh, N_I, hs). Computed once per image, reused at every step."""
        B, N, _ = vision.shape
        k = self.k_proj(vision).view(B, N, self.n_head, -1).transpose(1, 2)  # (B, nh, N_I, hs)
        v = self.v_proj(vision).view(B, N, self.n_head, -1).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q_proj(self.norm(x)).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, *kv, is_causal=False)                # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


def init_std(d_model: int, d_vision: int) -> float:
    """Std of q/k/v/fc1 at init: the release's 0.01 at Phi-1.5 + ViT-H widths, scaled so that the initial
    attention-logit std sigma^2 sqrt(D_LM D_ViT) is the release's at any width (0.036 at 128 + 128)."""
    return 0.01 * (2048 * 1280 / (d_model * d_vision)) ** 0.25


class DenseCrossAttentionBlock(nn.Module):
    """x + CrossAttn(LN(x), image), then x + FFN(LN(x)) with a 4x GELU FFN. No tanh gate: the paper found that
    Flamingo's gating hindered convergence (Sec. 2.1)."""

    def __init__(self, d_model: int, d_vision: int, n_head: int, lm_layers: int):
        super().__init__()
        self.attn = CrossAttention(d_model, d_vision, n_head)
        self.ff_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)
        # Sec. 2.1: output matrices start near zero so the frozen LM is intact at initialisation. Release values:
        # every linear N(0, 0.01^2) with zero bias, the two output matrices N(0, (0.01 / sqrt(2 max(L, 36)))^2).
        # The release's 0.01 is made for Phi-1.5 (2048) + ViT-H (1280): the initial attention logits q.k/sqrt(hs)
        # of unit-variance inputs have std sigma^2 sqrt(D_LM D_ViT) = 0.16 there, but 0.013 at width 128, where
        # attention then stays uniform over the vision tokens. So sigma keeps that spread at any width
        # (init_std; exactly 0.01 at the paper's widths); the output matrices keep the release's values.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std(d_model, d_vision))
                nn.init.zeros_(m.bias)
        for w in (self.attn.out_proj.weight, self.fc2.weight):
            nn.init.normal_(w, std=0.01 / math.sqrt(2 * max(lm_layers, 36)))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(x, kv)
        return x + self.fc2(F.gelu(self.fc1(self.ff_norm(x))))


# -----------------------------------------------------------------------------
# The model

class Pheye(nn.Module):
    """The whole model: vit (frozen, adapters "global" and "local"), norm_global / norm_local, pos_embed, xattn
    (blocks keyed by the decoder layer they precede) and llm (frozen). forward / generate / configure_stage /
    from_pretrained / save / load follow the contract every nanoHiRes model shares (spec.md)."""

    # Sec. 3.1: three stages train the same parameters (cross-attention, LoRA, positional embeddings, the two
    # LayerNorms) on different data, cosine decay, effective batch 128. Loss: summed over output tokens, and
    # train.py divides the gradients by the number of output tokens of the whole effective batch (all
    # micro-steps, all ranks), so short and long answers weigh the same.
    STAGES = {
        "stage1": dict(lr=2e-4, template="pheye", task="caption", reduction="sum", batch_size=128,
                       schedule="cosine", data="captions: ShareGPT4V-PT, one of ten caption instructions per image"),
        "stage2": dict(lr=1e-4, template="pheye", reduction="sum", batch_size=128, schedule="cosine",
                       data="instructions: MIMIC-IT, LRV, SViT, LVIS, one turn per sample"),
        "stage3": dict(lr=5e-5, template="pheye", reduction="sum", batch_size=128, schedule="cosine",
                       data="academic VQA and captioning mix based on LLaVA-1.5 mix-665K (App. A)"),
    }

    def __init__(self, config: PheyeConfig, vit: ViT | None = None, llm: LLM | None = None):
        super().__init__()
        check_config(config)
        c = self.config = config
        if vit is not None and vit.config.width != c.vit.width:
            raise ValueError(f"the given ViT is {vit.config.width} wide but config.vit.width is {c.vit.width}")
        if llm is not None and llm.config.d_model != c.llm.d_model:
            raise ValueError(f"the given LM is {llm.config.d_model} wide but config.llm.d_model is {c.llm.d_model}")
        self.vit = vit if vit is not None else ViT(c.vit)
        self.llm = llm if llm is not None else LLM(c.llm)
        self.llm.requires_grad_(False)  # frozen, input embeddings included (release)
        self.vit.requires_grad_(False)  # frozen base; add_lora below makes the adapters
        add_lora(self.vit, c.lora_targets, "global", c.global_rank, c.global_alpha, c.lora_dropout)
        add_lora(self.vit, c.lora_targets, "local", c.local_rank, c.local_alpha, c.lora_dropout)

        d_vit, d_lm = c.vit.width, c.llm.d_model
        self.norm_global = nn.LayerNorm(d_vit)  # Sec. 2.1: separate LayerNorms for global and local tokens
        self.norm_local = nn.LayerNorm(d_vit)
        # Fig. 3, release: one learned embedding per sub-image (row 0 global view, row k tile k), shared by all
        # of that sub-image's tokens.
        self.pos_embed = nn.Embedding(1 + c.tiles ** 2, d_vit)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        self.xattn = nn.ModuleDict({str(i): DenseCrossAttentionBlock(d_lm, d_vit, c.llm.n_head, c.llm.n_layer)
                                    for i in cross_attention_layers(c.llm.n_layer, c.interval)})

    # --- vision ---------------------------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, P * N', D_vit) vision tokens: the global view's N' tokens
        (CLS kept), then each tile's, P = 1 + n^2 sub-images (Fig. 1, 3)."""
        n, s = self.config.tiles, self.config.vit.image_size
        B = pixels.shape[0]
        # the global view: the image resized to the ViT size (bicubic, antialiased like PIL). The release resizes
        # the original image; here it is the S x S one forward() receives, so one tensor feeds both views.
        global_view = F.interpolate(pixels, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        g = self.norm_global(self.vit(global_view, adapter="global"))           # (B, N', D_vit), last layer
        if not self.config.local:  # global-only ablation: P = 1
            return g + self.pos_embed.weight[0]
        t = self.norm_local(self.vit(split_tiles(pixels, n), adapter="local"))  # (B*n*n, N', D_vit), one call
        tokens = torch.cat([g, t.reshape(B, -1, t.shape[-1])], dim=1)           # (B, P*N', D_vit)
        sub_image = torch.arange(1 + n * n, device=pixels.device).repeat_interleave(g.shape[1])  # 0..0,1..1,...
        return tokens + self.pos_embed(sub_image)

    def image_keys_values(self, pixels: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every cross-attention block's keys and values for these images, keyed by decoder layer."""
        vision = self.encode_image(pixels)
        return {i: block.attn.keys_values(vision) for i, block in self.xattn.items()}

    def _before_layer(self, kv):
        """The hook llm.forward/generate run on the hidden states before each decoder layer."""
        def cross_attend(i, x):
            block = self.xattn[str(i)] if str(i) in self.xattn else None
            return x if block is None else block(x, kv[str(i)])
        return cross_attend

    # --- language -------------------------------------------------------------------------------------------

    def check_inputs(self, pixels: torch.Tensor, idx: torch.Tensor):
        S = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, {S}, {S}), got {tuple(pixels.shape)}; grayscale or RGBA "
                             f"images: data.load_image converts them to RGB")
        if pixels.shape[-2:] != (S, S):
            raise ValueError(f"pixels are {pixels.shape[-2]}x{pixels.shape[-1]} but this Pheye takes {S}x{S} "
                             f"({self.config.tiles}x{self.config.tiles} tiles of {self.config.vit.image_size}); "
                             f"resize as the release does: data.load_image(path, {S}, pad_square=False)")
        if idx.ndim != 2 or idx.shape[0] != pixels.shape[0]:
            raise ValueError(f"idx must be (B, T) with B = {pixels.shape[0]} images, got {tuple(idx.shape)}")
        if (idx < 0).any():
            raise ValueError("idx holds a negative id (an <image> placeholder?): Pheye reads the image through "
                             "cross-attention, so its 'pheye' template has no image position")

    def forward(self, pixels, idx, labels=None, mask=None, reduction="mean"):
        """Logits (B, T, V); with labels (aligned with idx, IGNORE = -100 skipped; shifted here) also the
        next-token loss. reduction "sum" is Sec. 3.1's: the caller divides by the effective batch's token count."""
        self.check_inputs(pixels, idx)
        kv = self.image_keys_values(pixels)
        logits = self.llm(idx, mask=mask, before_layer=self._before_layer(kv))
        if labels is None:
            return logits
        return logits, next_token_loss(logits, labels, reduction)

    @torch.no_grad()
    def generate(self, pixels, idx, max_new_tokens=32, mask=None, temperature=0.0, eos_id=None):
        """(B, new) token ids. The cross-attention keys/values are computed once here and every decoding step
        reuses them; the LM keeps its own KV cache (llm.generate)."""
        self.check_inputs(pixels, idx)
        kv = self.image_keys_values(pixels)
        out = self.llm.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                                mask=mask, before_layer=self._before_layer(kv))
        return out[:, idx.shape[1]:]

    # --- training -------------------------------------------------------------------------------------------

    def configure_stage(self, stage: str) -> list[dict]:
        """Freeze everything, unfreeze what Pheye trains (the same groups in every stage), return param groups.
        Global-only (local=False): the local adapter and LayerNorm, which never run, stay frozen."""
        if stage not in self.STAGES:
            raise ValueError(f"unknown Pheye stage {stage!r}; choose from {list(self.STAGES)}")
        lr, local = self.STAGES[stage]["lr"], self.config.local
        groups = {"cross_attn": list(self.xattn.parameters()),
                  "lora": lora_parameters(self.vit, None if local else "global"),
                  "pos_embed": list(self.pos_embed.parameters()),
                  "norms": [*self.norm_global.parameters(), *(self.norm_local.parameters() if local else [])]}
        self.requires_grad_(False)
        for params in groups.values():
            for p in params:
                p.requires_grad_(True)
        return [{"name": name, "params": params, "lr": lr} for name, params in groups.items()]

    # --- checkpoints ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, config: PheyeConfig, dtype=None) -> "Pheye":
        """Build Pheye with the ViT and LM loaded from config.vit_path / config.llm_path (their HF configs win
        over the preset's); the new parts are freshly initialised."""
        config = copy.deepcopy(config)
        vit = llm = None
        if config.vit_path:
            vit = ViT.from_pretrained(config.vit_path, dtype)
            config.vit = vit.config
            config.image_size = config.tiles * vit.config.image_size
        if config.llm_path:
            llm = LLM.from_pretrained(config.llm_path, dtype)
            config.llm = llm.config
        model = cls(config, vit, llm)
        return model.to(dtype) if dtype is not None else model

    def save(self, dir: str):
        """config.json + model.safetensors (the whole model), each written to a temporary name and renamed."""
        os.makedirs(dir, exist_ok=True)
        tmp = os.path.join(dir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)
        os.replace(tmp, os.path.join(dir, "config.json"))
        tmp = os.path.join(dir, "model.safetensors.tmp")
        save_model(self, tmp)  # stores a tied LM head once
        os.replace(tmp, os.path.join(dir, "model.safetensors"))

    @classmethod
    def load(cls, dir: str, dtype=None) -> "Pheye":
        for name in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(dir, name)):
                raise FileNotFoundError(f"no {name} in {dir!r}: expected a directory written by Pheye.save")
        with open(os.path.join(dir, "config.json")) as f:
            config = PheyeConfig.from_dict(json.load(f))
        model = cls(config)
        if dtype is not None:
            model.to(dtype)
        load_model(model, os.path.join(dir, "model.safetensors"))  # strict: a missing/extra/misshaped key is an error
        return model


if __name__ == "__main__":
    import argparse

    import data
    from llm import Tokenizer

    ap = argparse.ArgumentParser(description="Pheye: answer one instruction about one image")
    ap.add_argument("--image", required=True, help="any image PIL reads; it is resized to the model's size")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--ckpt", help="a directory written by Pheye.save / train.py (holds the tokenizer too)")
    ap.add_argument("--preset", default="tiny", help="without --ckpt: a PheyeConfig preset")
    ap.add_argument("--vit", help="without --ckpt: HF CLIP directory for the preset")
    ap.add_argument("--llm", help="without --ckpt: HF LM directory (and its tokenizer) for the preset")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    args = ap.parse_args()

    if args.ckpt:
        model, tok_dir = Pheye.load(args.ckpt), args.ckpt
    else:
        config = PheyeConfig.preset(args.preset)
        config.vit_path, config.llm_path = args.vit or config.vit_path, args.llm or config.llm_path
        if not config.llm_path and args.preset != "tiny":
            ap.error(f"--preset={args.preset} needs --llm=DIR (the language model and its tokenizer)")
        if not (config.vit_path and config.llm_path):
            print("note: no --ckpt, so parts are randomly initialised: expect gibberish")
        model = Pheye.from_pretrained(config)
        if config.llm_path:
            tok_dir = config.llm_path
        else:
            import tempfile
            tok_dir = data.build_tiny_tokenizer(tempfile.mkdtemp())
    model.eval()
    tok = Tokenizer.from_pretrained(tok_dir)
    c = model.config
    pixels = data.load_image(args.image, c.image_size, c.pad_square)[None]  # (1, 3, S, S)
    ids, _ = data.tokenize_conversation(tok, [{"from": "human", "value": args.prompt}], c.template)
    new = model.generate(pixels, torch.tensor([ids]), max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id)
    print(f"Instruction: {args.prompt}\nResponse: {data.answer_text(tok, new[0].tolist())}")
