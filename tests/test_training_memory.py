"""Memory and precision at scale: the meta-device plan against a measured run, bf16 teacher with float32 exits, no head copies."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_base, tiny_hf_tokenizer
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from balcony.training.build import build_training_model
from balcony.training.config import TrainConfig
from balcony.training.loop import train
from balcony.training.memory import plan_memory
from balcony.training.objective import DistillObjective

WORDS = "hello world the a of and to is in it".split() + [f"w{i}" for i in range(40)]

# Big enough that activations, not bookkeeping, fill the memory of a step; small enough for seconds on a CPU.
SHAPE = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def profiled_peak(prof) -> int:
    """Peak bytes above the start: the CPU allocator's every allocation and free, as the profiler records them, in time order."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, b in events:
        now += b
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_plan_matches_a_measured_cpu_step(precision):
    cfg = TrainConfig(exit_layers=[2, 3], seq_len=256, batch_size=2, chunk_size=128, precision=precision)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    base = tiny_base(dtype=dtype, **SHAPE)
    plan = plan_memory(cfg, device="cpu", config=base.config)
    model, _ = build_training_model(cfg, dtype=dtype, base=base)
    objective = DistillObjective(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), foreach=False)
    batch = {"input_ids": torch.randint(3, 2048, (2, 256)), "position_ids": torch.arange(256).expand(2, -1)}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def micro_batch():
        with autocast:
            loss, _ = objective(batch)
        loss.backward()

    micro_batch()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    # Parameters, gradients and optimizer state: exactly what the run holds.
    assert plan.base_parameters == sum(p.numel() for p in model.base.parameters())
    assert plan.base_bytes == sum(p.numel() * p.element_size() for p in model.base.parameters())
    assert plan.trainable_bytes == sum(p.numel() * p.element_size() for p in trainable) == 4 * plan.trainable_parameters
    assert plan.gradient_bytes == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    assert plan.optimizer_bytes == sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    # Activations: the peak one micro-batch adds on top of them, as the profiler measures it on the CPU.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        micro_batch()
    measured = profiled_peak(prof)
    assert measured > 4e6  # activations dominate: the check below is about them, not bookkeeping
    assert plan.activation_bytes == pytest.approx(measured, rel=0.05), (plan.activation_bytes, measured)
    assert plan.peak_bytes >= plan.state_bytes + plan.activation_bytes


class Created(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op allocates (views of its inputs are not allocations)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.made += [(tuple(t.shape), t.dtype) for t in tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_no_float64_head_unless_the_logit_mse_warmup_uses_it():
    """The Gram matrix of the head is built only for warmup_loss=logit_mse, in row chunks, and is no module buffer."""
    base = tiny_base(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    model, _ = build_training_model(TrainConfig(exit_layers=[2]), base=base)
    v, h = model.parts.lm_head.weight.shape
    for cfg in (TrainConfig(exit_layers=[2]), TrainConfig(exit_layers=[2], warmup_loss="logit_mse", warmup_fraction=0.5)):
        with Created() as rec:
            objective = DistillObjective(model, cfg)
        biggest64 = max((math.prod(s) for s, d in rec.made if d == torch.float64), default=0)
        assert biggest64 <= 4096 * h < v * h  # never the whole head in float64
        assert "gram" not in dict(objective.named_buffers()) and not any(b.shape == (h, h) for b in objective.buffers())
        assert (objective.gram is None) == (cfg.warmup_loss is None)
    w = model.parts.lm_head.weight.detach().double()
    wc = w - w.mean(0)
    torch.testing.assert_close(objective.gram, (wc.T @ wc / v).float(), rtol=1e-5, atol=1e-7)


def test_bf16_loss_never_copies_the_head():
    """With a bf16 base under bf16 autocast, the loss casts the (n, V) gradient, never the (V, H) head."""
    base = tiny_base(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=3, dtype=torch.bfloat16)
    cfg = TrainConfig(exit_layers=[2], chunk_size=32, precision="bf16")  # (32, V) logits: half the head's size
    model, _ = build_training_model(cfg, dtype=torch.bfloat16, base=base)
    objective = DistillObjective(model, cfg)
    v, h = model.parts.lm_head.weight.shape
    batch = {"input_ids": torch.randint(3, v, (2, 96))}
    with Created() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = objective(batch)
        loss.backward()
    head_sized = [(s, d) for s, d in rec.made if math.prod(s) >= v * h]
    assert not head_sized, head_sized
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.exits.parameters())


def test_bf16_run_loads_the_base_in_bf16_keeps_float32_exits_and_trains(tmp_path, monkeypatch):
    """precision=bf16 (on the CPU here): the teacher is a bf16 base, exits and AdamW state stay float32, KL falls."""
    base = tiny_base(vocab_size=54)
    base.save_pretrained(tmp_path / "base")
    tiny_hf_tokenizer().save_pretrained(tmp_path / "base")
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(80)))
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        out = real_step(self, *a, **k)
        seen["state"] = [t.dtype for s in self.state.values() for t in s.values() if t.dim() > 0]
        return out

    real_init = DistillObjective.__init__

    def init(self, model, cfg):
        real_init(self, model, cfg)
        seen["model"] = model

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    monkeypatch.setattr(DistillObjective, "__init__", init)
    result = train(TrainConfig(model=str(tmp_path / "base"), dataset=str(tmp_path / "corpus.txt"), exit_layers=[2, 4], seq_len=32,
                               batch_size=4, max_steps=20, lr=3e-3, eval_tokens=128, save_every=0, progress=False, precision="bf16",
                               output_dir=str(tmp_path / "run")))
    model = seen["model"]
    assert {p.dtype for p in model.base.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.exits.parameters()} == {torch.float32} and set(seen["state"]) == {torch.float32}
    saved = load_file(tmp_path / "run" / "balcony_exits.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    ref = {k: v.to(torch.bfloat16) for k, v in load_file(tmp_path / "base" / "model.safetensors").items()}
    assert all(torch.equal(p, ref[n]) for n, p in model.base.state_dict().items() if n in ref)  # the teacher is untouched
    for j in (2, 4):
        assert result.after[j]["kl"] < 0.8 * result.before[j]["kl"], (j, result.before[j], result.after[j])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    done = log[-1]
    assert done["event"] == "done" and done["base_dtype"] == "bfloat16" and done["precision"] == "bf16"
    assert done["tokens_per_s"] > 0 and done["peak_mem_gb"] > 0


def test_the_base_is_read_in_bf16(tmp_path, monkeypatch):
    """from_pretrained gets the dtype: no float32 model is ever built (16 GB of host memory per rank saved at 8B)."""
    from transformers import AutoModelForCausalLM

    tiny_base(vocab_size=54).save_pretrained(tmp_path / "base")
    tiny_hf_tokenizer().save_pretrained(tmp_path / "base")
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **k):
        calls.append(k)
        return real(cls, *a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, _ = build_training_model(TrainConfig(model=str(tmp_path / "base"), exit_layers=[2]), dtype=torch.bfloat16)
    assert calls and calls[0]["dtype"] == torch.bfloat16
    assert {p.dtype for p in model.base.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.exits.parameters()} == {torch.float32}


@pytest.mark.slow
def test_cli_plans_the_paper_config_without_weights(capsys):
    """`balcony train --config llama3-8b-paper --plan`: Llama-3-8B's config is built on meta, nothing is read or downloaded."""
    from balcony.cli import main

    assert main(["train", "--config", "llama3-8b-paper", "--plan", "--processes", "8"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ") and "GB" in line}
    gb = {k.split(" (")[0]: float(v.split()[-2]) for k, v in lines.items()}
    assert gb["frozen base"] == pytest.approx(2 * 8.030261248, abs=0.01)  # 8.03B parameters in bf16
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # q and o, GQA k and v, MLP, two norms
    exits = 3 * (layer + 4096)  # three decoder exits and their norms, float32
    assert gb["trainable exits"] == pytest.approx(4 * exits / 1e9, abs=0.01) and gb["gradients"] == gb["trainable exits"]
    assert gb["optimizer state"] == pytest.approx(2 * gb["trainable exits"], abs=0.01)
    assert 1.0 < gb["activations per micro-batch"] < 10.0  # one 4096-token row: chunked loss, checkpointed exits
    assert 26.0 < gb["peak per process"] < 40.0  # fits an 80 GB GPU under DDP
    assert "global batch 256 rows (1,048,576 tokens)" in out  # the paper's 256 x 4096 on 8 processes


def test_cli_train_takes_device_and_dtype(tmp_path, monkeypatch):
    from balcony.cli import main

    tiny_base(vocab_size=54).save_pretrained(tmp_path / "base")
    tiny_hf_tokenizer().save_pretrained(tmp_path / "base")
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(40)))
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))
    import balcony.training.build as build

    real_load, devices = build.load_base, []
    monkeypatch.setattr(build, "load_base", lambda *a, **k: devices.append(k.get("device")) or real_load(*a, **k))
    rc = main(["train", "--config", "smollm2-quick", "--model", str(tmp_path / "base"), "--dataset", str(tmp_path / "corpus.txt"),
               "--output-dir", str(tmp_path / "run"), "--device", "cpu", "--dtype", "bfloat16", "--max-steps", "2",
               "--set", "exit_layers=[2,4],seq_len=32,batch_size=4,eval_tokens=128,progress=false,max_tokens=1024"])
    assert rc == 0
    done = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert (done["base_dtype"], done["precision"]) == ("bfloat16", "bf16")  # precision auto follows the bf16 teacher
    assert [str(d) for d in devices] == ["cpu"]  # the base is loaded where the run trains (straight onto a GPU there)
    assert main(["train", "--config", "smollm2-quick", "--device", "tpu"]) == 2  # named and refused
