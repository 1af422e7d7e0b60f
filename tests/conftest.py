import os

import pytest
import torch
from tiny_models import tiny_base, tiny_hf_tokenizer


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is, or on the device BALCONY_TEST_DEVICE names (scripts/gpu_check.sh --device cpu)."""
    if torch.cuda.is_available() or os.environ.get("BALCONY_TEST_DEVICE"):
        return
    skip = pytest.mark.skip(reason="needs CUDA (BALCONY_TEST_DEVICE=cpu runs the GPU checks on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_tokenizer_dir(tmp_path_factory):
    """(directory holding a saved tiny tokenizer, its vocab size)."""
    tok = tiny_hf_tokenizer()
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d, len(tok)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer_dir):
    """A directory holding a tiny random Llama base and its tokenizer, loadable by name (CLI tests)."""
    d = tmp_path / "base"
    tiny_base(vocab_size=tiny_tokenizer_dir[1]).save_pretrained(d)
    tiny_hf_tokenizer().save_pretrained(d)
    return d


# Chat template in the ChatML style SmolLM2 uses, enough to see that messages go through it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level tokenizer built in memory: token id == UTF-8 byte value.

    Specials: ``<|endoftext|>`` = 256 (EOS), ``<|pad|>`` = 257, ``<|im_start|>`` = 258,
    ``<|im_end|>`` = 259. It adds no BOS, and has a ChatML ``chat_template``.
    So ``tiny_tokenizer("hi")["input_ids"] == list(b"hi")``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.eos_token_id == 256 and tokenizer.pad_token_id == 257
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [258, 259]
    return tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: an OpenMP fork/join per op costs more than it saves (and stalls on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def local_tasks_only(monkeypatch):
    """Never index the harness's ~15k built-in tasks (10 s): only include paths."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    class LocalTaskManager(real):
        def __init__(self, *args, include_defaults=True, **kwargs):
            super().__init__(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTaskManager)
