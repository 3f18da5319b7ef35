"""Loading text data from files and folders."""

import json

import pytest

from hf_qad.data import load_text_dataset, split_documents


def test_split_documents_packs_paragraphs():
    text = "aaa\n\nbbb\n\n\nccc dddd\n"
    assert split_documents(text, max_chars=7) == ["aaa\nbbb", "ccc dddd"]
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
