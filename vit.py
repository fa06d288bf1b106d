"""
A CLIP-style Vision Transformer (Radford et al., 2021) and LoRA (Hu et al., 2021), written once for all three
models: LLaVA-1.5/HIRE/INF-LLaVA run CLIP-ViT-L/14-336, Pheye runs CLIP-ViT-H/14 with two LoRA adapters, and
HIRE puts LoRA on the LLM's linears (add_lora is generic over nn.Module).

Loads HF checkpoints (`clip_vision_model` or full `clip`, safetensors only) with one small rename dict.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class ViTConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"  # OpenAI CLIP and DFN-5B; "gelu" (exact erf) for LAION-2B's ViT-H
    eps: float = 1e-5
    post_norm: bool = True  # CLIP's post-LayerNorm on the class token (pooled output)

    @staticmethod
    def preset(name: str) -> "ViTConfig":
        presets = {
            # openai/clip-vit-large-patch14-336: the tower of LLaVA-1.5, HIRE and INF-LLaVA
            "clip-vit-l-14-336": ViTConfig(),
            # CLIP-ViT-H/14 trained on DFN-5B, Pheye's tower, 224 px. open_clip registers it as ViT-H-14-quickgelu
            # (pretrained="dfn5b"): quick_gelu, unlike LAION-2B's ViT-H-14 (exact gelu; a directory load reads
            # the file's hidden_act either way)
            "clip-vit-h-14": ViTConfig(image_size=224, width=1280, layers=32, heads=16, mlp_dim=5120),
            # shared by every tiny model so the miniature benchmark is fair (bench/miniature.py)
            "tiny": ViTConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512),
        }
        if name not in presets:
            raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(presets)}")
        return presets[name]


# -----------------------------------------------------------------------------
# LoRA (Hu et al., 2021): h = W0 x + (alpha / r) * B A x, Eq. (3) with the alpha/r scaling of Sec. 4.1.
# A wrapper keeps the original layer as `.base` (frozen, untouched, so weight tying or sharing survives), so its
# state-dict keys become `<name>.base.weight`; a state dict saved before wrapping (`<name>.weight`) still loads
# into a wrapped model (see _accept_unwrapped_keys). Adapters are named: several per layer, one active at a time.

class _LoRA(nn.Module):
    """Shared adapter bookkeeping of LoRALinear / LoRAConv2d."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self._register_load_state_dict_pre_hook(self._accept_unwrapped_keys)

    @staticmethod
    def _accept_unwrapped_keys(state_dict, prefix, *args):
        for k in ("weight", "bias"):
            if prefix + k in state_dict and prefix + "base." + k not in state_dict:
                state_dict[prefix + "base." + k] = state_dict.pop(prefix + k)

    @property
    def weight(self):  # so code that reads `layer.weight.dtype/device` works on wrapped layers too
        return self.base.weight

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float, a_shape, b_shape):
        if name in self.lora_A:
            raise ValueError(f"LoRA adapter {name!r} already exists on this layer")
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        w = self.base.weight
        A = torch.empty(a_shape, device=w.device, dtype=w.dtype)
        if A.device.type != "meta":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear's default init
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=w.dtype))  # adapter starts as 0
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / rank

    def extra_repr(self):
        return f"adapters={list(self.lora_A.keys())}, active={self.active!r}"


class LoRALinear(_LoRA):
    """nn.Linear plus named low-rank adapters: y = base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear):
        super().__init__(base)

    def add(self, name, rank, alpha, dropout=0.0):
        self.add_adapter(name, rank, alpha, dropout, (rank, self.base.in_features), (self.base.out_features, rank))

    def forward(self, x):
        y = self.base(x)
        if self.active is None:
            return y
        n = self.active
        return y + self.scaling[n] * F.linear(F.linear(self.lora_dropout[n](x), self.lora_A[n]), self.lora_B[n])


class LoRAConv2d(_LoRA):
    """nn.Conv2d plus named adapters: A is a conv with the base's kernel/stride to rank channels, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d):
        super().__init__(base)
        if base.groups != 1:
            raise ValueError("LoRAConv2d supports groups=1 convolutions only")

    def add(self, name, rank, alpha, dropout=0.0):
        b = self.base
        self.add_adapter(name, rank, alpha, dropout, (rank, b.in_channels, *b.kernel_size), (b.out_channels, rank, 1, 1))

    def forward(self, x):
        y = self.base(x)
        if self.active is None:
            return y
        n, b = self.active, self.base
        h = F.conv2d(self.lora_dropout[n](x), self.lora_A[n], None, b.stride, b.padding, b.dilation)
        return y + self.scaling[n] * F.conv2d(h, self.lora_B[n])


def add_lora(module: nn.Module, targets: list[str], name: str, rank: int, alpha: float,
             dropout: float = 0.0) -> list[str]:
    """Give adapter `name` to every nn.Linear / nn.Conv2d in `module` whose qualified name ends with one of
    `targets` (whole dotted components: "fc1" matches "layers.0.mlp.fc1", not "xfc1"). Layers wrapped earlier
    get a second adapter. Returns the qualified names of the adapted layers."""
    def wanted(qname):
        return any(qname == t or qname.endswith("." + t) for t in targets)

    hits = [(q, m) for q, m in module.named_modules() if q and wanted(q)]
    if not hits:
        raise ValueError(f"add_lora: no layer of {type(module).__name__} matches targets {targets}")
    for qname, m in hits:
        if not isinstance(m, (nn.Linear, nn.Conv2d, _LoRA)):
            raise TypeError(f"add_lora: {qname} is a {type(m).__name__}; only nn.Linear and nn.Conv2d get LoRA")
    for qname, m in hits:
        if not isinstance(m, _LoRA):
            parent_name, _, child = qname.rpartition(".")
            m = LoRALinear(m) if isinstance(m, nn.Linear) else LoRAConv2d(m)
            setattr(module.get_submodule(parent_name), child, m)
        m.add(name, rank, alpha, dropout)
    return [q for q, _ in hits]


def lora_layers(module: nn.Module) -> list[_LoRA]:
    return [m for m in module.modules() if isinstance(m, _LoRA)]


def set_adapter(module: nn.Module, name: str | None):
    """Activate adapter `name` on every LoRA layer in `module` (layers without it run their base weights);
    None runs base weights everywhere."""
    layers = lora_layers(module)
    if name is not None and not any(name in m.lora_A for m in layers):
        known = sorted({n for m in layers for n in m.lora_A})
        raise ValueError(f"no LoRA adapter named {name!r} in {type(module).__name__}; it has {known}")
    for m in layers:
        m.active = name if name in m.lora_A else None


def lora_parameters(module: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The A and B matrices of adapter `name` (all adapters if None)."""
    return [p for m in lora_layers(module) for d in (m.lora_A, m.lora_B)
            for n, p in d.items() if name is None or n == name]


# -----------------------------------------------------------------------------
# The ViT. Module names follow HF's CLIPVisionModel inside the blocks (so LoRA targets read the same for the
# ViT and the LLM); the few top-level names differ and map through HF_RENAMES.

def quick_gelu(x):
    # OpenAI CLIP's x * sigmoid(1.702 x), written through silu(z) = z * sigmoid(z): one fused kernel forward and
    # backward instead of three elementwise passes (~30% faster for the activation on CPU)
    return F.silu(1.702 * x) / 1.702


ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.width % cfg.heads == 0, f"width {cfg.width} must be divisible by heads {cfg.heads}"
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.act not in ACTS:
            raise ValueError(f"unsupported ViT activation {cfg.act!r}; choose from {sorted(ACTS)}")
        self.act = ACTS[cfg.act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


# HF CLIPVisionModel key prefix -> ours. Keys are read after stripping "vision_model." (full CLIP checkpoints and
# transformers-4 vision checkpoints carry it; transformers-5 vision checkpoints don't).
HF_RENAMES = {
    "embeddings.patch_embedding.": "patch_embed.",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "position_embedding",
    "pre_layrnorm.": "ln_pre.",
    "encoder.layers.": "layers.",
    "post_layernorm.": "ln_post.",
}
HF_SKIP = {"embeddings.position_ids"}  # an arange buffer older transformers saved; not a weight
HF_OTHER_TOWERS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # of full CLIP; ignored


class ViT(nn.Module):
    """CLIP vision tower: patchify, prepend the class token, add positions, pre-LayerNorm, pre-norm blocks."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        self.grid = c.image_size // c.patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(c.width) * c.width ** -0.5)
        self.position_embedding = nn.Parameter(torch.randn(1 + self.num_patches, c.width) * 0.02)
        self.ln_pre = nn.LayerNorm(c.width, eps=c.eps)  # CLIP's extra LayerNorm before the blocks
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_post = nn.LayerNorm(c.width, eps=c.eps) if c.post_norm else None

    def positions(self, h: int, w: int) -> torch.Tensor:
        """(1+h*w, D) position embeddings for an h x w patch grid: the learned ones at the native grid, else the
        patch part resized bicubically (align_corners=False, as HF's interpolate_pos_encoding)."""
        if (h, w) == (self.grid, self.grid):
            return self.position_embedding
        cls_pos, patch_pos = self.position_embedding[:1], self.position_embedding[1:]
        g, D = self.grid, patch_pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, D).to(cls_pos.dtype)  # (h*w, D)
        return torch.cat([cls_pos, patch_pos])

    def forward(self, pixels: torch.Tensor, layer: int = -1, adapter: str | None = None) -> torch.Tensor:
        """(B, 1+N, D) output of encoder layer `layer` (Python indexing: -1 last, -2 the penultimate LLaVA uses),
        before the post-LayerNorm; later layers are not run. If the ViT holds LoRA layers, `adapter` is the one
        used for this call (None: base weights)."""
        p, L = self.config.patch_size, len(self.layers)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got shape {tuple(pixels.shape)}")
        H, W = pixels.shape[-2:]
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(f"pixel size {H}x{W} is not a positive multiple of patch_size {p}")
        if not -L <= layer < L:
            raise IndexError(f"layer {layer} out of range for a ViT with {L} layers")
        loras = lora_layers(self)
        previous = [m.active for m in loras]
        if loras or adapter is not None:
            set_adapter(self, adapter)  # raises if `adapter` names no adapter of this ViT
        try:
            x = self.patch_embed(pixels.to(self.class_embedding.dtype))  # (B, D, H/p, W/p)
            B, D, h, w = x.shape
            x = x.flatten(2).transpose(1, 2)  # (B, N, D)
            x = torch.cat([self.class_embedding.expand(B, 1, D), x], dim=1) + self.positions(h, w)  # (B, 1+N, D)
            x = self.ln_pre(x)
            for block in self.layers[: layer % L + 1]:
                x = block(x)
        finally:
            for m, a in zip(loras, previous):
                m.active = a
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled image feature: post-LayerNorm of the last layer's class token (HF pooler_output)."""
        if self.ln_post is None:
            raise ValueError("this ViT has no post-LayerNorm (config.post_norm=False)")
        return self.ln_post(x[:, 0])

    # --- HF checkpoints ---------------------------------------------------------------------------------------

    @staticmethod
    def config_from_hf(cfg: dict, path: str = "") -> ViTConfig:
        model_type = cfg.get("model_type")
        if model_type == "clip":  # an old file's vision_config_dict wins over vision_config, as in transformers
            cfg = cfg.get("vision_config_dict") or cfg.get("vision_config") or {}
        elif model_type != "clip_vision_model":
            raise ValueError(f"{path}: unsupported model_type {model_type!r}; ViT loads 'clip_vision_model', 'clip'")
        if cfg.get("num_channels", 3) != 3:
            raise ValueError(f"{path}: num_channels {cfg['num_channels']} unsupported; ViT takes RGB (3)")
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ACTS:
            raise ValueError(f"{path}: unsupported hidden_act {act!r}; choose from {sorted(ACTS)}")
        # missing fields take CLIPVisionConfig's defaults, as transformers does
        return ViTConfig(image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 32),
                         width=cfg.get("hidden_size", 768), layers=cfg.get("num_hidden_layers", 12),
                         heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
                         act=act, eps=cfg.get("layer_norm_eps", 1e-5), post_norm=True)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None) -> "ViT":
        """Load an HF directory: config.json + model.safetensors (or shards with model.safetensors.index.json).
        Full CLIP checkpoints: the text tower and projections are ignored. dtype None: the default
        float dtype. Tensors go straight from the file into the target dtype; every key and shape is checked."""
        dtype = dtype or torch.get_default_dtype()
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"no config.json in {path!r}: expected an HF CLIP checkpoint directory")
        with open(cfg_file) as f:
            hf = json.load(f)
        config = cls.config_from_hf(hf, path)
        files = safetensors_files(path)

        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        state, unexpected, wrong_shape = {}, [], []
        for file, keys in files.items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    hf_key = key.removeprefix("vision_model.")
                    if key.startswith(HF_OTHER_TOWERS) or hf_key in HF_SKIP:
                        continue
                    name = hf_to_ours(hf_key)
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    t = f.get_slice(key)
                    if tuple(t.get_shape()) != tuple(expected[name].shape):
                        wrong_shape.append(f"{key}: file {tuple(t.get_shape())} vs model {tuple(expected[name].shape)}")
                        continue
                    state[name] = f.get_tensor(key).to(dtype)
        missing = [k for k in expected if k not in state]
        if missing or unexpected or wrong_shape:
            raise ValueError(f"checkpoint {path!r} does not fit ViT {config}:\n"
                             f"  missing: {missing}\n  unexpected: {unexpected}\n  wrong shape: {wrong_shape}")
        model.load_state_dict(state, assign=True)
        return model

    def save_pretrained(self, path: str):
        """Write config.json (HF `clip_vision_model`) and model.safetensors with HF key names
        (`vision_model.` prefixed, as published CLIP checkpoints; transformers 4 and 5 both read it)."""
        if lora_layers(self):
            raise ValueError("save_pretrained writes the HF base layout; this ViT holds LoRA adapters "
                             "(save the model's own state_dict instead)")
        if self.ln_post is None:
            raise ValueError("HF CLIP checkpoints always hold post_layernorm; config.post_norm=False can't be saved")
        c = self.config
        ours_to_hf = {v: k for k, v in HF_RENAMES.items()}
        state = {}
        for name, t in self.state_dict().items():
            prefix = next(p for p in ours_to_hf if name.startswith(p))
            state["vision_model." + ours_to_hf[prefix] + name[len(prefix):]] = t.detach().contiguous()
        hf = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": c.width,
              "intermediate_size": c.mlp_dim, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
              "num_channels": 3, "image_size": c.image_size, "patch_size": c.patch_size, "hidden_act": c.act,
              "layer_norm_eps": c.eps, "dtype": str(self.class_embedding.dtype).removeprefix("torch.")}
        os.makedirs(path, exist_ok=True)
        save_file(state, os.path.join(path, "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, "model.safetensors.tmp"), os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


def hf_to_ours(hf_key: str) -> str:
    for prefix, ours in HF_RENAMES.items():
        if hf_key.startswith(prefix):
            return ours + hf_key[len(prefix):]
    return hf_key  # no match: reported as unexpected by the caller


def tower_key(rest: str) -> str:
    """The rest of a CLIP `vision_model.` key inside a multimodal release -> our key under the model's `vit`."""
    return "vit." + hf_to_ours(rest)


CLIP_L_336 = "clip-vit-large-patch14-336"   # the tower of LLaVA-1.5 and INF-LLaVA, by its hub name


def release_tower(name, vit_dir, inside, where, dtype=None):
    """(ViTConfig, ViT or None) for the CLIP tower a LLaVA-style release names (mm_vision_tower). When the
    release holds the tower's weights (`inside`) they are loaded with the rest, and only the config is needed:
    from vit_dir, or the preset for CLIP-L/336; otherwise the weights come from vit_dir (or from `name` when that
    is a local directory). LLaVA's own builder reloads the tower from `name` whatever the checkpoint holds: the
    same frozen CLIP weights."""
    vit_dir = vit_dir or (name if name and os.path.isdir(name) else None)
    if vit_dir is None:
        if inside and name and name.rstrip("/").endswith(CLIP_L_336):
            return ViTConfig.preset("clip-vit-l-14-336"), None
        raise ValueError(f"{where} names the vision tower {name!r}" + ("" if inside else " and holds no tower "
                         "weights") + ": pass its CLIP directory (vit=DIR, --vit DIR)")
    if inside:
        cfg_file = os.path.join(vit_dir, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"no config.json in {vit_dir!r}: expected an HF CLIP checkpoint directory")
        with open(cfg_file) as f:
            return ViT.config_from_hf(json.load(f), vit_dir), None
    tower = ViT.from_pretrained(vit_dir, dtype)
    return tower.config, tower


def safetensors_files(path: str) -> dict[str, list[str]]:
    """{file: [keys]} of an HF checkpoint directory, following model.safetensors.index.json for shards."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {}
        for key, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(key)
        absent = sorted(os.path.basename(f) for f in files if not os.path.isfile(f))
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {path!r}: {absent}")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {single: list(f.keys())}
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise ValueError(f"{path!r} holds only {pickles}: only safetensors are loaded, because unpickling "
                         f"a .bin/.pt file can execute arbitrary code; convert it to model.safetensors first")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description="run a ViT on one image (or random pixels) and print its features")
    ap.add_argument("--ckpt", default=None, help="HF CLIP directory (default: a random tiny ViT)")
    ap.add_argument("--image", default=None)
    ap.add_argument("--layer", type=int, default=-2)
    args = ap.parse_args()
    torch.manual_seed(0)
    vit = ViT.from_pretrained(args.ckpt) if args.ckpt else ViT(ViTConfig.preset("tiny"))
    vit.eval()
    S = vit.config.image_size
    if args.image:
        from PIL import Image
        import numpy as np
        mean, std = torch.tensor([0.4815, 0.4578, 0.4082]), torch.tensor([0.2686, 0.2613, 0.2758])  # CLIP's
        img = Image.open(args.image).convert("RGB").resize((S, S), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        pixels = ((x - mean[:, None, None]) / std[:, None, None])[None]
    else:
        pixels = torch.randn(1, 3, S, S)
    t0 = time.time()
    with torch.no_grad():
        feats = vit(pixels, layer=args.layer)
    print(f"{vit.config}\nlayer {args.layer} features {tuple(feats.shape)}, mean {feats.mean():.4f}, "
          f"std {feats.std():.4f}, {1000 * (time.time() - t0):.1f} ms")
