import pytest
from tiny_models import tiny_hf_tokenizer


@pytest.fixture
def tiny_tokenizer_dir(tmp_path_factory):
    """(directory holding a saved tiny tokenizer, its vocab size)."""
    tok = tiny_hf_tokenizer()
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d, len(tok)
