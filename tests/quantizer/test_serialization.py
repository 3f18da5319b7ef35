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


def test_learned_scales_export_from_a_gathered_state_reads_its_clips(bf16_path):
    """FSDP and ZeRO-3 hand the export a full state gathered on one rank: its clips, not the live shards, count."""
    from hf_qad.quantizer.serialization import packed_state_dict

    model = _load(bf16_path, learn_scales=True)
    hf_qad.calibrate(model, [token_batches(1)[0]])
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight_clip.uniform_(0.7, 1.2)
        layer.input_clip.fill_(1.25)
    live = packed_state_dict(model)
    assert torch.equal(packed_state_dict(model, model.state_dict())["model.layers.0.mlp.up_proj.weight_scale"]
                       .view(torch.uint8), live["model.layers.0.mlp.up_proj.weight_scale"].view(torch.uint8))
    assert not any(key.endswith(("weight_clip", "input_clip")) for key in live)
    gathered = {key: value.clone() for key, value in model.state_dict().items()}
    gathered["model.layers.0.mlp.up_proj.weight_clip"].fill_(1.0)
    gathered["model.layers.0.mlp.up_proj.input_clip"].fill_(1.0)
    from_gathered = packed_state_dict(model, gathered)
    plain = packed_state_dict(_calibrated_like(bf16_path, model))
    for name in ("weight_scale", "input_global_scale"):
        key = f"model.layers.0.mlp.up_proj.{name}"
        assert torch.equal(from_gathered[key].view(torch.uint8), plain[key].view(torch.uint8)), name
        assert not torch.equal(from_gathered[key].view(torch.uint8), live[key].view(torch.uint8)), name
    assert torch.equal(layer.input_clip, torch.full_like(layer.input_clip, 1.25))  # the live clips are untouched


def _calibrated_like(path, model):
    """A model without learned scales, with ``model``'s calibrated input scales."""
    plain = _load(path)
    scales = {k: v for k, v in model.state_dict().items() if k.endswith("input_global_scale")}
    plain.load_state_dict(scales, strict=False)  # NVFP4Linear marks a loaded non-zero input scale calibrated
    return plain
