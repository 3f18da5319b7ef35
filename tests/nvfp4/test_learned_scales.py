"""Learned NVFP4 scales: amax at the start, LSQ gradients, an export that stores what the forward used."""

import pytest
import torch

from hf_qad.nvfp4 import calibration, fake_quant, fake_quant_activation, global_scale_from_amax
from hf_qad.nvfp4.format import BLOCK_SIZE, E2M1_MAX, E4M3_MAX
from hf_qad.nvfp4.learned_scales import (
    CLIP_RANGE,
    clipped_block_scales,
    fake_quant_activation_clipped,
    fake_quant_clipped,
)
from hf_qad.nvfp4.linear import NVFP4Linear
from hf_qad.nvfp4.reference import block_amax, codes_to_values, round_to_e2m1_codes


def _heavy(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(4) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_one_is_the_amax_quantization_bit_for_bit(dtype):
    w = _heavy((32, 128), dtype=dtype)
    gs = global_scale_from_amax(w.abs().amax())
    assert torch.equal(fake_quant_clipped(w, gs, torch.ones(32, 8)), fake_quant(w, gs))
    x = _heavy((4, 128), seed=1, dtype=dtype)
    assert torch.equal(fake_quant_activation_clipped(x, gs, torch.ones(1)), fake_quant_activation(x, gs))


def _surrogate(w, gs, clip):
    """The same quantizer written with detach tricks, so that autograd derives the gradients itself:
    straight through the e4m3 rounding of the scale and, to the input, through the E2M1 rounding."""
    amax = block_amax(w)
    exact = (gs * clip.clamp(*CLIP_RANGE) * amax / E2M1_MAX).clamp(max=E4M3_MAX)
    sb = exact + (clipped_block_scales(w, gs, clip.detach()).float() - exact).detach()  # e4m3, straight through
    step = (sb / gs).unsqueeze(-1)
    blocks = w.unflatten(-1, (-1, BLOCK_SIZE))
    values = codes_to_values(round_to_e2m1_codes(blocks.detach() / step.detach()))  # the codes, held fixed
    return (blocks - blocks.detach() + step * values).flatten(-2)


def test_weight_clip_gradient_moves_the_block_scale_with_its_codes_fixed():
    w = _heavy((16, 64), seed=2).requires_grad_()
    gs = global_scale_from_amax(w.detach().abs().amax())
    clip = (0.6 + torch.rand(16, 4, generator=torch.Generator().manual_seed(3))).requires_grad_()
    grad_out = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    out = fake_quant_clipped(w, gs, clip)
    (out * grad_out).sum().backward()
    w2, clip2 = w.detach().clone().requires_grad_(), clip.detach().clone().requires_grad_()
    reference = _surrogate(w2, gs, clip2)
    torch.testing.assert_close(out, reference.detach(), rtol=0, atol=1e-6)
    (reference * grad_out).sum().backward()
    torch.testing.assert_close(clip.grad, clip2.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad, grad_out)  # the weight keeps the plain straight-through gradient
    saturated = gs * clip.detach() * block_amax(w) / E2M1_MAX > E4M3_MAX
    assert saturated.any() and (clip.grad[saturated] == 0).all() and (clip.grad[~saturated] != 0).all()


def test_clip_outside_its_range_is_clamped_and_gets_no_gradient():
    w = _heavy((4, 32), seed=5)
    gs = global_scale_from_amax(w.abs().amax())
    clip = torch.tensor([[0.0, 5.0]] * 4, requires_grad=True)
    bounded = torch.tensor([[CLIP_RANGE[0], CLIP_RANGE[1]]] * 4)
    assert torch.equal(fake_quant_clipped(w, gs, clip), fake_quant_clipped(w, gs, bounded))
    fake_quant_clipped(w, gs, clip).sum().backward()
    assert torch.equal(clip.grad, torch.zeros_like(clip))
    assert (clipped_block_scales(w, gs, clip).float() > 0).all()


def _train_clips_on_weight_error(w, steps=100):
    gs = global_scale_from_amax(w.abs().amax())
    clip = torch.ones(w.shape[0], w.shape[1] // BLOCK_SIZE, requires_grad=True)
    optimizer = torch.optim.Adam([clip], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        (fake_quant_clipped(w, gs, clip) - w).pow(2).sum().backward()
        optimizer.step()
    return (fake_quant_clipped(w, gs, clip) - w).pow(2).sum() / (fake_quant(w, gs) - w).pow(2).sum()


def test_learning_the_clips_lowers_the_weight_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    assert _train_clips_on_weight_error(w) < 0.93


def test_input_clip_learns_only_from_saturated_blocks():
    x = _heavy((8, 64), seed=7)
    inside = global_scale_from_amax(x.abs().amax())
    clip = torch.ones(1, requires_grad=True)
    fake_quant_activation_clipped(x, inside, clip).pow(2).sum().backward()
    assert clip.grad.item() == 0  # calibrated on this very input: no block reaches the e4m3 maximum
    clip.grad = None
    narrow = global_scale_from_amax(x.abs().amax() / 4)  # calibrated on a smaller amax: big blocks saturate
    out = fake_quant_activation_clipped(x, narrow, clip)
    (out - x).pow(2).sum().backward()
    assert clip.grad.item() < 0  # widening the range (clip up) lowers the error


def _learned_layer(activations=True, seed=8):
    torch.manual_seed(seed)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 32), quantize_activations=activations, learn_scales=True)
    with torch.no_grad():
        layer.weight.copy_(_heavy((32, 64), seed=seed))
        layer.weight_clip.uniform_(0.7, 1.1)
        if activations:
            layer.input_clip.fill_(1.3)
    return layer


def test_a_layer_starts_at_amax_and_trains_its_clips():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    learned = NVFP4Linear.from_linear(linear, learn_scales=True)
    plain = NVFP4Linear.from_linear(linear)
    x = _heavy((4, 64), seed=9)
    calibration.calibrate(torch.nn.Sequential(learned), [x])
    calibration.calibrate(torch.nn.Sequential(plain), [x])
    assert set(learned.clip_parameters) == {"weight_clip", "input_clip"} and learned.weight_clip.shape == (32, 4)
    assert torch.equal(learned(x), plain(x))
    learned(x * 3).sum().backward()  # beyond the calibrated range: activation blocks saturate
    assert learned.weight_clip.grad.abs().sum() > 0 and learned.input_clip.grad.abs().sum() > 0


@pytest.mark.parametrize("activations", [True, False])
def test_pack_stores_exactly_the_scales_the_forward_used(activations):
    layer = _learned_layer(activations)
    x = _heavy((5, 64), seed=10)
    if activations:
        calibration.calibrate(torch.nn.Sequential(layer), [x])
    fake = layer(x)
    expected_scales = clipped_block_scales(layer.weight, layer.weight_global_scale_from_master(), layer.weight_clip)
    expected_input = layer.exported_input_global_scale() if activations else None
    layer.pack()
    assert layer.is_packed and not layer.clip_parameters and "weight_clip" not in layer.state_dict()
    assert torch.equal(layer.weight_scale.view(torch.uint8), expected_scales.view(torch.uint8))
    if activations:
        assert torch.equal(layer.input_global_scale, expected_input)
        assert not torch.equal(expected_input, layer.input_global_scale * 1.3)  # the clip was folded in
    assert torch.equal(layer(x), fake)


def test_learn_scales_needs_the_amax_method():
    with pytest.raises(ValueError, match="learn_scales starts from the amax scales"):
        NVFP4Linear(32, 8, scale_method="mse", learn_scales=True)
