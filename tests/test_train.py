"""train.py: exact resume, DDP == one process, atomic checkpoints, signals, bad input, every tiny model learns."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--from_scratch=True", "--n_train=64", "--n_val=8", "--eval_answers=4", "--num_workers=0",
        "--warmup_iters=2", "--batch_size=4"]


def run(tmp_path, *args, name="run"):
    out = str(tmp_path / name)
    train.main(FAST + [f"--out_dir={out}", *args], distributed=False)
    return out


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def weights(out):
    return load_file(os.path.join(out, "ckpt", "model.safetensors"))


def assert_same_weights(a, b, tol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst


def test_resume_equals_uninterrupted(tmp_path):
    common = ["--model=pheye", "--stage=stage3", "--lr_decay_iters=6", "--eval_interval=3", "--seed=3"]
    full = run(tmp_path, *common, "--max_iters=6", name="full")
    half = run(tmp_path, *common, "--max_iters=3", name="half")
    train.main(FAST + common + ["--max_iters=6", "--resume", f"--out_dir={half}"], distributed=False)
    assert losses(half) == losses(full)  # same per-step losses, bitwise (the log rounds to 1e-6)
    assert_same_weights(weights(half), weights(full), 1e-6)


def test_grad_accum_equals_one_big_batch(tmp_path):
    # 2 micro-steps of 2 == 1 step of 4: the loss is normalised by the tokens of the whole effective batch
    common = ["--model=hire", "--stage=pretrain", "--jbu_dropout=0", "--max_iters=3", "--eval_interval=3"]
    a = run(tmp_path, *common, "--batch_size=4", "--grad_accum=1", name="a")
    b = run(tmp_path, *common, "--batch_size=2", "--grad_accum=2", name="b")
    assert losses(a) == pytest.approx(losses(b), abs=2e-6)
    assert_same_weights(weights(a), weights(b), 1e-5)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, sharding):
    # torchrun on this CPU (gloo): the same global batch gives the same losses and weights (DDP, or FSDP2 with
    # the LM's blocks sharded and activation checkpointing); resuming the sharded run works too.
    args = FAST + ["--model=pheye", "--stage=stage3", "--lora_dropout=0", "--lr_decay_iters=3", "--eval_interval=3",
                   "--batch_size=2", "--grad_accum=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = str(tmp_path / "one")
    train.main(args + ["--max_iters=3", f"--out_dir={one}"], distributed=False)
    two = str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(ROOT, "train.py"), *args, f"--out_dir={two}"]
    runs = [["--max_iters=3"]] if sharding == "ddp" else [["--max_iters=2"], ["--max_iters=3", "--resume"]]
    if sharding == "ddp":  # no --grad_accum under torchrun: one micro-step per process, i.e. 2 here
        torchrun.remove("--grad_accum=2")
    for extra in runs:
        extra += ["--fsdp=True", "--act_ckpt=True"] if sharding == "fsdp" else []
        r = subprocess.run(torchrun + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert_same_weights(weights(one), weights(two), 1e-5)


def test_kill_while_writing_checkpoint_keeps_the_previous(tmp_path, monkeypatch):
    out = run(tmp_path, "--model=hire", "--stage=pretrain", "--max_iters=2", "--eval_interval=1")
    before = weights(out)

    def dies(*a, **k):  # the model weights of step 3 are written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        train.main(FAST + ["--model=hire", "--stage=pretrain", "--max_iters=3", "--eval_interval=1", "--resume",
                           f"--out_dir={out}"], distributed=False)
    monkeypatch.undo()
    assert train.read_train_state(os.path.join(out, "ckpt"))["step"] == 2
    assert_same_weights(weights(out), before, 0.0)
    import hire
    hire.HIRE.load(os.path.join(out, "ckpt"))  # still loads as a model


def test_non_finite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    import hire
    out = run(tmp_path, "--model=hire", "--stage=pretrain", "--max_iters=1")
    forward, calls = hire.HIRE.forward, []

    def diverges(self, *a, **k):  # the 3rd training forward after step 1 (so step 4, as the log counts) overflows
        logits, loss = forward(self, *a, **k)
        calls.append(1)
        return logits, loss * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(hire.HIRE, "forward", diverges)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 4: stopping; the last good checkpoint"):
        train.main(FAST + ["--model=hire", "--stage=pretrain", "--max_iters=20", "--eval_interval=100", "--resume",
                           f"--out_dir={out}"], distributed=False)
    assert train.read_train_state(os.path.join(out, "ckpt"))["step"] == 1  # the last good checkpoint stays


@pytest.mark.parametrize("model", ["llava", "llava_s2", "hire", "inf_llava", "pheye"])
def test_every_tiny_model_learns(tmp_path, model):
    stage = list(getattr(__import__(train.MODELS[model][0]), train.MODELS[model][1]).STAGES)[-1]
    out = run(tmp_path, f"--model={model}", f"--stage={stage}", "--max_iters=25", "--eval_interval=25", "--lr_scale=5",
              "--warmup_iters=3", "--batch_size=8")
    ls = losses(out)
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    assert last < first - 0.5, (first, last)  # nats; from random weights, so the first loss is about ln(512)


def test_command_line_parsing():
    cfg, over = train.parse_args(["--model=hire", "--compile=False", "--resume", "--batch_size", "3",
                                  "--llm.n_layer=2"])
    assert (cfg.model, cfg.compile, cfg.resume, cfg.batch_size) == ("hire", False, True, 3)
    assert cfg.out_dir == os.path.join("out", "hire") and over == {"llm.n_layer": "2"}
    _, _, mcfg = train.build_model_config(cfg, over)
    assert mcfg.llm.n_layer == 2 and mcfg.enricher == "hire"
    with pytest.raises(ValueError, match="--compile"):
        train.parse_args(["--compile=maybe"])
    with pytest.raises(ValueError, match="--max_iters"):
        train.parse_args(["--max_iters=ten"])
    with pytest.raises(ValueError, match="--model='nope'"):
        train.parse_args(["--model=nope"])
    cfg, over = train.parse_args(["--model=pheye", "--no_such_key=1"])
    with pytest.raises(ValueError, match="unknown option --no_such_key"):
        train.build_model_config(cfg, over)


def test_stage_chain_with_init(tmp_path, monkeypatch):
    """--init starts a stage from another's checkpoint; a recipe's data task reaches the dataset (Pheye stage 1
    trains on captions); a model option that contradicts the checkpoint's architecture is an error, not ignored."""
    import data
    tasks, make = [], data.make_dataset
    monkeypatch.setattr(data, "make_dataset", lambda *a, **k: tasks.append(k["task"]) or make(*a, **k))
    first = run(tmp_path, "--model=pheye", "--stage=stage1", "--max_iters=1", "--local=False", name="stage1")
    second = run(tmp_path, "--model=pheye", "--stage=stage3", "--max_iters=1", f"--init={first}/ckpt",
                 "--local=False", "--seed=7", name="stage3")
    assert tasks == ["caption", "caption", None, None]  # train + val of each run
    assert train.read_train_state(os.path.join(second, "ckpt"))["stage"] == "stage3"
    a, b = weights(first), weights(second)
    frozen = [k for k in a if k.startswith("llm.")]  # another seed, yet the frozen LM is stage 1's: loaded
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("xattn."))  # and trained on
    with pytest.raises(ValueError, match="--local=True differs from the checkpoint's local=False"):
        run(tmp_path, "--model=pheye", "--stage=stage3", "--max_iters=1", f"--init={first}/ckpt", "--local=True",
            name="bad")


def test_default_runs_the_papers_recipe_stage_by_stage(tmp_path):
    """No --stage on the synthetic set: every paper stage in turn, --max_iters split between them, each from the
    previous one's checkpoint; --resume skips finished stages and continues the unfinished one."""
    out = run(tmp_path, "--model=llava", "--max_iters=5", "--eval_interval=0")
    first = train.read_train_state(os.path.join(out, "pretrain", "ckpt"))
    last = train.read_train_state(os.path.join(out, "ckpt"))
    assert (first["stage"], first["step"], last["stage"], last["step"]) == ("pretrain", 2, "finetune", 3)
    assert last["train_config"]["init"] == os.path.join(out, "pretrain", "ckpt")
    a, b = weights(os.path.join(out, "pretrain")), weights(out)
    assert torch.equal(a["llm.embed_tokens.weight"], b["llm.embed_tokens.weight"])  # frozen in both: stage 1's own weights
    assert not torch.equal(a["projector.0.weight"], b["projector.0.weight"])  # trained on in stage 2
    stage1_log = open(os.path.join(out, "pretrain", "log.jsonl")).read()
    run(tmp_path, "--model=llava", "--max_iters=5", "--eval_interval=0", "--resume")
    assert open(os.path.join(out, "pretrain", "log.jsonl")).read() == stage1_log
    assert_same_weights(weights(out), b, 0)  # both stages were finished: nothing retrained
    for name in os.listdir(out):  # stage 2 interrupted before its first checkpoint
        if name.startswith("ckpt"):
            os.remove(os.path.join(out, name)) if name == "ckpt" else shutil.rmtree(os.path.join(out, name))
    run(tmp_path, "--model=llava", "--max_iters=5", "--eval_interval=0", "--resume")
    assert open(os.path.join(out, "pretrain", "log.jsonl")).read() == stage1_log  # stage 1 not rerun
    assert_same_weights(weights(out), b, 1e-6)  # stage 2 again from stage 1's checkpoint: the same result
    assert len(losses(out)) == 3


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        run(tmp_path, "--model=hire", "--stage=pretrain", "--max_iters=1", "--resume", name="empty")
    with pytest.raises(ValueError, match="larger than the 64 samples"):
        run(tmp_path, "--model=hire", "--stage=pretrain", "--max_iters=1", "--batch_size=65", name="big")
    with pytest.raises(ValueError, match="stages"):
        run(tmp_path, "--model=hire", "--stage=nope", "--max_iters=1", name="stage")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        run(tmp_path, "--model=hire", "--stage=finetune", "--max_iters=1", f"--data={tmp_path}/missing.json",
            name="data")
    with pytest.raises(ValueError, match="name the stage this data is for"):
        run(tmp_path, "--model=hire", "--max_iters=1", f"--data={tmp_path}/missing.json", name="data")
    with pytest.raises(ValueError, match="a data file serves one stage"):
        run(tmp_path, "--model=hire", "--stage=pretrain,finetune", f"--data={tmp_path}/x.json", name="data")
    with pytest.raises(ValueError, match="fewer than the 3 stages"):
        run(tmp_path, "--model=pheye", "--max_iters=2", name="short")
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        run(tmp_path, "--model=pheye", "--max_iters=3", "--resume", name="short")
    out = run(tmp_path, "--model=hire", "--stage=pretrain", "--max_iters=1", name="taken")
    with pytest.raises(FileExistsError, match="another model"):
        run(tmp_path, "--model=pheye", "--stage=stage3", "--max_iters=1", name="taken")
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path, "--model=hire", "--stage=pretrain", "--max_iters=1", name="taken")
    run(tmp_path, "--model=pheye", "--stage=stage3", "--max_iters=1", "--overwrite", name="taken")  # told to
    assert train.read_train_state(os.path.join(out, "ckpt"))["train_config"]["model"] == "pheye"


# ----------------------------------------------------------------------------- the tiny base
# (its builders and their tests: bench/tiny_base.py, tests/test_tiny_base.py)
def test_missing_tiny_base_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "TINY_LM", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing: .*bench/tiny_base.py lm"):
        train.tiny_tokenizer()
    open(tmp_path / "model.safetensors", "wb").close()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.model is missing"):
        train.tiny_base()


def test_learning_rate_scale_defaults_to_the_tiny_one_for_tiny_presets_only():
    assert train.parse_args(["--model=llava"])[0].lr_scale == train.TINY_LR_SCALE == 5.0
    assert train.parse_args(["--model=pheye", "--preset=paper-x4-448"])[0].lr_scale == 1.0  # the papers' rates
    assert train.parse_args(["--model=hire", "--lr_scale=2"])[0].lr_scale == 2.0  # as given
