"""The CLI parser and subcommands, on a tiny saved model."""

from __future__ import annotations

import pytest
from tiny_models import tiny_base

from balcony import BalconyConfig, BalconyModel
from balcony.cli import build_parser, main


@pytest.fixture
def tiny_dir(tmp_path, tiny_tokenizer_dir):
    base = tiny_base(vocab_size=tiny_tokenizer_dir[1])
    base.save_pretrained(tmp_path / "base")
    import shutil

    for f in (tiny_tokenizer_dir[0]).iterdir():
        shutil.copy(f, tmp_path / "base" / f.name)
    model = BalconyModel(base, BalconyConfig(exit_layers=[2, 4]))
    model.save_pretrained(tmp_path / "exits")
    return tmp_path


def test_parser_is_built_from_signatures():
    parser = build_parser()
    args = parser.parse_args(["generate", "hello", "--budget", "S", "--max-new-tokens", "3", "--sample"])
    assert args.prompt == "hello" and args.budget == "S" and args.max_new_tokens == 3 and args.sample is True
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--max-new-tokens", "many"])


def test_generate_and_info(tiny_dir, capsys):
    base = str(tiny_dir / "base")
    assert main(["generate", "hello world", "--model", base, "--exits", str(tiny_dir / "exits"), "--budget", "S", "--max-new-tokens", "4", "--no-chat"]) == 0
    err = capsys.readouterr().err
    assert "[budget S: layers 1-2 of 6" in err
    assert main(["generate", "hello", "--model", base, "--budget", "3", "--max-new-tokens", "2", "--no-chat"]) == 0
    assert "exits untrained" in capsys.readouterr().err
    assert main(["info", "--model", base, "--exits", str(tiny_dir / "exits")]) == 0
    out = capsys.readouterr().out
    assert "exits:        2, 4" in out and "trained" in out
    assert "trainable params:" in out


def test_bad_budget_is_a_clear_error(tiny_dir, capsys):
    rc = main(["generate", "hello", "--model", str(tiny_dir / "base"), "--exits", str(tiny_dir / "exits"), "--budget", "XXL", "--no-chat"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown budget 'XXL'" in err and "S (layer 2)" in err
    rc = main(["generate", " ", "--model", str(tiny_dir / "base"), "--no-chat"])
    assert rc == 2 and "prompt is empty" in capsys.readouterr().err
