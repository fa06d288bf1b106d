"""
One training loop for every nanoHiRes model, from a laptop CPU to many GPUs.

    python train.py --model pheye                  # tiny Pheye on the built-in synthetic set, CPU, minutes:
                                                   # its paper's stages in turn (stage1, stage2, stage3)
    python train.py --model hire --stage=finetune  # one stage
    torchrun --standalone --nproc_per_node=2 train.py --model pheye
    torchrun --nproc_per_node=8 train.py --model pheye --preset=paper-x4-448 --vit=DIR --llm=DIR \
        --data=llava.json --image_dir=DIR --stage=stage1

Every field of TrainConfig below, and every field of the model's config, can be set as --key=value
(nested model fields with a dot: --llm.n_layer=2). Unknown keys and ill-typed values are errors.
The model file says what each stage trains, at which learning rate and on which schedule (its STAGES /
configure_stage); this file never branches on the model beyond picking it. `python train.py` reports a bad
option, data file or checkpoint in one line and exits with 2; a traceback means a bug.
"""
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import import_module

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

import data
from llm import Tokenizer

# --model name -> (file, class, config fields that make the variant). llava and llava_s2 are HIRE's baselines.
MODELS = {
    "llava": ("hire", "HIRE", {"enricher": "none"}),
    "llava_s2": ("hire", "HIRE", {"enricher": "s2"}),
    "hire": ("hire", "HIRE", {"enricher": "hire"}),
    "inf_llava": ("inf_llava", "INFLLaVA", {}),
    "pheye": ("pheye", "Pheye", {}),
}


@dataclass
class TrainConfig:
    model: str = "pheye"          # one of MODELS
    preset: str = "tiny"          # a preset of the model's config
    stage: str = ""               # one of the model's STAGES, or several "a,b": run in turn, each from the
                                  # last's checkpoint. Default (synthetic data): the paper's whole recipe
    init: str = ""                # a checkpoint dir to start from (e.g. the previous stage's), weights only
    vit: str = ""                 # HF directory of the vision encoder (paper presets)
    llm: str = ""                 # HF directory of the language model and its tokenizer (paper presets)
    data: str = "synthetic"       # "synthetic" or a LLaVA-format JSON file
    image_dir: str = ""           # image folder for --data (default: the JSON's folder)
    n_train: int = 4000           # synthetic set sizes
    others: float = 0.0           # synthetic set: chance that each non-target cell holds an item too (0: one item
                                  # per image, the miniature's task; data.OTHERS = 0.8: the full 3x3 scenes)
    n_val: int = 256              # validation samples (--data: at most this many); 0: no validation. The last
                                  # evaluation answers all of them (issue 14: >= 200 for a number)
    val_fraction: float = 0.02    # --data: the share of records held out for validation (1 in 50)
    skip_bad: bool = False        # skip unreadable samples (counted) instead of stopping
    out_dir: str = ""             # default: out/<model>
    overwrite: bool = False       # allow replacing a checkpoint of another run in out_dir
    resume: bool = False
    max_iters: int = 600          # every tiny recipe answers from the image by then (README)
    batch_size: int = 8           # per process, per micro-step
    grad_accum: int = 0           # micro-steps per optimizer step, over all processes; 0: one per process
    lr_scale: float | None = None  # multiplies every learning rate of the stage recipe; None: TINY_LR_SCALE for the
                                  # tiny presets, 1 (the papers' rates) for every other
    warmup_iters: int | None = None   # None: the stage recipe's warmup_ratio x max_iters
    lr_decay_iters: int = 0       # cosine length; default max_iters (set it to train on past a stop)
    min_lr_ratio: float | None = None  # cosine decay to this fraction of the peak; None: the stage recipe's
    weight_decay: float = 0.0     # 0 in LLaVA-1.5's and INF-LLaVA's scripts (Pheye states none); matrices only
    grad_clip: float | None = None     # max gradient norm, 0: none; None: the stage recipe's
    max_len: int = 256            # token budget per sample (images count as one position here)
    seed: int = 1337
    device: str = "auto"          # auto | cpu | cuda
    compile: bool = False
    fsdp: bool = False            # shard the LLM's decoder blocks (PyTorch FSDP2 fully_shard)
    act_ckpt: bool = False        # activation checkpointing of the LLM's decoder blocks
    num_workers: int = 1          # DataLoader workers: image decoding stays off the training process
    eval_interval: int = 100      # evaluate + checkpoint every N steps; 0: only at the end
    eval_answers: int = 32        # greedy answers scored by exact match at each evaluation but the last (n_val)
    from_scratch: bool = False    # tiny presets: random ViT/LM instead of the shipped tiny base (assets/)


# ----------------------------------------------------------------------------- command line
def parse_value(text, like, key):
    """Parse text as the type of the default value `like`; bools accept True/False/1/0/yes/no."""
    if isinstance(like, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"--{key}: expected True or False, got {text!r}")
    if like is None:  # an optional path or value that defaults to None
        return None if text in ("None", "") else text
    try:
        if isinstance(like, (int, float, str)):
            return type(like)(text)
        return json.loads(text)  # lists, dicts: --s2_scales=[64,128]
    except ValueError:
        raise ValueError(f"--{key}: cannot parse {text!r} as {type(like).__name__}") from None


def set_field(obj, key, text):
    """Set a (possibly dotted) dataclass field from its command-line text, checked against the field type."""
    head, _, rest = key.partition(".")
    types = {f.name: f.type for f in dataclasses.fields(obj)}
    if head not in types:
        raise ValueError(f"unknown option --{key} (known: {', '.join(sorted(types))})")
    if rest:
        return set_field(getattr(obj, head), rest, text)
    like = getattr(obj, head)
    if like is None and types[head] in (int | None, float | None):  # an optional number parses as one
        like = types[head].__args__[0]()
    setattr(obj, head, parse_value(text, like, key))


def get_field(obj, key):
    for name in key.split("."):
        obj = getattr(obj, name)
    return obj


# The papers' learning rates are set for thousands of steps of billion-parameter models; the tiny presets train
# for a few hundred steps, in which LLaVA-1.5 at x1 stays at the no-image level and at x5 reads large details
# (probed once on LLaVA-1.5, then frozen for every model: README, "The papers' claims in miniature").
TINY_LR_SCALE = 5.0
# At x5 the tiny runs also need the schedule that probe ran with: 20 warmup steps, a cosine floor at 10% of the
# peak and gradient clipping at 1.0, for every model (with the releases' schedule, 3% warmup, cosine to 0 and no
# clipping, LLaVA-1.5 stayed at the no-image level: 20.3% against 42% on the same seed). The paper presets keep
# their releases' schedules (the model files' STAGES); an option given on the command line wins over both.
TINY_SCHEDULE = {"warmup_iters": 20, "min_lr_ratio": 0.1, "grad_clip": 1.0}


def parse_args(argv):
    """Split `--key=value` (or `--flag`) arguments into TrainConfig and model-config overrides."""
    cfg, overrides = TrainConfig(), {}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nTrainConfig (defaults):\n" + "\n".join(
            f"  --{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(TrainConfig)))
        sys.exit(0)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # --key value, or a bare --flag meaning True
            value = args.pop(0) if args and not args[0].startswith("--") else "True"
        if key in train_keys:
            set_field(cfg, key, value)
        else:
            overrides[key] = value
    if cfg.model not in MODELS:
        raise ValueError(f"--model={cfg.model!r} is not one of {', '.join(MODELS)}")
    if cfg.lr_scale is None:
        cfg.lr_scale = TINY_LR_SCALE if cfg.preset == "tiny" else 1.0
    for key, value in TINY_SCHEDULE.items() if cfg.preset == "tiny" else ():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    check_options(cfg)
    cfg.out_dir = cfg.out_dir or os.path.join("out", cfg.model)
    return cfg, overrides


def check_options(cfg):
    """Values that cannot make a sensible run are errors before anything is built, not a run that exits 0."""
    for key in ("max_iters", "batch_size", "n_train", "max_len"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    for key in ("grad_accum", "n_val", "num_workers", "eval_interval", "eval_answers", "lr_decay_iters",
                "warmup_iters", "weight_decay", "grad_clip"):
        value = getattr(cfg, key)
        if value is not None and not value >= 0:  # also NaN
            raise ValueError(f"--{key}={value}: must be 0 or more")
    if not (cfg.lr_scale > 0 and math.isfinite(cfg.lr_scale)):
        raise ValueError(f"--lr_scale={cfg.lr_scale}: must be a positive number (it multiplies the recipe's rates)")
    if cfg.min_lr_ratio is not None and not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio={cfg.min_lr_ratio}: must be in [0, 1] (a fraction of the peak rate)")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val_fraction={cfg.val_fraction}: must be in (0, 1); --n_val=0 trains without validation")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device={cfg.device!r}: one of auto, cpu, cuda")


def build_model_config(cfg, overrides):
    file, cls_name, variant = MODELS[cfg.model]
    module = import_module(file)
    config = getattr(module, cls_name + "Config").preset(cfg.preset)
    for key, value in variant.items():
        setattr(config, key, value)
    model_keys = {f.name for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        if key.partition(".")[0] not in model_keys:
            raise ValueError(f"unknown option --{key}: train.py's options are "
                             f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}; "
                             f"{cls_name}Config's are {', '.join(sorted(model_keys))}")
        set_field(config, key, value)
    return module, getattr(module, cls_name), config


# ----------------------------------------------------------------------------- checkpoints
# OUT_DIR/ckpt is a symlink to OUT_DIR/ckpt-NNNNNN, a complete checkpoint directory (config.json,
# model.safetensors, tokenizer, train_state.pt). A new one is written beside it and the link is swapped
# with one atomic rename, so a kill at any moment leaves the last good checkpoint in place.
def full_state(raw_model, optimizer, sharded):
    """(weights, optimizer state) whole on rank 0: FSDP gathers its shards; otherwise the model saves itself."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, opt = get_state_dict(raw_model, optimizer, options=options)
    unique = {n for n, _ in raw_model.named_parameters()} | {n for n, _ in raw_model.named_buffers()}
    return {k: v for k, v in weights.items() if k in unique}, opt  # tied twins once, as Model.save does


def set_optimizer_state(raw_model, optimizer, opt_state, sharded):
    if not sharded:
        return optimizer.load_state_dict(opt_state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(raw_model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(cfg, raw_model, weights, tok_dir, state):
    final = os.path.join(cfg.out_dir, f"ckpt-{state['step']:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if weights is None:
        raw_model.save(tmp)
    else:  # gathered from FSDP shards: the same files Model.save writes
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"architecture": MODELS[cfg.model][1], **dataclasses.asdict(raw_model.config)}, f, indent=2)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
    for name in os.listdir(tok_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab.json", "merges.txt", "generation_config")):
            shutil.copy(os.path.join(tok_dir, name), tmp)
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    link = os.path.join(cfg.out_dir, "ckpt")
    if os.path.lexists(link + ".tmp"):  # left by a kill between the next two lines
        os.remove(link + ".tmp")
    os.symlink(os.path.basename(final), link + ".tmp")
    os.replace(link + ".tmp", link)  # the atomic step
    for name in os.listdir(cfg.out_dir):  # older checkpoints
        if name.startswith("ckpt-") and name != os.path.basename(final):
            shutil.rmtree(os.path.join(cfg.out_dir, name), ignore_errors=True)


def read_train_state(ckpt_dir):
    path = os.path.join(ckpt_dir, "train_state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a readable training state ({e}); truncated by a copy?") from None


def clear_temporaries(out_dir):
    """A kill during save_checkpoint leaves ckpt.tmp (a link) or ckpt-NNNNNN.tmp (a directory): never a checkpoint."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name == "ckpt.tmp":
            os.remove(path)
        elif name.startswith("ckpt-") and name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)


_LOCKS = {}  # out_dir -> the open lock file of this process's run there


def lock_out_dir(out_dir):
    """One run per out_dir: an exclusive flock on OUT_DIR/lock, which holds the owner's pid. The kernel drops the
    lock when its process ends, however it ends (kill -9 included), so a lock is never stale."""
    try:
        import fcntl
    except ImportError:  # Windows has no flock: one run per out_dir is then up to you
        return
    path = os.path.join(out_dir, "lock")
    old = _LOCKS.pop(os.path.realpath(out_dir), None)
    if old:  # an earlier run of this process ended in an error before unlocking
        old.close()
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise FileExistsError(f"{out_dir} is in use by another run (pid {pid}); wait for it to end, stop it, or "
                              f"pass another --out_dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _LOCKS[os.path.realpath(out_dir)] = f


def unlock_out_dir(out_dir):
    f = _LOCKS.pop(os.path.realpath(out_dir), None)
    if f:
        f.close()


def check_model(cfg, path):
    """A checkpoint holds one model: its config.json names the class and the config the variant. --model must
    name that model; training HIRE's code on a LLaVA checkpoint is an error, not a run logged as "hire"."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a checkpoint directory: {file} does not exist")
    try:
        with open(file) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    arch = saved.get("architecture")
    found = next((name for name, (_, cls, variant) in MODELS.items()
                  if cls == arch and all(saved.get(k) == v for k, v in variant.items())), arch)
    _, cls_name, variant = MODELS[cfg.model]
    if (arch and arch != cls_name) or any(saved.get(k, v) != v for k, v in variant.items()):
        raise ValueError(f"{path} holds a --model={found} checkpoint, not --model={cfg.model}")


def open_log(cfg, start):
    """OUT_DIR/log.jsonl, one JSON row per step and per evaluation. On --resume the rows after the checkpoint's
    step (written by a run killed before its next checkpoint, and about to be redone) are dropped first."""
    path = os.path.join(cfg.out_dir, "log.jsonl")
    if not cfg.resume:
        return open(path, "w")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["iter"] <= start:
                        rows.append(line)
                except (ValueError, KeyError, TypeError):  # a row cut short by the kill
                    pass
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def check_resume(cfg, state, world, master):
    """--resume continues the checkpoint's run: the same seed and stage, and the same global batch, since the data
    position and the schedule count steps of batch_size x grad_accum samples. How that batch is split into
    micro-steps and processes may change: the data order stays exact; on another number of processes the
    per-rank random streams (dropout) are re-derived from (seed, step, rank), so the run is no longer bit-identical
    to an uninterrupted one."""
    old = state["train_config"]
    for key in ("seed", "stage"):
        if old[key] != getattr(cfg, key):
            raise ValueError(f"--resume: --{key}={getattr(cfg, key)} differs from the checkpoint's {old[key]!r}: "
                             f"resume with the same --{key}, or start a new run (--init=.../ckpt for the weights)")
    before, now = old["batch_size"] * old["grad_accum"], cfg.batch_size * cfg.grad_accum
    if before != now:
        raise ValueError(f"--resume: the checkpoint's global batch is {before} ({old['batch_size']} x "
                         f"{old['grad_accum']} micro-steps), this run's {now} ({cfg.batch_size} x {cfg.grad_accum}): "
                         f"its data position and schedule count steps of {before} samples. Keep --batch_size x "
                         f"--grad_accum = {before} (--grad_accum defaults to the number of processes)")
    if master and (old["batch_size"], state["world"]) != (cfg.batch_size, world):
        print(f"resuming with {cfg.batch_size} x {cfg.grad_accum} micro-steps on {world} process(es) (the checkpoint: "
              f"{old['batch_size']} x {old['grad_accum']} on {state['world']}): the same global batch and data order"
              + ("; dropout's random streams are re-seeded per rank, so not bit-identical to an uninterrupted run"
                 if state["world"] != world else ""))


def named_weights(load, *dirs):
    """load(); a safetensors file it cannot parse (truncated by a copy or download, or not safetensors at all) is
    an error that names the file."""
    from safetensors import SafetensorError, safe_open
    try:
        return load()
    except SafetensorError as e:
        for d in dirs:
            names = sorted(os.listdir(d)) if d and os.path.isdir(d) else []
            for path in (os.path.join(d, n) for n in names if n.endswith(".safetensors")):
                try:
                    with safe_open(path, "pt"):
                        pass
                except SafetensorError:
                    raise ValueError(f"{path}: not a readable safetensors file ({e}); truncated by an interrupted "
                                     f"copy or download?") from None
        raise


def check_out_dir(cfg):
    """Refuse to silently replace another run's checkpoint."""
    ckpt = os.path.join(cfg.out_dir, "ckpt")
    if cfg.resume:
        read_train_state(ckpt)  # raises if there is nothing to resume
        return
    if os.path.exists(ckpt) and not cfg.overwrite:
        old = read_train_state(ckpt)["train_config"]
        what = f"a checkpoint of --model={old['model']}" + ("" if old["model"] == cfg.model else " (another model)")
        raise FileExistsError(f"{cfg.out_dir} already holds {what}; pass --resume to continue it, "
                              f"--overwrite to replace it, or another --out_dir")


# ----------------------------------------------------------------------------- the schedule
RECIPE_KEYS = ("train", "lr", "lora", "template", "task", "warmup_ratio", "min_lr_ratio", "grad_clip",
               "pad_square", "center_crop")  # what is read
SCHEDULE_KEYS = ("warmup_ratio", "min_lr_ratio", "grad_clip")  # of a STAGES entry: read here, each with its option


def resolve_schedule(cfg, recipe):
    """Warmup steps, cosine floor and gradient clipping: the options where given, else the stage recipe's (the
    model file cites where each comes from). Warmup is ceil(warmup_ratio x max_iters), as the HF Trainer counts."""
    if cfg.warmup_iters is None:
        cfg.warmup_iters = math.ceil(recipe["warmup_ratio"] * cfg.max_iters - 1e-9)
    if cfg.min_lr_ratio is None:
        cfg.min_lr_ratio = recipe["min_lr_ratio"]
    if cfg.grad_clip is None:
        cfg.grad_clip = recipe["grad_clip"]


def lr_multiplier(step, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio at lr_decay_iters. The HF Trainer's warmup starts at 0
    (step / warmup); this one at 1 / warmup, so that no step is spent at a zero learning rate."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, (cfg.lr_decay_iters or cfg.max_iters) - cfg.warmup_iters)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(groups, cfg, device):
    """AdamW over the stage's groups; weight decay on matrices only."""
    param_groups = []
    for g in groups:
        for decay in (True, False):
            params = [p for p in g["params"] if (p.dim() >= 2) == decay and p.requires_grad]
            if params:
                param_groups.append(dict(params=params, lr=g["lr"] * cfg.lr_scale, base_lr=g["lr"] * cfg.lr_scale,
                                         name=g["name"], weight_decay=cfg.weight_decay if decay else 0.0))
    if not param_groups:
        raise ValueError(f"stage {cfg.stage!r} of --model={cfg.model} trains no parameters")
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups, fused=fused)  # betas (0.9, 0.999) as LLaVA's HF Trainer


# ----------------------------------------------------------------------------- data order
def ignore_stop_signals(worker_id):
    """DataLoader workers share the training process's group, so Ctrl-C and `timeout`/SLURM's SIGTERM reach them
    too. A worker killed by one takes the run down before it can save; the training process alone decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StepSampler(torch.utils.data.Sampler):
    """This rank's sample indices, optimizer step after optimizer step, from `start_step` on.

    Step s takes global samples [s*G, (s+1)*G) of a seeded permutation per epoch (G = batch_size * grad_accum);
    rank r takes micro-batches r*accum ... (r+1)*accum - 1 of them. So one process or N see the same samples
    in every optimizer step, and a resumed run continues exactly where the stopped one was."""

    def __init__(self, n, batch_size, grad_accum, rank, world, seed, start_step, max_iters):
        self.n, self.B, self.G, self.rank, self.world = n, batch_size, batch_size * grad_accum, rank, world
        self.seed, self.start, self.stop = seed, start_step, max_iters

    def _perm(self, epoch):
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return self._order

    def step_indices(self, step):
        """This rank's sample indices of one optimizer step."""
        per_rank, out = self.G // self.world, []
        for j in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            epoch, i = divmod(step * self.G + j, self.n)
            out.append(self._perm(epoch)[i])
        return out

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield from self.step_indices(step)

    def __len__(self):
        return (self.stop - self.start) * self.G // self.world


# ----------------------------------------------------------------------------- distributed and precision
def setup_distributed(cfg):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them this is one process."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device=cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else "cpu")
    if not dist.is_initialized():  # a recipe's later stages reuse the group
        dist.init_process_group("nccl" if want_cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(x, world, op=None):
    if world > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def choose_precision(device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bf16 autocast: this GPU supports bfloat16"
    if device.type == "cuda":
        return torch.float16, "fp16 autocast with loss scaling: this GPU has no bfloat16"
    return torch.float32, "fp32: on a CPU, autocast is slower than fp32 at these sizes"


def checkpoint_blocks(blocks):
    """Activation checkpointing: each decoder block recomputes its activations in the backward pass."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# ----------------------------------------------------------------------------- the tiny base
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")  # the shipped tiny base
TINY_VIT, TINY_LM = os.path.join(ASSETS, "tiny-vit"), os.path.join(ASSETS, "tiny-lm")


def tiny_base():
    """Tiny presets have no public weights to freeze: they start from the tiny ViT (pretrained as a patch
    classifier at the base resolution) and the text-only tiny LM shipped in assets/, as the papers start from CLIP
    and a text LLM, so that every model's paper recipe can freeze them as written. Returns (vit_dir, llm_dir).
    The LM's directory holds the tokenizer (data.build_tiny_tokenizer). bench/tiny_base.py builds them."""
    for path, how in ((f"{TINY_VIT}/model.safetensors", "vit"), (f"{TINY_LM}/model.safetensors", "lm"),
                      (f"{TINY_LM}/tokenizer.model", "lm")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the tiny base ships with the repository "
                                    f"(restore it from git, or rebuild it with python bench/tiny_base.py {how})")
    return TINY_VIT, TINY_LM


def tiny_tokenizer():
    """The tiny presets' tokenizer, even for a run from scratch: the tiny LM's (assets/tiny-lm)."""
    return tiny_base()[1]


# ----------------------------------------------------------------------------- evaluation
def greedy_answers(model, b, tok, eos_id, max_new_tokens, device="cpu"):
    """Greedy answers to a batch of a QA set: (answer texts, exact match of each against b["answer"])."""
    out = model.generate(b["pixels"].to(device), b["ids"].to(device), max_new_tokens=max_new_tokens,
                         mask=b["mask"].to(device), eos_id=eos_id)
    said = [data.answer_text(tok, row) for row in out.tolist()]
    return said, [data.normalize_answer(s) == data.normalize_answer(a) for s, a in zip(said, b["answer"])]


@torch.no_grad()
def evaluate(raw_model, val_loader, qa, tok, device, ctx, world, eos_id, max_new_tokens=16):
    """Validation loss (token mean over all ranks) and exact-match accuracy of greedy answers."""
    raw_model.eval()
    loss_sum, n_tok = torch.zeros((), device=device), torch.zeros((), device=device)
    for b in val_loader:
        b = {k: v.to(device) for k, v in b.items()}
        with ctx:
            _, loss = raw_model(b["pixels"], b["ids"], labels=b["labels"], mask=b["mask"], reduction="sum")
        loss_sum += loss.float()
        n_tok += data.count_targets(b["labels"])
    all_reduce(loss_sum, world), all_reduce(n_tok, world)
    correct, total, shown = torch.zeros((), device=device), torch.zeros((), device=device), []
    for b in qa:
        with ctx:
            said, ok = greedy_answers(raw_model, b, tok, eos_id, max_new_tokens, device)
        correct += sum(ok)
        total += len(ok)
        shown += zip(b["question"], b["answer"], said)
    all_reduce(correct, world), all_reduce(total, world)
    raw_model.train()
    return (loss_sum / n_tok.clamp(min=1)).item(), round((correct / total.clamp(min=1)).item(), 4), shown


def detail_accuracy(net, tok, template, n, split="test", seed=0, batch_size=32, max_new_tokens=8, others=0.0):
    """Greedy answers of `net` to the first n questions of a synthetic split (others: as TrainConfig), scored by
    exact match (data.normalize_answer) per detail size: ({"large", "medium", "small", "overall"}, counts, the
    mean prompt length in text tokens, a few (truth, said, size) samples). The benchmarks' code path: eval.py."""
    from eval import detail_accuracy
    return detail_accuracy(net, tok, template, n, split, seed, batch_size, max_new_tokens, others)


# ----------------------------------------------------------------------------- the loop
def recipe_stages(cfg):
    """The stages this command runs: --stage as given (comma-separated for several), or by default, on the
    synthetic set, the paper's whole recipe: every stage of the model file in order but the tiny-only "base"."""
    file, cls_name, _ = MODELS[cfg.model]
    known = list(getattr(import_module(file), cls_name).STAGES)
    if cfg.stage:
        stages = cfg.stage.split(",")
    elif cfg.data == "synthetic":
        stages = [s for s in known if s != "base"]
    else:
        raise ValueError(f"--data={cfg.data}: name the stage this data is for, --stage=one of {', '.join(known)} "
                         f"(each stage of a recipe trains on its own data)")
    bad = [s for s in stages if s not in known]
    if bad:
        raise ValueError(f"--stage={cfg.stage!r}: --model={cfg.model} has stages {', '.join(known)}")
    if len(stages) > 1 and cfg.data != "synthetic":
        raise ValueError(f"--stage={cfg.stage}: a data file serves one stage; run the stages one by one, each "
                         f"with its data and --init=<the previous stage's out_dir>/ckpt")
    return stages


def run_recipe(argv, cfg, stages, distributed):
    """Several stages in turn, --max_iters split evenly (the last takes the remainder). Stage k trains in
    OUT_DIR/<stage> from stage k-1's checkpoint (--init); the last in OUT_DIR itself. With --resume, finished
    stages are skipped and the interrupted one continues."""
    n = len(stages)
    if cfg.max_iters < n:
        raise ValueError(f"--max_iters={cfg.max_iters} is fewer than the {n} stages of {','.join(stages)}")
    iters = [cfg.max_iters // n] * (n - 1) + [cfg.max_iters - (n - 1) * (cfg.max_iters // n)]
    outs = [os.path.join(cfg.out_dir, s) for s in stages[:-1]] + [cfg.out_dir]
    if cfg.resume and not any(os.path.exists(os.path.join(out, "ckpt")) for out in outs):
        read_train_state(os.path.join(outs[0], "ckpt"))  # nothing to resume: raises, naming the path
    init, step = cfg.init, 0
    for k, (stage, todo, out) in enumerate(zip(stages, iters, outs)):
        ckpt = os.path.join(out, "ckpt")
        done = os.path.exists(ckpt) and read_train_state(ckpt)
        if cfg.resume and done and done["stage"] == stage and done["step"] == todo:
            init, step = ckpt, todo  # finished before the interruption
            continue
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"=== recipe stage {k + 1}/{n}: {stage}, {todo} steps, in {out}")
        step = main(argv + [f"--stage={stage}", f"--max_iters={todo}", f"--out_dir={out}", f"--init={init}",
                            f"--resume={bool(cfg.resume and done)}"], distributed, last=k == n - 1)
        if step < todo:  # stopped by a signal: the checkpoint is saved, --resume continues from here
            return step
        init = ckpt
    return step


def main(argv=None, distributed=True, last=True):
    """Train; returns the last step. last=False: more stages of a recipe follow in this process."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, overrides = parse_args(argv)
    stages = recipe_stages(cfg)
    if len(stages) > 1:
        return run_recipe(argv, cfg, stages, distributed)
    cfg.stage = stages[0]
    rank, world, device = setup_distributed(cfg) if distributed else (0, 1, torch.device("cpu"))
    master = rank == 0
    cfg.grad_accum = cfg.grad_accum or world
    if cfg.grad_accum % world:
        raise ValueError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    accum = cfg.grad_accum // world
    dtype, why = choose_precision(device)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # --- the model, its stage recipe, and where its weights come from
    module, Model, mcfg = build_model_config(cfg, overrides)
    mcfg.vit_path, mcfg.llm_path = cfg.vit or mcfg.vit_path, cfg.llm or mcfg.llm_path
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock_out_dir(cfg.out_dir)  # before anything in it is read or cleared
        clear_temporaries(cfg.out_dir)
        check_out_dir(cfg)
    if cfg.preset == "tiny" and not (mcfg.vit_path or mcfg.llm_path or cfg.from_scratch):
        mcfg.vit_path, mcfg.llm_path = tiny_base()
    # the tokenizer travels with checkpoints; else it is the LM's, or the tiny one
    tok_dir = ((ckpt_dir if cfg.resume else cfg.init) or mcfg.llm_path
               or (tiny_tokenizer() if cfg.preset == "tiny" else ""))
    if not tok_dir:
        raise ValueError(f"--preset={cfg.preset} needs --llm=DIR (the language model and its tokenizer)")
    tok = Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.resume or cfg.init:
        check_model(cfg, ckpt_dir if cfg.resume else cfg.init)
        model = named_weights(lambda: Model.load(ckpt_dir if cfg.resume else cfg.init), ckpt_dir if cfg.resume
                              else cfg.init)
        for key in overrides:  # a checkpoint's architecture is its own: say so rather than ignore the option
            if get_field(model.config, key) != get_field(mcfg, key):
                raise ValueError(f"--{key}={overrides[key]} differs from the checkpoint's {key}="
                                 f"{get_field(model.config, key)!r} ({ckpt_dir if cfg.resume else cfg.init})")
    elif mcfg.vit_path or mcfg.llm_path:
        model = named_weights(lambda: Model.from_pretrained(mcfg), mcfg.vit_path, mcfg.llm_path)
    else:
        model = Model(mcfg)
    groups = model.configure_stage(cfg.stage)
    recipe = Model.STAGES[cfg.stage]
    if "template" in overrides and "template" in recipe and recipe["template"] != mcfg.template:
        raise ValueError(f"--template={mcfg.template}: stage {cfg.stage} of --model={cfg.model} trains with its own "
                         f"template, {recipe['template']!r} ({MODELS[cfg.model][0]}.py STAGES)")
    resolve_schedule(cfg, recipe)
    model.to(device)
    raw_model = model
    if cfg.act_ckpt:
        checkpoint_blocks(raw_model.llm.layers)
    if cfg.fsdp:  # shard each decoder block, then the rest; sharding replaces the Parameter objects
        from torch.distributed.fsdp import fully_shard
        names = {id(p): n for n, p in raw_model.named_parameters()}
        groups = [dict(g, params=[names[id(p)] for p in g["params"]]) for g in groups]
        for block in raw_model.llm.layers:
            fully_shard(block)
        fully_shard(raw_model)
        params = dict(raw_model.named_parameters())
        groups = [dict(g, params=[params[n] for n in g["params"]]) for g in groups]
    elif world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ddp_model = model
    optimizer = make_optimizer(groups, cfg, device)
    state = read_train_state(ckpt_dir) if cfg.resume else None
    if state:
        check_resume(cfg, state, world, master)
        set_optimizer_state(raw_model, optimizer, state["optimizer"], cfg.fsdp)
        scaler.load_state_dict(state["scaler"])
    if cfg.compile:
        model = torch.compile(model)

    # --- data: the stage's template, the model's image size; each rank reads its own share
    template = recipe.get("template", raw_model.config.template)
    mc = raw_model.config  # as the model resolved it (e.g. S2's input is its largest scale)
    make = lambda split, n: data.make_dataset(cfg.data, tok, template=template, image_size=mc.image_size,
                                              pad_square=recipe.get("pad_square", mc.pad_square), max_len=cfg.max_len,
                                              split=split, n=n, seed=cfg.seed, image_dir=cfg.image_dir,
                                              skip_bad=cfg.skip_bad, task=recipe.get("task"),
                                              center_crop=recipe.get("center_crop", False),  # a stage's image fit
                                              val_fraction=cfg.val_fraction, others=cfg.others)
    # --n_val=0: no validation, and a data file trains on all its records
    train_set = make("train" if cfg.n_val or cfg.data == "synthetic" else None, cfg.n_train)
    val_set = make("val", cfg.n_val) if cfg.n_val else None
    if cfg.batch_size * cfg.grad_accum > len(train_set):
        raise ValueError(f"a global batch of {cfg.batch_size * cfg.grad_accum} samples is larger than the "
                         f"{len(train_set)} samples of --data={cfg.data}")
    start = state["step"] if state else 0
    sampler = StepSampler(len(train_set), cfg.batch_size, cfg.grad_accum, rank, world, cfg.seed, start, cfg.max_iters)
    # Workers ignore SIGINT/SIGTERM (the training process decides when to stop), and their seeds come from a
    # generator of their own: creating a loader never draws from the training RNG streams (exact resume).
    loader = lambda ds, **kw: torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=ds.collate,
        worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(cfg.seed), **kw)
    val_loader = loader(val_set, sampler=list(range(rank, len(val_set), world))) if val_set is not None else []
    eos_id = data.end_of_turn(tok, template)

    def qa_loader(n):  # the first n validation questions; captions are not scored
        questions = val_set.qa_set(n) if val_set is not None and template != "plain" and n else []
        return loader(questions, sampler=list(range(rank, len(questions), world))) if len(questions) else []
    qa, final_qa = qa_loader(cfg.eval_answers), qa_loader(len(val_set) if val_set is not None else 0)

    # --- RNG: per-rank streams (dropout), restored exactly on resume
    if state and state["world"] == world:
        rng = state["rng"][rank]
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:  # a fresh run, or a resume on another number of processes: streams derived from (seed, step, rank)
        seed = cfg.seed + rank + (1_000_003 * start if state else 0)
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)

    def checkpoint(step):
        rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        rngs = [None] * world
        dist.all_gather_object(rngs, rng) if world > 1 else rngs.__setitem__(0, rng)
        weights, opt_state = full_state(raw_model, optimizer, cfg.fsdp)  # a collective under FSDP
        if master:
            save_checkpoint(cfg, raw_model, weights, tok_dir, dict(
                step=step, optimizer=opt_state, scaler=scaler.state_dict(), rng=rngs,
                train_config=dataclasses.asdict(cfg), stage=cfg.stage, world=world))
        if world > 1:
            dist.barrier()

    # --- Ctrl-C / preemption: finish the step, save, exit cleanly. Installed before the first DataLoader worker
    # is forked (iter() below): a worker inherits this harmless handler until ignore_stop_signals replaces it.
    stop = {"signal": None}
    handlers = {sig: signal.signal(sig, lambda s, _: stop.update(signal=signal.Signals(s).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}

    if master:
        n_train = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        print(f"model {cfg.model} ({cfg.preset}), stage {cfg.stage}: {n_train / 1e6:.2f}M trainable parameters "
              f"in {', '.join(sorted({g['name'] for g in optimizer.param_groups}))}")
        print(f"device {device}, {world} process(es), precision: {why}; global batch "
              f"{cfg.batch_size * cfg.grad_accum} = {cfg.batch_size} x {accum} micro-steps x {world}")
        print(f"schedule: {cfg.warmup_iters} warmup steps, cosine to {cfg.min_lr_ratio:g} x peak at step "
              f"{cfg.lr_decay_iters or cfg.max_iters}, gradient clipping " + (f"at {cfg.grad_clip:g}" if cfg.grad_clip
              else "off") + f" ({MODELS[cfg.model][0]}.py STAGES[{cfg.stage!r}] unless set here)")
    step, step_loss, shown, log = start, float("nan"), [], None
    try:
        batches = iter(loader(train_set, sampler=sampler))
        log = open_log(cfg, start) if master else None
        bar = tqdm(total=cfg.max_iters, initial=start, disable=not master, dynamic_ncols=True)
        t_start, t_data, t_step = time.time(), 0.0, 0.0
        while step < cfg.max_iters:
            t0 = time.time()
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_multiplier(step, cfg)
            try:
                micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(accum)]
            except RuntimeError as e:  # a DataLoader worker died (killed): once stopping, save what the steps did
                if stop["signal"] is None or world > 1:
                    raise
                checkpoint(step)
                bar.write(f"stopped by {stop['signal']} at step {step} (and a data worker: {e}); checkpoint "
                          f"saved in {ckpt_dir}; continue with --resume")
                break
            t1 = time.time()
            # Loss = sum of token losses over the whole effective batch / its number of supervised tokens
            # (Pheye Sec. 3.1), so micro-batches and ranks of different lengths weigh by their tokens.
            n_tok = all_reduce(sum(data.count_targets(b["labels"]) for b in micro).float(), world)
            if n_tok.item() == 0:  # 0 / 0: say which samples rather than train on NaN
                names = [train_set.record(i).get("id", i) for i in sampler.step_indices(step)]
                raise data.DataError(f"step {step + 1}: no supervised token in the batch: samples {names} of "
                                     f"--data={cfg.data} have no answer token within --max_len={cfg.max_len} "
                                     f"(empty answers, or prompts longer than max_len)")
            n_seen = all_reduce(sum(b["mask"].sum() for b in micro).float(), world)
            loss_sum = torch.zeros((), device=device)
            for m, b in enumerate(micro):
                sync_now = m == accum - 1  # gradients are reduced over ranks on the last micro-step only
                if cfg.fsdp:
                    ddp_model.set_requires_gradient_sync(sync_now)
                sync = ddp_model.no_sync() if world > 1 and not cfg.fsdp and not sync_now else nullcontext()
                with sync:
                    with ctx:
                        _, loss = model(b["pixels"], b["ids"], labels=b["labels"], mask=b["mask"], reduction="sum")
                    # DDP averages gradients over ranks: scale by world so that sum / n_tok above holds
                    scaler.scale(loss * world / n_tok).backward()
                loss_sum += loss.detach().float()
            step_loss = (all_reduce(loss_sum, world) / n_tok).item()
            if not math.isfinite(step_loss):
                kept = (f"the last good checkpoint ({os.path.realpath(ckpt_dir)}) is kept" if os.path.exists(ckpt_dir)
                        else "no checkpoint was written before it")
                raise FloatingPointError(f"non-finite loss ({step_loss}) at step {step + 1}: stopping; {kept}")
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            t2 = time.time()
            t_data, t_step = t_data + (t1 - t0), t_step + (t2 - t0)
            if master:
                lr = optimizer.param_groups[0]["lr"]
                rec = dict(iter=step, loss=round(step_loss, 6), lr=lr, tokens_per_s=round(n_seen.item() / (t2 - t0), 1),
                           elapsed_s=round(time.time() - t_start, 3), data_s=round(t1 - t0, 4))
                log.write(json.dumps(rec) + "\n"), log.flush()
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            halt = torch.tensor(float(stop["signal"] is not None), device=device)  # any rank stopped: all stop
            all_reduce(halt, world, dist.ReduceOp.MAX if world > 1 else None)
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_iters or halt.item():
                if not halt.item() and val_set is not None:
                    asked = final_qa if step == cfg.max_iters else qa
                    val_loss, acc, shown = evaluate(raw_model, val_loader, asked, tok, device, ctx, world, eos_id)
                    if master:
                        n_asked = len(asked.dataset) if asked else 0
                        log.write(json.dumps(dict(iter=step, val_loss=round(val_loss, 6), accuracy=acc,
                                                  answers=n_asked)) + "\n")
                        log.flush()
                        scored = f", exact-match accuracy {acc:.1%} on {n_asked} held-out questions" if asked else ""
                        bar.write(f"step {step}: val loss {val_loss:.4f}{scored}")
                checkpoint(step)
            if halt.item():
                if master:
                    bar.write(f"stopped by {stop['signal'] or 'a signal on another rank'} at step {step}; checkpoint "
                              f"saved in {ckpt_dir}; continue with --resume")
                break
        bar.close()
    finally:  # also on errors: the signal handlers go back, the log is closed, the out_dir unlocked
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if log:
            log.close()
        if master:
            unlock_out_dir(cfg.out_dir)
    if master and step == cfg.max_iters:
        print(f"done: {step} steps in {time.time() - t_start:.0f}s, final loss {step_loss:.4f}, "
              f"data loading {t_data / max(t_step, 1e-9):.1%} of step time")
        for question, answer, said in shown[:5]:
            print(f"  Q: {question}\n     truth: {answer!r}  model: {said!r}")
        print(f"try it: python {MODELS[cfg.model][0]}.py --ckpt {ckpt_dir} --image IMAGE --prompt \"...\"")
    if world > 1 and distributed and last:
        dist.destroy_process_group()
    return step


# ----------------------------------------------------------------------------- the command line's errors
# Errors that our own checks raise about what the user gave (options, data, checkpoints, paths). Raised anywhere
# else (inside torch, say) the same types are bugs, and keep their traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
HERE = os.path.dirname(os.path.abspath(__file__))


def user_error(e):
    """The one-line message of a user error, or None for an internal error."""
    if not isinstance(e, USER_ERRORS):
        return None
    if isinstance(e, data.DataError) and "Original Traceback" in str(e):  # re-raised from a DataLoader worker
        return str(e).strip().splitlines()[-1].partition(": ")[2]
    tb = e.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return str(e) if os.path.dirname(path) == HERE else None


def cli(argv=None):
    """python train.py: a user error prints one line and exits with 2; anything else keeps its traceback."""
    try:
        main(argv)
    except USER_ERRORS as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"train.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
