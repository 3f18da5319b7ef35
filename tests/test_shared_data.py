"""The repository's data helper (``tests/shared_data.py``): ``$HF_QAD_DATA`` or ``../shared/data``."""

import pytest

from tests.shared_data import read_text, shared_data_dir


def test_shared_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_QAD_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    assert read_text("a.txt") == "héllo"
    with pytest.raises(FileNotFoundError, match="available: a.txt"):
        read_text("b.txt")
    with pytest.raises(ValueError, match="file name"):
        read_text("../a.txt")


def test_absent_shared_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_QAD_DATA", str(tmp_path / "missing"))
    assert shared_data_dir() is None
    with pytest.raises(FileNotFoundError, match="HF_QAD_DATA"):
        read_text("wikitext2_valid.txt")


def test_shared_data_dir_beside_the_repo(monkeypatch):
    monkeypatch.delenv("HF_QAD_DATA", raising=False)
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("../shared/data is absent (only present beside the development checkout)")
    assert folder.name == "data" and folder.parent.name == "shared"
    assert "Homarus" in read_text("wikitext2_valid.txt")[:200]
