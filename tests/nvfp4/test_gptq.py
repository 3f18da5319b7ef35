"""GPTQ for NVFP4: lower output error than nearest rounding, reproduced exactly by the forward and the packing."""

import copy

import pytest
import torch

from hf_qad.nvfp4 import dequantize
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.nvfp4.gptq import _hessians, _round_layer, gptq
from hf_qad.nvfp4.linear import NVFP4Linear


class Block(torch.nn.Module):
    """Two layers in a row, the second fed by the first, plus a side layer on the same input."""

    def __init__(self, w4a4: bool, learn_scales: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        kwargs = dict(quantize_activations=w4a4, learn_scales=learn_scales, dtype=dtype)
        self.up = NVFP4Linear(64, 96, **kwargs)
        self.down = NVFP4Linear(96, 32, **kwargs)
        self.side = NVFP4Linear(64, 32, **kwargs)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) + self.side(x)


def _batches(dtype=torch.float32, n=4):
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(64, 64, generator=generator) / 4  # correlated inputs, as a model's activations are
    return [(torch.randn(128, 64, generator=generator) @ mixing).to(dtype) for _ in range(n)]


def _model(w4a4=False, learn_scales=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Block(w4a4, learn_scales, dtype)
    if w4a4:
        calibrate(model, _batches(dtype))
    return model


def _inputs(model, batches):
    """Each layer's inputs in the unquantized model."""
    inputs = {name: [] for name in ("up", "down", "side")}
    handles = [getattr(model, name).register_forward_pre_hook(lambda m, a, n=name: inputs[n].append(a[0]))
               for name in inputs]
    layers = [model.up, model.down, model.side]
    for layer in layers:
        layer.quantization_enabled = False
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for layer in layers:
        layer.quantization_enabled = True
    for handle in handles:
        handle.remove()
    return {name: torch.cat(x).float() for name, x in inputs.items()}


@pytest.mark.parametrize("w4a4", [False, True], ids=["w4a16", "w4a4"])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
def test_every_layer_has_a_lower_output_error_on_the_calibration_inputs(w4a4, act_order):
    model = _model(w4a4)
    batches = _batches()
    inputs = _inputs(model, batches)
    original = {name: getattr(model, name).weight.detach().clone() for name in inputs}
    before = {name: getattr(model, name).fake_quantized_weight().detach().clone() for name in inputs}
    result = gptq(model, batches, act_order=act_order)
    assert sorted(result) == ["down", "side", "up"]
    for name, x in inputs.items():
        after = getattr(model, name).fake_quantized_weight().detach()
        target = x @ original[name].T
        error_before = (x @ before[name].T - target).pow(2).sum() / target.pow(2).sum()
        error_after = (x @ after.T - target).pow(2).sum() / target.pow(2).sum()
        assert error_after < 0.9 * error_before, name
        # what gptq() reports is that error, measured through H
        assert result[name].nearest == pytest.approx(float(error_before), rel=1e-3)
        assert result[name].gptq == pytest.approx(float(error_after), rel=1e-3)


@pytest.mark.parametrize("learn_scales", [False, True], ids=["amax", "learned_clips"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w4a4", [False, True], ids=["w4a16", "w4a4"])
def test_the_forward_and_the_packing_hold_the_gptq_rounding_bit_for_bit(learn_scales, dtype, w4a4):
    model = _model(w4a4, learn_scales, dtype)
    batches = _batches(dtype)
    reference = copy.deepcopy(model)
    layers = {name: getattr(reference, name) for name in ("up", "down", "side")}
    hessians = _hessians(reference, layers, batches, None)
    expected = {name: _round_layer(layer, hessians[name], layer.quantized_weight(), 0.01, False)
                for name, layer in layers.items()}
    scales = {name: getattr(model, name).quantized_weight() for name in layers}
    result = gptq(model, batches)
    for name in layers:
        layer = getattr(model, name)
        _, clips, values, rerounded = expected[name]
        assert result[name].rerounded == rerounded / (values.numel() // 16)
        # (a) the fake-quant forward computes GPTQ's values
        assert torch.equal(layer.fake_quantized_weight(), values), name
        # GPTQ's scales stay: the global scale always; with learned clips every block scale
        packed, block_scale, global_scale = layer.quantized_weight()
        assert torch.equal(global_scale, scales[name].global_scale)
        if learn_scales:
            assert rerounded == 0 and torch.equal(layer.weight_clip, clips)
            assert torch.equal(block_scale.view(torch.uint8), scales[name].block_scale.view(torch.uint8)), name
        # (c) packing stores exactly those codes and scales, and computes what the fake layer computes
        inputs = torch.randn(8, layer.in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
        y_fake = layer(inputs)
        layer.pack()
        assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.weight_scale.view(torch.uint8),
                                                                         block_scale.view(torch.uint8))
        assert torch.equal(dequantize(*layer.quantized_weight(), dtype=dtype), values), name
        assert torch.equal(layer(inputs), y_fake), name


def test_without_clips_a_block_gptq_left_below_the_top_code_is_rounded_again_and_accounted_for():
    model = _model(seed=3)
    result = gptq(model, _batches())
    # plain amax scales come back only for blocks with a ±6 code; the others the student rounds again
    assert any(r.rerounded > 0 for r in result.values())
    assert all(r.gptq < r.nearest for r in result.values())


def test_the_first_optimizer_step_lets_the_scales_follow_the_weights_again():
    model = _model()
    gptq(model, _batches())
    layer = model.up
    pinned = layer.weight_global_scale_from_master()
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(layer.weight_global_scale_from_master(), pinned / 2)


def test_fused_peers_share_the_pinned_global_scale():
    model = _model()
    NVFP4Linear.share_weight_global_scale([model.up, model.side])
    shared = model.up.weight_global_scale_from_master()
    reference = copy.deepcopy(model)
    gptq(model, _batches())
    for name in ("up", "side"):
        layer, before = getattr(model, name), getattr(reference, name)
        assert torch.equal(layer.weight_global_scale_from_master(), shared)
        assert torch.equal(layer.quantized_weight().global_scale, before.quantized_weight().global_scale)


def test_bad_input_is_refused_in_one_line():
    model = _model()
    with pytest.raises(ValueError, match="empty dataloader"):
        gptq(model, [])
    with pytest.raises(ValueError, match="dampening"):
        gptq(model, _batches(), dampening=1.5)
    with pytest.raises(ValueError, match="no NVFP4Linear"):
        gptq(torch.nn.Sequential(torch.nn.Linear(16, 16)), [torch.randn(2, 16)])
    model.side.pack()
    with pytest.raises(ValueError, match="packed: side"):
        gptq(model, _batches())


def test_a_layer_the_batches_never_reach_is_named():
    model = _model()
    model.unused = NVFP4Linear(32, 16, quantize_activations=False)
    with pytest.raises(ValueError, match="never reached these layers: unused"):
        gptq(model, _batches())
