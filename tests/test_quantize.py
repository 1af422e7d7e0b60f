"""Weight-only quantization: layer accuracy, the module swap (tied heads), generation, bench and CLI wiring."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.inference.engine import generate
from balcony.inference.quantize import (
    Int4Linear,
    Int8Linear,
    head_rows,
    is_quantized,
    parse_mode,
    quantization_of,
    quantize_int8,
    quantize_linear,
    quantize_model,
)

EXITS = [2, 3, 5]


def make(**base) -> BalconyModel:
    return BalconyModel(tiny_base(**base), BalconyConfig(exit_layers=EXITS))


def ids(t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


def _linear(n: int, k: int, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias)


# ------------------------------------------------------------------------ one layer
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_close_to_float(bias):
    lin = _linear(96, 64, bias)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (96,) and not q.weight.requires_grad
    # Rounding to the nearest step: every weight within half a step of its channel's scale.
    step = q.scales.float()[:, None]
    assert ((q.dequantize() - lin.weight).abs() <= 0.5 * step * 1.01 + 1e-6).all()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, rel  # int8 weights + bfloat16 activations: ~1% error
    # and it is not the float layer by accident
    assert not torch.equal(out, ref)


def test_int4_linear_is_close_to_float_and_falls_back_to_int8():
    lin = _linear(64, 128)
    q = Int4Linear(lin, group_size=32)
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.15, rel  # 16 levels per group of 32: a few % error
    # Coarser groups are less accurate.
    with torch.no_grad():
        rel128 = (Int4Linear(lin, group_size=128)(x) - ref).norm() / ref.norm()
    assert rel128 > rel
    # Shapes the CPU kernel cannot take fall back to int8: out_features not a multiple of 16, or K % group.
    assert isinstance(quantize_linear(_linear(97, 64), "int4-32"), Int8Linear)
    assert isinstance(quantize_linear(_linear(64, 48), "int4-32"), Int8Linear)
    assert isinstance(quantize_linear(_linear(64, 64), "int4-32"), Int4Linear)
    with pytest.raises(ValueError, match="group size 64 does not divide in_features=48"):
        Int4Linear(_linear(64, 48), 64)


@pytest.mark.parametrize("mode", ["int3", "int8-32", "fp8", "int4-48", ""])
def test_bad_modes_are_named(mode):
    with pytest.raises(ValueError, match=f"quantize={mode!r}"):
        parse_mode(mode)
    with pytest.raises(ValueError, match=f"quantize={mode!r}"):
        make().quantize(mode)


def test_modes_parse():
    assert parse_mode("int8") == ("int8", None)
    assert parse_mode("int4") == ("int4", 32)
    assert parse_mode("INT4-128") == ("int4", 128)


def test_head_rows_computes_the_first_rows_only():
    lin = _linear(96, 64, bias=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        for head in (lin, Int8Linear(lin)):
            full = head(x)
            part = head_rows(head, 40)(x)
            assert part.shape == (2, 40)
            torch.testing.assert_close(part, full[:, :40], atol=1e-5, rtol=0)
            assert head_rows(head, 96) is head


# ------------------------------------------------------------------------ whole model
def test_quantize_model_swaps_layers_exits_and_a_tied_head():
    model = make(tie_word_embeddings=True)
    assert model.base.lm_head.weight is model.parts.embed_tokens.weight
    emb = model.parts.embed_tokens.weight.detach().clone()
    n = quantize_int8(model)
    per_layer = 7  # q, k, v, o, gate, up, down
    assert n == per_layer * (model.num_layers + len(EXITS)) + 1
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.parts.lm_head, Int8Linear) and model.base.lm_head is model.parts.lm_head
    # The embedding is untouched and still float: lookups work.
    assert model.parts.embed_tokens.weight.dtype == torch.float32 and torch.equal(model.parts.embed_tokens.weight, emb)
    assert is_quantized(model) and quantization_of(model) == "int8"
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")


def test_a_quantized_model_refuses_to_save_its_exits(tmp_path):
    model = make()
    model.save_pretrained(tmp_path / "float")  # the float model saves
    model.quantize("int8")
    with pytest.raises(ValueError, match="quantized \\(int8\\).*before calling quantize"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("mode", ["int8", "int4-32"])
def test_quantized_generation_mostly_matches_float(mode):
    model = make(tie_word_embeddings=True)
    q = copy.deepcopy(model).quantize(mode)
    x = ids(t=8)
    with torch.no_grad():
        lf = model(x).logits.log_softmax(-1)
        lq = q(x).logits.log_softmax(-1)
    kl = (lf.exp() * (lf - lq)).sum(-1).mean()
    assert 0 < kl < (1e-3 if mode == "int8" else 2e-2), kl
    ref = generate(model, x, max_new_tokens=16)[0, 8:]
    out = generate(q, x, max_new_tokens=16)[0, 8:]
    assert (out == ref).float().mean() >= (0.75 if mode == "int8" else 0.25)
    # Every budget decodes, and the engine's cached decode is the quantized model's own recompute.
    for budget in q.budgets:
        y = generate(q, x, exit=budget, max_new_tokens=4)
        with torch.no_grad():
            step = q(y[:, :-1], exit=budget).logits[:, -1].argmax(-1)
        assert torch.equal(step, y[:, -1])


def test_hf_generate_runs_on_the_quantized_modules_and_agrees_with_the_engine():
    q = make().quantize("int8")
    x = ids(t=6, seed=4)
    hf = q.base.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(generate(q, x, max_new_tokens=10), hf)


def test_speculative_on_a_quantized_model_equals_its_greedy():
    q = make().quantize("int8")
    x = ids(t=5)
    ref = generate(q, x, max_new_tokens=12)
    for kw in (dict(draft_length=3), dict(draft_length=1, draft_width=2), dict(draft_length=2, draft_vocab=40)):
        out = q.generate(x, exit="S", speculative=True, max_new_tokens=12, **kw)
        assert torch.equal(out, ref), kw


# ------------------------------------------------------------------------ bench and CLI
def test_bench_reports_the_quantized_model(tmp_path):
    from balcony.bench.report import format_table
    from balcony.bench.speed import run_bench

    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=EXITS))
    result = run_bench(
        model, tok, max_new_tokens=4, prompt_tokens=8, repeats=1, batch_size=2, speculative=False, quantize="int8", log=lambda s: None
    )
    q = result["quantized"]
    assert q["mode"] == "int8" and q["engine_decode_tok_s"] > 0 and q["hf_decode_tok_s"] > 0
    assert 0 <= q["greedy_match"] <= 1 and q["greedy_tokens"] == 4 and q["kl_float_quantized"] >= 0
    assert q["engine_over_hf_float"] > 0 and q["engine_over_hf_quantized"] > 0
    assert not is_quantized(model)  # the bench quantizes a copy
    table = format_table(result)
    assert "weight-only int8" in table and "HF generate, int8 (same modules)" in table and "KL(float || int8)" in table


def test_cli_quantize_flag(tmp_path, tiny_model_dir, capsys):
    from balcony.cli import main

    args = ["generate", "hello world", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--no-chat"]
    assert main(args + ["--quantize", "int8"]) == 0
    assert "budget XL" in capsys.readouterr().err
    assert main(args + ["--quantize", "int3"]) == 2
    assert "quantize='int3' is not a quantization mode" in capsys.readouterr().err
    bench = ["bench", "--model", str(tiny_model_dir), "--exit-layers", "2,4", "--max-new-tokens", "3", "--prompt-tokens", "4"]
    assert main(bench + ["--repeats", "1", "--no-hf", "--no-speculative", "--quantize", "int3", "--out", str(tmp_path / "o")]) == 2
    assert "quantize='int3'" in capsys.readouterr().err


# ------------------------------------------------------------------------ off the CPU: dequantised in the graph
def test_int8_in_graph_path_matches_the_cpu_kernel(monkeypatch):
    """The path CUDA (and any non-CPU device) takes, run here on CPU tensors: same result as the CPU kernel."""
    import balcony.inference.quantize as quantize

    lin = _linear(96, 64, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        kernel = q(x)
        monkeypatch.setattr(quantize, "uses_cpu_kernel", lambda x: False)
        monkeypatch.setattr(torch, "_weight_int8pack_mm", None)  # the other path must not touch the CPU kernel
        graph = q(x)
        rows = head_rows(q, 40)(x)
    # The kernel rounds the activations to bfloat16; the in-graph path computes in the input's dtype.
    assert graph.dtype == x.dtype and (graph - kernel).norm() / kernel.norm() < 5e-3
    torch.testing.assert_close(graph, torch.nn.functional.linear(x, q.dequantize(), lin.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows, graph[..., :40], atol=1e-5, rtol=0)


def test_int4_nibble_layout_holds_the_cpu_kernels_weights(monkeypatch):
    import balcony.inference.quantize as quantize

    lin = _linear(64, 128, bias=True)
    cpu, generic = Int4Linear(lin, 32), Int4Linear(lin, 32, layout="nibbles")
    assert cpu.layout == "cpu" and generic.layout == "nibbles" and generic.weight.shape == (64, 64)
    # The CPU kernel applied to the identity reads out the (bfloat16) weights it computes with: the same as ours.
    eye = torch.eye(128, dtype=torch.bfloat16)
    kernel_w = torch._weight_int4pack_mm_for_cpu(eye, cpu.weight, 32, cpu.scales_and_zeros).T
    assert torch.equal(kernel_w, generic.dequantize(torch.bfloat16))
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref, a = lin(x), cpu(x)
        monkeypatch.setattr(quantize, "uses_cpu_kernel", lambda x: False)
        monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", None)
        b = generic(x)
        with pytest.raises(ValueError, match=r"packed for the CPU kernel but runs on cpu.*then \.quantize\('int4'\)"):
            cpu(x)  # the CPU layout off the CPU (simulated): refused, naming the device
    assert (b - a).norm() / a.norm() < 5e-3 and 0 < (b - ref).norm() / ref.norm() < 0.15


def test_layers_quantized_off_the_cpu_take_the_in_graph_layout():
    # A layer on another device (here 'meta': this torch has no CUDA) gets int4 in nibbles, whatever out_features is;
    # before, int4 quietly fell back to int8 off the CPU.
    with torch.device("meta"):
        lin = torch.nn.Linear(64, 97)
    q = quantize_linear(lin, "int4-32")
    assert isinstance(q, Int4Linear) and q.layout == "nibbles" and q.weight.device.type == "meta"
    assert isinstance(quantize_linear(_linear(97, 64), "int4-32"), Int8Linear)  # on the CPU the kernel's shape rule holds


def test_quantized_model_decodes_and_compiles_through_the_in_graph_path(monkeypatch):
    import balcony.inference.quantize as quantize

    model = make()
    x = ids(t=6)
    kernel = copy.deepcopy(model).quantize("int8")
    with torch.no_grad():
        want = kernel(x).logits
    monkeypatch.setattr(quantize, "uses_cpu_kernel", lambda x: False)
    graph = copy.deepcopy(model).quantize("int8")
    with torch.no_grad():
        got = graph(x).logits
    assert (got - want).norm() / want.norm() < 5e-3
    torch._dynamo.reset()
    eager = generate(graph, x, max_new_tokens=6)
    assert torch.equal(generate(graph, x, max_new_tokens=6, compile="aot_eager"), eager)  # fullgraph: dequantisation in the graph
    torch._dynamo.reset()
