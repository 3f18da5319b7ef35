"""The reference NVFP4 math against compressed-tensors, byte for byte."""

import pytest
import torch

from tests.ct_oracle import ct_compress, ct_decompress, ct_fake_quant
from hf_qad.nvfp4.format import E2M1_VALUES, ZERO_BLOCK_SCALE, global_scale_from_amax
from hf_qad.nvfp4.reference import (
    block_scales,
    codes_to_values,
    dequantize,
    fake_quant,
    fake_quant_activation,
    pack_codes,
    quantize,
    round_to_e2m1_codes,
    runtime_block_scales,
    unpack_codes,
)
from tests.nvfp4_cases import _cases
from tests.runtime_oracle import adversarial_activations, runtime_fake_quant

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


CASES = _cases()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_quantize_matches_compressed_tensors_bytes(case, dtype):
    x = CASES[case].to(dtype)
    expected = ct_compress(x)
    q = quantize(x)
    assert torch.equal(q.packed, expected["weight_packed"])
    assert torch.equal(q.block_scale.view(torch.uint8), expected["weight_scale"].view(torch.uint8))
    assert torch.equal(q.global_scale, expected["weight_global_scale"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_quant_and_dequantize_match_compressed_tensors(case, dtype):
    x = CASES[case].to(dtype)
    expected = ct_fake_quant(x)
    assert torch.equal(fake_quant(x), expected)
    q = quantize(x)
    assert torch.equal(dequantize(*q, dtype=dtype), expected)
    decompressed = ct_decompress(ct_compress(x))
    assert torch.equal(dequantize(*q, dtype=decompressed.dtype), decompressed)


def test_static_global_scale_matches_compressed_tensors():
    """Activations use a calibrated global scale that their own amax may exceed."""
    x = torch.randn(32, 64) * 3
    gs = global_scale_from_amax(torch.tensor(2.0))  # amax 2 while |x| reaches ~10: saturation
    expected = ct_compress(x, global_scale=gs)
    q = quantize(x, global_scale=gs)
    assert torch.equal(q.packed, expected["weight_packed"])
    assert torch.equal(q.block_scale.view(torch.uint8), expected["weight_scale"].view(torch.uint8))
    assert torch.equal(fake_quant(x, gs), ct_fake_quant(x, gs))
    assert fake_quant(x, gs).abs().max() <= 448 * 6 / gs.item() * 1.0001


def test_ties_round_to_even():
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 7.0, -100.0])
    values = codes_to_values(round_to_e2m1_codes(y))
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 6.0, -6.0])
    assert torch.equal(values, expected)
    assert torch.signbit(values[7])  # a negative value rounding to zero keeps its sign


def test_all_zero_tensor_is_exact_and_uses_ct_fallbacks():
    q = quantize(torch.zeros(2, 32))
    assert q.global_scale.item() == 1.0  # 2688 / 0 is not finite: fall back to 1
    assert torch.all(q.block_scale.float() == ZERO_BLOCK_SCALE)
    assert torch.all(q.packed == 0)
    assert torch.equal(dequantize(*q, dtype=torch.float32), torch.zeros(2, 32))


def test_tiny_amax_underflowing_global_scale_quantizes_to_zero():
    x = torch.full((1, 16), 1e-40)  # 2688 / 1e-40 overflows float32
    q = quantize(x)
    assert q.global_scale.item() == 1.0
    assert torch.equal(fake_quant(x), torch.zeros_like(x))


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert torch.equal(unpack_codes(packed), codes)


def test_code_values_cover_the_e2m1_grid():
    codes = torch.arange(16, dtype=torch.uint8)
    values = codes_to_values(codes)
    assert values[:8].tolist() == list(E2M1_VALUES)
    assert values[8:].tolist() == [-v for v in E2M1_VALUES]


def test_error_is_small_relative_to_the_tensor():
    x = torch.randn(64, 256)
    rel = (fake_quant(x) - x).norm() / x.norm()
    assert 0.05 < rel < 0.15  # E2M1 with e4m3 block scales: ~10% relative RMS error


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4, 24), "multiple of 16"),
        (torch.tensor(1.0), "multiple of 16"),
        (torch.ones(4, 16, dtype=torch.int32), "floating-point"),
        (torch.tensor([[float("nan")] + [0.0] * 15]), "NaN or Inf"),
        (torch.tensor([[float("inf")] + [0.0] * 15]), "NaN or Inf"),
    ],
)
def test_bad_input_errors_name_the_tensor(x, match):
    with pytest.raises(ValueError, match=match) as info:
        quantize(x, name="model.layers.0.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value)


def test_unpack_refuses_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(torch.zeros(2, 8, dtype=torch.int8))


# ------------------------------------------------- activations, rounded as serving does


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(adversarial_activations(torch.float32)))
def test_activation_rounding_is_the_runtime_formula(case, dtype):
    x, global_scale = adversarial_activations(dtype)[case]
    got, want = fake_quant_activation(x, global_scale), runtime_fake_quant(x, global_scale)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_runtime_block_scales_keep_amax_in_float32_and_zero_at_zero():
    # bf16 amax 1.859375 and gs 100: compressed-tensors rounds amax / 6 to bf16 (0.310546875)
    # and gets 31.05 -> 32; the run-time kernel keeps amax * (1/6) in float32: 30.99 -> 30.
    amax = torch.tensor([1.859375, 0.0])
    gs = torch.tensor([100.0])
    assert runtime_block_scales(amax, gs).float().tolist() == [30.0, 0.0]
    assert block_scales(amax, gs, torch.bfloat16).float().tolist() == [32.0, ZERO_BLOCK_SCALE]
