"""Weight block-scale selection."""

import pytest
import torch

from hf_qad.nvfp4 import reference as ref
from tests.ct_oracle import ct_compress
from hf_qad.nvfp4.format import global_scales_from_amax
from hf_qad.nvfp4.scale_search import SCALE_METHODS, search_block_scales
from tests.ct_oracle import ct_decompress


def _weight():
    torch.manual_seed(0)
    return torch.distributions.StudentT(3.0).sample((128, 256))


def _block_error(w, method):
    gs = ref.global_scale_from_amax(w.abs().amax())
    w_hat = ref.fake_quant(w, gs, block_scale=search_block_scales(w, gs, method))
    return (w_hat - w).pow(2).unflatten(-1, (-1, 16)).sum(-1)


def test_amax_method_is_the_default_scale():
    w = _weight()
    gs = ref.global_scale_from_amax(w.abs().amax())
    assert torch.equal(search_block_scales(w, gs, "amax").view(torch.uint8), ref.quantize(w).block_scale.view(torch.uint8))


@pytest.mark.parametrize("method", ["four_over_six", "mse"])
def test_search_never_increases_any_block_error_and_lowers_the_total(method):
    w = _weight()
    base, searched = _block_error(w, "amax"), _block_error(w, method)
    assert torch.all(searched <= base)
    assert searched.sum() < 0.97 * base.sum()


def test_mse_is_at_least_as_good_as_four_over_six():
    w = _weight()
    assert torch.all(_block_error(w, "mse") <= _block_error(w, "four_over_six"))


def test_searched_scales_pack_exactly_like_compressed_tensors():
    """compressed-tensors packs any given block scale and reads it back; our codes and values must agree."""
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4

    w = _weight().to(torch.bfloat16)
    gs = ref.global_scale_from_amax(w.float().abs().amax())
    scale = search_block_scales(w, gs, "mse")
    q = ref.quantize(w, gs, block_scale=scale)
    assert torch.equal(q.packed, quantize_and_pack_fp4(w, scale.to(torch.bfloat16), global_scale=gs))
    stored = {"weight_packed": q.packed, "weight_scale": q.block_scale, "weight_global_scale": q.global_scale}
    assert torch.equal(ct_decompress(stored), ref.dequantize(*q, dtype=torch.bfloat16))


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown scale method"):
        search_block_scales(torch.randn(2, 16), torch.ones(1), "best")
    assert set(SCALE_METHODS) == {"amax", "four_over_six", "mse"}


@pytest.mark.parametrize("method", ["four_over_six", "mse"])
def test_a_global_scale_per_expert_searches_each_expert_as_its_own_tensor(method):
    torch.manual_seed(0)
    experts = torch.randn(3, 8, 64) * torch.tensor([1e-3, 1.0, 40.0]).view(3, 1, 1)
    global_scale = global_scales_from_amax(experts.abs().amax(dim=(1, 2)))
    searched = search_block_scales(experts, global_scale, method)
    for e in range(3):
        expected = search_block_scales(experts[e], global_scale[e], method)
        assert torch.equal(searched[e].view(torch.uint8), expected.view(torch.uint8))
