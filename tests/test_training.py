"""Training: recipes, exact resume, frozen base, data errors, shipped configs (tiny models, CPU)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.training.config import CONFIG_DIR, TrainConfig, parse_overrides
from balcony.training.loop import load_training_data, train
from balcony.training.objective import DistillObjective

WORDS = "hello world the a of and to is in it".split() + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = tiny_base(vocab_size=54)
    base.save_pretrained(root / "base")
    tiny_hf_tokenizer().save_pretrained(root / "base")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(150)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    (root / "empty.txt").write_text("\n\n  \n")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))


def cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(root / "base"), dataset=str(root / "corpus.txt"), exit_layers=[2, 4], seq_len=32, batch_size=4,
                max_steps=6, output_dir=str(out), eval_tokens=128, save_every=3, progress=False, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def exit_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "balcony_exits.safetensors")


def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"exit_kind": "mlp"},
        {"exit_kind": "attention", "init": "random"},
        {"init": "identity", "loss": "kl+ce"},
        {"loss": "ce"},
        {"loss": "jsd", "temperature": 2.0},
        {"cache_features": True, "warmup_loss": "logit_mse", "warmup_fraction": 0.5},
        {"cache_features": True, "warm_start": "lstsq"},
        {"exit_kind": "mlp", "warm_start": "lstsq"},
        {"cache_features": True, "warm_start": "lstsq", "loss_vocab": 20},
        {"loss_vocab": 16, "loss": "reverse_kl"},
    ],
    ids=["decoder", "mlp", "attention-random", "identity-klce", "ce", "jsd-T2", "cached-mse-warmup", "cached-lstsq", "mlp-lstsq-uncached",
         "cached-lstsq-loss-vocab", "loss-vocab-uncached"],
)
def test_every_exit_parameter_changes_and_base_is_bitwise_unchanged(tiny_setup, tmp_path, kw):
    before = BalconyModel(tiny_base(vocab_size=54), BalconyConfig(exit_layers=[2, 4], **{k: v for k, v in kw.items() if k in ("exit_kind", "init")}))
    start = {k: v.clone() for k, v in before.exit_state_dict().items()}
    captured = {}
    real_save = BalconyModel.save_pretrained

    def spy(self, d):
        captured["model"] = self
        return real_save(self, d)

    BalconyModel.save_pretrained = spy
    try:
        result = train(cfg(tiny_setup, tmp_path / "run", **kw))
    finally:
        BalconyModel.save_pretrained = real_save
    trained = exit_weights(tmp_path / "run")
    assert set(trained) == set(start)
    # identity init zeroes output projections, but their gradient is non-zero, so they move too
    unchanged = [k for k in start if torch.equal(trained[k], start[k])]
    assert not unchanged, f"exit parameters did not train: {unchanged}"
    ref = base_state(tiny_setup / "base")
    model = captured["model"]
    for name, p in model.base.state_dict().items():
        if name in ref:
            assert torch.equal(p, ref[name]), f"base parameter {name} changed"
    assert result.steps == 6 and result.tokens == 6 * 4 * 32
    assert set(result.after) == {2, 4, 6}


@pytest.mark.parametrize("kw", [{}, {"cache_features": True, "warm_start": "lstsq", "loss_vocab": 20}], ids=["paper", "default-levers"])
def test_training_lowers_held_out_kl(tiny_setup, tmp_path, kw):
    """A short run brings every exit closer to the full model on held-out rows it never trained on."""
    result = train(cfg(tiny_setup, tmp_path / "run", max_steps=30, lr=3e-3, save_every=0, **kw))
    for j in (2, 4):
        before, after = result.before[j], result.after[j]
        assert after["kl"] < 0.8 * before["kl"], (j, before, after)
        assert after["tokens"] == before["tokens"] >= 128


@pytest.mark.parametrize("recipe", ["unfrozen", "sorted", "pretrain"])
def test_recipes_that_train_the_base_change_it(tiny_setup, tmp_path, recipe):
    train(cfg(tiny_setup, tmp_path / "run", recipe=recipe, max_steps=3))
    saved = base_state(tmp_path / "run" / "base")
    ref = base_state(tiny_setup / "base")
    changed = [k for k in ref if k in saved and not torch.equal(saved[k], ref[k])]
    assert len(changed) > len(ref) // 2
    if recipe == "sorted":  # no exit modules: exits are norm-only and read the shared final norm
        cfgjson = BalconyConfig.load(tmp_path / "run")
        assert cfgjson.exit_kind == "norm"


def test_checkpointed_exits_give_the_same_gradients(tiny_setup):
    from balcony import BalconyConfig
    from balcony.training.objective import DistillObjective

    torch.manual_seed(0)
    base = tiny_base(vocab_size=54)
    model = BalconyModel(base, BalconyConfig(exit_layers=[2, 4]))
    objective = DistillObjective(model, TrainConfig(exit_layers=[2, 4]))
    batch = {"input_ids": torch.randint(0, 54, (2, 12)), "position_ids": torch.tensor([list(range(5)) + list(range(7))] * 2)}
    grads, calls = {}, []
    model.exits["2"].register_forward_pre_hook(lambda *a: calls.append(1))
    for flag in (False, True):
        model.checkpoint_exits = flag
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss, _ = objective(batch)
        loss.backward()
        grads[flag] = {n: p.grad.clone() for n, p in model.exits.named_parameters()}
        assert len(calls) == (2 if flag else 1)  # checkpointing re-runs the exit in backward
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, g in grads[False].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7)


def test_cached_features_run_the_held_out_frozen_pass_once(tiny_setup, tmp_path, monkeypatch):
    """With cache_features, evaluations reuse one held-out frozen pass and score as an uncached evaluation does."""
    from balcony.training.evaluate import distill_metrics

    calls = {"n": 0}
    real = BalconyModel.base_pass

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(BalconyModel, "base_pass", counting)
    c = cfg(tiny_setup, tmp_path / "run", cache_features=True, eval_every=1, max_steps=4)
    result = train(c)
    monkeypatch.setattr(BalconyModel, "base_pass", real)
    model = BalconyModel.from_pretrained(tiny_base(vocab_size=54), tmp_path / "run").eval()
    train_rows, eval_rows = load_training_data(c, tiny_hf_tokenizer(), model)
    batches = -(-len(train_rows) // c.batch_size) + -(-len(eval_rows) // c.batch_size)
    assert calls["n"] == batches  # one pass over each split; the six evaluations ran no base layer
    ref = distill_metrics(model, [eval_rows[slice(s, s + c.batch_size)] for s in range(0, len(eval_rows), c.batch_size)])
    for j in (2, 4, 6):
        assert result.after[j]["kl"] == pytest.approx(ref[j]["kl"], rel=1e-5, abs=1e-7)
        assert result.after[j]["agreement"] == ref[j]["agreement"]
    assert result.after[2]["kl"] > 0


def test_kill_and_resume_gives_the_same_exits(tiny_setup, tmp_path, monkeypatch):
    for kw in ({}, {"cache_features": True, "warmup_loss": "logit_mse", "warmup_fraction": 0.3, "warm_start": "lstsq", "loss_vocab": 20}):
        full, killed = tmp_path / f"full{len(kw)}", tmp_path / f"killed{len(kw)}"
        train(cfg(tiny_setup, full, max_steps=10, **kw))
        real = DistillObjective.forward
        calls = {"n": 0}

        def dies(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 8:
                raise KeyboardInterrupt
            return real(self, *a, **k)

        monkeypatch.setattr(DistillObjective, "forward", dies)
        with pytest.raises(KeyboardInterrupt):
            train(cfg(tiny_setup, killed, max_steps=10, **kw))
        monkeypatch.setattr(DistillObjective, "forward", real)
        assert (killed / "checkpoint-7").is_dir() and (killed / "checkpoint-6").is_dir()
        shutil.rmtree(killed / "checkpoint-7")  # a hard kill saves nothing: resume from the periodic checkpoint
        train(cfg(tiny_setup, killed, max_steps=10, **kw))
        a, b = exit_weights(full), exit_weights(killed)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_exit_at_a_time_and_adding_an_exit_later(tiny_setup, tmp_path):
    train(cfg(tiny_setup, tmp_path / "first", exit_layers=[2, 4], train_exits=[2]))
    w = exit_weights(tmp_path / "first")
    fresh = BalconyModel(tiny_base(vocab_size=54), BalconyConfig(exit_layers=[2, 4])).exit_state_dict()
    assert all(torch.equal(w[k], fresh[k]) for k in w if k.startswith("exits.4."))
    assert not all(torch.equal(w[k], fresh[k]) for k in w if k.startswith("exits.2."))
    # Add exit 3 and train it alone: exits 2 and 4 stay exactly as they were.
    train(cfg(tiny_setup, tmp_path / "second", exits_from=str(tmp_path / "first"), exit_layers=[3], train_exits=[3]))
    w2 = exit_weights(tmp_path / "second")
    assert all(torch.equal(w2[k], w[k]) for k in w)
    assert any(k.startswith("exits.3.") for k in w2)


def test_bad_input_is_named_and_nothing_is_overwritten(tiny_setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"empty"):
        train(cfg(tiny_setup, out, dataset=str(tiny_setup / "empty.txt")))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "hello world"}\n')
    with pytest.raises(ValueError, match=r"'text'.*body"):
        train(cfg(tiny_setup, out, dataset=str(jsonl)))
    with pytest.raises(ValueError, match=r"seq_len=512 exceeds the model's maximum context of 256"):
        train(cfg(tiny_setup, out, seq_len=512))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train(cfg(tiny_setup, out, dataset=str(tmp_path / "nope.txt")))
    # Exits saved for another base.
    other = tmp_path / "other-exits"
    BalconyModel(tiny_base(hidden_size=48, vocab_size=54), BalconyConfig(exit_layers=[2])).save_pretrained(other)
    with pytest.raises(ValueError, match="hidden_size: exits have 48, base has 32"):
        train(cfg(tiny_setup, out, exits_from=str(other)))
    assert sorted(os.listdir(out)) == ["keep.txt", "train_config.json"] or (out / "keep.txt").read_text() == "precious"
    assert not (out / "balcony_exits.safetensors").exists()


def test_loss_vocab_restricts_the_loss_and_is_kept_across_a_resume(tiny_setup, tmp_path):
    import json

    from balcony import BalconyConfig
    from balcony.training.chunked import multi_exit_distill_loss
    from balcony.training.objective import DistillObjective

    # The objective with a loss vocabulary equals the loss through a head cut to those rows.
    torch.manual_seed(0)
    model = BalconyModel(tiny_base(vocab_size=54), BalconyConfig(exit_layers=[2, 4]))
    objective = DistillObjective(model, TrainConfig(exit_layers=[2, 4]))
    batch = {"input_ids": torch.randint(0, 54, (2, 12))}
    full, _ = objective(batch)
    keep = torch.tensor([1, 5, 7, 30, 41])
    objective.set_loss_vocab(keep)
    cut, per = objective(batch)
    out = model.distill_forward(batch["input_ids"], None, None, exits=[2, 4])
    sub = torch.nn.Linear(model.parts.lm_head.weight.shape[1], 5, bias=False)
    sub.weight.data = model.parts.lm_head.weight.detach()[keep]
    ref, _ = multi_exit_distill_loss([out.exit_hidden[2], out.exit_hidden[4]], out.teacher_hidden, sub)
    torch.testing.assert_close(cut, ref)
    assert not torch.allclose(cut, full)
    objective.set_loss_vocab(None)
    torch.testing.assert_close(objective(batch)[0], full)

    # The run picks the entries with the most teacher mass, logs them, and a resume reuses the saved choice.
    run = tmp_path / "run"
    train(cfg(tiny_setup, run, max_steps=4, cache_features=True, loss_vocab=12))
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    event = [r for r in log if r.get("event") == "loss_vocab"][0]
    assert event["entries"] == 12 and 12 / 54 < event["coverage"] <= 1.0
    saved = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["loss_vocab"]
    assert len(saved) == 12 and saved == sorted(saved)
    # A loss vocabulary at least as large as the model's (a shipped config on a small model) keeps every entry.
    big = train(cfg(tiny_setup, tmp_path / "big", max_steps=2, loss_vocab=99))
    whole = train(cfg(tiny_setup, tmp_path / "whole", max_steps=2))
    a, b = exit_weights(tmp_path / "big"), exit_weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a) and big.after[2] == whole.after[2]


def test_config_validation_names_values():
    with pytest.raises(ValueError, match="recipe='magic' is not one of"):
        TrainConfig(recipe="magic")
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown training options \\['lrr'\\]"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ValueError, match="cache_features needs a frozen base"):
        TrainConfig(recipe="sorted", cache_features=True)
    with pytest.raises(ValueError, match="warm_start='lstsq' fits a decoder or MLP exit on a frozen base, not exit_kind='attention'"):
        TrainConfig(warm_start="lstsq", exit_kind="attention")
    with pytest.raises(ValueError, match="loss_vocab=0 must be a positive integer"):
        TrainConfig(loss_vocab=0)
    with pytest.raises(ValueError, match="loss_vocab=64 needs a frozen base and a pure distillation loss .* loss='kl\\+ce'"):
        TrainConfig(loss_vocab=64, loss="kl+ce")
    with pytest.raises(ValueError, match="loss_vocab=64 needs a frozen base .* recipe='sorted'"):
        TrainConfig(loss_vocab=64, recipe="sorted")
    with pytest.raises(ValueError, match="warm_start='ols' is not one of"):
        TrainConfig(warm_start="ols")
    assert parse_overrides(["lr=1e-4", "exit_layers=[4, 8]"]) == {"lr": 1e-4, "exit_layers": [4, 8]}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    c = TrainConfig.from_yaml(path.stem)
    assert c.lr > 0 and c.seq_len > 0
    if path.stem.endswith("-paper"):  # the paper's own models and settings
        assert c.exit_layers == [15, 18, 21] and c.lr == 5e-4 and c.seq_len == 4096 and c.loss == "kl"
    if path.stem == "smollm2-paper-recipe":  # the paper's recipe on the embedded model
        assert (c.init, c.warm_start, c.loss, c.loss_vocab, c.lr) == ("last_layer", None, "kl", None, 5e-4)


def test_cli_train_with_overrides(tiny_setup, tmp_path):
    from balcony.cli import main

    rc = main(["train", "--config", "smollm2-quick", "--model", str(tiny_setup / "base"), "--dataset", str(tiny_setup / "corpus.txt"),
               "--output-dir", str(tmp_path / "cli"), "--set", "exit_layers=[2,4],seq_len=32,batch_size=4,eval_tokens=128,progress=false,corpus_tokens=1000",
               "--max-steps", "4"])
    assert rc == 0
    assert (tmp_path / "cli" / "balcony_exits.safetensors").is_file() and (tmp_path / "cli" / "log.jsonl").is_file()
    rc = main(["train", "--config", "no-such-config"])
    assert rc == 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_launch(tiny_setup, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "run.py"
    script.write_text(
        "from balcony.training import TrainConfig, train\n"
        f"train(TrainConfig(model={str(tiny_setup / 'base')!r}, dataset={str(tiny_setup / 'corpus.txt')!r}, exit_layers=[2, 4],"
        f" seq_len=32, batch_size=2, max_steps=4, output_dir={str(out)!r}, eval_tokens=128, save_every=2, progress=False,"
        " cache_features=True, warm_start='lstsq'))\n"
    )
    env = {**os.environ, "BALCONY_CACHE": str(tmp_path / "cache2"), "OMP_NUM_THREADS": "1"}
    # On CPU, Accelerate's torchrun path (--multi_gpu) starts the processes; training then uses gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "balcony_exits.safetensors").is_file()
    model = BalconyModel.from_pretrained(tiny_base(vocab_size=54), out)
    ids = torch.randint(3, 54, (1, 8))
    assert model(ids, exit=2).logits.shape == (1, 8, 54)
    import json

    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    done = [r for r in log if r.get("event") == "done"][0]
    assert done["tokens"] == 4 * 2 * 32 * 2  # both processes' tokens count
    assert [r for r in log if r.get("event") == "warm_start"]  # fitted on rank 0, broadcast to rank 1
