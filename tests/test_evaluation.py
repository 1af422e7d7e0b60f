"""Evaluation: the lm-eval adapter, the shared multi-budget scorer, distillation metrics, the table and plots.

Everything runs on a tiny random Llama with a word-level tokenizer, and tiny task
files written into tmp dirs (no downloads, no real data).
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil

import pytest
import torch
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from balcony import eval as evaluation  # noqa: E402
from balcony.eval.harness import evaluate_tasks  # noqa: E402
from balcony.eval.lm_eval_model import BalconyLM  # noqa: E402
from balcony.eval.plots import match_speedup, read_bench  # noqa: E402
from balcony.eval.run import run_evaluation  # noqa: E402
from balcony.eval.tasks import parse_task_data, prepare_tasks  # noqa: E402
from balcony.eval.texts import (
    distillation_metrics,  # noqa: E402
    load_texts,  # noqa: E402
)
from balcony.eval.variants import build_variants, exit_hidden_states  # noqa: E402
from balcony.metrics import kl_per_token  # noqa: E402

WORDS = "hello world the a of and to is in it".split() + [f"w{i}" for i in range(40)]
N_LAYERS = 6


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _perturb(model: BalconyModel, seed: int) -> None:
    """Make exits differ from a fresh copy of the last layer, so loading them visibly matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.exits.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny base (with tokenizer), trained-looking exits at 2 and 4, a baseline at 3, and task data."""
    root = tmp_path_factory.mktemp("evaluation")
    tok = tiny_hf_tokenizer()
    base = tiny_base(vocab_size=len(tok))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = BalconyModel(base, BalconyConfig(exit_layers=[2, 4]))
    _perturb(model, 1)
    model.save_pretrained(root / "exits")
    other = BalconyModel(base, BalconyConfig(exit_layers=[3], exit_kind="mlp"))
    _perturb(other, 2)
    other.save_pretrained(root / "other-exits")

    rng = random.Random(0)
    data = root / "data"
    data.mkdir()
    with open(data / "valid.jsonl", "w") as f:  # PIQA without labels: they sit in valid-labels.lst
        for _ in range(6):
            f.write(json.dumps({"goal": _sentence(rng, 5), "sol1": _sentence(rng, 4), "sol2": _sentence(rng, 7)}) + "\n")
    (data / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(6)))
    with open(data / "arc.jsonl", "w") as f:
        for i in range(5):
            choices = [{"text": _sentence(rng, 2 + k), "label": label} for k, label in enumerate("ABCD")]
            f.write(json.dumps({"id": f"q{i}", "question": {"stem": _sentence(rng, 6), "choices": choices}, "answerKey": "ABCD"[i % 4]}) + "\n")
    with open(data / "lambada.jsonl", "w") as f:
        for _ in range(5):
            f.write(json.dumps({"text": _sentence(rng, 12)}) + "\n")
    (data / "text.txt").write_text("\n\n".join(_sentence(rng, 40) for _ in range(4)))
    spec = f"piqa={data / 'valid.jsonl'},arc_easy={data / 'arc.jsonl'},lambada={data / 'lambada.jsonl'}"
    tasks_dir = prepare_tasks(spec, root / "tasks")
    return {"root": root, "base": root / "base", "exits": root / "exits", "other": root / "other-exits", "data": data, "spec": spec, "tasks": tasks_dir}


@pytest.fixture(scope="module")
def loaded(tiny):
    """(BalconyModel with the saved exits, tokenizer), loaded once."""
    model, tok, trained = evaluation.load_balcony(str(tiny["base"]), str(tiny["exits"]))
    assert trained
    return model, tok


def _requests(lm, pairs):
    return [Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=i) for i, (c, x) in enumerate(pairs)]


PAIRS = [("hello world the", " a of"), ("w1 w2 w3 w4 w5", " w6"), ("it is in", " the w7 w8 w9"), ("", "hello w3 w4")]


def _direct_loglikelihood(model: BalconyModel, lm, context: str, continuation: str, exit) -> tuple[float, bool]:
    """Sum of log p(continuation | context) from one plain forward at `exit`."""
    if context:
        ctx, cont = lm._encode_pair(context, continuation)
    else:
        ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, exit=exit).logits.float(), -1)[0]
    pred = logp[len(ctx) - 1 : -1]
    target = torch.tensor(cont)
    return float(pred.gather(-1, target[:, None]).sum()), bool((pred.argmax(-1) == target).all())


# ------------------------------------------------------------------ adapter
def test_adapter_matches_direct_forward_at_its_budget(tiny, loaded):
    model, _ = loaded
    lm = BalconyLM(pretrained=str(tiny["base"]), exits=str(tiny["exits"]), budget="S", device="cpu", batch_size=3)
    assert lm.exit_layer == 2 and lm.budget_name == "S"
    got = lm.loglikelihood(_requests(lm, PAIRS))
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
        want_ll, want_greedy = _direct_loglikelihood(model, lm, ctx, cont, "S")
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy
    # A layer number is the same budget; another budget gives other numbers.
    lm.set_budget(2)
    assert [x[0] for x in lm.loglikelihood(_requests(lm, PAIRS))] == pytest.approx([x[0] for x in got], abs=1e-5)
    lm.set_budget("M")
    assert lm.exit_layer == 4
    assert lm.loglikelihood(_requests(lm, PAIRS[:1]))[0][0] != pytest.approx(got[0][0], abs=1e-3)

    # Rolling loglikelihood (perplexity tasks) and generation run at the budget too.
    lm.set_budget("S")
    text = "hello world the a of and to is in it w1 w2"
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = torch.tensor([[lm.prefix_token_id] + lm.tok_encode(text)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, exit="S").logits.float(), -1)[0, :-1]
    assert rolling == pytest.approx(float(logp.gather(-1, ids[0, 1:, None]).sum()), abs=1e-4)

    prompt = "hello world the"
    out = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["w39"], "max_gen_toks": 5, "do_sample": False}), 0)])[0]
    ids = torch.tensor([lm.tok_encode(prompt)])
    want = model.generate(ids, exit="S", max_new_tokens=5, eos_token_id=lm.eot_token_id)
    want_text = lm.tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True).split("w39")[0]
    assert out == want_text

    # Batched prompts of different lengths (left-padded by the harness) decode as they do alone.
    prompts = ["hello world the a of and", "w5", "it is"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["w39"], "max_gen_toks": 4}), i) for i, p in enumerate(prompts)]
    alone = [lm.generate_until([r])[0] for r in reqs]
    assert lm.generate_until(reqs) == alone


def test_adapter_full_budget_equals_the_harness_hf_model(tiny):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny["base"]), device="cpu", dtype="float32", batch_size=3)
    ours = BalconyLM(pretrained=str(tiny["base"]), exits=str(tiny["exits"]), budget="XL", device="cpu", batch_size=3)
    want = hf.loglikelihood(_requests(hf, PAIRS))
    got = ours.loglikelihood(_requests(ours, PAIRS))
    assert [g for _, g in got] == [g for _, g in want]
    assert [x for x, _ in got] == pytest.approx([x for x, _ in want], abs=1e-5)
    text = [Instance("loglikelihood_rolling", {}, ("w1 w2 w3 hello world the a of",), 0)]
    assert ours.loglikelihood_rolling(text) == pytest.approx(hf.loglikelihood_rolling(text), abs=1e-5)


def test_registered_model_runs_through_simple_evaluate(tiny, loaded):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tiny["tasks"]), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="balcony",
        model_args=f"pretrained={tiny['base']},exits={tiny['exits']},budget=S",
        tasks=["balcony_piqa", "balcony_lambada"],
        task_manager=manager,
        device="cpu",
        batch_size=4,
        limit=4,
        bootstrap_iters=0,
    )
    assert res["config"]["balcony_budget"] == "S" and res["config"]["balcony_exit_layer"] == 2
    assert res["n-samples"]["balcony_piqa"]["effective"] == 4
    # The shared engine (one forward for every variant) gives the same numbers for balcony/S.
    model, tok = loaded
    variants = build_variants(model, early_exit=False, budgets=["S"])
    shared = evaluate_tasks(variants, tok, ["balcony_piqa", "balcony_lambada"], task_manager=manager, limit=4, batch_size=4)
    for task in ("balcony_piqa", "balcony_lambada"):
        for metric, value in shared.scores["balcony/S"][task].items():
            assert res["results"][task][f"{metric},none"] == pytest.approx(value, rel=1e-5)


def test_budget_and_exit_kind_arguments(tiny):
    with pytest.raises(ValueError, match="unknown budget 'XXL'"):
        BalconyLM(pretrained=str(tiny["base"]), exits=str(tiny["exits"]), budget="XXL", device="cpu")
    with pytest.raises(ValueError, match="exit layer 3 has no Balcony module"):
        BalconyLM(pretrained=str(tiny["base"]), exits=str(tiny["exits"]), budget=3, device="cpu")
    # Plain early exit at the exits' layers; fresh exits (with a warning) without an exits dir.
    norm = BalconyLM(pretrained=str(tiny["base"]), exits=str(tiny["exits"]), exit_kind="norm", budget="S", device="cpu")
    assert norm.balcony.config.exit_kind == "norm" and norm.exit_layer == 2
    with pytest.warns(UserWarning, match="untrained"):
        fresh = BalconyLM(pretrained=str(tiny["base"]), exit_layers="1;3", budget=3, device="cpu")
    assert fresh.balcony.exit_layers == [1, 3]
    with pytest.raises(ValueError, match="exit_layers='1,x'"):
        BalconyLM(pretrained=str(tiny["base"]), exit_layers="1,x", device="cpu")


@pytest.mark.slow
def test_lm_eval_command_line_wrapper(tiny, tmp_path, monkeypatch, capsys):
    """`python -m balcony.lm_eval_model ...` is the lm_eval CLI with `balcony` registered."""
    from balcony.eval.lm_eval_model import main

    monkeypatch.chdir(tmp_path)
    main([
        "--model", "balcony", "--model_args", f"pretrained={tiny['base']},exits={tiny['exits']},budget=M",
        "--tasks", "balcony_lambada", "--include_path", str(tiny["tasks"]), "--limit", "3", "--device", "cpu",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert "balcony_lambada" in out and "perplexity" in out


# ------------------------------------------------------------ shared scoring
def test_one_pass_feeds_every_variant_exactly(tiny, loaded):
    model, _ = loaded
    variants = build_variants(model, baselines={"mlp": str(tiny["other"])})
    assert [v.key for v in variants] == ["full", "balcony/S", "balcony/M", "early-exit/S", "early-exit/M", "mlp/S"]
    ids = torch.randint(4, 50, (2, 9))
    hidden = exit_hidden_states(variants, ids)
    head = model.parts.lm_head
    with torch.no_grad():
        assert torch.allclose(head(hidden["full"]), model.base(ids).logits, atol=1e-5)
        for v in variants[1:]:
            assert torch.allclose(head(hidden[v.key]), v.model(ids, exit=v.layer).logits, atol=1e-5), v.key
    # Early exit is the final norm on the layer-j state: the exit module holds a norm only.
    assert variants[3].model.exits["2"].layer is None


def test_shared_engine_equals_the_harness_loop(tiny, loaded):
    model, tok = loaded
    variants = build_variants(model, budgets=["S"])
    assert [v.key for v in variants] == ["full", "balcony/S", "early-exit/S"]
    tasks = ["balcony_arc_easy", "balcony_lambada"]
    kwargs = dict(include_path=[str(tiny["tasks"])], batch_size=3)
    shared = evaluate_tasks(variants, tok, tasks, engine="shared", **kwargs)
    harness = evaluate_tasks(variants, tok, tasks, engine="harness", **kwargs)
    assert shared.samples == {"balcony_arc_easy": 5, "balcony_lambada": 5}
    for v in variants:
        for task in tasks:
            assert shared.scores[v.key][task] == pytest.approx(harness.scores[v.key][task], rel=1e-5), (v.key, task)


# -------------------------------------------------------------- distillation
def test_distillation_metrics(tiny, loaded):
    model, tok = loaded
    base = model.base
    norm = BalconyModel(base, BalconyConfig(exit_layers=[3, N_LAYERS], exit_kind="norm"))
    variants = build_variants(model, baselines={"norm": norm})
    texts = [_sentence(random.Random(1), 30), _sentence(random.Random(2), 17)]
    got = distillation_metrics(variants, tok, texts, seq_len=16, batch_size=2, chunk_tokens=7)
    # A norm exit after the last layer is the full model: KL 0, agreement 1, same perplexity.
    last = got[f"norm/{norm.config.budget_names[1]}"]
    assert last["kl"] == pytest.approx(0.0, abs=1e-6) and last["agreement"] == 1.0
    assert last["ppl"] == pytest.approx(got["full"]["ppl"], rel=1e-5)
    # Windows of 16 tokens: 30 -> 16 + 14, 17 -> 16 (+ a 1-token tail that predicts nothing, dropped).
    assert got["balcony/S"]["kl"] > 0 and got["balcony/S"]["tokens"] == got["full"]["tokens"] == 16 + 14 + 16

    # Against a direct computation on one unpadded window.
    one = distillation_metrics(variants, tok, texts[:1], seq_len=64)
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        teacher = base(ids).logits[0]
        student = model(ids, exit="S").logits[0]
    assert one["balcony/S"]["kl"] == pytest.approx(float(kl_per_token(student, teacher).mean()), rel=1e-4)
    agree = float((student.argmax(-1) == teacher.argmax(-1)).float().mean())
    assert one["balcony/S"]["agreement"] == pytest.approx(agree)
    nll = -torch.log_softmax(student, -1)[:-1].gather(-1, ids[0, 1:, None]).mean()
    assert one["balcony/S"]["ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)
    full_nll = -torch.log_softmax(teacher, -1)[:-1].gather(-1, ids[0, 1:, None]).mean()  # the base's own perplexity
    assert one["full"]["ppl"] == pytest.approx(float(full_nll.exp()), rel=1e-4)


def test_load_texts(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"content": "two"}\n')
    assert load_texts(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.txt").write_text("first para\nstill first\n\nsecond\n")
    assert load_texts(str(tmp_path / "b.txt")) == ["first para\nstill first", "second"]
    (tmp_path / "c.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match="line 1 has no 'text' field"):
        load_texts(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(tmp_path / "missing.txt")


# ---------------------------------------------------------- table and plots
def test_eval_command_writes_table_and_plots(tiny, tmp_path, capsys, local_tasks_only):
    from balcony.cli import main

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"budgets": [{"budget": "S", "layer": 2, "speedup": 2.4}, {"budget": "M", "speedup": 1.4}, {"budget": "XL", "speedup": 1.0}]}))
    out = tmp_path / "out"
    rc = main([
        "eval", "--model", str(tiny["base"]), "--exits", str(tiny["exits"]), "--task-data", tiny["spec"],
        "--tasks", "piqa,arc_easy,lambada", "--text", str(tiny["data"] / "text.txt"), "--baseline", f"mlp={tiny['other']}",
        "--limit", "4", "--batch-size", "4", "--seq-len", "32", "--output", str(out), "--bench-json", str(bench), "--device", "cpu",
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "drop vs full" in printed and "piqa acc %" in printed and "KL(full||exit)" in printed

    data = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert list(rows) == ["full", "balcony/S", "balcony/M", "early-exit/S", "early-exit/M", "mlp/S"]
    assert data["tasks"] == ["balcony_piqa", "balcony_arc_easy", "balcony_lambada"]
    assert data["meta"]["task_samples"] == {"balcony_piqa": 4, "balcony_arc_easy": 4, "balcony_lambada": 4}
    full_avg = rows["full"]["average"]
    for key, r in rows.items():
        assert r["average"] == pytest.approx(sum(r["scores"].values()) / 3)
        assert r["drop"] == pytest.approx(r["average"] - full_avg)
        assert set(r["distill"]) >= {"kl", "agreement", "ppl"}
    assert all(r["distill"]["kl"] > 0 for k, r in rows.items() if k != "full")  # every exit differs from the full model
    assert rows["balcony/S"]["params"] < rows["balcony/M"]["params"] < rows["full"]["params"]
    assert rows["early-exit/S"]["params"] < rows["balcony/S"]["params"]
    assert rows["balcony/S"]["speedup"] == 2.4 and rows["balcony/M"]["speedup"] == 1.4 and rows["early-exit/S"]["speedup"] is None
    # Scores are lm-eval's numbers in percent.
    assert rows["balcony/M"]["scores"]["balcony_piqa"] == pytest.approx(100 * rows["balcony/M"]["metrics"]["balcony_piqa"]["acc"])
    assert "perplexity" in rows["full"]["metrics"]["balcony_lambada"]
    # Each exit against plain early exit at its layer, item by item (the same 4 items per task).
    for key in ("balcony/S", "balcony/M"):
        twin = "early-exit/" + rows[key]["budget"]
        for task in ("balcony_piqa", "balcony_arc_easy"):
            for name in ("acc", "acc_norm"):
                p = rows[key]["paired"][task][name]
                diff = 100 * (rows[key]["metrics"][task][name] - rows[twin]["metrics"][task][name])
                assert p["against"] == twin and p["n"] == 4 and p["diff"] == pytest.approx(diff)
                assert p["se"] >= 0 and p["wins"] + p["losses"] <= 4
                assert (p["wins"] - p["losses"]) * 25 == pytest.approx(p["diff"])  # 0/1 items: each win or loss is 25 points
        assert set(rows[key]["paired"]["balcony_lambada"]) == {"acc"}  # perplexity is not a mean over items
    # mlp/S exits at layer 3, where there is no early-exit row to pair with.
    assert rows["mlp/S"]["layer"] == 3 and all(not rows[k]["paired"] for k in ("full", "early-exit/S", "early-exit/M", "mlp/S"))
    assert "paired: each row minus plain early exit" in printed

    table = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [(r["method"], r["budget"]) for r in table] == [("full", "XL"), ("balcony", "S"), ("balcony", "M"), ("early-exit", "S"), ("early-exit", "M"), ("mlp", "S")]
    assert float(table[1]["drop"]) == pytest.approx(float(table[1]["average"]) - float(table[0]["average"]))
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| method | budget | layer | params") and len(md) == 2 + 6
    for name in ("accuracy_vs_speedup.png", "accuracy_vs_params.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert (out / "tasks" / "balcony_piqa.yaml").is_file()  # the prepared tasks, reusable with lm_eval
    assert evaluation.EvalReport.load(out).to_text() in printed


def test_distillation_only_report_and_plot(tiny, loaded, tmp_path):
    report = run_evaluation(model=str(tiny["base"]), exits=str(tiny["exits"]), text=str(tiny["data"] / "text.txt"), early_exit=False, budgets="S", output=tmp_path, log=None)
    assert [r.key for r in report.rows] == ["full", "balcony/S"]
    assert report.tasks == [] and "avg" not in report.columns()
    assert (tmp_path / "accuracy_vs_params.png").is_file()


# ---------------------------------------------------------------- bad input
def test_bad_inputs_are_named(tiny, tmp_path, local_tasks_only):
    base, exits = str(tiny["base"]), str(tiny["exits"])
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        run_evaluation(model=base, exits=exits, tasks="no_such_task", log=None)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        run_evaluation(model=base, exits=exits, task_data=f"piqa={tmp_path / 'nowhere.jsonl'}", log=None)
    with pytest.raises(ValueError, match="unknown offline task 'hellaswag'"):
        parse_task_data(f"hellaswag={tiny['data'] / 'arc.jsonl'}")
    with pytest.raises(ValueError, match="task 'balcony_piqa' reads local data"):
        run_evaluation(model=base, exits=exits, tasks="balcony_piqa", log=None)
    with pytest.raises(ValueError, match="unknown budget 'XXL'"):
        run_evaluation(model=base, exits=exits, text=["hello world the a"], budgets="XXL", log=None)
    with pytest.raises(FileNotFoundError, match="no-such-exits"):
        run_evaluation(model=base, exits=exits, text=["hello world"], baselines=f"b={tmp_path / 'no-such-exits'}", log=None)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_evaluation(model=base, exits=exits, log=None)
    # PIQA without labels and without a labels file; ARC data that is not ARC.
    lonely = tmp_path / "piqa.jsonl"
    shutil.copy(tiny["data"] / "valid.jsonl", lonely)
    with pytest.raises(FileNotFoundError, match="piqa-labels.lst"):
        prepare_tasks({"piqa": lonely}, tmp_path / "t")
    with pytest.raises(ValueError, match="does not look like arc_easy data: its first record lacks question, answerKey"):
        prepare_tasks({"arc_easy": tiny["data"] / "lambada.jsonl"}, tmp_path / "t")
    bench = tmp_path / "bench.json"
    bench.write_text('{"budgets": [{"note": "nothing"}]}')
    with pytest.raises(ValueError, match="holds no usable entries"):
        run_evaluation(model=base, exits=exits, text=["hello world"], bench_json=bench, log=None)


def test_paired_difference():
    p = evaluation.paired_difference([1, 1, 0, 1], [1, 0, 0, 0])
    assert p["diff"] == 0.5 and p["n"] == 4 and (p["wins"], p["losses"]) == (2, 0)
    assert p["se"] == pytest.approx((1 / 3 / 4) ** 0.5)  # std (ddof 1) of the differences over sqrt(n)
    same = evaluation.paired_difference([0, 1, 1], [0, 1, 1])
    assert same["diff"] == 0 and same["se"] == 0 and same["wins"] == same["losses"] == 0
    # Two variants that trade wins: a zero mean difference with a non-zero standard error.
    swap = evaluation.paired_difference([1, 0] * 50, [0, 1] * 50)
    assert swap["diff"] == 0 and swap["se"] > 0.09 and swap["wins"] == swap["losses"] == 50
    with pytest.raises(ValueError, match="3 and 2 values"):
        evaluation.paired_difference([1, 0, 1], [1, 0])


def test_read_bench_is_tolerant(tmp_path):
    def read(obj):
        path = tmp_path / "b.json"
        path.write_text(json.dumps(obj))
        return read_bench(path)

    pts = read({"budgets": [{"budget": "S", "layer": 14, "speedup": 1.9}, {"name": "M", "speed_up": 1.5}, {"budget": "S", "method": "early-exit", "speedup": 2.1}]})
    assert match_speedup(pts, "balcony", "S", 14) == 1.9 and match_speedup(pts, "balcony", "M", 17) == 1.5
    assert match_speedup(pts, "early-exit", "S", 14) == 2.1 and match_speedup(pts, "early-exit", "M", 17) is None
    pts = read([{"budget": "S", "tokens_per_s": 300.0}, {"budget": "XL", "tokens_per_s": 100.0}])
    assert match_speedup(pts, "balcony", "S", 14) == pytest.approx(3.0)
    pts = read({"budgets": {"S": 2.0, "M": {"latency_ms": 5.0}, "XL": {"latency_ms": 10.0}}})
    assert match_speedup(pts, "balcony", "S", 1) == 2.0 and match_speedup(pts, "balcony", "M", 2) == pytest.approx(2.0)
    pts = read({"results": [{"exit_layer": 20, "speedup": 1.3}]})
    assert match_speedup(pts, "balcony", "L", 20) == 1.3


def test_prepared_tasks_follow_lm_eval_prompts(tiny):
    from lm_eval.tasks import TaskManager

    loaded_tasks = TaskManager(include_path=str(tiny["tasks"]), include_defaults=False).load(["balcony_piqa", "balcony_arc_easy", "balcony_lambada"])["tasks"]
    piqa, arc, lambada = (loaded_tasks[k] for k in ("balcony_piqa", "balcony_arc_easy", "balcony_lambada"))
    doc = list(piqa.test_docs())[1]
    assert piqa.doc_to_text(doc) == f"Question: {doc['goal']}\nAnswer:"
    assert piqa.doc_to_choice(doc) == [doc["sol1"], doc["sol2"]] and piqa.doc_to_target(doc) == 1
    raw = json.loads((tiny["data"] / "arc.jsonl").read_text().splitlines()[2])
    doc = list(arc.test_docs())[2]
    assert arc.doc_to_text(doc) == f"Question: {raw['question']['stem']}\nAnswer:"
    assert arc.doc_to_choice(doc) == [c["text"] for c in raw["question"]["choices"]] and arc.doc_to_target(doc) == 2
    doc = list(lambada.test_docs())[0]
    words = doc["text"].split(" ")
    assert lambada.doc_to_text(doc) == " ".join(words[:-1]) and lambada.doc_to_target(doc) == " " + words[-1]
