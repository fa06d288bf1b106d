"""bench/miniature.py: the grid runs end to end at a trivial size (2 steps per model, from scratch), its table has
every row and column, its numbers are the right ones (FLOPs from flops.py, trained parameters, prompt length),
and the scorer counts exact matches per detail size."""
import json
import os
import sys

import pytest
import torch

import data
import flops
import train
from llm import LLMConfig, Tokenizer
from vit import ViTConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import miniature  # noqa: E402
import probe  # noqa: E402


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("miniature")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # seven tiny runs in this process: a second thread only waits on a shared machine
    try:
        rows = miniature.main(["--quick", "--jobs=1", f"--out={out}"])
    finally:
        torch.set_num_threads(threads)
    return out, rows


def test_table_has_every_row_and_column(grid):
    out, rows = grid
    assert [r["key"] for r in rows] == [g[0] for g in miniature.GRID]
    lines = (out / "miniature.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert [c.strip() for c in lines[header].strip("|").split("|")] == miniature.COLUMNS
    body = lines[header + 2:header + 2 + len(rows)]
    for (_, label, _, _), line in zip(miniature.GRID, body):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(miniature.COLUMNS) and cells[0] == label
    saved = json.loads((out / "miniature.json").read_text())
    assert [r["key"] for r in saved["rows"]] == [g[0] for g in miniature.GRID]
    for r in saved["rows"]:
        assert set(r["accuracy"]) == {"overall", "large", "medium", "small"}
        for acc in r["accuracy"].values():
            assert all(0.0 <= a <= 1.0 for a in acc["values"]) and len(acc["values"]) == 1
        assert r["n_test"] == {"large": 2, "medium": 2, "small": 2, "overall": 6}
        assert r["s_per_step"]["mean"] > 0
    # the no-image floor: one fixed guess per question kind scores at least 1/17 (characters) and at most 1/3
    prior = saved["meta"]["answer_prior"]
    assert 1 / 17 <= prior["overall"] <= 1 / 3 and prior["overall"] * 6 == round(prior["overall"] * 6)
    assert any(line.startswith("Without the image") for line in lines)
    assert (out / "miniature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure by detail size


def test_flops_column_is_flops_py(grid):
    out, rows = grid
    llava = next(r for r in rows if r["key"] == "llava")
    # the prompt: vicuna_v1 around the question, the image slot not counted
    tok = Tokenizer.from_pretrained(os.path.join(out, "runs", "llava-seed1", "ckpt"))
    lengths = []
    for i in range(6):
        rec, _ = data.synthetic_record(miniature.TEST_SEED, "test", i)
        ids, _ = data.tokenize_conversation(tok, rec["conversations"][:1], "vicuna_v1")
        lengths.append(len(ids) - 1)
    assert llava["text_tokens"] == round(sum(lengths) / len(lengths))
    want = flops.llava(vit_cfg=ViTConfig.preset("tiny"), lm=LLMConfig.preset("tiny"),
                       text_tokens=llava["text_tokens"], vit_sdpa=True).macs / 1e6
    assert llava["first_token_mflops"] == pytest.approx(want, rel=1e-12)
    line = next(x for x in (out / "miniature.md").read_text().splitlines() if x.startswith(f"| {llava['label']} |"))
    assert line.split("|")[7].strip() == f"{want:.1f}"
    # INF-LLaVA without DEM costs exactly the DEM less (3 x 3 windows of the 8 x 8 grid at the ViT width)
    inf, add = (next(r for r in rows if r["key"] == k) for k in ("inf_llava", "inf_llava_dcm_add"))
    assert inf["text_tokens"] == add["text_tokens"]
    assert inf["first_token_mflops"] - add["first_token_mflops"] == pytest.approx(flops.dem(3, 8, ViTConfig.preset("tiny").width).macs / 1e6)


def test_trained_parameters(grid):
    _, rows = grid
    import hire
    lm, d = LLMConfig.preset("tiny"), ViTConfig.preset("tiny").width
    r, D, ff, L = hire.HIRE.STAGES["finetune"]["lora"]["rank"], lm.d_model, lm.d_ff, lm.n_layer
    lora = L * r * (4 * (D + D) + 2 * (D + ff) + (ff + D))  # q, k, v, o; gate, up; down
    projector = d * D + D + D * D + D
    assert next(x for x in rows if x["key"] == "llava")["params_trained"] == lora + projector
    pheye = {x["key"]: x["params_trained"] for x in rows if x["key"].startswith("pheye")}
    from pheye import Pheye, PheyeConfig
    from vit import lora_parameters
    local = sum(p.numel() for p in lora_parameters(Pheye(PheyeConfig.preset("tiny")).vit, "local"))
    # the local adapter, its LayerNorm and the 5 position rows; global-only has its connector LayerNorm instead
    assert pheye["pheye"] - pheye["pheye_global"] == local + 5 * d


def test_each_run_is_its_papers_alignment_then_instruction_stage(grid):
    """Two train.py calls per run: the alignment stage (ALIGN), then the instruction stage from its checkpoint."""
    out, rows = grid
    for key, _, model, overrides in miniature.GRID:
        run = os.path.join(out, "runs", f"{key}-seed1")
        first = train.read_train_state(os.path.join(run, "align", "ckpt"))
        second = train.read_train_state(os.path.join(run, "ckpt"))
        Model = getattr(__import__(train.MODELS[model][0]), train.MODELS[model][1])
        assert (first["stage"], first["step"]) == (miniature.ALIGN[train.MODELS[model][0]], 1)
        assert (second["stage"], second["step"]) == (list(Model.STAGES)[-1], 2)
        assert second["train_config"]["init"] == os.path.join(run, "align", "ckpt")


def test_scorer_counts_exact_matches_per_size(grid, monkeypatch):
    """An oracle that answers only the small-detail questions right scores 1 on small, 0 elsewhere."""
    out, _ = grid
    import hire
    tok = Tokenizer.from_pretrained(os.path.join(out, "runs", "llava-seed1", "ckpt"))
    records = [data.synthetic_record(miniature.TEST_SEED, "test", i)[0] for i in range(6)]
    queue = list(records)

    def oracle(self, pixels, idx, max_new_tokens=32, mask=None, temperature=0.0, eos_id=None):
        rows = []
        for _ in range(len(idx)):
            rec = queue.pop(0)
            answer = rec["conversations"][1]["value"] + ("" if rec["detail"] == "small" else "x")
            rows.append(tok.encode(" " + answer.upper() + ".") + [eos_id, 7, 7])  # case, blanks, stop ignored
        width = max(map(len, rows))
        return torch.tensor([row + [eos_id] * (width - len(row)) for row in rows])

    monkeypatch.setattr(hire.HIRE, "generate", oracle)
    res = miniature.evaluate_checkpoint(os.path.join(out, "runs", "llava-seed1"), "llava", 6, batch_size=4)
    assert res["accuracy"] == {"large": 0.0, "medium": 0.0, "small": 1.0, "overall": pytest.approx(1 / 3)}
    assert not queue


def test_learning_curve_runs_scale_both_stages_and_average_over_seeds(tmp_path):
    args = miniature.parse_args(["--align_iters=100", "--iters=300", f"--out={tmp_path}", "--curve"])
    run_dir, calls, _ = miniature.run_spec(args, "llava_s2", 2, 0.25)
    assert run_dir == os.path.join(str(tmp_path), "runs", "llava_s2-seed2-x0.25")
    assert [next(a for a in c if a.startswith("--max_iters=")) for c in calls] == ["--max_iters=25", "--max_iters=75"]
    assert miniature.run_spec(args, "llava_s2", 2)[0] == os.path.join(str(tmp_path), "runs", "llava_s2-seed2")
    acc = lambda small: {"overall": 0.5, "large": 0.8, "medium": 0.5, "small": small}
    budgets = (0.25, 0.5, 1)  # a subset: a budget with no runs is left out of the curve
    results = [dict(key=k, seed=s, budget=b, steps=round(400 * b), accuracy=acc(0.1 * s + b / 10))
               for k in miniature.CURVE_KEYS for s in (1, 2, 3) for b in budgets]
    curve = miniature.learning_curve(results)
    assert [(c["key"], c["steps"]) for c in curve] == [(k, round(400 * b)) for k in miniature.CURVE_KEYS
                                                       for b in budgets]
    first = curve[0]["accuracy"]["small"]  # seeds 0.1, 0.2, 0.3 + 0.025
    assert first["mean"] == pytest.approx(0.225) and first["std"] == pytest.approx(0.1)
    meta = dict(seeds=[1, 2, 3], answer_prior={"overall": 0.2, "large": 0.2, "medium": 0.2, "small": 0.2})
    assert "| LLaVA-1.5, 64 px | 100 | 50.0 ± 0.0 | 80.0 ± 0.0 | 50.0 ± 0.0 | 22.5 ± 10.0 |" in \
        miniature.curve_markdown(curve, meta)
    miniature.curve_figure(curve, meta, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_results_of_a_partial_run_keep_the_other_rows(tmp_path):
    """bench/probe.py --only KEY re-probes some rows: probe.json keeps every other (key, seed) row and takes the new
    ones in place of the old."""
    path = str(tmp_path / "probe.json")
    row = lambda key, seed, v: dict(key=key, seed=seed, probe={"small": v}, answers={"small": v})
    probe.save_results(path, [row("llava", 1, 0.1), row("hire", 1, 0.2), row("hire", 2, 0.3)])
    probe.save_results(path, [row("hire", 1, 0.9)])
    with open(path) as f:
        got = {(r["key"], r["seed"]): r["probe"]["small"] for r in json.load(f)}
    assert got == {("llava", 1): 0.1, ("hire", 1): 0.9, ("hire", 2): 0.3}


def test_probe_fits_separable_classes_and_pools_what_the_lm_reads(grid):
    """bench/probe.py: the logistic regression classifies separable held-out points exactly; the features are
    the mean and max over the tokens the LM reads (the projector's output for the LLaVA family, encode_image's
    for Pheye), of the split's own images."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 6
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 8, generator=g)
    predict = probe.fit_probe(x[:60], y[:60], 3)
    assert predict(x[60:]).eq(y[60:]).all()
    out, _ = grid
    for key, model in (("llava", "llava"), ("pheye", "pheye")):
        net, tok = miniature.load_run(os.path.join(out, "runs", f"{key}-seed1"), model)
        feats, answers, sizes = probe.pooled_features(net, model, tok, "test", 4, batch_size=3)
        ds = data.SyntheticDataset(tok, n=4, split="test", seed=miniature.TEST_SEED, image_size=net.config.image_size,
                                   others=0.0)
        with torch.no_grad():  # what the LM reads: encode_image for Pheye, the projector's output otherwise
            t = (net.encode_image if model == "pheye" else net.encode_images)(ds[3][0][None])[0]
        assert torch.allclose(feats[3], torch.cat([t.mean(0), t.amax(0)]), atol=1e-5)
        assert answers[3] == ds.record(3)["conversations"][1]["value"] and sizes == ["large", "medium", "small",
                                                                                      "large"]
