"""The format's constants, its shared checks, and the shims of the names that moved."""

import pytest
import torch

from hf_qad.nvfp4 import format, reference


def test_e2m1_thresholds_and_ties_are_compressed_tensors_cast_to_fp4():
    assert format.E2M1_THRESHOLDS == (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
    # ">" for 0.25, 1.25, 2.5, 5.0 (ties down), ">=" for 0.75, 1.75, 3.5 (ties up)
    assert format.E2M1_TIES_ROUND_UP == (False, True, False, True, False, True, False)
    assert format.E2M1_MAX == 6.0 and format.E2M1_SMALLEST_NORMAL == 1.0


def test_e4m3_constants_match_pytorch_float8():
    info = torch.finfo(torch.float8_e4m3fn)
    assert format.E4M3_MAX == info.max == 448.0
    assert format.E4M3_SMALLEST_NORMAL == info.smallest_normal == 2.0**-6
    assert format.E4M3_MIN_EXPONENT == -6
    assert 2.0**-format.E4M3_MANTISSA_BITS == info.eps
    smallest_subnormal = torch.tensor([1], dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert format.E4M3_SUBNORMAL_STEP == smallest_subnormal.item() == 2.0**-9
    assert format.GLOBAL_SCALE_NUMERATOR == 2688.0


def test_check_block_scale_refuses_wrong_shape_dtype_and_positional_names():
    x = torch.randn(4, 64)
    format.check_block_scale(x, torch.ones(4, 4).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="'w'.*float8_e4m3fn \\(4, 4\\)"):
        format.check_block_scale(x, torch.ones(4, 2).to(torch.float8_e4m3fn), name="w")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        format.check_block_scale(x, torch.ones(4, 4))
    with pytest.raises(TypeError, match="name="):
        format.check_block_scale(x, "model.layers.0.mlp.up_proj.weight")


def test_moved_reference_names_warn_and_still_work():
    x = torch.randn(8, 32)
    with pytest.warns(DeprecationWarning, match="hf_qad.nvfp4.reference.block_amax"):
        block_amax = format.block_amax
    assert block_amax is reference.block_amax
    with pytest.warns(DeprecationWarning, match="hf_qad.nvfp4.fake_quant"):
        from hf_qad.nvfp4.format import fake_quant
    with pytest.warns(DeprecationWarning, match="hf_qad.nvfp4.quantize"):
        from hf_qad.nvfp4.format import quantize
    with pytest.warns(DeprecationWarning, match="hf_qad.nvfp4.dequantize"):
        from hf_qad.nvfp4.format import dequantize
    gs = format.global_scale_from_amax(x.abs().amax() / 2)
    block_scale = reference.quantize(x, gs).block_scale
    # the old positional order (x, global_scale, name, block_scale) keeps working
    assert torch.equal(fake_quant(x, gs, "w", block_scale), reference.fake_quant(x, gs, block_scale))
    q = quantize(x, gs, "w", block_scale)
    assert torch.equal(q.packed, reference.quantize(x, gs).packed)
    assert torch.equal(dequantize(*q, dtype=torch.float32), reference.fake_quant(x, gs))


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        format.no_such_name  # noqa: B018
