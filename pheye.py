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
Pheye.from_release loads the released checkpoints (huggingface.co/miguelcarv/Pheye-x4-448 and siblings), and
`python pheye.py --release DIR --vit DIR --llm DIR --image x.jpg --prompt "..."` asks them a question.
"""
import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

import data
from llm import LLM, LLMConfig, _to_hf, model_config_from_dict, next_token_loss
from vit import HF_RENAMES, ViT, ViTConfig, add_lora, lora_parameters

# Release: LoRA on every linear layer of the ViT and on its patch-embedding convolution.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embed"]


@dataclass
class PheyeConfig:
    vit: ViTConfig
    llm: LLMConfig
    image_size: int               # side of the square high-res image forward() takes: tiles * vit.image_size
    tiles: int = 2                # local tiles per side: 2 -> 448 px (P = 5 sub-images), 3 -> 672 px (P = 10)
    interval: int = 4             # I: a cross-attention block before decoder layer i when (i+1) % I == 0
    local: bool = True            # False: the global view alone, no tiles (the ablation behind Table 2's claim),
                                  # read as the release's level 1: a LayerNorm connector, no position embeddings
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
    # The global view's adapter. "train": the paper's two trained adapters (Sec. 2.1, App. B.2). The release trains
    # only the local one: its global view runs the bare ViT unless config.json sets first_level, and even then
    # peft's set_adapter("second") switches off the gradients of adapter "first" before the backward pass, so it
    # stays at its initialisation (B = 0, which adds nothing). "frozen": the adapter exists and runs, never
    # trains (release, first_level); "none": no global adapter (release default). Trainable parameters,
    # Pheye-x4 / x2: 301.0 M / 584.3 M with "train", 295 M / 578 M otherwise (the release README's figures).
    global_lora: str = "train"
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # Cross-attention heads (release xattn.py): inner width max(D_LM, D_ViT), in heads of this size. The release
    # fixes 64 (Phi-1.5 + ViT-H: 2048 / 64 = 32 heads); the tiny preset takes 32 (128 / 32 = 4 heads).
    xattn_head_dim: int = 64

    @staticmethod
    def preset(name: str) -> "PheyeConfig":
        """Presets: "tiny" (CPU, minutes) and "paper-x{I}-{448|672}", Pheye-xI at that resolution (Table 1)."""
        if name == "tiny":  # shared tiny ViT (64 px) and LM; 128 px = 2 x 2 tiles of 64
            return PheyeConfig(vit=ViTConfig.preset("tiny"), llm=LLMConfig.preset("tiny"),
                               image_size=128, tiles=2, interval=2, xattn_head_dim=32)
        papers = {f"paper-x{I}-{S}": (I, S) for I in (4, 2) for S in (448, 672)}
        if name not in papers:
            raise ValueError(f"unknown Pheye preset {name!r}; choose from {['tiny', *papers]}")
        I, S = papers[name]
        return PheyeConfig(vit=ViTConfig.preset("clip-vit-h-14"), llm=LLMConfig.preset("phi-1.5"),
                           image_size=S, tiles=S // 224, interval=I)

    @staticmethod
    def from_dict(d: dict) -> "PheyeConfig":
        return model_config_from_dict(PheyeConfig, "Pheye", d, vit=ViTConfig, llm=LLMConfig)


def check_config(c: PheyeConfig):
    """Refuse inconsistent hand-made configs with a message that names the numbers."""
    if c.tiles < 1 or c.image_size != c.tiles * c.vit.image_size:
        raise ValueError(f"image_size {c.image_size} must equal tiles ({c.tiles}) x vit.image_size "
                         f"({c.vit.image_size}) = {c.tiles * c.vit.image_size}")
    if c.global_lora not in ("train", "frozen", "none"):
        raise ValueError(f"global_lora {c.global_lora!r}: choose 'train' (paper), 'frozen' or 'none' (release)")
    if not 1 <= c.interval <= c.llm.n_layer:
        raise ValueError(f"interval {c.interval} must be in 1..{c.llm.n_layer} (the LM's layer count)")
    inner = max(c.llm.d_model, c.vit.width)
    if c.xattn_head_dim < 1 or inner % c.xattn_head_dim:
        raise ValueError(f"cross-attention width max(LM {c.llm.d_model}, ViT {c.vit.width}) = {inner} is not "
                         f"divisible by xattn_head_dim {c.xattn_head_dim}")


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
    are projected straight from the ViT width. The inner width is the release's (xattn.py): max(D, D_ViT), split
    into heads of head_dim = 64, so max(D, D_ViT) / 64 heads (Phi-1.5 + ViT-H: 2048 wide, 32 heads, which is also
    Phi-1.5's own width and head count); the output projection returns to the LM width D."""

    def __init__(self, d_model: int, d_vision: int, head_dim: int):
        super().__init__()
        inner = max(d_model, d_vision)
        self.n_head = inner // head_dim
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_vision, inner)
        self.v_proj = nn.Linear(d_vision, inner)
        self.out_proj = nn.Linear(inner, d_model)

    def keys_values(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N_I, D_vit) -> keys, values (B, nh, N_I, hs). Computed once per image, reused at every step."""
        B, N, _ = vision.shape
        k = self.k_proj(vision).view(B, N, self.n_head, -1).transpose(1, 2)  # (B, nh, N_I, hs)
        v = self.v_proj(vision).view(B, N, self.n_head, -1).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(self.norm(x)).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, *kv, is_causal=False)                # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))


def init_std(d_model: int, d_vision: int) -> float:
    """Std of q/k/v/fc1 at init: the release's 0.01 at Phi-1.5 + ViT-H widths, scaled so that the initial
    attention-logit std sigma^2 sqrt(D_LM D_ViT) is the release's at any width (0.036 at 128 + 128)."""
    return 0.01 * (2048 * 1280 / (d_model * d_vision)) ** 0.25


class DenseCrossAttentionBlock(nn.Module):
    """x + CrossAttn(LN(x), image), then x + FFN(LN(x)) with a 4x GELU FFN. No tanh gate: the paper found that
    Flamingo's gating hindered convergence (Sec. 2.1)."""

    def __init__(self, d_model: int, d_vision: int, head_dim: int, lm_layers: int):
        super().__init__()
        self.attn = CrossAttention(d_model, d_vision, head_dim)
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
    """The whole model: vit (frozen, adapters "global" and "local"), norm_global / norm_local, pos_embed (the
    global-only model: norm_global and a LayerNorm connector), xattn (blocks keyed by the decoder layer they
    precede) and llm (frozen). forward / generate / configure_stage / from_pretrained / save / load follow the
    contract every nanoHiRes model shares (train.py calls them)."""

    # Sec. 3.1: three stages train the same parameters (cross-attention, LoRA, positional embeddings, the two
    # LayerNorms) on different data, cosine decay, effective batch 128. Loss: summed over output tokens, and
    # train.py divides the gradients by the number of output tokens of the whole effective batch (all
    # micro-steps, all ranks), so short and long answers weigh the same. Sec. 3.1 states no warmup, floor or
    # gradient clipping, and the release (miguelscarv/pheye) has no training code: none of them here (cosine
    # from the first step down to 0), nothing the paper does not say.
    SCHEDULE = dict(warmup_ratio=0.0, min_lr_ratio=0.0, grad_clip=0.0)
    STAGES = {
        # captions: ShareGPT4V-PT, one of ten caption instructions per image
        "stage1": dict(lr=2e-4, template="pheye", task="caption", **SCHEDULE),
        # instructions: MIMIC-IT, LRV, SViT, LVIS, one turn per sample
        "stage2": dict(lr=1e-4, template="pheye", **SCHEDULE),
        # academic VQA and captioning mix based on LLaVA-1.5 mix-665K (App. A)
        "stage3": dict(lr=5e-5, template="pheye", **SCHEDULE),
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
        if c.global_lora != "none":
            add_lora(self.vit, c.lora_targets, "global", c.global_rank, c.global_alpha, c.lora_dropout)
        if c.local:
            add_lora(self.vit, c.lora_targets, "local", c.local_rank, c.local_alpha, c.lora_dropout)

        d_vit, d_lm = c.vit.width, c.llm.d_model
        self.norm_global = nn.LayerNorm(d_vit)  # Sec. 2.1: separate LayerNorms for global and local tokens
        if c.local:
            self.norm_local = nn.LayerNorm(d_vit)
            # Fig. 3, release: one learned embedding per sub-image (row 0 global view, row k tile k), shared by
            # all of that sub-image's tokens.
            self.pos_embed = nn.Embedding(1 + c.tiles ** 2, d_vit)
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        else:  # release level 1: one sub-image, so no positions; a second LayerNorm as the connector instead
            self.connector = nn.LayerNorm(d_vit)
        self.xattn = nn.ModuleDict({str(i): DenseCrossAttentionBlock(d_lm, d_vit, c.xattn_head_dim, c.llm.n_layer)
                                    for i in cross_attention_layers(c.llm.n_layer, c.interval)})

    # --- vision ---------------------------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor, global_view: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, P * N', D_vit) vision tokens: the global view's N' tokens
        (CLS kept), then each tile's, P = 1 + n^2 sub-images (Fig. 1, 3)."""
        n, s = self.config.tiles, self.config.vit.image_size
        B = pixels.shape[0]
        # the global view: the image resized to the ViT size (bicubic, antialiased like PIL). The release resizes
        # the original image (release_views gives that view); by default it is the S x S one forward() receives,
        # so one tensor feeds both views.
        if global_view is None:
            global_view = pixels if n == 1 else F.interpolate(pixels, size=(s, s), mode="bicubic",
                                                              align_corners=False, antialias=True)
        adapter = None if self.config.global_lora == "none" else "global"
        g = self.norm_global(self.vit(global_view, adapter=adapter))            # (B, N', D_vit), last layer
        if not self.config.local:  # global-only ablation, the release's level 1: P = 1
            return self.connector(g)
        t = self.norm_local(self.vit(split_tiles(pixels, n), adapter="local"))  # (B*n*n, N', D_vit), one call
        tokens = torch.cat([g, t.reshape(B, -1, t.shape[-1])], dim=1)           # (B, P*N', D_vit)
        sub_image = torch.arange(1 + n * n, device=pixels.device).repeat_interleave(g.shape[1])  # 0..0,1..1,...
        return tokens + self.pos_embed(sub_image)

    def image_keys_values(self, pixels: torch.Tensor, global_view: torch.Tensor | None = None
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every cross-attention block's keys and values for these images, keyed by decoder layer."""
        vision = self.encode_image(pixels, global_view)
        return {i: block.attn.keys_values(vision) for i, block in self.xattn.items()}

    def _before_layer(self, kv):
        """The hook llm.forward/generate run on the hidden states before each decoder layer."""
        def cross_attend(i, x):
            block = self.xattn[str(i)] if str(i) in self.xattn else None
            return x if block is None else block(x, kv[str(i)])
        return cross_attend

    # --- language -------------------------------------------------------------------------------------------

    def check_inputs(self, pixels: torch.Tensor, idx: torch.Tensor, global_view: torch.Tensor | None = None):
        S, s = self.config.image_size, self.config.vit.image_size
        if global_view is not None and tuple(global_view.shape) != (pixels.shape[0], 3, s, s):
            raise ValueError(f"global_view must be (B, 3, {s}, {s}) with B = {pixels.shape[0]}, "
                             f"got {tuple(global_view.shape)}")
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

    def forward(self, pixels, idx, labels=None, mask=None, reduction="mean", global_view=None):
        """Logits (B, T, V); with labels (aligned with idx, IGNORE = -100 skipped; shifted here) also the
        next-token loss. reduction "sum" is Sec. 3.1's: the caller divides by the effective batch's token count.
        global_view: (B, 3, s, s), the global view made apart (release_views); None: resized from pixels."""
        self.check_inputs(pixels, idx, global_view)
        kv = self.image_keys_values(pixels, global_view)
        logits = self.llm(idx, mask=mask, before_layer=self._before_layer(kv))
        if labels is None:
            return logits
        return logits, next_token_loss(logits, labels, reduction)

    @torch.no_grad()
    def generate(self, pixels, idx, max_new_tokens=32, mask=None, temperature=0.0, eos_id=None, global_view=None):
        """(B, new) token ids. The cross-attention keys/values are computed once here and every decoding step
        reuses them; the LM keeps its own KV cache (llm.generate)."""
        self.check_inputs(pixels, idx, global_view)
        kv = self.image_keys_values(pixels, global_view)
        out = self.llm.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                                mask=mask, before_layer=self._before_layer(kv))
        return out[:, idx.shape[1]:]

    # --- training -------------------------------------------------------------------------------------------

    def configure_stage(self, stage: str) -> list[dict]:
        """Freeze everything, unfreeze what Pheye trains (the same groups in every stage), return the non-empty
        param groups: cross_attn, lora, pos_embed (global-only: connector), norms. The global adapter trains only
        with global_lora="train"."""
        if stage not in self.STAGES:
            raise ValueError(f"unknown Pheye stage {stage!r}; choose from {list(self.STAGES)}")
        c, lr = self.config, self.STAGES[stage]["lr"]
        lora = [p for name in (["global"] if c.global_lora == "train" else []) + (["local"] if c.local else [])
                for p in lora_parameters(self.vit, name)]
        groups = {"cross_attn": list(self.xattn.parameters()), "lora": lora}
        if c.local:
            groups |= {"pos_embed": list(self.pos_embed.parameters()),
                       "norms": [*self.norm_global.parameters(), *self.norm_local.parameters()]}
        else:
            groups |= {"connector": list(self.connector.parameters()), "norms": list(self.norm_global.parameters())}
        self.requires_grad_(False)
        for params in groups.values():
            for p in params:
                p.requires_grad_(True)
        return [{"name": name, "params": params, "lr": lr} for name, params in groups.items() if params]

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
        with open(tmp, "w") as f:  # the class first: --init checks it (train.py)
            json.dump({"architecture": "Pheye", **dataclasses.asdict(self.config)}, f, indent=2)
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

    @classmethod
    def from_release(cls, dir: str, vit: str, llm: str, dtype=torch.float32) -> "Pheye":
        """Load a released Pheye (huggingface.co/miguelcarv/Pheye-x4-448, -x4-672, -x2-448, -x2-672): `dir` holds
        its config.json and checkpoint.pt (or the checkpoint.safetensors that release_to_safetensors writes).
        `vit` and `llm` are the directories of the models its config.json names as "encoder" and "decoder";
        only their config.json is read, since the checkpoint holds every weight, the ViT's and the LM's too.
        Every tensor is checked against RELEASE_LAYOUT: a missing, unexpected or misshaped one is an error that
        names it. The release ran its parts in the dtypes its config names; here the whole model takes `dtype`."""
        config = release_config(dir, vit, llm)
        state, file = read_release_checkpoint(dir)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(release_to_ours(model, state, file, dtype, aliases=file.endswith(".pt")),
                              strict=True, assign=True)
        return model.eval()


# -----------------------------------------------------------------------------
# The released checkpoints (github.com/miguelscarv/pheye; read there: generate.py, pheye_builder/)
#
# config.json names the encoder, decoder and tokenizer and the fields below. checkpoint.pt is the whole phEYE
# state dict (phEYE.py): `vision_encoder.` (encoder.py: the CLIP vision transformer, wrapped by peft from level 2
# on; norm_lvl_1/2/3; the connector) and `lang_encoder.` (the HF causal LM with every decoder layer wrapped
# together with the cross-attention block before it, wrapper_lm.py). The LM is built from its config and gets
# all its weights from the checkpoint, so the checkpoint holds the ViT and the LM too.

RELEASE_FIELDS = ("encoder", "decoder", "tokenizer", "cross_interval", "level", "first_level", "reduce", "from_layer",
                  "encoder_dtype", "decoder_dtype", "other_params_dtype")
RELEASE_TILES = {1: 1, 2: 2, 3: 3}  # encoder.py level -> tiles per side (P = 1, 5, 10 sub-images)
RELEASE_DTYPES = {f"torch.{d}": getattr(torch, d) for d in ("float32", "float16", "bfloat16")}
RELEASE_ADAPTERS = {"local": "second", "global": "first"}  # ours -> the release's peft adapter names
RELEASE_POSITIONS = 21  # encoder.py's Position table: max(LEVELS_TO_PATCHES) rows, of which level n reads P
# our cross-attention block -> xattn.py's CrossAttentionBlock; k_proj and v_proj are the two halves of attn.to_kv
RELEASE_XATTN = {"attn.norm": "attn.norm", "attn.q_proj": "attn.to_q", "attn.out_proj": "attn.to_out",
                 "ff_norm": "ff.norm", "fc1": "ff.fc1", "fc2": "ff.fc2"}
# wrapper_lm.py also keeps every decoder layer and block under a second name (the same tensors; torch.save keeps
# them shared): second name -> the name release_layout maps ({} is the decoder layer)
RELEASE_ALIASES = {"lang_encoder.old_decoder_blocks.{}.": "lang_encoder.model.layers.{}.decoder_layer.",
                   "lang_encoder.cross_attn_layers.{}.": "lang_encoder.model.layers.{}.cross_attn_layer."}
RELEASE_SYSTEM = data.PHEYE_SYSTEM  # generate.py's SYSTEM_PROMPT


def release_prompt(question: str) -> str:
    """generate.py's prompt, tokenised whole with no BOS (data.py's "pheye" template gives the same ids)."""
    return f"{RELEASE_SYSTEM}\n\nInstruction: {question}\nOutput:"


def release_views(image, config: PheyeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's preprocessing (encoder.py): the original image resized by PIL (bicubic, no padding) to
    tiles x the ViT size, cut into tiles column-major (split_tiles, inside the model), and resized again from the
    original to the ViT size for the global view. Returns (pixels (3, S, S), global view (3, s, s)).
    One difference: data.open_image applies the EXIF orientation, the release reads the pixels as stored."""
    im = data.open_image(image)
    return data.load_image(im, config.image_size, False), data.load_image(im, config.vit.image_size, False)


def release_config(dir: str, vit_dir: str, llm_dir: str) -> PheyeConfig:
    """A release config.json (with the ViT's and the LM's own config.json) -> PheyeConfig. What this file does
    not implement is refused by name: level 4 (the release's encoder.py has no forward for it), reduce != 1 and
    from_layer != 0 (the released models' parameter counts, 295 M / 578 M, are those of reduce 1, from layer 0)."""
    path = os.path.join(dir, "config.json")
    r = _read_json(path, "a Pheye release directory (config.json + checkpoint.pt)")
    unknown, missing = sorted(set(r) - set(RELEASE_FIELDS)), [k for k in RELEASE_FIELDS if k not in r]
    if unknown or missing:
        raise ValueError(f"{path}: unknown fields {unknown}, missing fields {missing} (a release config has "
                         f"{list(RELEASE_FIELDS)})")
    refused = [f"level={r['level']} (levels {list(RELEASE_TILES)}: level 4, 1 + 4 + 16 sub-images, has no forward "
               f"in the release)"] if r["level"] not in RELEASE_TILES else []
    refused += [f"reduce={r['reduce']} (narrower cross-attention; not implemented)"] if r["reduce"] != 1 else []
    refused += [f"from_layer={r['from_layer']} (not implemented)"] if r["from_layer"] != 0 else []
    refused += ["first_level with level 1 (the release cannot build it)"] if r["first_level"] and r["level"] == 1 else []
    refused += [f"{k}={r[k]!r} (one of {list(RELEASE_DTYPES)})" for k in RELEASE_FIELDS[-3:] if r[k] not in RELEASE_DTYPES]
    if refused:
        raise ValueError(f"{path}: unsupported " + "; ".join(refused))
    vit = ViT.config_from_hf(_read_json(os.path.join(vit_dir, "config.json"), f"the encoder {r['encoder']!r}"),
                             vit_dir)
    llm = LLMConfig.from_hf(_read_json(os.path.join(llm_dir, "config.json"), f"the decoder {r['decoder']!r}"))
    if llm.family not in ("phi", "llama", "qwen2") or llm.tie_embeddings:  # Phi-1.5: phi, untied head
        raise ValueError(f"{llm_dir}: a {llm.family} decoder{' with a tied head' * llm.tie_embeddings}; the release "
                         f"loader reads phi, llama or qwen2 with their own lm_head (decoder layers at model.layers)")
    n = RELEASE_TILES[r["level"]]
    return PheyeConfig(vit=vit, llm=llm, image_size=n * vit.image_size, tiles=n, interval=r["cross_interval"],
                       local=n > 1, global_lora="frozen" if r["first_level"] else "none", lora_dropout=0.0,
                       xattn_head_dim=64, vit_path=vit_dir, llm_path=llm_dir)


def _read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {path}: expected {what}")
    with open(path) as f:
        return json.load(f)


def release_layout(model: Pheye) -> dict[str, tuple[str, list[str]]]:
    """Release key -> (how, our keys): "copy"; "kv" (to_kv = [k_proj; v_proj] by rows); "rows" (the 21-row
    position table, of which P are ours); "unused" (norm_lvl_3, and norm_lvl_2 at level 1: built, never run)."""
    c, out = model.config, {}
    vit = "vision_encoder.vision_model." + ("base_model.model." if c.local else "")  # peft: PeftModel, LoraModel
    ours_to_hf = {v: k for k, v in HF_RENAMES.items()}
    for name in model.vit.state_dict():
        key = name.replace(".base.", ".base_layer.")  # peft 0.7 keeps the wrapped layer as base_layer
        for ours, peft in RELEASE_ADAPTERS.items():
            key = re.sub(rf"\.lora_([AB])\.{ours}$", rf".lora_\1.{peft}.weight", key)  # peft: an nn.Linear/Conv2d
        prefix = next(p for p in ours_to_hf if key.startswith(p))
        out[vit + ours_to_hf[prefix] + key[len(prefix):]] = ("copy", [f"vit.{name}"])
    for p in ("weight", "bias"):
        out[f"vision_encoder.norm_lvl_1.{p}"] = ("copy", [f"norm_global.{p}"])
        out[f"vision_encoder.norm_lvl_2.{p}"] = ("copy", [f"norm_local.{p}"]) if c.local else ("unused", [])
        out[f"vision_encoder.norm_lvl_3.{p}"] = ("unused", [])
        if not c.local:
            out[f"vision_encoder.connector.{p}"] = ("copy", [f"connector.{p}"])
    if c.local:
        out["vision_encoder.connector.embedding.weight"] = ("rows", ["pos_embed.weight"])
    for name, t in model.llm.state_dict().items():
        for hf in _to_hf(c.llm, {name: t}):  # our name -> the HF name (none for a tied head)
            out["lang_encoder." + re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1.decoder_layer.", hf)] = (
                "copy", [f"llm.{name}"])
    for i in model.xattn:
        for p in ("weight", "bias"):
            block = f"lang_encoder.model.layers.{i}.cross_attn_layer."
            for ours, theirs in RELEASE_XATTN.items():
                out[f"{block}{theirs}.{p}"] = ("copy", [f"xattn.{i}.{ours}.{p}"])
            out[f"{block}attn.to_kv.{p}"] = ("kv", [f"xattn.{i}.attn.k_proj.{p}", f"xattn.{i}.attn.v_proj.{p}"])
    return out


def _swap_prefix(key: str, src: str, dst: str) -> str | None:
    """key with prefix src ({} a layer number) rewritten to prefix dst, or None if src does not match."""
    m = re.match(re.escape(src).replace(r"\{\}", r"(\d+)"), key)
    return dst.format(m[1]) + key[m.end():] if m else None


def _canonical(key: str) -> str | None:
    """For a second name of a shared module (RELEASE_ALIASES), the name release_layout maps; else None."""
    return next((c for second, first in RELEASE_ALIASES.items() if (c := _swap_prefix(key, second, first))), None)


def read_release_checkpoint(dir: str) -> tuple[dict[str, torch.Tensor], str]:
    """checkpoint.safetensors if release_to_safetensors wrote one, else checkpoint.pt, a pickle read only through
    torch.load(weights_only=True): it rebuilds tensors and plain containers and runs no code from the file."""
    st, pt = os.path.join(dir, "checkpoint.safetensors"), os.path.join(dir, "checkpoint.pt")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st), st
    if not os.path.isfile(pt):
        raise FileNotFoundError(f"no checkpoint.pt or checkpoint.safetensors in {dir!r}")
    state = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{pt}: expected a state dict (names -> tensors), got {type(state).__name__}")
    return state, pt


def check_release(model: Pheye, state: dict, file: str, aliases: bool = True) -> dict:
    """Check a release state dict against the layout of `model` (a meta model will do) and return the layout.
    Every key of release_layout present with its shape; nothing unexpected; every second name of a shared module
    (aliases=True, as torch.save writes them: required) equal to the tensor it names again. One error lists
    every problem."""
    c, layout = model.config, release_layout(model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {}
    for key, (how, names) in layout.items():
        shape = ours[names[0]] if names else (c.vit.width,)
        want[key] = {"kv": (2 * shape[0], *shape[1:]), "rows": (RELEASE_POSITIONS, *shape[1:])}.get(how, shape)
    missing = [k for k in layout if k not in state]
    if aliases:
        missing += [a for k in layout for second, first in RELEASE_ALIASES.items()
                    if (a := _swap_prefix(k, first, second)) and a not in state]
    unexpected, wrong = [], []
    n_pos = 1 + (c.vit.image_size // c.vit.patch_size) ** 2
    for key, t in state.items():
        canonical = _canonical(key)
        if canonical is not None:
            if not aliases or canonical not in state:
                unexpected.append(key)
            elif t.shape != state[canonical].shape or not (
                    t.data_ptr() == state[canonical].data_ptr() or torch.equal(t, state[canonical])):
                wrong.append(f"{key}: differs from {canonical}, the same module under its other name")
        elif key.startswith("vision_encoder.vision_model.") and key.endswith("embeddings.position_ids"):
            if not torch.equal(t, torch.arange(n_pos)[None]):  # a derived buffer some transformers saved
                wrong.append(f"{key}: not arange({n_pos})")
        elif key not in layout:
            unexpected.append(key)
        elif tuple(t.shape) != want[key]:
            wrong.append(f"{key}: file {tuple(t.shape)} vs model {want[key]}")
    if missing or unexpected or wrong:
        raise ValueError(f"{file} does not fit the Pheye its config.json describes:\n" + "".join(
            f"  {what}: {keys}\n" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                       ("wrong", wrong)) if keys))
    return layout


def release_to_ours(model: Pheye, state: dict, file: str, dtype=torch.float32, aliases=True) -> dict:
    """The release state dict -> ours (for load_state_dict(strict=True)), after check_release."""
    out = {}
    for key, (how, names) in check_release(model, state, file, aliases).items():
        t = state[key].to(dtype, copy=True)
        if how == "copy":
            out[names[0]] = t
        elif how == "kv":  # xattn.py: k, v = to_kv(media).chunk(2, dim=-1)
            out[names[0]], out[names[1]] = (h.contiguous() for h in t.chunk(2))
        elif how == "rows":  # encoder.py's Position reads rows 0 .. P-1
            out[names[0]] = t[: 1 + model.config.tiles ** 2].contiguous()
    return out


def release_to_safetensors(dir: str, vit: str, llm: str) -> str:
    """The one-command conversion: check checkpoint.pt against its config.json (as from_release does), then write
    its tensors, less the second names of shared modules, to dir/checkpoint.safetensors, which from_release reads
    from then on instead of the pickle."""
    from safetensors.torch import save_file
    state, file = read_release_checkpoint(dir)
    if not file.endswith(".pt"):
        raise ValueError(f"{dir!r} already holds {os.path.basename(file)}")
    with torch.device("meta"):
        model = Pheye(release_config(dir, vit, llm))
    check_release(model, state, file)
    tmp, out = os.path.join(dir, "checkpoint.safetensors.tmp"), os.path.join(dir, "checkpoint.safetensors")
    save_file({k: t.contiguous() for k, t in state.items() if _canonical(k) is None}, tmp, metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    import argparse

    from llm import Tokenizer

    ap = argparse.ArgumentParser(description="Pheye: answer one instruction about one image")
    ap.add_argument("--image", help="any image PIL reads; it is resized to the model's size")
    ap.add_argument("--prompt")
    ap.add_argument("--ckpt", help="a directory written by Pheye.save / train.py (holds the tokenizer too)")
    ap.add_argument("--release", help="a released Pheye directory (config.json + checkpoint.pt), with --vit, --llm")
    ap.add_argument("--to_safetensors", action="store_true",
                    help="with --release: check checkpoint.pt and write checkpoint.safetensors beside it, then stop")
    ap.add_argument("--preset", default="tiny", help="without --ckpt: a PheyeConfig preset")
    ap.add_argument("--vit", help="HF CLIP directory (with --release: its config.json gives the architecture)")
    ap.add_argument("--llm", help="HF LM directory and its tokenizer (with --release: config.json and tokenizer)")
    ap.add_argument("--tokenizer", help="with --release: the tokenizer directory, if not --llm")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default: 50 with --release (as "
                    "generate.py), else 32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    if args.release:
        if not (args.vit and args.llm):
            ap.error("--release needs --vit=DIR and --llm=DIR: the encoder's and decoder's directories (config.json; "
                     "--llm also the tokenizer), as its config.json names them")
        if args.to_safetensors:
            print(f"wrote {release_to_safetensors(args.release, args.vit, args.llm)}")
            raise SystemExit
    if not (args.image and args.prompt):
        ap.error("--image and --prompt are required")

    if args.release:
        model, tok_dir = Pheye.from_release(args.release, args.vit, args.llm, dtype), args.tokenizer or args.llm
    elif args.ckpt:
        model, tok_dir = Pheye.load(args.ckpt, dtype), args.ckpt
    else:
        config = PheyeConfig.preset(args.preset)
        config.vit_path, config.llm_path = args.vit or config.vit_path, args.llm or config.llm_path
        if not config.llm_path and args.preset != "tiny":
            ap.error(f"--preset={args.preset} needs --llm=DIR (the language model and its tokenizer)")
        if not (config.vit_path and config.llm_path):
            print("note: no --ckpt, so parts are randomly initialised: expect gibberish")
        model = Pheye.from_pretrained(config, dtype)
        if config.llm_path:
            tok_dir = config.llm_path
        else:
            import tempfile
            tok_dir = data.build_tiny_tokenizer(tempfile.mkdtemp())
    model.eval()
    tok = Tokenizer.from_pretrained(tok_dir)
    c = model.config
    if args.release:  # generate.py: its preprocessing and prompt, greedy, 50 new tokens
        pixels, view = (x[None] for x in release_views(args.image, c))
        ids = tok.encode(release_prompt(args.prompt))
        new = model.generate(pixels, torch.tensor([ids]), max_new_tokens=args.max_new_tokens or 50,
                             eos_id=tok.eos_id, global_view=view)
    else:
        pixels = data.load_image(args.image, c.image_size, c.pad_square)[None]  # (1, 3, S, S)
        ids, _ = data.tokenize_conversation(tok, [{"from": "human", "value": args.prompt}], c.template)
        new = model.generate(pixels, torch.tensor([ids]), max_new_tokens=args.max_new_tokens or 32,
                             eos_id=tok.eos_id)
    print(f"Instruction: {args.prompt}\nResponse: {data.answer_text(tok, new[0].tolist())}")
