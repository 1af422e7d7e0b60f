"""The GPU check's driver (scripts/gpu_check.py): its table, its training arguments, its refusal of a CPU torch.

The check itself runs end to end on a CPU with ``scripts/gpu_check.sh --device cpu --size small`` (.ci/run).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_has_a_row_per_test_training_budget_and_quality_run(check):
    results = {
        "tests": {"ok": False, "tests": [{"test": "test_a", "status": "passed", "seconds": 1.0, "message": ""},
                                         {"test": "test_b", "status": "FAILED", "seconds": 2.0, "message": "assert 2 == 1"}]},
        "train": {"ok": True, "steps": 200, "tokens_per_s": 51234.0, "peak_memory_mb": 2048.0, "seconds": 40.0, "lr_shape_ok": True,
                  "lr_trace": [(s, 1e-3 * min(s / 10, 1.0)) for s in range(10, 210, 10)]},
        "bench": {"ok": True, "bench": {"dtype": "bfloat16", "budgets": [
            {"budget": "S", "exit_layer": 14, "decode_tok_s": 300.0, "compiled_decode_tok_s": 900.0, "compiled_over_eager": 3.0},
            {"budget": "XL", "exit_layer": 30, "decode_tok_s": 150.0}], "hf": {"batch1": {"decode_tok_s": 90.0}}, "speculative": []}},
        "quality": {"ok": False, "rc": "timeout", "seconds": 300.0},
    }
    text = check.table(results, {"device": "cuda", "name": "NVIDIA H200", "torch": "2.13.0"})
    assert "GPU check on cuda (NVIDIA H200)" in text
    assert "test_b" in text and "FAILED: assert 2 == 1" in text
    assert "200 steps, 51,234 tok/s, 2,048 MiB" in text and "ok: " in text
    assert "engine S (layer 14)" in text and "compiled 900 (3.00x)" in text and "HF generate, batch 1, full depth" in text
    assert "FAILED (rc timeout)" in text


def test_training_arguments_follow_the_train_command(check):
    args = check._train_args("smollm2-quick", "precision=bf16,max_steps=200", Path("/tmp/x"), "cuda")
    assert args[:3] == ["train", "--config", "smollm2-quick"]
    assert args[4] == "precision=bf16,max_steps=200,output_dir=/tmp/x,progress=false" and "--no-resume" in args
    from balcony.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    takes_device = any("--device" in a.option_strings for a in train._actions)
    assert ("--device" in args) == takes_device


def test_a_cpu_torch_on_a_gpu_machine_is_refused(check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(check, "_has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(check, "_device", lambda name: "cpu")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path)])
    assert check.main() == 2
    assert "this torch has no CUDA" in capsys.readouterr().err
