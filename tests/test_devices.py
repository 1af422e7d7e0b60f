"""Devices: the default device and dtype, --device/--dtype on every command, generators on the model's device,
accelerate-dispatched bases (device_map / offload), and benchmark clocks that wait for the device."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import VOCAB, tiny_base

from balcony import BalconyConfig, BalconyModel
from balcony.inference.engine import generate, generate_stream
from balcony.inference.speculative import speculative_generate
from balcony.modeling.loading import pick_device, pick_dtype

EXITS = [2, 3, 5]


def make(**base) -> BalconyModel:
    return BalconyModel(tiny_base(**base), BalconyConfig(exit_layers=EXITS))


def ids(t: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ default device and dtype
def _machine(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda,mps,want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_the_default_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    _machine(monkeypatch, cuda, mps)
    assert pick_device(None) == pick_device("auto") == want
    assert pick_device("cpu") == "cpu"


def test_an_absent_accelerator_falls_back_to_the_cpu_with_a_warning(monkeypatch):
    _machine(monkeypatch, False, False)
    for asked in ("cuda", "cuda:1", "mps"):
        with pytest.warns(UserWarning, match=f"device='{asked}' asked for but"):
            assert pick_device(asked) == "cpu"


def test_the_default_dtype_is_bfloat16_on_cuda_else_float32(monkeypatch):
    _machine(monkeypatch, True, False)
    assert pick_dtype("auto", "cuda") == pick_dtype(None, "cuda:0") == "bfloat16"
    assert pick_dtype("auto", "cpu") == pick_dtype("auto", "mps") == "float32"
    assert pick_dtype("bf16", "cpu") == "bfloat16" and pick_dtype("torch.float16", "cuda") == "float16"
    with pytest.raises(ValueError, match="dtype 'int8' is not one of auto, float32, bfloat16, float16"):
        pick_dtype("int8", "cpu")


# ------------------------------------------------------------------------ every command takes --device and --dtype
COMMANDS = {
    "generate": ["generate", "hello"],
    "bench": ["bench", "--no-hf"],
    "eval": ["eval", "--text", "{text}"],
    "serve": ["serve"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_take_device_and_dtype_and_default_to_the_accelerator(monkeypatch, tmp_path, name):
    from balcony.cli import build_parser, main

    monkeypatch.delenv("BALCONY_TASK_DATA", raising=False)
    (tmp_path / "t.txt").write_text("one passage\n\nanother passage\n")
    argv = [a.format(text=tmp_path / "t.txt") for a in COMMANDS[name]]
    sub = build_parser()._subparsers._group_actions[0].choices[name]
    options = {a.dest: a.default for a in sub._actions}
    assert options.get("device") is None and options.get("dtype") == "auto", options

    # On a machine with CUDA, the model goes there in bfloat16 unless told otherwise.
    _machine(monkeypatch, True, False)
    seen = []

    class Loaded(Exception):
        pass

    def fake_load(*args, **kwargs):
        seen.append((kwargs.get("device"), kwargs.get("dtype")))
        raise Loaded

    monkeypatch.setattr("balcony.cli.common.load_base", fake_load)
    monkeypatch.setattr("balcony.eval.run.load_balcony", fake_load)
    for extra, want in (([], ("cuda", "bfloat16")), (["--device", "cpu", "--dtype", "float16"], ("cpu", "float16"))):
        with pytest.raises(Loaded):
            main(argv + extra)
        assert seen[-1] == want, (name, extra, seen[-1])


def test_info_counts_on_the_cpu(monkeypatch):
    from balcony.cli import main

    _machine(monkeypatch, True, False)
    seen = []

    def fake_load(*args, **kwargs):
        seen.append(kwargs.get("device"))
        raise KeyboardInterrupt

    monkeypatch.setattr("balcony.cli.common.load_base", fake_load)
    assert main(["info"]) == 130 and seen == ["cpu"]


def test_a_base_for_an_accelerator_loads_straight_onto_it(monkeypatch, tiny_model_dir):
    """device=cuda loads through device_map (shard by shard onto the device), never a whole copy in host RAM first."""
    import transformers

    from balcony.modeling.loading import load_base

    real = transformers.AutoModelForCausalLM.from_pretrained
    seen = []

    def spy(path, **kwargs):
        seen.append(kwargs.get("device_map"))
        kwargs.pop("device_map", None)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_base(str(tiny_model_dir), device="cpu")
    base, _ = load_base(str(tiny_model_dir), device="meta", dtype="bfloat16")  # "meta" stands in for an accelerator here
    assert seen == [None, {"": "meta"}]
    assert next(base.parameters()).device.type == "meta" and next(base.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------ generators
class _Elsewhere:
    """A generator stand-in on another device (this CPU-only torch cannot make a CUDA one)."""

    device = torch.device("cuda", 0)


@pytest.mark.parametrize("call", ["generate", "stream", "speculative"])
def test_a_generator_on_another_device_is_refused_with_both_devices_named(call):
    model = make()
    kw = dict(exit="S", max_new_tokens=3, do_sample=True, generator=_Elsewhere())
    run = {
        "generate": lambda: generate(model, ids(), **kw),
        "stream": lambda: list(generate_stream(model, ids(), **kw)),
        "speculative": lambda: speculative_generate(model, ids(), **kw),
    }[call]
    with pytest.raises(ValueError, match=r"generator is on cuda:0 but the model decodes on cpu.*torch.Generator\(device='cpu'\)"):
        run()
    # the same generator object on the right device is fine
    assert generate(model, ids(), exit="S", max_new_tokens=3, do_sample=True, generator=torch.Generator("cpu").manual_seed(0)).shape == (1, 9)


def test_generate_command_seeds_a_generator_on_the_model_device(monkeypatch, tiny_model_dir, capsys):
    from balcony.cli import main

    made = []
    real = torch.Generator

    def recording(device=None):
        made.append(device)
        return real() if device is None else real(device=device)

    monkeypatch.setattr(torch, "Generator", recording)
    args = ["generate", "hello world", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--no-chat", "--sample", "--seed", "5"]
    assert main(args + ["--device", "cpu"]) == 0
    assert made == [torch.device("cpu")]  # created for the model's device, not torch's default one
    first = capsys.readouterr().out
    assert main(args + ["--device", "cpu"]) == 0 and capsys.readouterr().out == first  # and seeded


# ------------------------------------------------------------------------ accelerate-dispatched bases
def _offloaded(kind: str, tmp_path) -> tuple[BalconyModel, BalconyModel]:
    """(plain model, the same weights with accelerate's offload hooks on the base)."""
    import accelerate

    plain = make()
    hooked = make()
    if kind == "cpu_offload":  # every weight on 'meta' between calls, loaded by the hooks
        accelerate.cpu_offload(hooked.base, execution_device="cpu")
    else:  # a device map: three layers in memory, three offloaded to disk, the head offloaded too
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk"}
        device_map.update({f"model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(6)})
        accelerate.dispatch_model(hooked.base, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert hooked.base.model.layers[4].self_attn.q_proj.weight.device.type == "meta"
    return plain, hooked


@pytest.mark.parametrize("kind", ["cpu_offload", "device_map"])
def test_offloaded_bases_decode_exactly_like_plain_ones(kind, tmp_path):
    plain, hooked = _offloaded(kind, tmp_path)
    x = ids(t=7)
    for budget in ("S", "L", "XL"):
        assert torch.equal(generate(hooked, x, exit=budget, max_new_tokens=8), generate(plain, x, exit=budget, max_new_tokens=8))
    ref = generate(plain, x, max_new_tokens=10)
    for kw in (dict(draft_length=3), dict(draft_length=1, draft_width=2), dict(draft_length=2, draft_vocab=40)):
        out, stats = speculative_generate(hooked, x, exit="L", max_new_tokens=10, **kw)
        assert torch.equal(out, ref), kw
        # the same drafts too (a draft head reading an offloaded weight would propose junk: still lossless, never accepted)
        want = speculative_generate(plain, x, exit="L", max_new_tokens=10, **kw)[1]
        assert (stats.drafted, stats.accepted) == (want.drafted, want.accepted) and stats.accepted > 0, kw


def test_offloaded_layers_never_take_the_fast_path(tmp_path):
    from balcony.inference.cache import budget_slots
    from balcony.inference.spans import new_state

    plain, hooked = _offloaded("device_map", tmp_path)
    assert all(new_state(plain, budget_slots(plain, 6), 1, 8).fast.values())
    fast = new_state(hooked, budget_slots(hooked, 6), 1, 8).fast
    layers = hooked.parts.layers
    assert [fast[id(layer)] for layer in layers] == [False] * 6  # hooked (also the in-memory ones: their hooks move inputs)
    assert all(fast[id(ex.layer)] for ex in hooked.exits.values())  # the exits are plain modules


def test_compile_and_quantize_refuse_dispatched_bases(tmp_path):
    _, hooked = _offloaded("cpu_offload", tmp_path)
    with pytest.raises(ValueError, match="compile=True needs a base on one device without accelerate hooks"):
        generate(hooked, ids(), max_new_tokens=2, compile="eager")
    with pytest.raises(ValueError, match="quantize needs the base's weights in memory on one device"):
        hooked.quantize("int8")


# ------------------------------------------------------------------------ benchmark clocks
def test_bench_clocks_wait_for_the_device(monkeypatch):
    """Every clock read in the benchmark comes right after a device sync (on CUDA: `torch.cuda.synchronize`)."""
    import time

    import balcony.bench.measure as measure
    from balcony.bench.speed import run_bench
    from tiny_models import tiny_hf_tokenizer

    events = []
    monkeypatch.setattr(measure, "synchronize", lambda device=None: events.append("sync"))
    real = time.perf_counter

    def clock() -> float:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("balcony.bench"):
            assert events and events[-1] == "sync", f"{caller} read the clock without waiting for the device"
            events.append("clock")
        return real()

    monkeypatch.setattr(time, "perf_counter", clock)
    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=EXITS))
    run_bench(model, tok, max_new_tokens=3, prompt_tokens=4, repeats=1, batch_size=2, log=lambda s: None)
    assert events.count("clock") > 20
