"""train.py and data.py under preemption, faults and careless input: nothing is lost, nothing runs silently wrong,
and every error names what to fix. One test per point of the robustness sweep (the points are numbered below)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import train
from llm import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
FAST = ["--from_scratch=True", "--n_train=64", "--n_val=8", "--eval_answers=4", "--num_workers=0", "--batch_size=4"]
LLAVA = ["--model=llava", "--stage=pretrain"]  # the cheapest step of all


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny-lm"))  # the tiny presets' tokenizer


def run(tmp_path, *args, name="run"):
    out = str(tmp_path / name)
    train.main(FAST + [f"--out_dir={out}", *args], distributed=False)
    return out


def rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [r["loss"] for r in rows(out) if "loss" in r]


def weights(out):
    return load_file(os.path.join(out, "ckpt", "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_of(out):
    return train.read_train_state(os.path.join(out, "ckpt"))["step"]


def wait_for_rows(out, n, p, timeout=120):
    log, deadline = os.path.join(out, "log.jsonl"), time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(log) and sum(1 for line in open(log) if '"loss"' in line) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps logged in {timeout} s: {p.communicate()[0][-2000:] if p.poll() else ''}")


def write_records(tmp_path, records, name="d.json"):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    path = tmp_path / name
    path.write_text(json.dumps([{"id": f"r{k}", "image": "a.png", **r} for k, r in enumerate(records)]))
    return str(path)


def qa(question="What colour is it?", answer="red"):
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


# ----------------------------------------------------------------------------- data loss
def test_1_sigterm_to_the_process_group_saves_and_resumes_exactly(tmp_path, sig=signal.SIGTERM):
    """`timeout`, SLURM and Kubernetes signal the whole process group, DataLoader workers included. The workers
    ignore it (SIGINT, a terminal's Ctrl-C, too), the training process finishes its step and saves; resuming
    gives the uninterrupted run bit for bit."""
    common = LLAVA + ["--lr_decay_iters=12", "--eval_interval=0", "--warmup_iters=2"]
    out = str(tmp_path / "cut")
    p = subprocess.Popen([sys.executable, TRAIN, *FAST, *common, "--num_workers=1", "--max_iters=1000",
                          f"--out_dir={out}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)  # its own process group, as under `timeout`
    wait_for_rows(out, 2, p)
    os.killpg(p.pid, sig)  # the group: the worker gets it too
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and f"stopped by {sig.name}" in text, text[-3000:]
    step = step_of(out)
    assert step == len(losses(out)) >= 2
    train.main(FAST + common + [f"--max_iters={step + 2}", "--resume", f"--out_dir={out}"], distributed=False)
    full = run(tmp_path, *common, f"--max_iters={step + 2}", name="full")
    assert losses(out) == losses(full) and len(losses(full)) == step + 2
    assert same_weights(weights(out), weights(full))


def test_1_a_data_worker_that_dies_with_the_stop_does_not_lose_the_steps(tmp_path, monkeypatch, capsys):
    """Whatever the workers do (killed another way, say), once a stop signal has come the steps done are saved."""
    loader = torch.utils.data.DataLoader

    class Dying(loader):
        def __iter__(self):
            for k, batch in enumerate(super().__iter__()):
                if k == 2 and isinstance(self.sampler, train.StepSampler):  # fetching step 3's batch
                    os.kill(os.getpid(), signal.SIGTERM)
                    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
                yield batch

    monkeypatch.setattr(torch.utils.data, "DataLoader", Dying)
    out = run(tmp_path, *LLAVA, "--max_iters=5")
    assert step_of(out) == 2 == len(losses(out)) and "(and a data worker: DataLoader worker" in capsys.readouterr().out


def test_2_stale_temporaries_do_not_block_resume(tmp_path):
    """A kill between creating the ckpt.tmp link and the rename, or while a checkpoint directory is written."""
    out = run(tmp_path, *LLAVA, "--max_iters=1")
    os.symlink("ckpt-000001", os.path.join(out, "ckpt.tmp"))
    os.makedirs(os.path.join(out, "ckpt-000002.tmp"))
    train.main(FAST + LLAVA + ["--max_iters=2", "--resume", f"--out_dir={out}"], distributed=False)
    assert step_of(out) == 2 and sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == ["ckpt", "ckpt-000002"]
    # and the swap itself is idempotent: a leftover link is replaced
    os.symlink("ckpt-000002", os.path.join(out, "ckpt.tmp"))
    state = train.read_train_state(os.path.join(out, "ckpt"))
    cfg, _ = train.parse_args(FAST + LLAVA + [f"--out_dir={out}"])
    import hire
    model = hire.HIRE.load(os.path.join(out, "ckpt"))
    train.save_checkpoint(cfg, model, None, os.path.join(out, "ckpt"), dict(state, step=3))
    assert step_of(out) == 3 and not os.path.lexists(os.path.join(out, "ckpt.tmp"))


def test_3_a_second_run_in_the_same_out_dir_names_the_first(tmp_path):
    out = str(tmp_path / "busy")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, train; train.lock_out_dir(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", out],
                              cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FileExistsError, match=rf"{out} is in use by another run \(pid {holder.pid}\)"):
        run(tmp_path, *LLAVA, "--max_iters=1", name="busy")
    assert os.listdir(out) == ["lock"]  # nothing of the first run's touched
    holder.communicate("")  # the first run ends (however it ends, the kernel drops its lock)
    run(tmp_path, *LLAVA, "--max_iters=1", name="busy")
    assert step_of(out) == 1


# ----------------------------------------------------------------------------- silent wrong runs
def test_4_a_checkpoint_of_another_model_is_a_named_error(tmp_path):
    import hire
    llava = run(tmp_path, *LLAVA, "--max_iters=1", name="llava")
    pheye = run(tmp_path, "--model=pheye", "--stage=stage3", "--max_iters=1", name="pheye")
    with open(os.path.join(llava, "ckpt", "config.json")) as f:
        assert json.load(f)["architecture"] == "HIRE"
    with pytest.raises(ValueError, match=r"llava/ckpt holds a --model=llava checkpoint, not --model=hire"):
        run(tmp_path, "--model=hire", "--stage=finetune", "--max_iters=1", f"--init={llava}/ckpt", name="a")
    with pytest.raises(ValueError, match=r"holds a --model=llava checkpoint, not --model=llava_s2"):
        train.main(FAST + ["--model=llava_s2", "--stage=pretrain", "--max_iters=2", "--resume",
                           f"--out_dir={llava}"], distributed=False)
    with pytest.raises(ValueError, match=r"pheye/ckpt holds a --model=pheye checkpoint, not --model=hire"):
        run(tmp_path, "--model=hire", "--stage=finetune", "--max_iters=1", f"--init={pheye}/ckpt", name="b")
    with pytest.raises(ValueError, match=r"not a HIRE checkpoint: its config.json is a Pheye's"):
        hire.HIRE.load(os.path.join(pheye, "ckpt"))  # hire.py --ckpt=<a Pheye run>
    with open(os.path.join(pheye, "ckpt", "config.json")) as f:  # written before the class was recorded
        legacy = {k: v for k, v in json.load(f).items() if k != "architecture"}
    with pytest.raises(ValueError, match=r"not a HIRE checkpoint: .*fields HIRE does not have: .*'tiles'"):
        hire.HIREConfig.from_dict(legacy)


def test_5_resume_with_another_batch_split_or_process_count(tmp_path, capsys):
    """The global batch must stay (the data position and the schedule count its steps); its split into
    micro-steps and processes may change, and a change of process count is said, with what it costs."""
    common = LLAVA + ["--lr_decay_iters=4", "--eval_interval=0", "--warmup_iters=1"]
    full = run(tmp_path, *common, "--max_iters=4", name="full")
    out = run(tmp_path, *common, "--max_iters=2", name="cut")
    with pytest.raises(ValueError, match=r"global batch is 4 \(4 x 1 micro-steps\), this run's 2 \(2 x 1\)"):
        train.main(FAST + common + ["--max_iters=4", "--resume", "--batch_size=2", f"--out_dir={out}"],
                   distributed=False)
    with pytest.raises(ValueError, match=r"--seed=1 differs from the checkpoint's 1337"):
        train.main(FAST + common + ["--max_iters=4", "--resume", "--seed=1", f"--out_dir={out}"], distributed=False)
    # the checkpoint now says it came from 2 processes (per-rank RNG list of 2): resumed in one, 2 micro-steps of 2
    path = os.path.join(out, "ckpt", "train_state.pt")
    state = torch.load(path, weights_only=False)
    torch.save(dict(state, world=2, rng=state["rng"] * 2), path)
    capsys.readouterr()
    train.main(FAST + common + ["--max_iters=4", "--resume", "--batch_size=2", "--grad_accum=2", f"--out_dir={out}"],
               distributed=False)
    said = capsys.readouterr().out
    assert "the checkpoint: 4 x 1 on 2" in said and "re-seeded per rank" in said, said
    assert losses(out) == pytest.approx(losses(full), abs=2e-6)  # the same samples in every step


def test_6_a_stop_on_an_evaluation_step_resumes_exactly(tmp_path, monkeypatch):
    """The stop skips the evaluation the uninterrupted run does at that step: evaluation must not move the
    training RNG streams (JBU dropout draws from them)."""
    import hire
    common = ["--model=hire", "--stage=pretrain", "--lr_decay_iters=4", "--eval_interval=2", "--warmup_iters=1",
              "--batch_size=2", "--n_val=2"]
    full = run(tmp_path, *common, "--max_iters=4", name="full")
    forward, calls = hire.HIRE.forward, []

    def preempted(self, *a, **k):  # SIGTERM arrives during step 2, which ends on an evaluation
        if self.training:
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *a, **k)

    monkeypatch.setattr(hire.HIRE, "forward", preempted)
    out = run(tmp_path, *common, "--max_iters=4", name="cut")
    monkeypatch.undo()
    assert step_of(out) == 2 and not any("val_loss" in r for r in rows(out))
    train.main(FAST + common + ["--max_iters=4", "--resume", f"--out_dir={out}"], distributed=False)
    assert losses(out) == losses(full)
    assert same_weights(weights(out), weights(full))


@pytest.mark.parametrize("option", ["--lr_scale=-1", "--lr_scale=0", "--lr_scale=nan", "--device=gpu",
                                    "--max_iters=0", "--max_iters=-3", "--grad_accum=-1", "--batch_size=0",
                                    "--val_fraction=1", "--grad_clip=-1"])
def test_7_impossible_options_are_errors(option):
    with pytest.raises(ValueError, match=option.partition("=")[0] + "=" + r"[-\w.']+: "):
        train.parse_args([option])


def test_7_template_that_contradicts_the_stage_and_records_without_answers(tmp_path, tok):
    with pytest.raises(ValueError, match=r"--template=vicuna_v1: stage pretrain of --model=llava trains with its own "
                                         r"template, 'plain'"):
        run(tmp_path, *LLAVA, "--max_iters=1", "--template=vicuna_v1")
    question = {"conversations": [{"from": "human", "value": "What colour?"}]}
    with pytest.raises(data.DataError, match=r"record 1 \(id 'r1'\): the last turn is a question without an answer"):
        data.LlavaJsonDataset(write_records(tmp_path, [qa(), question]), tok)
    with pytest.raises(data.DataError, match=r"record 0 \(id 'r0'\), turn 1: empty answer"):
        data.LlavaJsonDataset(write_records(tmp_path, [qa(answer=" "), qa()]), tok)


# ----------------------------------------------------------------------------- messages
def test_8_no_supervised_token_names_the_records_and_no_phantom_checkpoint(tmp_path, monkeypatch, tok):
    long = "Describe every part of this image in great detail please. " * 4
    ids, labels = data.tokenize_conversation(tok, qa(long)["conversations"], "vicuna_v1")
    first_answer = next(i for i, y in enumerate(labels) if y != data.IGNORE)
    path = write_records(tmp_path, [qa(long)] * 8)
    with pytest.raises(data.DataError, match=r"step 1: no supervised token in the batch: samples \['r\d', .*"
                                             rf"within --max_len={first_answer}"):
        run(tmp_path, "--model=llava", "--stage=finetune", f"--data={path}", "--n_val=0", "--max_iters=1",
            f"--max_len={first_answer}", name="cut")
    import hire
    forward = hire.HIRE.forward
    monkeypatch.setattr(hire.HIRE, "forward", lambda self, *a, **k: (lambda out: (out[0], out[1] * math.nan))(
        forward(self, *a, **k)))
    with pytest.raises(FloatingPointError, match=r"at step 1: stopping; no checkpoint was written before it"):
        run(tmp_path, *LLAVA, "--max_iters=2", name="nan")


def test_9_a_small_data_file_trains(tmp_path):
    path = write_records(tmp_path, [qa()] * 10)
    with pytest.raises(data.DataError, match=r"no val records: 0.02 of its 10 records is less than one; .*"
                                             r"--val_fraction=0.2.*--n_val=0"):
        run(tmp_path, "--model=llava", "--stage=finetune", f"--data={path}", "--max_iters=1", name="a")
    out = run(tmp_path, "--model=llava", "--stage=finetune", f"--data={path}", "--max_iters=1", "--val_fraction=0.2",
              name="b")
    assert [r["iter"] for r in rows(out)] == [1, 1]  # a step, then its evaluation
    out = run(tmp_path, "--model=llava", "--stage=finetune", f"--data={path}", "--max_iters=1", "--n_val=0",
              "--batch_size=10", name="c")  # all 10 records train: a batch of 10 fits
    assert [r["iter"] for r in rows(out)] == [1] and step_of(out) == 1


def test_10_errors_name_the_file_or_the_option(tmp_path, tok):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([{"id": "é", "image": "a.png", **qa("Qué color?")}], ensure_ascii=False)
                     .encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1.json: not UTF-8 \(byte 0xe9 at offset \d+\)"):
        data.LlavaJsonDataset(str(path), tok)
    out = run(tmp_path, *LLAVA, "--max_iters=1")
    weights_file = os.path.join(out, "ckpt", "model.safetensors")
    with open(weights_file, "r+b") as f:  # an interrupted copy
        f.truncate(os.path.getsize(weights_file) // 2)
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors: not a readable safetensors file"):
        train.main(FAST + LLAVA + ["--max_iters=2", "--resume", f"--out_dir={out}"], distributed=False)
    state_file = os.path.join(out, "ckpt", "train_state.pt")
    with open(state_file, "r+b") as f:
        f.truncate(os.path.getsize(state_file) // 2)
    with pytest.raises(ValueError, match=r"ckpt/train_state.pt: not a readable training state"):
        train.main(FAST + LLAVA + ["--max_iters=2", "--resume", f"--out_dir={out}"], distributed=False)
    cfg, over = train.parse_args(["--model=pheye", "--lr_sclae=2"])
    with pytest.raises(ValueError, match=r"unknown option --lr_sclae: train.py's options are .*lr_scale.*; "
                                         r"PheyeConfig's are .*tiles"):
        train.build_model_config(cfg, over)


def test_11_padding_to_square_is_checked_before_the_canvas_exists(tmp_path):
    """A 60000x10 PNG of 2 KB would ask for a 3.6-gigapixel canvas; the same rule, at a small max_pixels here."""
    Image.new("RGB", (400, 10), (9, 9, 9)).save(tmp_path / "strip.png")
    with pytest.raises(data.DataError, match=r"strip.png: padding 400x10 to a square makes 160000 pixels > "
                                             r"max_pixels 10000"):
        data.load_image(str(tmp_path / "strip.png"), 64, pad_square=True, max_pixels=10_000)
    assert data.load_image(str(tmp_path / "strip.png"), 64, pad_square=False, max_pixels=10_000).shape == (3, 64, 64)


def test_12_user_errors_are_one_line_and_exit_2_internal_errors_keep_the_traceback(monkeypatch, capsys):
    r = subprocess.run([sys.executable, TRAIN, "--max_iters=0"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "train.py: error: --max_iters=0: must be at least 1\n")
    assert train.cli(["--model=hire", "--stage=nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setattr(train, "main", lambda argv: torch.optim.AdamW([], lr=1.0))  # a ValueError inside torch
    with pytest.raises(ValueError, match="empty parameter list"):
        train.cli([])


def test_13_log_is_cut_back_to_the_resumed_step(tmp_path, monkeypatch):
    out = run(tmp_path, *LLAVA, "--max_iters=2", "--eval_interval=2")
    def dies(*a, **k):  # killed while saving step 3's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        train.main(FAST + LLAVA + ["--max_iters=3", "--eval_interval=2", "--resume", f"--out_dir={out}"],
                   distributed=False)
    monkeypatch.undo()
    assert [r["iter"] for r in rows(out)] == [1, 2, 2, 3, 3]  # step 3 and its evaluation, not in the checkpoint
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"iter": 4, "lo')  # and a row cut short by the kill
    train.main(FAST + LLAVA + ["--max_iters=3", "--eval_interval=2", "--resume", f"--out_dir={out}"],
               distributed=False)
    assert [r["iter"] for r in rows(out)] == [1, 2, 2, 3, 3]


# ----------------------------------------------------------------------------- the schedule (issue 15, point 14)
def test_schedule_comes_from_the_stage_recipe(tmp_path, monkeypatch):
    """Warmup, floor and clipping are each model's cited recipe (STAGES), every STAGES key is read, and the
    options override them."""
    import hire
    import inf_llava
    import pheye
    for cls in (hire.HIRE, inf_llava.INFLLaVA, pheye.Pheye):
        for stage, recipe in cls.STAGES.items():
            assert set(recipe) <= set(train.RECIPE_KEYS) and set(train.SCHEDULE_KEYS) <= set(recipe), (cls, stage)
    llava = {"warmup_ratio": 0.03, "min_lr_ratio": 0.0, "grad_clip": 0.0}  # LLaVA-1.5's and INF-LLaVA's scripts
    assert all({k: hire.HIRE.STAGES[s][k] for k in llava} == llava for s in ("pretrain", "finetune"))
    assert all({k: inf_llava.INFLLaVA.STAGES[s][k] for k in llava} == llava for s in ("pretrain", "finetune"))
    cfg, _ = train.parse_args(["--max_iters=5000", "--preset=paper"])
    train.resolve_schedule(cfg, hire.HIRE.STAGES["base"])  # what assets/tiny-lm was built with
    assert (cfg.warmup_iters, cfg.min_lr_ratio, cfg.grad_clip) == (20, 0.1, 1.0)
    cfg, _ = train.parse_args(["--max_iters=2180", "--preset=paper"])  # LLaVA-1.5's pretraining: 558K samples / 256
    train.resolve_schedule(cfg, hire.HIRE.STAGES["pretrain"])
    assert (cfg.warmup_iters, cfg.min_lr_ratio, cfg.grad_clip) == (66, 0.0, 0.0)  # the HF Trainer's ceil(65.4)
    cfg, _ = train.parse_args(["--max_iters=3", "--preset=paper", "--model=pheye"])
    train.resolve_schedule(cfg, pheye.Pheye.STAGES["stage3"])
    assert (cfg.warmup_iters, cfg.min_lr_ratio, cfg.grad_clip) == (0, 0.0, 0.0)
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, c: clipped.append(c) or clip(p, c))
    # the tiny presets: train.TINY_SCHEDULE (20 warmup steps, floor 10%, clip 1.0) at x TINY_LR_SCALE
    out = run(tmp_path, "--model=pheye", "--stage=stage3", "--max_iters=3", "--eval_interval=0", name="pheye")
    lr = [r["lr"] for r in rows(out) if "lr" in r]
    assert lr == pytest.approx([5e-5 * train.TINY_LR_SCALE * (k + 1) / 20 for k in range(3)])
    assert clipped == [1.0] * 3
    clipped.clear()
    out = run(tmp_path, *LLAVA, "--max_iters=3", "--eval_interval=0", "--grad_clip=0.5", "--min_lr_ratio=0.1",
              "--warmup_iters=1", "--lr_scale=1", name="llava")  # options win over the recipe and the tiny defaults
    lr = [r["lr"] for r in rows(out) if "lr" in r]  # 1 warmup step, then cosine to the floor
    assert lr == pytest.approx([1e-3, 1e-3, 1e-3 * (0.1 + 0.9 * 0.5)])
    assert clipped == [0.5] * 3
