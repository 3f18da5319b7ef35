"""The HfQuantizer: from_pretrained gives a trainable fake-quant model; packed models keep their bits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config, NVFP4Linear
from tests.tiny_models import save_tiny_llama, token_batches


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**config), dtype=torch.bfloat16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_gives_trainable_fake_quant_model(bf16_path):
    model = _load(bf16_path)
    layers = hf_qad.nvfp4.conversion.nvfp4_modules(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head kept
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, NVFP4Linear)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.weight.requires_grad and not q.is_packed
    assert model.hf_quantizer.is_qat_trainable and model.hf_quantizer.is_trainable
    # master weights are the checkpoint's tensors, untouched
    plain = AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.bfloat16)
    assert torch.equal(q.weight, plain.model.layers[0].self_attn.q_proj.weight)
    # fused projections share one global scale
    k, v = model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.v_proj
    assert set(q.global_scale_peers) == {k, v}
    # the forward quantizes: logits differ from BF16's, gradients reach the masters
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids])
    assert not torch.equal(_logits(model, ids), _logits(plain, ids))
    model(ids, labels=ids).loss.backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cast", ["half", "float", "to_bf16"])
def test_dtype_casts_keep_packed_model_exact(bf16_path, tmp_path, cast):
    _load(bf16_path, scheme="w4a16").save_pretrained(tmp_path)
    model = hf_qad.load_packed_model(tmp_path)
    layer = model.model.layers[0].mlp.up_proj
    before = [t.clone() for t in (layer.weight_packed, layer.weight_scale, layer.weight_global_scale)]
    cast_fn = {"half": lambda m: m.half(), "float": lambda m: m.float(), "to_bf16": lambda m: m.to(torch.bfloat16)}[cast]
    if cast == "to_bf16":
        cast_fn(model)
    else:  # transformers refuses .half()/.float() on quantized models; NVFP4Linear alone allows them
        with pytest.raises(ValueError, match="not supported for quantized model"):
            cast_fn(model)
        cast_fn(layer)
    after = (layer.weight_packed, layer.weight_scale, layer.weight_global_scale)
    for b, a in zip(before, after):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_nan_weights_error_names_the_module(bf16_path):
    model = _load(bf16_path, scheme="w4a16")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_proj"):
        model(token_batches(1)[0])


def test_loading_and_saving_leave_the_users_config_unchanged(bf16_path, tmp_path):
    config = NVFP4Config(scheme="w4a16", modules_to_not_convert=["lm_head", "model.layers.1"])
    before = config.to_dict()
    model = AutoModelForCausalLM.from_pretrained(bf16_path, quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "packed")
    with hf_qad.master_weight_checkpoint(model):
        model.save_pretrained(tmp_path / "master")
    assert config.to_dict() == before and model.hf_quantizer.quantization_config == config
