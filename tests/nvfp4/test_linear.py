"""NVFP4Linear: fake mode, packed mode, their parity, caching and dtype safety."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_qad.nvfp4 import reference as ref
from hf_qad.nvfp4 import functional
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.nvfp4.reference import unpack_codes
from hf_qad.nvfp4.linear import ZEROED_BLOCK_RATIO, NVFP4Linear


def _layer(w4a4=True, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 32, bias=bias, dtype=dtype), quantize_activations=w4a4)
    if w4a4:
        calibrate(layer, [torch.randn(4, 64, dtype=dtype) for _ in range(2)])
    return layer


@pytest.mark.parametrize("w4a4", [False, True], ids=["W4A16", "W4A4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fake_forward_is_reference_composition(w4a4, dtype):
    layer = _layer(w4a4, dtype)
    x = torch.randn(2, 3, 64, dtype=dtype)
    x_hat = ref.fake_quant_activation(x, layer.input_global_scale) if w4a4 else x
    expected = F.linear(x_hat, ref.fake_quant(layer.weight.detach()), layer.bias)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("w4a4", [False, True], ids=["W4A16", "W4A4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pack_is_lossless(w4a4, dtype):
    layer = _layer(w4a4, dtype)
    x = torch.randn(5, 64, dtype=dtype) * 3  # beyond the calibrated range too
    before = layer(x)
    layer.pack()
    assert layer.is_packed and "weight" not in dict(layer.named_parameters())
    assert torch.equal(layer(x), before)


def test_packed_state_dict_layout_and_reload():
    layer = _layer(True).pack()
    state = layer.state_dict()
    assert state["weight_packed"].dtype == torch.uint8 and state["weight_packed"].shape == (32, 32)
    assert state["weight_scale"].dtype == torch.float8_e4m3fn and state["weight_scale"].shape == (32, 4)
    assert state["weight_global_scale"].dtype == torch.float32 and state["weight_global_scale"].shape == (1,)
    assert state["input_global_scale"].dtype == torch.float32
    fresh = NVFP4Linear(64, 32, packed=True)
    fresh.load_state_dict(state)
    assert fresh.input_calibrated
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))


def test_gradients_reach_master_weight_through_ste():
    layer = _layer(True)
    x = torch.randn(4, 64)
    grad_out = torch.randn(4, 32)
    layer(x).backward(grad_out)
    x_hat = ref.fake_quant_activation(x, layer.input_global_scale)
    assert torch.allclose(layer.weight.grad, grad_out.T @ x_hat, atol=1e-5)
    assert torch.allclose(layer.bias.grad, grad_out.sum(0), atol=1e-6)


def test_bf16_master_under_autocast():
    layer = _layer(False, torch.bfloat16)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.bfloat16


def test_frozen_weight_is_quantized_once_until_it_changes(monkeypatch):
    layer = _layer(False)
    layer.weight.requires_grad_(False)
    calls = []
    original = functional.fake_quant
    monkeypatch.setattr(functional, "fake_quant", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 64)
    first = layer(x)
    assert torch.equal(layer(x), first) and len(calls) == 2  # no cache unless asked for (see NVFP4LoraLinear)
    layer.cache_frozen_weight = True
    calls.clear()
    first = layer(x)
    assert torch.equal(layer(x), first) and len(calls) == 1
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place change must invalidate the cache
    assert not torch.equal(layer(x), first) and len(calls) == 2


def test_using_master_weight_quantizes_from_the_given_weight_and_puts_the_live_one_back():
    layer = _layer(False)
    live = layer.weight
    full = torch.randn_like(live)
    expected = NVFP4Linear.from_linear(torch.nn.Linear(64, 32), quantize_activations=False)
    expected.weight = torch.nn.Parameter(full.clone())
    with layer.using_master_weight(full):
        packed = layer.quantized_weight()
    assert layer.weight is live
    for got, want in zip(packed, expected.quantized_weight()):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(ValueError, match="packed"), layer.pack().using_master_weight(full):
        pass


@pytest.mark.parametrize("cast", ["to_bf16", "half", "float", "double"])
def test_dtype_casts_never_touch_packed_buffers_or_scales(cast):
    layer = _layer(True).pack()
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    {"to_bf16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(),
     "float": lambda m: m.float(), "double": lambda m: m.double()}[cast](layer)
    for name, value in before.items():
        buffer = getattr(layer, name)
        assert buffer.dtype == value.dtype
        assert torch.equal(buffer.view(torch.uint8), value.view(torch.uint8))


def test_fake_mode_cast_keeps_float32_input_scale():
    layer = _layer(True).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.input_global_scale.dtype == torch.float32


def test_shared_global_scale_uses_the_largest_amax_and_packs_losslessly():
    q, k, v = (_layer(False, seed=s) for s in range(3))
    with torch.no_grad():
        k.weight.mul_(10)
    NVFP4Linear.share_weight_global_scale([q, k, v])
    expected = ref.global_scale_from_amax(k.weight.abs().amax())
    for layer in (q, k, v):
        assert torch.equal(layer.quantized_weight().global_scale, expected)
    x = torch.randn(3, 64)
    before = q(x)
    q_weight = q.quantized_weight()
    assert torch.equal(q(x), F.linear(x, ref.dequantize(*q_weight, dtype=torch.float32), q.bias))
    assert torch.equal(q.pack()(x), before)


def test_uncalibrated_w4a4_warns_once_and_uses_per_batch_scale():
    layer = NVFP4Linear(64, 32)
    x = torch.randn(4, 64)
    with pytest.warns(UserWarning, match="not calibrated"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    gs = ref.global_scale_from_amax(x.abs().amax())
    assert torch.equal(y, F.linear(ref.fake_quant_activation(x, gs), ref.fake_quant(layer.weight.detach()), layer.bias))


def test_in_features_not_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear(24, 8)


def test_nan_weight_error_names_the_module():
    layer = _layer(False)
    layer.module_name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj"):
        layer(torch.randn(1, 64))


@pytest.mark.parametrize("scale_method", ["four_over_six", "mse"])
def test_searched_scales_lower_weight_error_and_pack_losslessly(scale_method):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32)
    amax_layer = NVFP4Linear.from_linear(base, quantize_activations=False)
    searched = NVFP4Linear.from_linear(base, quantize_activations=False, scale_method=scale_method)
    err = lambda layer: (layer.fake_quantized_weight() - base.weight).pow(2).sum()  # noqa: E731
    assert err(searched) < err(amax_layer)
    x = torch.randn(3, 64)
    before = searched(x)
    assert torch.equal(searched.pack()(x), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_unpacked_master_reproduces_the_packed_codes(dtype):
    layer = _layer(True, dtype, seed=3).pack()
    stored = [t.clone() for t in layer.quantized_weight()]
    layer.unpack(dtype)
    assert not layer.is_packed and layer.weight.requires_grad
    packed, block_scale, global_scale = layer.quantized_weight()
    assert torch.equal(global_scale, stored[2])
    assert torch.equal(block_scale.view(torch.uint8), stored[1].view(torch.uint8))
    # Codes agree except that a stored negative zero (code 8) comes back as +0: the
    # dequantized master holds -0.0, and compressed-tensors' rounding gives -0.0 code 0.
    assert torch.equal(_positive_zero(unpack_codes(packed)), _positive_zero(unpack_codes(stored[0])))
    with torch.no_grad():
        layer.weight.mul_(2)  # once trained, the global scale follows the master again
    assert torch.equal(layer.quantized_weight().global_scale, ref.global_scale_from_amax(layer.weight.abs().amax()))


def _positive_zero(codes):
    return torch.where(codes == 8, torch.zeros_like(codes), codes)


def test_qweight_only_in_packed_mode():
    layer = _layer(False)
    assert not hasattr(layer, "qweight")
    assert layer.pack().qweight is layer.weight_packed


@pytest.mark.parametrize("margin", [0.99, 1.01])
def test_outlier_warning_starts_where_blocks_quantize_to_zero(margin):
    # every block's amax is 1 but the first one's, so the median block amax is 1; one all-zero block
    # (pruned) is not counted as zeroed
    layer = NVFP4Linear(64, 4, bias=False, quantize_activations=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[0, 0] = ZEROED_BLOCK_RATIO * margin
        layer.weight[3, 48:] = 0
    blocks = functional.dequantize(*layer.quantized_weight(), dtype=torch.float32).unflatten(-1, (-1, 16))
    zeroed = int((blocks == 0).all(-1).sum())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ratio = layer.warn_if_outlier_zeroes_blocks()
    warned = [str(w.message) for w in record if "median block amax" in str(w.message)]
    if margin < 1:
        assert zeroed == 1 and not warned and ratio is None
    else:
        assert zeroed == 15 and len(warned) == 1 and "14 of its 16 weight blocks" in warned[0]
        assert ratio == pytest.approx(ZEROED_BLOCK_RATIO * margin)


def _heavy_tailed_inputs(dtype=torch.bfloat16):
    return torch.distributions.StudentT(1.5).sample((64, 64)).to(dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["fake", "packed"])
def test_w4a4_inputs_are_rounded_as_serving_rounds_them(packed):
    torch.manual_seed(3)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 32, dtype=torch.bfloat16))
    x = _heavy_tailed_inputs()
    calibrate(layer, [x])
    gs = layer.input_global_scale
    w_hat = ref.fake_quant(layer.weight.detach())
    runtime, offline = ref.fake_quant_activation(x, gs), ref.fake_quant(x, gs)
    assert not torch.equal(runtime, offline)  # the formulas differ on these blocks ...
    if packed:
        layer.pack()
    y = layer(x)
    assert torch.equal(y, F.linear(runtime, w_hat, layer.bias))  # ... and the layer uses the run-time one
    assert not torch.equal(y, F.linear(offline, w_hat, layer.bias))


def test_w4a4_weight_stays_on_compressed_tensors_formula():
    from tests.ct_oracle import ct_fake_quant

    layer = _layer(True, torch.bfloat16)
    assert torch.equal(layer.fake_quantized_weight(), ct_fake_quant(layer.weight.detach()))


def test_activation_gradient_is_straight_through():
    layer = _layer(True)
    x = (_heavy_tailed_inputs(torch.float32) * 10).requires_grad_()  # saturating values too
    grad_out = torch.randn(64, 32)
    layer(x).backward(grad_out)
    assert torch.allclose(x.grad, grad_out @ ref.fake_quant(layer.weight.detach()), atol=1e-5)
