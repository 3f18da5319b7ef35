"""``hf_qad.assets``, deprecated: its names still resolve, each with a DeprecationWarning."""

import pytest

import hf_qad.assets
from hf_qad import smollm2
from tests import shared_data


@pytest.mark.parametrize("name", smollm2.__all__)
def test_smollm2_names_warn_and_resolve_to_hf_qad_smollm2(name):
    with pytest.warns(DeprecationWarning, match=f"import {name} from hf_qad.smollm2"):
        assert getattr(hf_qad.assets, name) is getattr(smollm2, name)


def test_from_import_warns():
    with pytest.warns(DeprecationWarning, match="hf_qad.smollm2"):
        from hf_qad.assets import smollm2_path
    assert smollm2_path is smollm2.smollm2_path


def test_data_helpers_warn_and_run_the_repository_helper(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_QAD_DATA", str(tmp_path))
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    with pytest.warns(DeprecationWarning, match="tests/shared_data.py"):
        read_text = hf_qad.assets.read_text
    with pytest.warns(DeprecationWarning, match="tests/shared_data.py"):
        shared_data_dir = hf_qad.assets.shared_data_dir
    assert read_text("a.txt") == shared_data.read_text("a.txt") == "héllo"
    assert shared_data_dir() == shared_data.shared_data_dir() == tmp_path


def test_data_helpers_outside_a_checkout_are_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_qad.assets, "_HELPERS_FILE", tmp_path / "tests" / "shared_data.py")
    with pytest.raises(AttributeError, match="only served a source checkout"):
        hf_qad.assets.read_text


def test_unknown_name():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_qad.assets.nope
