"""Resume: a run stopped anywhere, mid accumulation window included, ends bitwise where an uninterrupted run ends; CUDA RNG is saved."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.training.checkpoint import load_checkpoint, save_checkpoint
from balcony.training.config import TrainConfig
from balcony.training.loop import train
from balcony.training.objective import DistillObjective

WORDS = "hello world the a of and to is in it".split() + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_base(vocab_size=54).save_pretrained(root / "base")
    tiny_hf_tokenizer().save_pretrained(root / "base")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(60)))
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))


def cfg(root, out, **kw) -> TrainConfig:
    # 10 rows of 4: 2 micro-batches per epoch, 3 per window, so windows run across epoch ends.
    base = dict(model=str(root / "base"), dataset=str(root / "corpus.txt"), exit_layers=[2, 4], seq_len=32, batch_size=4,
                max_tokens=10 * 32, grad_accum=3, max_steps=5, output_dir=str(out), eval_tokens=128, save_every=0, progress=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


LEVERS = {"cache_features": True, "warmup_loss": "logit_mse", "warmup_fraction": 0.4, "warm_start": "lstsq", "loss_vocab": 20}


@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["plain", "cached-warmup-lstsq-vocab"])
@pytest.mark.parametrize("kill_at,resume_step", [(7, 2), (11, 3), (12, 3)], ids=["step-boundary", "1-of-3", "2-of-3"])
def test_interrupt_anywhere_in_an_accumulation_window_resumes_bitwise(setup, tmp_path, monkeypatch, levers, kill_at, resume_step):
    """KeyboardInterrupt at micro-batch `kill_at` (grad_accum 3): the checkpoint holds the window's start, the resume redoes it."""
    train(cfg(setup, tmp_path / "full", **levers))
    real = DistillObjective.forward
    calls = {"n": 0}

    def dies(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(DistillObjective, "forward", dies)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(setup, tmp_path / "killed", **levers))
    monkeypatch.setattr(DistillObjective, "forward", real)
    saved = sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*"))
    assert saved == [f"checkpoint-{resume_step}"]
    resumed = train(cfg(setup, tmp_path / "killed", **levers))
    assert resumed.steps == 5
    a, b = load_file(tmp_path / "full" / "balcony_exits.safetensors"), load_file(tmp_path / "killed" / "balcony_exits.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_carry_the_cuda_generators(tmp_path, monkeypatch):
    """Where CUDA exists, every device's generator state is saved and restored with the CPU ones."""
    model = BalconyModel(tiny_base(vocab_size=54), BalconyConfig(exit_layers=[2]))
    optimizer = torch.optim.AdamW(model.exits.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.append([s.clone() for s in new]))
    save_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler, {"step": 1})
    states[0][0] = 99  # the generators move on after the save
    assert load_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler)["step"] == 1
    assert len(restored) == 1 and [s.tolist() for s in restored[0]] == [[1, 2, 3], [4, 5, 6]]
