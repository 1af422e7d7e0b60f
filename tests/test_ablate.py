"""Ablation studies: equal-compute plans, the whole Figure 5 and Table 4 studies on tiny models, resume, claims; the eval extensions they use.

Everything runs on tiny random Llamas with a word-level tokenizer and tiny data files
written into tmp dirs (no downloads, no real data).
"""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.eval.report import EvalReport, ReportRow, make_report
from balcony.eval.stats import paired_difference
from balcony.eval.texts import distillation_metrics
from balcony.eval.variants import build_variants, exit_hidden_states
from balcony.metrics import kl_per_token
from balcony.studies import plan as study_plan
from balcony.studies import runner as study_runner
from balcony.studies.calibrate import steps_for_budget
from balcony.studies.claims import HELD, INCONCLUSIVE, NOT_HELD, judge_claims
from balcony.studies.plan import FIGURE5, TABLE4, differing_fields, study_configs
from balcony.studies.runner import run_study
from balcony.studies.scratch import ScratchSpec
from balcony.training.config import TrainConfig
from balcony.training.loop import build_training_model

lm_eval = pytest.importorskip("lm_eval")

WORDS = "hello world the a of and to is in it".split() + [f"w{i}" for i in range(40)]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny base with its tokenizer, a training corpus, held-out text and tiny task data."""
    root = tmp_path_factory.mktemp("ablate")
    tok = tiny_hf_tokenizer()
    tiny_base(vocab_size=len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n\n".join(_sentence(rng, rng.randint(20, 60)) for _ in range(160)) + "\n")
    (root / "held.txt").write_text("\n\n".join(_sentence(rng, 30) for _ in range(12)))
    data = root / "data"
    data.mkdir()
    with open(data / "valid.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"goal": _sentence(rng, 5), "sol1": _sentence(rng, 4), "sol2": _sentence(rng, 7)}) + "\n")
    (data / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(6)))
    with open(data / "lambada.jsonl", "w") as f:
        for _ in range(5):
            f.write(json.dumps({"text": _sentence(rng, 12)}) + "\n")
    return {"root": root, "base": root / "base", "corpus": root / "corpus.txt", "text": root / "held.txt",
            "task_data": f"piqa={data / 'valid.jsonl'},lambada={data / 'lambada.jsonl'}"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))


TINY = {"seq_len": 32, "batch_size": 4, "eval_tokens": 128, "lr": 3e-3, "warm_start_tokens": 2048, "loss_vocab": 40}


def _figure5(tiny, out, **kw):
    args = dict(output=out, model=str(tiny["base"]), exits=[2, 4], overrides=TINY, dataset=str(tiny["corpus"]), steps=4,
                text=str(tiny["text"]), text_tokens=512, eval_seq_len=64, progress=False, log=None)
    args.update(kw)
    return run_study("figure5", **args)


# ---------------------------------------------------------------- the plan


def test_each_variant_is_the_reference_with_one_factor_changed():
    base = TrainConfig.from_yaml("smollm2-default")
    configs = study_configs(FIGURE5, base, steps=7, output="out")
    ref = configs["balcony"]
    assert ref.warm_start is None and ref.loss_vocab is None and not ref.cache_features  # the levers some factor forbids
    assert ref.max_steps == 7 and ref.max_tokens == 7 * 8 * 256 and ref.lr == base.lr == 2e-3
    for v in FIGURE5.variants:
        diff = differing_fields(ref, configs[v.name])
        if v.keep_levers:
            assert diff == {"warm_start": (None, "lstsq"), "loss_vocab": (None, 4096), "cache_features": (False, True)}
        else:
            assert set(diff) == set(v.overrides), v.name
    assert configs["mlp"].output_dir.endswith("variants/mlp")
    with pytest.raises(ValueError, match="steps=0"):
        study_configs(FIGURE5, base, steps=0, output="out")
    with pytest.raises(ValueError, match="unknown variants"):
        study_plan.select_variants(FIGURE5, "mlp,nope")


def test_steps_for_budget_share_the_time_equally():
    assert steps_for_budget({"a": 1.0, "b": 2.0, "c": 3.0}, budget_minutes=1) == 10
    assert steps_for_budget({"a": 500.0}, budget_minutes=1) == 1
    with pytest.raises(ValueError, match="budget_minutes"):
        steps_for_budget({"a": 1.0}, budget_minutes=0)


# ---------------------------------------------------------------- Figure 5 end to end


def test_figure5_study_end_to_end_then_resume(tiny, tmp_path, monkeypatch):
    out = tmp_path / "study"
    result = _figure5(tiny, out)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["steps"] == 4 and set(plan["variants"]) == {v.name for v in FIGURE5.variants}
    for v in FIGURE5.variants:  # same steps and tokens for all
        metrics = json.loads((out / "variants" / v.name / "metrics.json").read_text())
        assert metrics["step"] == 4 and metrics["tokens"] == 4 * 4 * 32, v.name
    # Claim 3's second half: frozen variants serve the base exactly, trained bases do not.
    full = json.loads((out / "full_models.json").read_text())
    assert all(full[n]["exact"] for n in ("balcony", "random-init", "mlp", "attention", "kl-ce", "best-known"))
    assert not full["unfrozen"]["exact"] and not full["sorted"]["exact"] and full["sorted"]["max_abs_diff"] > 0
    # One evaluation over every variant, each row paired with the reference at its layer.
    report = result.report
    methods = {r.method for r in report.rows}
    assert methods == {"full", "early-exit"} | {v.name for v in FIGURE5.variants}
    assert report.row("unfrozen/XL").distill["kl"] > 0 and report.row("full").distill["kl"] == 0
    for r in report.rows:
        if r.method in ("balcony", "full"):
            assert not r.paired_text
            continue
        against = "full" if r.layer == 6 else f"balcony/{r.budget}"
        assert r.paired_text["kl"]["against"] == against, r.key
        assert r.paired_text["kl"]["diff"] == pytest.approx(r.distill["kl"] - report.row(against).distill["kl"], abs=1e-9)
    assert [c.claim for c in result.claims] == [1, 2, 3]
    assert all(c.verdict in (HELD, NOT_HELD, INCONCLUSIVE) for c in result.claims)
    assert result.figure.is_file() and result.figure.stat().st_size > 10_000
    md = result.markdown.read_text()
    assert "## (a) exit module and initialisation (claim 1)" in md and "**Claim 3:" in md and "Δ KL vs ref" in md
    assert json.loads((out / "claims.json").read_text())[0]["claim"] == 1

    # Rerun: every variant is skipped and the evaluation reused.
    calls = []
    monkeypatch.setattr(study_runner, "train", lambda cfg: calls.append(cfg.output_dir))
    monkeypatch.setattr(study_runner, "run_evaluation", lambda **kw: calls.append("eval"))
    again = _figure5(tiny, out)
    assert calls == [] and [c.verdict for c in again.claims] == [c.verdict for c in result.claims]
    with pytest.raises(ValueError, match="planned with 4 steps, not 5"):
        _figure5(tiny, out, steps=5)
    with pytest.raises(ValueError, match="other settings for variant 'balcony'.*lr"):
        _figure5(tiny, out, overrides={**TINY, "lr": 1e-3})


def test_an_interrupted_variant_resumes_from_its_checkpoint(tiny, tmp_path):
    out = tmp_path / "study"
    _figure5(tiny, out, variants="mlp", evaluate=False)
    run = out / "variants" / "mlp"
    finished = load_file(run / "balcony_exits.safetensors")
    # As after a kill at step 3 of 4: the last checkpoint is there, the final exits are not.
    for name in ("metrics.json", "balcony_exits.safetensors", "balcony_config.json"):
        (run / name).unlink()
    shutil.rmtree(out / "variants" / "balcony")
    _figure5(tiny, out, variants="mlp", evaluate=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    done = [r for r in log if r.get("event") == "done"]
    assert len(done) == 2 and done[-1]["step"] == 4
    assert [r["step"] for r in log if r.get("event") == "eval"] == [0, 3]  # the second run started at step 3
    resumed = load_file(run / "balcony_exits.safetensors")
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)  # the same exits as the uninterrupted run
    assert (out / "variants" / "balcony" / "metrics.json").is_file()  # the reference, deleted, was trained again


def test_the_full_model_check_compares_logits(tiny, tmp_path):
    """Each variant's served full model against the base, measured (not assumed from the recipe)."""
    tok = tiny_hf_tokenizer()
    base = tiny_base(vocab_size=len(tok))
    for name in ("frozen", "trained-same", "trained-changed"):
        BalconyModel(base, BalconyConfig(exit_layers=[2, 4])).save_pretrained(tmp_path / name)
    for name, scale in (("trained-same", 1.0), ("trained-changed", 1.5)):
        with torch.no_grad():
            base.model.layers[3].mlp.down_proj.weight.mul_(scale)
        base.save_pretrained(tmp_path / name / "base")
        tok.save_pretrained(tmp_path / name / "base")
    dirs = {n: tmp_path / n for n in ("frozen", "trained-same", "trained-changed")}
    trains = {"frozen": False, "trained-same": True, "trained-changed": True}
    got = study_runner.check_full_models(str(tiny["base"]), dirs, trains, "hello world w1 w2 the")
    assert got["frozen"] == {"exact": True, "max_abs_diff": 0.0, "trains_base": False}
    assert got["trained-same"]["exact"] and got["trained-same"]["max_abs_diff"] == 0.0  # a trained base that did not move is exact
    assert not got["trained-changed"]["exact"] and got["trained-changed"]["max_abs_diff"] > 1e-4
    (tmp_path / "frozen" / "base").mkdir()
    with pytest.raises(AssertionError, match="frozen variant 'frozen' saved a base model"):
        study_runner.check_full_models(str(tiny["base"]), {"frozen": tmp_path / "frozen"}, {"frozen": False}, "hello world w1 w2 the")


def test_runners_on_one_study_share_the_variants(tiny, tmp_path, monkeypatch):
    """A variant another runner holds is skipped, then waited for; nothing is trained twice at once."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "study"
    held = out / "variants" / "mlp"
    held.mkdir(parents=True)
    handle = open(held / ".study.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another runner" trains mlp
    trained, lines = [], []
    real = study_runner.train
    monkeypatch.setattr(study_runner, "train", lambda cfg: (trained.append(cfg.output_dir.rsplit("/", 1)[-1]), real(cfg)))

    def other_runner_stops(seconds):
        assert trained == ["balcony"]  # the free variant went first
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    monkeypatch.setattr(study_runner, "_sleep", other_runner_stops)
    _figure5(tiny, out, variants="mlp", evaluate=False, log=lines.append)
    assert trained == ["balcony", "mlp"]
    assert "[ablate] waiting for another runner to finish mlp" in lines
    assert json.loads((held / study_runner.WALL_FILE).read_text())["seconds"] > 0


def test_two_runners_evaluate_once(tiny, tmp_path, monkeypatch):
    pytest.importorskip("fcntl")
    import threading
    import time

    out = tmp_path / "study"
    _figure5(tiny, out, variants="mlp", evaluate=False)
    calls = []
    real = study_runner.run_evaluation

    def slow_evaluation(**kw):
        calls.append(kw["exits"])
        time.sleep(0.5)  # long enough for the other runner to reach the lock
        return real(**kw)

    monkeypatch.setattr(study_runner, "run_evaluation", slow_evaluation)
    results = [None, None]

    def runner(i):
        results[i] = _figure5(tiny, out, variants="mlp")

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # the second runner waited, then reused the first one's results
    assert [c.verdict for c in results[0].claims] == [c.verdict for c in results[1].claims]


# ---------------------------------------------------------------- Table 4 end to end


def test_sorted_pretraining_reads_through_the_shared_final_norm(tiny):
    cfg = TrainConfig(model=str(tiny["base"]), recipe="pretrain", exit_kind="norm", exit_layers=[2, 4])
    model, _ = build_training_model(cfg)
    assert all(model.exits[str(j)].norm is model.parts.norm for j in (2, 4))
    balcony, _ = build_training_model(TrainConfig(model=str(tiny["base"]), recipe="pretrain", exit_layers=[2, 4]))
    assert balcony.exits["2"].layer is not None and balcony.exits["2"].norm is not balcony.parts.norm


def test_table4_study_end_to_end(tiny, tmp_path):
    out = tmp_path / "scratch"
    result = run_study("table4", output=out, dataset=str(tiny["corpus"]), overrides={"seq_len": 32, "batch_size": 4, "eval_tokens": 128},
                       steps=3, text=str(tiny["text"]), text_tokens=512, eval_seq_len=64, scratch=ScratchSpec(layers=4, hidden=32, heads=4,
                       kv_heads=2, intermediate=64, vocab=300, max_positions=128), progress=False, log=None)
    spec = json.loads((out / "scratch-base" / "scratch_spec.json").read_text())
    assert spec["layers"] == 4 and spec["vocab"] == 300
    for name in ("balcony", "sorted"):
        cfg = json.loads((out / "variants" / name / "train_config.json").read_text())
        assert cfg["recipe"] == "pretrain" and cfg["exit_layers"] == [1, 2, 3] and cfg["max_steps"] == 3
        assert (out / "variants" / name / "base" / "model.safetensors").is_file()  # each trained its own base
    report = result.report
    assert {r.key for r in report.rows} == {"full", "balcony/S", "balcony/M", "balcony/L", "sorted/S", "sorted/M", "sorted/L", "sorted/XL"}
    nll = report.row("sorted/M").paired_text["nll"]
    assert nll["against"] == "balcony/M" and nll["diff"] == pytest.approx(report.row("sorted/M").distill["nll"] - report.row("balcony/M").distill["nll"])
    assert [c.claim for c in result.claims] == [4] and result.claims[0].verdict in (HELD, NOT_HELD, INCONCLUSIVE)
    assert result.figure.is_file() and "Claim 4" in result.markdown.read_text()


# ---------------------------------------------------------------- claims


def _row(method, budget, layer, kl=None, agreement=None, nll=None):
    pt = {}
    for name, p in (("kl", kl), ("agreement", agreement), ("nll", nll)):
        if p is not None:
            pt[name] = {"diff": p[0], "se": p[1], "n": 100, "wins": 0, "losses": 0, "against": f"balcony/{budget}"}
    return ReportRow(key=f"{method}/{budget}", method=method, budget=budget, layer=layer, params=1, paired_text=pt)


def _report(rows):
    ref = [ReportRow(key=f"balcony/{b}", method="balcony", budget=b, layer=j, params=1) for b, j in (("S", 2), ("M", 4))]
    full = ReportRow(key="full", method="full", budget="XL", layer=6, params=1)
    return EvalReport(rows=[full, *ref, *rows], tasks=[], shown={}, percent={})


def test_claim_verdicts_follow_the_paired_standard_errors():
    worse = {"kl": (0.5, 0.1), "agreement": (-5.0, 1.0)}  # the variant is worse on both, by 5 SE
    rows = [_row(v, b, j, **worse) for v in ("random-init", "mlp", "attention") for b, j in (("S", 2), ("M", 4))]
    assert judge_claims(_report(rows), FIGURE5)[0].verdict == HELD
    rows[-1] = _row("attention", "M", 4, kl=(0.05, 0.1), agreement=(-1.0, 1.0))  # within noise at one budget
    assert judge_claims(_report(rows), FIGURE5)[0].verdict == INCONCLUSIVE
    rows[-1] = _row("attention", "M", 4, kl=(-0.5, 0.1), agreement=(5.0, 1.0))  # the attention exit wins there
    claim = judge_claims(_report(rows), FIGURE5)[0]
    assert claim.verdict == NOT_HELD and "attention/M" in claim.reason
    # Claim 2 is about no gain: KL+CE better beyond noise refutes it, worse or tied keeps it.
    assert judge_claims(_report([_row("kl-ce", "S", 2, kl=(0.2, 0.1), agreement=(-0.1, 1.0))]), FIGURE5)[0].verdict == HELD
    assert judge_claims(_report([_row("kl-ce", "S", 2, kl=(-0.3, 0.1), agreement=(3.0, 1.0))]), FIGURE5)[0].verdict == NOT_HELD
    # Claim 3 needs the full-model check too.
    rows3 = [_row(v, b, j, **worse) for v in ("unfrozen", "sorted") for b, j in (("S", 2), ("M", 4))]
    exact = {"balcony": {"exact": True, "max_abs_diff": 0.0, "trains_base": False},
             "unfrozen": {"exact": False, "max_abs_diff": 1.0, "trains_base": True}, "sorted": {"exact": False, "max_abs_diff": 2.0, "trains_base": True}}
    assert judge_claims(_report(rows3), FIGURE5, exact)[0].verdict == HELD
    assert judge_claims(_report(rows3), FIGURE5, None)[0].verdict == INCONCLUSIVE
    broken = {**exact, "balcony": {"exact": False, "max_abs_diff": 1e-3, "trains_base": False}}
    assert judge_claims(_report(rows3), FIGURE5, broken)[0].verdict == NOT_HELD
    # Claim 4 is decided by NLL alone.
    rows4 = [_row("sorted", b, j, nll=(0.2, 0.05), kl=(-1.0, 0.1)) for b, j in (("S", 2), ("M", 4))]
    assert judge_claims(_report(rows4), TABLE4)[0].verdict == HELD


# ---------------------------------------------------------------- eval extensions the study uses


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory):
    """The tiny base with exits, and a baseline folder holding exits on its own (perturbed) base."""
    root = tmp_path_factory.mktemp("bases")
    tok = tiny_hf_tokenizer()
    base = tiny_base(vocab_size=len(tok))
    model = BalconyModel(base, BalconyConfig(exit_layers=[2, 4]))
    other_base = tiny_base(vocab_size=len(tok))
    with torch.no_grad():
        for p in other_base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trained = BalconyModel(other_base, BalconyConfig(exit_layers=[2, 4], exit_kind="norm"))
    trained.save_pretrained(root / "trained")
    other_base.save_pretrained(root / "trained" / "base")
    tok.save_pretrained(root / "trained" / "base")  # as training writes it
    return model, tok, root / "trained", other_base


def test_a_baseline_with_its_own_base_is_scored_on_it(two_bases):
    model, tok, trained_dir, other_base = two_bases
    variants = build_variants(model, early_exit=False, baselines={"unfrozen": str(trained_dir)})
    assert [v.key for v in variants] == ["full", "balcony/S", "balcony/M", "unfrozen/XL", "unfrozen/S", "unfrozen/M"]
    ids = torch.tensor([[5, 9, 13, 21, 8, 30, 2, 7]])
    hidden = exit_hidden_states(variants, ids)
    own = variants[3].model
    assert own.base is not model.base
    with torch.no_grad():
        assert torch.allclose(own.parts.lm_head(hidden["unfrozen/XL"]), other_base(ids).logits, atol=1e-5)
        assert torch.allclose(own.parts.lm_head(hidden["unfrozen/S"]), own(ids, exit=2).logits, atol=1e-5)
        assert torch.allclose(model.parts.lm_head(hidden["balcony/M"]), model(ids, exit=4).logits, atol=1e-5)


def test_text_windows_pair_and_average_to_the_totals(two_bases):
    model, tok, trained_dir, other_base = two_bases
    variants = build_variants(model, early_exit=True, baselines={"unfrozen": str(trained_dir)})
    rng = random.Random(3)
    texts = [_sentence(rng, rng.randint(8, 40)) for _ in range(9)]
    got = distillation_metrics(variants, tok, texts, seq_len=16, max_tokens=400, batch_size=3, per_window=True)
    plain = distillation_metrics(variants, tok, texts, seq_len=16, max_tokens=400, batch_size=3)
    for key, scores in got.items():
        w = scores["windows"]
        assert len(w["kl"]) == len(w["agreement"]) == len(w["nll"]) > 9
        for name in ("kl", "agreement", "nll"):
            assert sum(w[name]) / len(w[name]) == pytest.approx(scores[name], rel=1e-6, abs=1e-9), (key, name)
            assert scores[name] == pytest.approx(plain[key][name], rel=1e-6, abs=1e-9)
    # The trained base is read through its own head: KL of its full model against the base, by hand.
    ids = tok(texts[0])["input_ids"][:16]
    with torch.no_grad():
        by_hand = kl_per_token(other_base(torch.tensor([ids])).logits, model.base(torch.tensor([ids])).logits).mean()
    one = distillation_metrics([variants[0], variants[-3]], tok, [texts[0]], seq_len=16, max_tokens=len(ids))
    assert one["unfrozen/XL"]["kl"] == pytest.approx(float(by_hand), rel=1e-4)
    report = make_report(variants, None, got, paired_against="balcony")
    row = report.row("early-exit/S")
    assert row.paired_text["agreement"]["against"] == "balcony/S"
    expected = paired_difference(got["early-exit/S"]["windows"]["agreement"], got["balcony/S"]["windows"]["agreement"])
    assert row.paired_text["agreement"]["diff"] == pytest.approx(100 * expected["diff"])
    assert row.paired_text["agreement"]["se"] == pytest.approx(100 * expected["se"])
    assert "windows" not in row.distill and not report.row("balcony/S").paired_text
    assert "paired: each row minus 'balcony'" in report.to_text()
    with pytest.raises(ValueError, match="paired_against='nope' is not one of the evaluated methods"):
        make_report(variants, None, got, paired_against="nope")


def test_ablate_and_eval_command_lines_with_benchmarks(tiny, tmp_path, capsys, local_tasks_only):
    from balcony.cli import main

    out = tmp_path / "cli"
    rc = main(["ablate", "--study", "figure5", "--output", str(out), "--model", str(tiny["base"]), "--exits", "2,4", "--dataset", str(tiny["corpus"]),
               "--set", "seq_len=32,batch_size=4,eval_tokens=128,loss_vocab=40,warm_start_tokens=2048", "--steps", "2", "--variants", "unfrozen",
               "--text", str(tiny["text"]), "--text-tokens", "256", "--task-data", tiny["task_data"], "--tasks", "lambada", "--limit", "3",
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "claim 3:" in printed and "figure5.md" in printed
    report = EvalReport.load(out / "eval")
    task = report.tasks[0]
    for key, against in (("unfrozen/S", "balcony/S"), ("unfrozen/XL", "full"), ("early-exit/M", "balcony/M")):
        p = report.row(key).paired[task]["acc"]
        assert p["against"] == against and p["n"] == 3, key  # benchmarks paired item by item with the reference too
    assert "| Δ avg vs ref |" in (out / "figure5.md").read_text()
    rc = main(["eval", "--model", str(tiny["base"]), "--exits", str(out / "variants" / "balcony"), "--baseline", f"unfrozen={out / 'variants' / 'unfrozen'}",
               "--text", str(tiny["text"]), "--text-tokens", "256", "--paired-against", "unfrozen", "--output", str(tmp_path / "eval"), "--no-plot"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "each row minus 'unfrozen'" in printed and re.search(r"\nunfrozen +XL +6 ", printed)
    assert main(["ablate", "--study", "figure9", "--output", str(out)]) == 2
    assert "study 'figure9' is not one of figure5, table4" in capsys.readouterr().err
    assert main(["ablate", "--output", str(tmp_path / "none"), "--steps", "2"]) == 2
    assert "nothing to evaluate on" in capsys.readouterr().err
