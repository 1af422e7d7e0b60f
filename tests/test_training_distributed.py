"""Training on several processes (CPU, gloo): one LR schedule, data prepared once, equal steps on every rank."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony.training.config import TrainConfig
from balcony.training.loop import train

PROBE = Path(__file__).with_name("_train_rank_probe.py")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(num_processes: int, cfg: dict, out: Path, cache: Path, extra: list[str] | None = None, timeout: int = 240):
    """`accelerate launch` the rank probe on CPU processes (torchrun path, gloo); returns each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BALCONY_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           *(extra or []), str(PROBE), json.dumps(cfg), str(out)]
    # Own session, so a hung run's ranks (children of the launcher) can be stopped together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a rank that takes a step the others don't hangs in its all-reduce
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the {num_processes}-process run hung for {timeout} s: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(num_processes)]


def lr_trace(run: Path) -> list[float]:
    return [r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "lr" in r]


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_base(vocab_size=54).save_pretrained(root / "base")
    tiny_hf_tokenizer().save_pretrained(root / "base")
    return root / "base"


@pytest.mark.slow
def test_two_processes_match_one_process_of_the_same_global_batch(tiny_base_dir, tmp_path):
    """Generated corpus, 7 training rows (odd), epochs, grad_accum 2: 2 x batch 1 against 1 x batch 2.

    Both ranks take the same optimizer steps (an uneven shard would hang one rank in its
    all-reduce); the corpus is generated and tokenised once, on rank 0; the LR at every step
    is the same function of the global step as on one process; the ranks end with identical
    exits, equal (to float rounding) to the one-process run's, which saw the same rows per step.
    """
    cache = tmp_path / "cache"
    common = dict(model=str(tiny_base_dir), dataset=None, corpus_tokens=800, exit_layers=[2, 4], seq_len=32, max_tokens=7 * 32,
                  eval_tokens=128, epochs=8, grad_accum=2, warmup_ratio=0.25, lr=3e-3, log_every=1, save_every=0, progress=False)
    two = launch(2, {**common, "batch_size": 1, "output_dir": str(tmp_path / "two"), "save_every": 4}, tmp_path / "two-ranks", cache)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint-4").glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    corpus = list((cache / "corpus").glob("*.jsonl"))
    assert len(corpus) == 1
    lines = corpus[0].read_text().splitlines()
    assert len(lines) == len(set(lines)), "a passage was written more than once (every rank generated the corpus)"
    assert two[0]["generate"] > 0 and two[1]["generate"] == 0  # rank 1 waited and read rank 0's corpus
    assert two[0]["saves"] == 1 and two[1]["saves"] == 0  # the token cache is written once, by rank 0
    # 7 rows, global batch 2: 3 micro-batches per epoch on every rank, 1 optimizer step per epoch.
    assert [r["steps"] for r in two] == [8, 8] and [r["forwards"] for r in two] == [16, 16]
    assert two[0]["exits"].keys() == two[1]["exits"].keys()
    assert all(torch.equal(two[0]["exits"][k], two[1]["exits"][k]) for k in two[0]["exits"])

    os.environ["BALCONY_CACHE"] = str(cache)  # the same generated corpus (monkeypatched back by the autouse fixture)
    one = train(TrainConfig(**{**common, "batch_size": 2, "output_dir": str(tmp_path / "one")}))
    assert one.steps == 8
    lrs = lr_trace(tmp_path / "two")
    assert lrs == lr_trace(tmp_path / "one")
    warmup, total = 2, 8  # transformers' cosine schedule with linear warm-up, one value per global step
    expected = [3e-3 * (s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))) for s in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    from safetensors.torch import load_file

    single = load_file(tmp_path / "one" / "balcony_exits.safetensors")
    for k, v in single.items():
        torch.testing.assert_close(two[0]["exits"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_bitwise(tiny_base_dir, tmp_path):
    """strategy=fsdp on 2 CPU processes (gloo): the same exits as DDP (to float rounding) and LR trace; a resume from
    its sharded checkpoint (exits and AdamW state gathered on rank 0, scattered back) ends bitwise where the run ended."""
    import random
    import shutil

    from safetensors.torch import load_file

    rng = random.Random(0)
    words = "hello world the a of and to is in it".split() + [f"w{i}" for i in range(40)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    common = dict(model=str(tiny_base_dir), dataset=str(tmp_path / "corpus.txt"), exit_layers=[2, 4], seq_len=32, batch_size=2,
                  grad_accum=2, max_steps=8, eval_tokens=128, warmup_ratio=0.25, lr=3e-3, log_every=1, progress=False,
                  save_every=4, keep_checkpoints=5)
    fsdp = launch(2, {**common, "strategy": "fsdp", "output_dir": str(tmp_path / "fsdp")}, tmp_path / "fsdp-ranks", tmp_path / "cache")
    ddp = launch(2, {**common, "output_dir": str(tmp_path / "ddp")}, tmp_path / "ddp-ranks", tmp_path / "cache")
    assert [r["steps"] for r in fsdp] == [8, 8] and all(torch.equal(fsdp[0]["exits"][k], fsdp[1]["exits"][k]) for k in fsdp[0]["exits"])
    assert lr_trace(tmp_path / "fsdp") == lr_trace(tmp_path / "ddp")
    full = sum(v.numel() for v in ddp[0]["exits"].values())
    assert ddp[0]["local_exit_numel"] == full and fsdp[0]["local_exit_numel"] + fsdp[1]["local_exit_numel"] == full  # sharded in two
    saved = load_file(tmp_path / "fsdp" / "balcony_exits.safetensors")
    assert saved.keys() == ddp[0]["exits"].keys()
    for k, v in saved.items():
        assert torch.equal(v, fsdp[0]["exits"][k])
        torch.testing.assert_close(v, ddp[0]["exits"][k], rtol=1e-4, atol=1e-5)
    # Resume from the step-4 checkpoint in a fresh directory.
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    launch(2, {**common, "strategy": "fsdp", "output_dir": str(tmp_path / "resumed")}, tmp_path / "resumed-ranks", tmp_path / "cache")
    again = load_file(tmp_path / "resumed" / "balcony_exits.safetensors")
    assert all(torch.equal(again[k], saved[k]) for k in saved)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
