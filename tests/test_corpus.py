"""The generated default corpus: built once, cached, resumed, and used when no dataset is given."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_base, tiny_hf_tokenizer

from balcony import BalconyConfig, BalconyModel
from balcony.training.corpus import (
    FICTION_SHARE,
    FICTION_TOPICS,
    HOWTO_SHARE,
    HOWTO_TOPICS,
    SAMPLING,
    TOPICS,
    _prompts,
    corpus_path,
    generated_corpus,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "cache"))


def test_prompts_mix_textbook_topics_fiction_and_howto():
    prompts = _prompts(tiny_hf_tokenizer(), 400, seed=0)
    fiction = sum(topic in FICTION_TOPICS for topic, _ in prompts) / len(prompts)
    howto = sum(topic in HOWTO_TOPICS for topic, _ in prompts) / len(prompts)
    textbook = sum(topic in TOPICS for topic, _ in prompts) / len(prompts)
    assert abs(fiction - FICTION_SHARE) < 0.1, fiction
    assert abs(howto - HOWTO_SHARE) < 0.1, howto
    assert abs(textbook - (1 - FICTION_SHARE - HOWTO_SHARE)) < 0.1, textbook
    assert all(topic in text for topic, text in prompts)
    assert _prompts(tiny_hf_tokenizer(), 400, seed=0) == prompts and _prompts(tiny_hf_tokenizer(), 400, seed=1) != prompts


def test_generated_corpus_is_cached_and_extended():
    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=[2]))
    path = generated_corpus(model, tok, num_tokens=200, batch_size=4, max_new_tokens=24, progress=False)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert sum(r["tokens"] for r in rows) >= 200
    assert all(r["topic"] in TOPICS + FICTION_TOPICS + HOWTO_TOPICS and r["tokens"] >= 16 for r in rows)
    assert path == corpus_path(model, 0)
    # Asking for no more than what is there generates nothing.
    model.generate = lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated"))
    assert generated_corpus(model, tok, num_tokens=200, progress=False) == path
    del model.generate
    # Asking for more appends: earlier passages are kept as they were.
    before = path.read_text()
    generated_corpus(model, tok, num_tokens=400, batch_size=4, max_new_tokens=24, progress=False)
    after = path.read_text()
    assert after.startswith(before) and len(after) > len(before)


def test_each_sampling_setting_has_its_own_cache_file():
    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=[2]))
    kw = dict(num_tokens=60, batch_size=4, max_new_tokens=24, progress=False)
    default = generated_corpus(model, tok, **kw)
    cool = dict(temperature=0.8, top_k=100, top_p=0.95)
    cooler = generated_corpus(model, tok, **kw, **cool)
    assert default == corpus_path(model, 0) and cooler == corpus_path(model, 0, **cool) and default != cooler
    assert default.read_text() != cooler.read_text()
    assert corpus_path(model, 0, **{**SAMPLING, "temperature": 0.9}) not in (default, cooler)


def test_two_runs_sharing_a_cache_append_each_passage_once(tmp_path, monkeypatch):
    """A second run on the same cache waits for the first instead of appending the same rounds again."""
    import threading

    tok = tiny_hf_tokenizer()
    model = BalconyModel(tiny_base(vocab_size=len(tok)), BalconyConfig(exit_layers=[2]))
    kw = dict(num_tokens=150, batch_size=4, max_new_tokens=24, progress=False)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(generated_corpus(model, tok, **kw))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paths[0] == paths[1]
    shared = paths[0].read_text()
    monkeypatch.setenv("BALCONY_CACHE", str(tmp_path / "alone"))
    alone = generated_corpus(model, tok, **kw).read_text()
    assert shared == alone  # exactly what one run writes: no round appended twice
