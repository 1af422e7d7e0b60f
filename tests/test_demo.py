"""The main job (`balcony demo`) end to end on a tiny model: train, answer at every budget, evaluate."""

from __future__ import annotations

import json
import random

from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony.cli import main

WORDS = "hello world the a of and to is in it".split() + [f"w{i}" for i in range(40)]


def test_demo_trains_answers_and_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BALCONY_TASK_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_base(vocab_size=54)
    base.save_pretrained(tmp_path / "base")
    tiny_hf_tokenizer().save_pretrained(tmp_path / "base")
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(80)))
    (tmp_path / "cfg.yaml").write_text(
        f"model: {tmp_path / 'base'}\ndataset: {tmp_path / 'corpus.txt'}\nexit_layers: [2, 4]\nseq_len: 32\nbatch_size: 4\n"
        "max_steps: 4\neval_tokens: 128\nprogress: false\ncache_features: true\nwarmup_loss: logit_mse\nwarmup_fraction: 0.5\n"
    )
    out = tmp_path / "run"
    assert main(["demo", "--config", str(tmp_path / "cfg.yaml"), "--output-dir", str(out), "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "KL before" in text and "agree after" in text  # training table
    answers = json.loads((out / "demo_answers.json").read_text())
    assert [a["budget"] for a in answers][:3] == ["S", "M", "XL"] and answers[2]["speedup"] == 1.0
    auto = answers[3]  # token-level exits at a threshold calibrated on the held-out text
    assert auto["budget"].startswith("auto@") and 2 <= auto["layer"] <= 6 and auto["speedup"] > 0
    assert "token-level exits at threshold" in text and "calibrated on" in text
    table = json.loads((out / "eval" / "results.json").read_text())
    assert (out / "eval" / "accuracy_vs_params.png").is_file()
    assert "early-exit" in json.dumps(table) and "balcony" in json.dumps(table)
