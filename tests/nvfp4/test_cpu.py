"""The fast CPU path against the reference math, bit for bit (signed zeros included)."""

import pytest
import torch

from hf_qad.nvfp4 import cpu, format, reference
from hf_qad.nvfp4.scale_search import SCALE_TARGETS, search_block_scales
from tests.nvfp4_cases import _cases, expected_global_scale, global_scale_cases
from tests.runtime_oracle import adversarial_activations, runtime_fake_quant

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CASES = _cases()
NAME = "model.layers.0.mlp.up_proj.weight"
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != 0.0 and NaN == NaN."""
    return t.contiguous().view(_INT_OF_WIDTH[t.element_size()])


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


def assert_same_as_reference(
    x: torch.Tensor, global_scale: torch.Tensor | None = None, block_scale: torch.Tensor | None = None
) -> None:
    """fake_quant, quantize and dequantize of ``x`` equal the reference's bits."""
    expected = reference.quantize(x, global_scale, block_scale=block_scale)
    q = cpu.quantize(x, global_scale, block_scale=block_scale)
    for actual_part, expected_part in zip(q, expected):
        assert_bit_equal(actual_part, expected_part)
    assert_bit_equal(
        cpu.fake_quant(x, global_scale, block_scale=block_scale),
        reference.fake_quant(x, global_scale, block_scale=block_scale),
    )
    for dtype in DTYPES:
        assert_bit_equal(cpu.dequantize(*q, dtype=dtype), reference.dequantize(*expected, dtype=dtype))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 blocks, so that small tensors cross many chunk boundaries."""
    monkeypatch.setattr(cpu, "CHUNK", 3 * format.BLOCK_SIZE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, dtype):
    assert_same_as_reference(CASES[case].to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_static_global_scale_with_saturation_matches_reference(case, dtype):
    """A calibrated scale for a quarter of the amax: the largest blocks saturate at 448 * 6."""
    x = CASES[case].to(dtype)
    amax = x.float().abs().amax()
    global_scale = format.global_scale_from_amax(amax / 4)
    assert_same_as_reference(x, global_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["random", "heavy_tailed", "subnormal_scales", "zero_blocks"])
def test_given_block_scales_match_reference(case, dtype):
    x = CASES[case].to(dtype)
    global_scale = format.global_scale_from_amax(x.abs().amax())
    block_scale = search_block_scales(x, global_scale, "mse")
    assert_same_as_reference(x, global_scale, block_scale)
    assert cpu.quantize(x, global_scale, block_scale=block_scale).block_scale is block_scale


@pytest.mark.parametrize("saturated", [False, True], ids=["own_scale", "saturated"])
@pytest.mark.parametrize("method", sorted(SCALE_TARGETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_scale_search_matches_reference(case, dtype, method, saturated):
    """Same choice in every block, ties and zero blocks included; a static global scale for a quarter
    of the amax makes the largest blocks' candidates saturate at 448."""
    x = CASES[case].to(dtype)
    amax = x.float().abs().amax()
    global_scale = format.global_scale_from_amax(amax / 4 if saturated else amax)
    targets = SCALE_TARGETS[method]
    assert_bit_equal(cpu.search_block_scales(x, global_scale, targets),
                     reference.search_block_scales(x, global_scale, targets))


def test_scale_search_across_chunks_and_per_expert_global_scales(small_chunks):
    torch.manual_seed(0)
    experts = torch.randn(3, 8, 64) * torch.tensor([1e-3, 1.0, 40.0]).view(3, 1, 1)
    global_scale = format.global_scales_from_amax(experts.abs().amax(dim=(1, 2)))
    targets = SCALE_TARGETS["mse"]
    assert_bit_equal(cpu.search_block_scales(experts, global_scale, targets),
                     reference.search_block_scales(experts, global_scale, targets))


def _midpoints_and_neighbours(grid: torch.Tensor) -> torch.Tensor:
    """Every midpoint of a sorted float32 grid, with the float32 values just below and above."""
    midpoints = (grid[1:] + grid[:-1]) / 2
    below = torch.nextafter(midpoints, torch.tensor(0.0))
    above = torch.nextafter(midpoints, torch.tensor(float("inf")))
    return torch.cat([grid, midpoints, below, above])


def test_rounding_constant_matches_float8_conversion_at_every_e4m3_midpoint():
    """The block-scale rounding against PyTorch's own float8 conversion (ties to even)."""
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    values = _midpoints_and_neighbours(grid)
    rounded = values.clone()
    constant = torch.empty_like(values)
    cpu._add_rounding_constant(rounded, constant, format.E4M3_SMALLEST_NORMAL, format.E4M3_MANTISSA_BITS)
    assert torch.equal(rounded - constant, values.to(torch.float8_e4m3fn).float())


def test_rounding_constant_matches_reference_at_every_e2m1_midpoint():
    values = _midpoints_and_neighbours(torch.tensor(format.E2M1_VALUES))
    expected_codes = reference.round_to_e2m1_codes(values)
    signed, magnitude, magic = values.clone(), values.clone(), torch.empty_like(values)
    cpu._add_rounding_constant(magnitude, magic, format.E2M1_SMALLEST_NORMAL, format.E2M1_MANTISSA_BITS)
    assert torch.equal(cpu._codes(signed, magnitude, magic).to(torch.uint8), expected_codes)


def test_static_global_scale_leaves_the_scale_untouched():
    x = torch.randn(4, 32)
    global_scale = torch.tensor([100.0])
    assert torch.equal(cpu.quantize(x, global_scale).global_scale, global_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_signed_zeros_follow_the_reference(dtype):
    """The code's sign is ``y < 0``: -0.0 inputs give +0, small negatives give -0."""
    x = torch.zeros(2, 16)
    x[0, :4] = torch.tensor([-0.0, 0.0, -0.1, 0.1])
    x[0, 15] = 6.0  # block scale 1 after the global scale below
    x[1, 0] = 2688.0
    x = x.to(dtype)
    assert_same_as_reference(x, torch.tensor([1.0]))
    assert torch.signbit(cpu.fake_quant(x, torch.tensor([1.0]))[0, :3]).tolist() == [False, False, True]


def test_negative_value_underflowing_the_division_is_positive_zero():
    """``-1e-40 / 1.4e34`` underflows to -0.0 in float32, which the reference codes as +0."""
    x = torch.zeros(1, 32)
    x[0, 0] = 3e38  # gs = 2688 / 3e38, so the zero-scale block below gets sb / gs ~ 1.4e34
    x[0, 16] = -1e-40
    for dtype in (torch.bfloat16, torch.float32):
        assert_same_as_reference(x.to(dtype))


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_rows_that_are_not_a_multiple_of_the_chunk(rows):
    x = torch.randn(rows, 48, dtype=torch.bfloat16)  # 3 blocks per row, 3 per chunk
    x[-1, -1] = 20.0  # the amax in the last, partial chunk
    assert_same_as_reference(x)
    assert_same_as_reference(x, format.global_scale_from_amax(torch.tensor(5.0)))


def test_several_default_chunks():
    x = torch.randn(2 * cpu.CHUNK // 256 + 3, 256)
    assert_same_as_reference(x)


@pytest.mark.usefixtures("small_chunks")
def test_three_dimensional_input():
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    assert_same_as_reference(x)
    assert cpu.quantize(x).packed.shape == (3, 5, 32)
    assert cpu.quantize(x).block_scale.shape == (3, 5, 4)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize(
    "x",
    [torch.randn(32, 48).t(), torch.randn(8, 64)[:, ::2], torch.randn(4, 6, 32).transpose(0, 1)],
    ids=["transposed", "strided", "permuted"],
)
def test_non_contiguous_input(x):
    assert not x.is_contiguous()
    assert_same_as_reference(x)


def test_float64_input():
    assert_same_as_reference(CASES["wide_range"].double())


def test_empty_input_with_static_global_scale():
    x = torch.zeros(0, 32, dtype=torch.bfloat16)
    global_scale = torch.tensor([10.0])
    assert_same_as_reference(x, global_scale)


def test_input_is_left_alone_and_output_has_no_history():
    x = torch.randn(8, 32, requires_grad=True)
    before = x.detach().clone()
    out = cpu.fake_quant(x)
    assert torch.equal(x.detach(), before)
    assert not out.requires_grad
    assert out.dtype == x.dtype and out.shape == x.shape


def test_fake_quant_is_dequantize_of_quantize():
    x = CASES["heavy_tailed"].to(torch.bfloat16)
    assert_bit_equal(cpu.fake_quant(x), cpu.dequantize(*cpu.quantize(x), dtype=x.dtype))


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("function", [cpu.quantize, cpu.fake_quant], ids=["quantize", "fake_quant"])
@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4, 24), "multiple of 16"),
        (torch.tensor(1.0), "multiple of 16"),
        (torch.ones(4, 16, dtype=torch.int32), "floating-point"),
        (torch.tensor([[float("nan")] + [0.0] * 15]), "NaN or Inf"),
        (torch.tensor([[float("inf")] + [0.0] * 15]), "NaN or Inf"),
        (torch.tensor([[-float("inf")] + [0.0] * 15]), "NaN or Inf"),
        (torch.zeros(9, 64).index_fill_(0, torch.tensor([8]), float("nan")), "NaN or Inf"),
        (torch.full((2, 16), -float("nan"), dtype=torch.bfloat16), "NaN or Inf"),
    ],
    ids=["k24", "scalar", "int32", "nan", "inf", "-inf", "nan_last_chunk", "-nan_bf16"],
)
@pytest.mark.parametrize("global_scale", [None, torch.tensor([1.0])], ids=["dynamic", "static"])
def test_bad_input_errors_name_the_tensor(function, x, match, global_scale):
    with pytest.raises(ValueError, match=match) as info:
        function(x, global_scale, name=NAME)
    assert NAME in str(info.value)


def test_dequantize_refuses_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        cpu.dequantize(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 1), torch.ones(1))


# ------------------------------------------------- activations, rounded as serving does


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(adversarial_activations(torch.float32)))
def test_activation_rounding_is_the_runtime_formula(case, dtype, small_chunks):
    x, global_scale = adversarial_activations(dtype)[case]
    assert_bit_equal(cpu.fake_quant_activation(x, global_scale), runtime_fake_quant(x, global_scale))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_rounding_matches_the_reference(case, dtype):
    x = CASES[case].to(dtype)
    own = reference.global_scale_from_amax(x.abs().amax())
    assert_bit_equal(cpu.fake_quant_activation(x), reference.fake_quant_activation(x))
    for global_scale in (own, own * 4):  # a calibrated amax 4x below this batch's: saturation
        assert_bit_equal(cpu.fake_quant_activation(x, global_scale), runtime_fake_quant(x, global_scale))


def test_activation_rounding_keeps_negative_zero_where_the_weight_path_clears_it():
    x = torch.tensor([[-0.0, -0.01, 0.0] + [6.0] * 13])
    assert torch.signbit(cpu.fake_quant_activation(x)[0, :3]).tolist() == [True, True, False]
    assert torch.signbit(cpu.fake_quant(x)[0, :3]).tolist() == [False, True, False]


def test_activation_rounding_refuses_what_the_weight_path_refuses():
    with pytest.raises(ValueError, match=f"'{NAME}'.*multiple of 16"):
        cpu.fake_quant_activation(torch.randn(2, 24), name=NAME)
    with pytest.raises(ValueError, match=f"'{NAME}' contains NaN"):
        cpu.fake_quant_activation(torch.full((2, 16), float("nan")), name=NAME)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_global_scale_per_expert_equals_the_2d_path_on_each_expert_slice(dtype):
    torch.manual_seed(0)
    experts = (torch.randn(4, 24, 64) * torch.tensor([0.01, 1.0, 30.0, 1e-4]).view(4, 1, 1)).to(dtype)
    experts[2, 0, :16] = 0  # a zero block
    global_scale = torch.cat([format.global_scale_from_amax(expert.abs().amax()) for expert in experts])
    fake = cpu.fake_quant(experts, global_scale)
    packed, block_scale, stored = cpu.quantize(experts, global_scale)
    assert torch.equal(stored, global_scale)
    for e in range(4):
        assert torch.equal(fake[e], cpu.fake_quant(experts[e], global_scale[e]))
        expected = cpu.quantize(experts[e], global_scale[e])
        assert torch.equal(packed[e], expected.packed)
        assert torch.equal(block_scale[e].view(torch.uint8), expected.block_scale.view(torch.uint8))
        assert torch.equal(cpu.dequantize(packed, block_scale, stored, dtype)[e],
                           cpu.dequantize(expected.packed, expected.block_scale, expected.global_scale, dtype))


def test_global_scales_per_expert_and_half_equal_the_2d_path_on_each_slice():
    torch.manual_seed(1)
    experts = torch.randn(3, 2, 8, 32) * torch.tensor([1.0, 1e-3]).view(1, 2, 1, 1)  # gate and up halves
    global_scale = format.global_scales_from_amax(experts.abs().amax(dim=(-2, -1)))
    fake, q = cpu.fake_quant(experts, global_scale), cpu.quantize(experts, global_scale)
    for e in range(3):
        for half in range(2):
            assert torch.equal(fake[e, half], cpu.fake_quant(experts[e, half], global_scale[e, half]))
            assert torch.equal(q.packed[e, half], cpu.quantize(experts[e, half], global_scale[e, half]).packed)
    assert torch.equal(cpu.dequantize(*q, dtype=torch.float32), fake)


def test_a_global_scale_per_expert_must_match_the_leading_dimensions():
    with pytest.raises(ValueError, match=r"experts: a global scale per leading index must have shape x\.shape\[:d\]"):
        cpu.fake_quant(torch.randn(4, 8, 32), torch.ones(3), name="experts")
    with pytest.raises(ValueError, match=r"packed: a global scale per leading index"):
        cpu.dequantize(torch.zeros(4, 8, 16, dtype=torch.uint8), torch.ones(4, 8, 2).to(torch.float8_e4m3fn),
                       torch.ones(4, 8, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", sorted(global_scale_cases()))
def test_global_scale_of_tensors_together(case, dtype):
    tensors = tuple(t.to(dtype) for t in global_scale_cases()[case])
    want = expected_global_scale(tensors)
    got = cpu.global_scale(*tensors)
    assert got.dtype == torch.float32 and got.shape == (1,)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bits: NaN never comes out, 0 and 1 do


def test_global_scale_refuses_nothing_and_odd_shapes():
    with pytest.raises(ValueError, match="at least one tensor"):
        cpu.global_scale()
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu.global_scale(torch.ones(2, 16), torch.ones(2, 24))
