"""The packed compressed-tensors export: its files, its reload with hf_qad, and without it."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config, NVFP4Linear
from tests.ct_oracle import assert_plain_transformers_logits
from tests.tiny_models import save_tiny_llama, token_batches


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.bfloat16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_packed_export_round_trips_with_hf_qad(bf16_path, tmp_path, scheme):
    model = _load(bf16_path, scheme=scheme)
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids]) if scheme == "w4a4" else None
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    quant_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "compressed-tensors"
    assert quant_config["format"] == "nvfp4-pack-quantized"
    assert quant_config["ignore"] == ["lm_head"]
    assert hf_qad.write_model_card(model, tmp_path)
    assert "nvfp4-pack-quantized" in (tmp_path / "README.md").read_text()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.mlp.up_proj"
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.uint8
        assert f.get_tensor(f"{name}.weight_packed").shape == (128, 32)
        assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float8_e4m3fn
        assert f.get_tensor(f"{name}.weight_global_scale").dtype == torch.float32
        assert (f"{name}.input_global_scale" in keys) == (scheme == "w4a4")
        assert f"{name}.weight" not in keys  # no full-size high-precision copy
        # vLLM fuses q/k/v with one global scale: they must be identical
        gs = [f.get_tensor(f"model.layers.0.self_attn.{p}_proj.weight_global_scale") for p in "qkv"]
        assert torch.equal(gs[0], gs[1]) and torch.equal(gs[0], gs[2])
    reloaded = hf_qad.load_packed_model(tmp_path)
    layer = reloaded.model.layers[0].mlp.up_proj
    assert isinstance(layer, NVFP4Linear) and layer.is_packed
    assert not reloaded.hf_quantizer.is_qat_trainable
    assert torch.equal(_logits(reloaded, ids), expected)


def test_packed_export_loads_in_plain_transformers_without_hf_qad(bf16_path, tmp_path):
    model = _load(bf16_path)
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids])
    model.save_pretrained(tmp_path / "packed")
    assert_plain_transformers_logits(tmp_path / "packed", ids, model, tmp_path)


def test_uncalibrated_w4a4_export_is_refused(bf16_path, tmp_path):
    model = _load(bf16_path)
    with pytest.raises(ValueError, match="never calibrated"):
        model.save_pretrained(tmp_path)


def test_load_packed_model_refuses_other_checkpoints(bf16_path):
    with pytest.raises(ValueError, match="not a packed NVFP4 export"):
        hf_qad.load_packed_model(bf16_path)
