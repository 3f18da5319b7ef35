"""Static activation global scales from calibration batches."""

import pytest
import torch

from hf_qad.nvfp4 import reference as ref
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.nvfp4.linear import NVFP4Linear


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = NVFP4Linear(32, 64)
        self.down = NVFP4Linear(64, 16)
        self.side = NVFP4Linear(32, 16, quantize_activations=False)

    def forward(self, x, scale=1.0):
        return self.down(torch.relu(self.up(x * scale))) + self.side(x)


def test_sets_scale_from_max_over_batches_and_keeps_flags():
    torch.manual_seed(0)
    model = TwoLayers()
    batches = [torch.randn(4, 32), torch.randn(4, 32) * 5, torch.randn(4, 32)]
    amax = calibrate(model, batches)
    expected_up = max(b.abs().amax() for b in batches)
    assert amax["up"] == pytest.approx(float(expected_up))
    assert torch.equal(model.up.input_global_scale, ref.global_scale_from_amax(expected_up))
    assert model.up.input_calibrated and model.down.input_calibrated
    assert model.up.quantize_activations and not model.side.quantize_activations
    assert "side" not in amax


def test_dict_batches_and_num_batches():
    model = TwoLayers()
    batches = [{"x": torch.ones(2, 32), "scale": 1.0}, {"x": torch.ones(2, 32), "scale": 100.0}]
    amax = calibrate(model, batches, num_batches=1)
    assert amax["up"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="no NVFP4Linear"):
        calibrate(torch.nn.Sequential(torch.nn.Linear(16, 16)), [torch.randn(1, 16)])
    with pytest.raises(ValueError, match="empty dataloader"):
        calibrate(TwoLayers(), [])
    with pytest.raises(ValueError, match="NaN or Inf"):
        calibrate(TwoLayers(), [torch.full((1, 32), float("nan"))])
