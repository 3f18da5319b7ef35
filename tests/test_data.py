"""Loading text data from files and folders."""

import json

import pytest

from hf_qad.data import load_text_dataset, split_documents


def test_split_documents_packs_paragraphs():
    text = "aaa\n\nbbb\n\n\nccc dddd\n"
    assert split_documents(text, max_chars=7) == ["aaa\nbbb", "ccc", "dddd"]  # 8 chars: cut at the space
    assert split_documents(text, max_chars=100) == ["aaa\nbbb\nccc dddd"]
    assert split_documents("\n\n") == []


def test_txt_jsonl_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert load_text_dataset(str(tmp_path / "a.txt"), max_chars=3)["text"] == ["one", "two"]
    rows = [{"prompt": "hi", "completion": "there"}, {"prompt": "a", "completion": "b"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_text_dataset(str(tmp_path / "b.jsonl"))["prompt"] == ["hi", "a"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_dataset(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        load_text_dataset(str(tmp_path / "empty.txt"))
    (tmp_path / "c.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_text_dataset(str(tmp_path / "c.xml"))


def test_long_paragraphs_are_cut_at_line_ends_then_at_whitespace_then_anywhere():
    paragraph = "first line\nsecond line here\nthird"
    assert split_documents(paragraph, max_chars=17) == ["first line", "second line here", "third"]
    assert split_documents(paragraph, max_chars=30) == ["first line\nsecond line here", "third"]
    assert split_documents("one two three four five", max_chars=9) == ["one two", "three", "four five"]
    assert split_documents("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]  # no whitespace: a hard cut
    # indentation that alone fills the limit is no piece of its own
    assert split_documents("a\n" + " " * 12 + "b" * 12, max_chars=10) == ["a", "b" * 10, "bb"]
    assert split_documents("short\n\n" + "y " * 10, max_chars=8) == ["short", "y y y y", "y y y y", "y y"]


def test_jsonl_without_rows_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no rows"):
        load_text_dataset(str(tmp_path / "empty.jsonl"))
