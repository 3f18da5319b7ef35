"""The GPTQ rounding survives both exports: the compressed-tensors and ModelOpt checkpoints hold the student's codes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config, save_modelopt_checkpoint
from hf_qad.nvfp4.conversion import nvfp4_modules
from tests.export.checkpoint_files import as_bytes, read_tensors
from tests.tiny_models import save_tiny_llama, token_batches


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


@pytest.mark.parametrize("learn_scales", [False, True], ids=["amax", "learned_clips"])
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_exports_hold_exactly_the_gptq_student(bf16_path, tmp_path, scheme, learn_scales):
    model = AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.bfloat16, quantization_config=NVFP4Config(
        scheme=scheme, learn_scales=learn_scales))
    batches = token_batches(4, batch=4, seq=32)
    if scheme == "w4a4":
        hf_qad.calibrate(model, batches)
    nearest = {name: layer.quantized_weight() for name, layer in nvfp4_modules(model).items()}
    result = hf_qad.gptq(model, batches)
    assert all(r.gptq < r.nearest for r in result.values())
    stored = {name: layer.quantized_weight() for name, layer in nvfp4_modules(model).items()}
    assert any(not torch.equal(stored[name].packed, nearest[name].packed) for name in stored)
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model(ids).logits

    model.save_pretrained(tmp_path / "ct")
    packed = hf_qad.load_packed_model(tmp_path / "ct", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, expected)
    save_modelopt_checkpoint(model, tmp_path / "modelopt")
    modelopt = read_tensors(tmp_path / "modelopt")
    for name, layer in nvfp4_modules(packed).items():
        codes, block_scale, global_scale = stored[name]
        assert torch.equal(layer.weight_packed, codes) and torch.equal(as_bytes(layer.weight_scale), as_bytes(block_scale))
        assert torch.equal(layer.weight_global_scale, global_scale), name
        # GPTQ keeps the original global scale (pinned), and with learned clips every original block scale
        assert torch.equal(global_scale, nearest[name].global_scale), name
        if learn_scales:
            assert torch.equal(as_bytes(block_scale), as_bytes(nearest[name].block_scale)), name
        assert torch.equal(modelopt[f"{name}.weight"], codes), name
        assert torch.equal(as_bytes(modelopt[f"{name}.weight_scale"]), as_bytes(block_scale)), name
        assert torch.equal(modelopt[f"{name}.weight_scale_2"], (1 / global_scale).reshape(())), name
