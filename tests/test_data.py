"""balcony.data: loading local corpora, packing into rows, resumable batches (offline)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from balcony.training import data as data_mod
from balcony.training.data import (
    DataConfig,
    batches_per_epoch,
    iterate_batches,
    prepare_data,
)
from balcony.training.packing import PackedData, tokenize_and_pack
from balcony.training.sources import chat_to_text, load_texts

EOS = 256  # tiny_tokenizer: token id == byte value, EOS 256, pad 257, <|im_start|> 258, <|im_end|> 259


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # Keep `datasets`' Arrow cache out of the user's home.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts_of(ds, field="text"):
    return [row[field] for row in ds]


def stream(docs):
    """The token stream packing should produce: each document's bytes, then EOS."""
    return [t for d in docs for t in [*d.encode(), EOS]]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"seq_len": 0}, ["seq_len", "0", ">= 1"]),
        ({"seq_len": True}, ["seq_len", "True"]),
        ({"max_tokens": -5}, ["max_tokens", "-5"]),
        ({"eval_fraction": 1.5}, ["eval_fraction", "1.5", "between 0 and 1"]),
        ({"eval_fraction": 0.1, "eval_tokens": 100}, ["eval_fraction", "eval_tokens", "at most one"]),
        ({"num_proc": 0}, ["num_proc", "0"]),
        ({"text_field": ""}, ["text_field", "''"]),
        ({"streaming": "yes"}, ["streaming", "'yes'"]),
    ],
)
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError) as err:
        DataConfig(dataset="x.txt", **kwargs)
    for word in words:
        assert word in str(err.value)


def test_config_eval_rows():
    assert DataConfig(seq_len=10).eval_rows(100) == 0
    assert DataConfig(seq_len=10, eval_tokens=25).eval_rows(100) == 3
    assert DataConfig(seq_len=10, eval_fraction=0.05).eval_rows(100) == 5
    assert DataConfig(seq_len=10, eval_fraction=0.001).eval_rows(100) == 1


# --------------------------------------------------------------------------- loading


def test_txt_documents_are_blank_line_separated_blocks(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("First doc,\nstill first.\n\nSecond doc.\n\n\n\nThird doc.\n  \n\n\n")
    ds = load_texts(DataConfig(dataset=str(f)))
    assert isinstance(ds, datasets.Dataset)
    assert texts_of(ds) == ["First doc,\nstill first.", "Second doc.", "Third doc."]


def test_txt_renamed_to_text_field(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a\n\nb\n")
    assert texts_of(load_texts(DataConfig(dataset=str(f), text_field="content")), "content") == ["a", "b"]


def test_jsonl_keeps_only_the_text_column(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "alpha", "id": 1}, {"text": "beta", "id": 2}])
    ds = load_texts(DataConfig(dataset=str(f)))
    assert ds.column_names == ["text"]
    assert texts_of(ds) == ["alpha", "beta"]


def test_json_list_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps([{"body": "x y"}, {"body": "z"}]))
    assert texts_of(load_texts(DataConfig(dataset=str(f), text_field="body")), "body") == ["x y", "z"]


def test_parquet(tmp_path):
    f = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"text": ["p1", "p2", "p3"], "n": [1, 2, 3]}).to_parquet(str(f))
    assert texts_of(load_texts(DataConfig(dataset=str(f)))) == ["p1", "p2", "p3"]


def test_directory_reads_supported_files_sorted_recursively(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "b.jsonl", [{"text": "b1"}])
    write_jsonl(d / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    write_jsonl(d / "sub" / "c.jsonl", [{"text": "c1"}])
    (d / "README.md").write_text("# not data")
    (d / ".cache").mkdir()
    write_jsonl(d / ".cache" / "x.jsonl", [{"text": "hidden"}])
    assert texts_of(load_texts(DataConfig(dataset=str(d)))) == ["a1", "a2", "b1", "c1"]


def test_glob(tmp_path):
    write_jsonl(tmp_path / "part2.jsonl", [{"text": "two"}])
    write_jsonl(tmp_path / "part1.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "other.jsonl", [{"text": "no"}])
    assert texts_of(load_texts(DataConfig(dataset=str(tmp_path / "part*.jsonl")))) == ["one", "two"]


def test_streaming_local_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one\n\n two \n\n\n")
    ds = load_texts(DataConfig(dataset=str(f), streaming=True))
    assert isinstance(ds, datasets.IterableDataset)
    assert texts_of(ds) == ["one", "two"]


@pytest.mark.parametrize("name", ["missing.jsonl", "no/such/dir", "./corpus"])
def test_missing_path_is_named(tmp_path, name):
    path = str(tmp_path / name) if name != "./corpus" else name
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_texts(DataConfig(dataset=path))
    assert path in str(err.value)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-"):
        load_texts(DataConfig(dataset=str(tmp_path / "nothing-*.jsonl")))


def test_missing_text_field_lists_columns(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"content": "a", "meta": 1}])
    for streaming in (False, True):
        with pytest.raises(ValueError) as err:
            load_texts(DataConfig(dataset=str(f), streaming=streaming))
        msg = str(err.value)
        assert "'text'" in msg and "'content'" in msg and "'meta'" in msg


@pytest.mark.parametrize("name, content", [("e.txt", ""), ("blank.txt", "\n\n  \n\n"), ("e.jsonl", ""), ("n.jsonl", "\n\n")])
@pytest.mark.parametrize("streaming", [False, True])
def test_empty_dataset(tmp_path, name, content, streaming):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ValueError, match="empty") as err:
        load_texts(DataConfig(dataset=str(f), streaming=streaming))
    assert str(f) in str(err.value)


def test_empty_parquet(tmp_path):
    f = tmp_path / "e.parquet"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})).to_parquet(str(f))
    with pytest.raises(ValueError, match="empty"):
        load_texts(DataConfig(dataset=str(f)))


def test_mixed_formats_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    with pytest.raises(ValueError, match="mixes file formats"):
        load_texts(DataConfig(dataset=str(tmp_path)))


def test_local_files_have_only_train_split(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": f"d{i}"} for i in range(10)])
    with pytest.raises(ValueError, match="validation"):
        load_texts(DataConfig(dataset=str(f), split="validation"))
    assert texts_of(load_texts(DataConfig(dataset=str(f), split="train[:3]"))) == ["d0", "d1", "d2"]


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["hub doc"], "other": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_texts(DataConfig(dataset="SomeOrg/some-set", config_name="cfg", split="train[:10]", num_proc=2))
    assert texts_of(ds) == ["hub doc"]
    assert calls == [(("SomeOrg/some-set", "cfg"), {"split": "train[:10]", "streaming": False, "num_proc": 2})]


def test_unknown_hub_id_is_named(monkeypatch):
    def not_found(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'SomeOrg/nope' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(FileNotFoundError, match="'SomeOrg/nope' is not a local file"):
        load_texts(DataConfig(dataset="SomeOrg/nope"))


def test_dataset_unset():
    with pytest.raises(ValueError, match="dataset is not set"):
        load_texts(DataConfig())


# --------------------------------------------------------------------------- packing

DOCS = ["Hello world.", "A second, longer document here.", "x", "Fourth document!", "The end of the corpus."]


def test_packing_rows_eos_positions_labels(tiny_tokenizer):
    seq_len = 16
    packed = tokenize_and_pack(DOCS, tiny_tokenizer, seq_len)
    expected = stream(DOCS)
    rows = len(expected) // seq_len
    assert packed.input_ids.shape == (rows, seq_len) and packed.packed
    # Total tokens preserved up to the dropped tail, in order, documents joined by EOS.
    assert packed.input_ids.flatten().tolist() == expected[:rows * seq_len]

    # position_ids are 0 exactly at document starts and row starts, else count up by one.
    flat_pos = packed.position_ids.flatten().tolist()
    doc_starts, start = set(), 0
    for d in DOCS:
        doc_starts.add(start)
        start += len(d.encode()) + 1
    for i, p in enumerate(flat_pos):
        if i in doc_starts or i % seq_len == 0:
            assert p == 0, i
        else:
            assert p == flat_pos[i - 1] + 1, i
    # A token after EOS always starts a document.
    ids = packed.input_ids.flatten().tolist()
    for i in range(1, len(ids)):
        if ids[i - 1] == EOS:
            assert flat_pos[i] == 0

    row = packed[1]
    assert set(row) == {"input_ids", "position_ids", "labels"}  # packed rows pass no attention_mask
    assert row["input_ids"].dtype == torch.long and row["input_ids"].shape == (seq_len,)
    assert torch.equal(row["labels"], row["input_ids"].masked_fill(row["position_ids"] == 0, -100))


def test_packing_drops_tail_exactly(tiny_tokenizer):
    docs = ["abc", "defg"]  # 4 + 5 = 9 tokens
    packed = tokenize_and_pack(docs, tiny_tokenizer, 4)
    assert packed.input_ids.tolist() == [[*b"abc", EOS], [*b"defg"]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_max_tokens(tiny_tokenizer):
    full = stream(DOCS)
    for max_tokens in (20, 33, 48):
        packed = tokenize_and_pack(DOCS, tiny_tokenizer, 8, max_tokens=max_tokens)
        kept = full[:max_tokens]
        assert packed.input_ids.flatten().tolist() == kept[: len(kept) // 8 * 8]
    unpacked = tokenize_and_pack(DOCS, tiny_tokenizer, 8, pack=False, max_tokens=11)
    assert unpacked.num_tokens == 11 and len(unpacked) == 2  # 8 (truncated doc 1) + 3 of doc 2


def test_too_few_tokens_for_a_row(tiny_tokenizer):
    with pytest.raises(ValueError) as err:
        tokenize_and_pack(["ab", "c"], tiny_tokenizer, 64)
    assert "5 tokens" in str(err.value) and "seq_len=64" in str(err.value)


def test_seq_len_over_max_positions(tiny_tokenizer):
    with pytest.raises(ValueError) as err:
        tokenize_and_pack(DOCS, tiny_tokenizer, 4096, max_positions=2048)
    assert "4096" in str(err.value) and "2048" in str(err.value)
    with pytest.raises(ValueError, match="seq_len=300.*256"):
        prepare_data(DataConfig(dataset="unused.txt", seq_len=300), tiny_tokenizer, max_positions=256)


def test_unpacked_rows_truncate_and_pad(tiny_tokenizer):
    data = tokenize_and_pack(["abcdefghij", "xy", "   ", ""], tiny_tokenizer, 6, pack=False)
    assert data.input_ids.tolist() == [[*b"abcdef"], [*b"xy", EOS, 257, 257, 257]]
    assert data.attention_mask.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    row = data[1]
    assert row["attention_mask"].tolist() == [1, 1, 1, 0, 0, 0]
    assert row["labels"].tolist() == [-100, ord("y"), EOS, -100, -100, -100]


def test_dataset_inputs_match_list_input(tiny_tokenizer):
    as_list = tokenize_and_pack(DOCS, tiny_tokenizer, 8)
    ds = datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))})
    from_ds = tokenize_and_pack(ds, tiny_tokenizer, 8, text_field="body", batch_size=2)
    from_stream = tokenize_and_pack(ds.to_iterable_dataset(), tiny_tokenizer, 8, text_field="body", batch_size=3)
    for other in (from_ds, from_stream):
        assert torch.equal(other.input_ids, as_list.input_ids) and torch.equal(other.position_ids, as_list.position_ids)
    with pytest.raises(ValueError, match="'text' not found.*'body'"):
        tokenize_and_pack(ds, tiny_tokenizer, 8)


def test_no_double_eos_and_no_eos(tiny_tokenizer):
    data = tokenize_and_pack(["ab<|endoftext|>", "cd"], tiny_tokenizer, 3)
    assert data.input_ids.flatten().tolist() == [*b"ab", EOS, *b"cd", EOS]
    data = tokenize_and_pack(["ab", "cd"], tiny_tokenizer, 2, add_eos=False)
    assert data.input_ids.tolist() == [[*b"ab"], [*b"cd"]] and data.position_ids.tolist() == [[0, 1], [0, 1]]


def test_packed_positions_isolate_documents_in_attention():
    """What the docstring promises: packed position_ids (no mask, no cache) keep documents apart under SDPA."""
    from tiny_models import tiny_base

    model = tiny_base("llama")
    a, b = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[8, 9, 10, 11]])
    row = torch.cat([a, b], dim=1)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits
        alone = model(input_ids=b, use_cache=False).logits
        concatenated = model(input_ids=row, position_ids=pos, attention_mask=torch.ones_like(row), use_cache=False).logits
    torch.testing.assert_close(packed[:, 4:], alone, atol=1e-5, rtol=1e-5)
    # With an explicit mask HF falls back to plain causal attention over the concatenation.
    assert not torch.allclose(concatenated[:, 4:], alone, atol=1e-3)


# --------------------------------------------------------------------------- chat


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_chat_to_text_uses_template(tiny_tokenizer):
    assert chat_to_text(CHAT, tiny_tokenizer) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    with pytest.raises(ValueError, match="role"):
        chat_to_text([{"text": "hi"}], tiny_tokenizer)


def test_chat_to_text_without_template(tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        chat_to_text(CHAT, tok)


def test_prepare_data_chat(tmp_path, tiny_tokenizer):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT, "id": 0}, {"messages": CHAT[:1], "id": 1}])
    train, held_out = prepare_data(DataConfig(dataset=str(f), messages_field="messages", seq_len=4), tiny_tokenizer)
    assert held_out is None
    expected = tiny_tokenizer(chat_to_text(CHAT, tiny_tokenizer), add_special_tokens=False)["input_ids"] + [EOS]
    expected += tiny_tokenizer(chat_to_text(CHAT[:1], tiny_tokenizer), add_special_tokens=False)["input_ids"] + [EOS]
    assert expected[0] == 258  # <|im_start|> is one special token, not its characters
    assert train.input_ids.flatten().tolist() == expected[: len(expected) // 4 * 4]
    with pytest.raises(ValueError, match="messages field 'messages' not found.*'text'"):
        prepare_data(DataConfig(dataset=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])), messages_field="messages"), tiny_tokenizer)


# --------------------------------------------------------------------------- PackedData


def test_split_save_load(tmp_path, tiny_tokenizer):
    data = tokenize_and_pack(DOCS * 4, tiny_tokenizer, 8)
    train, held_out = data.split(3)
    assert len(held_out) == 3 and len(train) == len(data) - 3
    assert torch.equal(held_out.input_ids, data.input_ids[-3:])
    with pytest.raises(ValueError, match="eval_rows"):
        data.split(len(data))

    data.metadata["note"] = "hi"
    data.save(tmp_path / "cache" / "d.safetensors")
    back = PackedData.load(tmp_path / "cache" / "d.safetensors")
    assert torch.equal(back.input_ids, data.input_ids) and torch.equal(back.position_ids, data.position_ids)
    assert back.attention_mask is None and back.metadata == {"note": "hi"}

    unpacked = tokenize_and_pack(DOCS, tiny_tokenizer, 8, pack=False)
    unpacked.save(tmp_path / "u.safetensors")
    back = PackedData.load(tmp_path / "u.safetensors")
    assert torch.equal(back.attention_mask, unpacked.attention_mask)


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"input_ids": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a balcony PackedData"):
        PackedData.load(tmp_path / "x.safetensors")


def test_prepare_data_eval_split_and_cache(tmp_path, tiny_tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS * 4])
    cfg = DataConfig(dataset=str(f), seq_len=8, eval_tokens=20)
    cache = tmp_path / "tok.safetensors"
    train, held_out = prepare_data(cfg, tiny_tokenizer, cache_path=cache)
    assert len(held_out) == 3 and cache.exists()
    full = stream(DOCS * 4)
    assert len(train) + len(held_out) == len(full) // 8

    # A second call reads the cache and does not load the corpus again.
    monkeypatch.setattr(data_mod, "load_texts", lambda cfg: pytest.fail("cache was not used"))
    train2, _ = prepare_data(cfg, tiny_tokenizer, cache_path=cache)
    assert torch.equal(train2.input_ids, train.input_ids)
    # A change that shapes the tokens invalidates it.
    monkeypatch.undo()
    datasets.disable_progress_bars()
    train3, held_out3 = prepare_data(DataConfig(dataset=str(f), seq_len=8, max_tokens=40, eval_fraction=0.2), tiny_tokenizer, cache_path=cache)
    assert len(train3) + len(held_out3) == 5 and len(held_out3) == 1


# --------------------------------------------------------------------------- batches


def rows_data(n=23, seq_len=4):
    ids = torch.arange(n * seq_len, dtype=torch.int32).reshape(n, seq_len)
    return PackedData(ids, torch.arange(seq_len, dtype=torch.int32).expand(n, seq_len).contiguous())


def row_ids(batches):
    return [b["input_ids"][:, 0].div(4, rounding_mode="floor").tolist() for b in batches]


def test_batches_deterministic_and_per_epoch():
    data = rows_data()
    first = row_ids(iterate_batches(data, 5, seed=3, epoch=0))
    assert first == row_ids(iterate_batches(data, 5, seed=3, epoch=0))
    assert first != row_ids(iterate_batches(data, 5, seed=3, epoch=1))
    assert first != row_ids(iterate_batches(data, 5, seed=4, epoch=0))
    assert len(first) == batches_per_epoch(data, 5) == 4  # drop_last: 23 rows -> 4 full batches
    flat = [r for b in first for r in b]
    assert len(set(flat)) == 20  # no row twice in an epoch
    # Independent of global RNG state.
    torch.manual_seed(123)
    assert first == row_ids(iterate_batches(data, 5, seed=3, epoch=0))


def test_batches_resume_exactly():
    data = rows_data()
    full = list(iterate_batches(data, 3, seed=7, epoch=2))
    for k in (0, 1, 4, len(full)):
        resumed = list(iterate_batches(data, 3, seed=7, epoch=2, start_step=k))
        assert len(resumed) == len(full) - k
        for a, b in zip(resumed, full[k:]):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    batch = full[0]
    assert batch["input_ids"].shape == (3, 4) and batch["input_ids"].dtype == torch.long


def test_batches_errors_and_drop_last():
    data = rows_data(n=10)
    assert sum(len(b["input_ids"]) for b in iterate_batches(data, 4, seed=0, epoch=0, drop_last=False)) == 10
    with pytest.raises(ValueError, match=r"start_step.*\[0, 2\].*3"):
        list(iterate_batches(data, 4, seed=0, epoch=0, start_step=3))
    with pytest.raises(ValueError, match="batch_size=11 exceeds the 10 rows"):
        list(iterate_batches(data, 11, seed=0, epoch=0))
