"""The Triton kernels against the reference math, bit for bit.

They run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest), which is slow: shapes are kept small. The interpreter is not a GPU, so these
tests check the kernels' arithmetic; the interpreter's own rounding quirks (float32 ->
bfloat16 truncation, its float8 conversion) are exactly what the kernels avoid relying on.

On a GPU the same checks run compiled: ``TRITON_INTERPRET=0 HF_QAD_TEST_DEVICE=cuda pytest
tests/nvfp4/test_triton_kernels.py``. The kernels then get CUDA copies of the inputs and
their outputs come back to the CPU, where the reference computes what they must equal.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_qad.nvfp4 import reference as ref
from hf_qad.nvfp4 import triton_kernels
from hf_qad.nvfp4.scale_search import search_block_scales
from hf_qad.nvfp4.triton_kernels import _round_to_bf16
from tests.nvfp4_cases import _cases, expected_global_scale, global_scale_cases
from tests.runtime_oracle import adversarial_activations, runtime_fake_quant

DEVICE = torch.device(os.environ.get("HF_QAD_TEST_DEVICE", "cpu"))


def _moved(obj, device: torch.device):
    """``obj`` with every tensor in it (also inside tuples such as NVFP4Quantized) on ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        items = [_moved(item, device) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


class _KernelsOnTestDevice:
    """``triton_kernels`` with inputs moved to DEVICE and outputs back to the CPU."""

    def __getattr__(self, name: str):
        kernel = getattr(triton_kernels, name)

        def call(*args, **kwargs):
            args, kwargs = _moved(args, DEVICE), {k: _moved(v, DEVICE) for k, v in kwargs.items()}
            return _moved(kernel(*args, **kwargs), torch.device("cpu"))

        return call


tk = _KernelsOnTestDevice()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CASES = _cases()  # shared with the reference tests: ties, subnormal and zero scales, ...


def _scale_bits(q: ref.NVFP4Quantized) -> torch.Tensor:
    return q.block_scale.view(torch.uint8)


def _assert_same_bytes(got: ref.NVFP4Quantized, want: ref.NVFP4Quantized) -> None:
    assert torch.equal(got.packed, want.packed)
    assert torch.equal(_scale_bits(got), _scale_bits(want))
    assert torch.equal(got.global_scale, want.global_scale)


def _assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal including the sign of zero (torch.equal treats -0.0 == 0.0)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))


def _strided_views() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 80, generator=g)
    return {
        "row_stride": wide[:, 16:64],  # contiguous rows, row stride 80: read in place
        "transposed": torch.randn(48, 7, generator=g).t(),  # last-dim stride 7: copied
        "3d": torch.randn(2, 5, 32, generator=g) * 4,
        "k16": torch.randn(70, 16, generator=g),  # 70 blocks: a partial second program
    }


# --------------------------------------------------------------------- fake_quant


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_quant_is_bit_exact(case, dtype):
    x = CASES[case].to(dtype)
    _assert_bits_equal(tk.fake_quant(x), ref.fake_quant(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(_strided_views()))
def test_fake_quant_strided_and_odd_shapes(case, dtype):
    x = _strided_views()[case].to(dtype)
    _assert_bits_equal(tk.fake_quant(x), ref.fake_quant(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_static_global_scale_saturates_like_the_reference(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(24, 64, generator=g) * 3).to(dtype)
    gs = ref.global_scale_from_amax(torch.tensor(2.0))  # |x| reaches ~10: blocks saturate
    _assert_bits_equal(tk.fake_quant(x, gs), ref.fake_quant(x, gs))
    _assert_same_bytes(tk.quantize(x, gs), ref.quantize(x, gs))


# -------------------------------------------------------------- quantize, dequantize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_quantize_bytes_and_dequantize_are_exact(case, dtype):
    x = CASES[case].to(dtype)
    q = tk.quantize(x)
    want = ref.quantize(x)
    _assert_same_bytes(q, want)
    _assert_bits_equal(tk.dequantize(*want, dtype=dtype), ref.dequantize(*want, dtype=dtype))


@pytest.mark.parametrize("case", sorted(_strided_views()))
def test_quantize_strided_and_odd_shapes(case):
    x = _strided_views()[case].to(torch.bfloat16)
    q = tk.quantize(x)
    _assert_same_bytes(q, ref.quantize(x))
    _assert_bits_equal(tk.dequantize(*q), ref.dequantize(*q))


def _e4m3_midpoints() -> torch.Tensor:
    """Every midpoint between adjacent positive e4m3 values, and the floats either side."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mid = (values[:-1] + values[1:]) / 2
    above = torch.nextafter(mid, torch.tensor(float("inf")))
    below = torch.nextafter(mid, torch.tensor(0.0))
    beyond = torch.tensor([448.0, 460.0, 464.0, 500.0, 1e4])  # saturation at 448
    return torch.cat([mid, above, below, values, beyond])


def test_block_scales_round_to_e4m3_like_pytorch_at_every_midpoint():
    """With gs = 1 a block of amax ``6 s`` asks for block scale ``s`` exactly."""
    scales = _e4m3_midpoints()
    x = torch.zeros(scales.numel(), 16)
    x[:, 5] = scales * 6
    gs = torch.ones(1)
    assert torch.equal(x[:, 5] / 6, scales)  # the request reaches the rounding unchanged
    _assert_same_bytes(tk.quantize(x, gs), ref.quantize(x, gs))
    _assert_bits_equal(tk.fake_quant(x, gs), ref.fake_quant(x, gs))


def test_dequantize_every_code_pair_and_scale_byte():
    """Every finite scale byte (254 rows of 2 blocks), all 256 bytes (code pairs) among them."""
    scale_bytes = torch.cat([torch.arange(0, 127), torch.arange(128, 255)]).to(torch.uint8)
    rows = scale_bytes.numel()
    packed = (torch.arange(rows * 16) % 256).to(torch.uint8).reshape(rows, 16)
    block_scale = scale_bytes[:, None].repeat(1, 2).view(torch.float8_e4m3fn)
    gs = torch.tensor([0.37])  # an arbitrary scale: sb / gs has a full float32 mantissa
    for dtype in DTYPES:
        want = ref.dequantize(packed, block_scale, gs, dtype=dtype)
        _assert_bits_equal(tk.dequantize(packed, block_scale, gs, dtype=dtype), want)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="patches Triton's CPU interpreter")
def test_signed_zeros_do_not_depend_on_how_triton_negates(monkeypatch):
    """Triton 3.6 and older (triton-lang/triton#10270) compiled ``-x`` on floats as ``0 - x``,
    +0.0 for x = +0.0: the compiled dequantize then gave +0.0 where the reference has -0.0 (a
    zero block scale of byte 0x80, H200 run in benchmarks/RESULTS.md), while the interpreter
    negated exactly. Under an interpreter that negates as those compilers did, every signed
    zero must still match."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def zero_minus(self, x):
        return TensorHandle(np.subtract(np.zeros_like(x.data), x.data), x.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "create_fneg", zero_minus)
    test_dequantize_every_code_pair_and_scale_byte()
    x = torch.tensor([[-0.0, 0.0, -1e-3, 1e-3] * 4, [-0.0] * 16, [-5.0] + [-0.01] * 15])
    for gs in (torch.ones(1), torch.tensor([-1.0])):  # a negative global scale: negative block scales
        _assert_bits_equal(tk.fake_quant(x, gs), ref.fake_quant(x, gs))
        _assert_same_bytes(tk.quantize(x, gs), ref.quantize(x, gs))
    _assert_bits_equal(tk.fake_quant_activation(x), ref.fake_quant_activation(x))


@triton.jit
def _round_to_bf16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _round_to_bf16(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_bf16_rounding_is_nearest_even_where_the_interpreter_truncates():
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F7F8000, 0x7F7F8000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    x = torch.cat([ties, torch.randn(400, generator=g) * 1e3, torch.tensor([1e-40, -0.0])])
    out = torch.empty_like(x, device=DEVICE)
    _round_to_bf16_kernel[(1,)](x.to(DEVICE), out, x.numel(), BLOCK=512)
    out = out.cpu()
    _assert_bits_equal(out.to(torch.bfloat16), x.to(torch.bfloat16))
    assert torch.equal(out, out.to(torch.bfloat16).float())  # exactly representable


# ------------------------------------------------------------------------ global scale


def _assert_same_global_scale(got: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> None:
    want = expected_global_scale(tensors)
    assert got.dtype == torch.float32 and got.shape == (1,)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(global_scale_cases()))
def test_global_scale_is_bit_exact(case, dtype):
    tensors = tuple(t.to(dtype) for t in global_scale_cases()[case])
    _assert_same_global_scale(tk.global_scale(*tensors), tensors)


def test_global_scale_reduces_many_partials_in_several_rounds(monkeypatch):
    """One block per program and two partials per round: the reduction's loop and masks."""
    monkeypatch.setattr(triton_kernels, "_AMAX_BLOCKS_PER_PROGRAM", 1)
    monkeypatch.setattr(triton_kernels, "_AMAX_REDUCE_CHUNK", 2)
    g = torch.Generator().manual_seed(13)
    for position in (0, 37, 69):  # the largest value in the first, a middle and the last (odd) partial
        x = torch.randn(70, 16, generator=g)
        x.view(-1)[position * 16 + 5] = -40.0
        peer = torch.randn(3, 16, generator=g)
        _assert_same_global_scale(tk.global_scale(x, peer), (x, peer))


def test_fake_quant_and_quantize_without_a_global_scale_use_the_fused_one():
    x = CASES["outlier"].to(torch.bfloat16)
    gs = expected_global_scale((x,))
    _assert_bits_equal(tk.fake_quant(x), ref.fake_quant(x, gs))
    assert torch.equal(tk.quantize(x).global_scale, gs)


def test_global_scale_refuses_nothing_and_odd_shapes():
    with pytest.raises(ValueError, match="at least one tensor"):
        triton_kernels.global_scale()
    with pytest.raises(ValueError, match="multiple of 16"):
        tk.global_scale(torch.ones(2, 16), torch.ones(2, 24))


# ------------------------------------------------------------------ given block scales


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_given_block_scales_are_bit_exact(case, dtype):
    """Searched weight scales (some map the amax past 6, so values clip) read by the kernels."""
    x = CASES[case].to(dtype)
    gs = ref.global_scale_from_amax(x.abs().amax())
    block_scale = search_block_scales(x, gs, "mse")
    _assert_bits_equal(tk.fake_quant(x, gs, block_scale), ref.fake_quant(x, gs, block_scale))
    _assert_same_bytes(tk.quantize(x, gs, block_scale), ref.quantize(x, gs, block_scale))


@pytest.mark.parametrize("case", sorted(_strided_views()))
def test_given_block_scales_strided_and_odd_shapes(case):
    x = _strided_views()[case].to(torch.bfloat16)
    gs = ref.global_scale_from_amax(x.abs().amax())
    block_scale = search_block_scales(x, gs, "four_over_six")
    _assert_bits_equal(tk.fake_quant(x, gs, block_scale), ref.fake_quant(x, gs, block_scale))
    _assert_same_bytes(tk.quantize(x, gs, block_scale), ref.quantize(x, gs, block_scale))


def test_every_given_scale_byte_is_read_like_the_reference():
    """Every finite e4m3 byte, zero, subnormals and negatives included, as a block's scale."""
    scale_bytes = torch.cat([torch.arange(0, 127), torch.arange(128, 255)]).to(torch.uint8)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(scale_bytes.numel(), 32, generator=g) * torch.logspace(-3, 3, 32)
    block_scale = scale_bytes[:, None].repeat(1, 2).view(torch.float8_e4m3fn)
    gs = torch.tensor([0.37])
    for dtype in DTYPES:
        xd = x.to(dtype)
        _assert_bits_equal(tk.fake_quant(xd, gs, block_scale), ref.fake_quant(xd, gs, block_scale))
        _assert_same_bytes(tk.quantize(xd, gs, block_scale), ref.quantize(xd, gs, block_scale))


def test_given_block_scales_are_returned_as_given():
    x = torch.randn(4, 64, device=DEVICE)
    gs = ref.global_scale_from_amax(x.abs().amax())
    block_scale = search_block_scales(x, gs, "mse")
    assert triton_kernels.quantize(x, gs, block_scale).block_scale is block_scale


# ------------------------------------------------------------------------- linear


def _weight(n: int, k: int, seed: int) -> ref.NVFP4Quantized:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, k)  # varied block scales
    return ref.quantize(w)


def _assert_linear_close(y, x, w, bias):
    """``y`` is ``F.linear(x, w, bias)`` accumulated in float32 in some order, rounded once.

    Its distance to the float32 result is at most the final rounding (half an ulp of the
    output dtype) plus K float32 roundings of partial sums bounded by ``|x| @ |w|^T``.
    """
    assert y.dtype == x.dtype
    bias32 = None if bias is None else bias.float()
    expected = F.linear(x.float(), w.float(), bias32).double()
    assert y.shape == expected.shape
    magnitude = x.double().abs() @ w.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    rounding = torch.finfo(x.dtype).eps / 2 * expected.abs()
    order = x.shape[-1] * torch.finfo(torch.float32).eps * magnitude
    assert torch.all((y.double() - expected).abs() <= rounding + order)


LINEAR_SHAPES = {
    "decode_split_k": (1, 48, 512),  # small M: GEMV tiles, K split over 4 programs
    "decode_k16": (3, 20, 16),
    "mid_m": (40, 48, 256),
    "prefill_tiles": (130, 136, 64),  # 2 x 2 tiles of 128, both partial; no split
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", sorted(LINEAR_SHAPES))
def test_w4a16_linear_matches_dequantized_matmul(shape, with_bias, dtype):
    m, n, k = LINEAR_SHAPES[shape]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(m, k, generator=g).to(dtype)
    q = _weight(n, k, seed=5)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = tk.w4a16_linear(x, *q, bias=bias)
    _assert_linear_close(y, x, ref.dequantize(*q, dtype=dtype), bias)


@pytest.mark.parametrize("case", ["3d", "row_stride", "transposed"])
def test_w4a16_linear_takes_leading_dims_and_strided_input(case):
    x = _strided_views()[case].to(torch.bfloat16)
    q = _weight(24, x.shape[-1], seed=6)
    y = tk.w4a16_linear(x, *q)
    assert y.shape == (*x.shape[:-1], 24)
    _assert_linear_close(y, x, ref.dequantize(*q), None)


def test_w4a16_linear_reads_a_strided_weight_view():
    """Columns of a wider packed weight: its rows are strided in packed and scale bytes."""
    q = _weight(24, 96, seed=11)
    packed, block_scale = q.packed[:, 8:40], q.block_scale[:, 1:5]  # K positions 16 .. 80
    x = torch.randn(5, 64).to(torch.bfloat16)
    y = tk.w4a16_linear(x, packed, block_scale, q.global_scale)
    w = ref.dequantize(packed, block_scale, q.global_scale)
    _assert_linear_close(y, x, w, None)


@pytest.mark.parametrize(("m", "dtype"), [(1, torch.bfloat16), (3, torch.float32), (16, torch.float16),
                                          (40, torch.bfloat16), (70, torch.bfloat16)], ids=str)
def test_every_autotuning_candidate_computes_the_product(m, dtype):
    """Each tile config autotuning may pick (GEMV, split-K, big tiles) is a correct matmul
    (configs launching the same tiles and splits on this shape run once); the first
    candidate is the one used untuned and off CUDA."""
    n, k = 40, 512
    g = torch.Generator().manual_seed(14)
    x = torch.randn(m, k, generator=g).to(dtype)
    q = _weight(n, k, seed=15)
    bias = torch.randn(n, generator=g).to(dtype)
    w = ref.dequantize(*q, dtype=dtype)
    operands = _moved((x, q.packed, q.block_scale.view(torch.uint8), q.global_scale, bias), DEVICE)
    candidates = triton_kernels._matmul_candidates(m, dtype)
    assert any(not c.dot for c in candidates) == (m <= 4)
    launches = set()
    for config in candidates:
        tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        k_tiles = triton.cdiv(k, config.block_k)
        splits = triton.cdiv(k_tiles, triton_kernels._k_tiles_per_split(tiles, k_tiles, config.target_programs))
        if (config._replace(target_programs=0), splits) in launches:
            continue
        launches.add((config._replace(target_programs=0), splits))
        out = torch.empty(m, n, dtype=dtype, device=DEVICE)
        triton_kernels._matmul(*operands, out, config)
        _assert_linear_close(out.cpu(), x, w, bias)
    assert m > 16 or any(splits > 1 for _, splits in launches)  # decode splits K


def test_autotuning_keeps_the_fastest_candidate_once_and_skips_what_does_not_compile(monkeypatch):
    """The choice logic of CUDA autotuning, with a fake timer (``do_bench`` needs a GPU)."""
    from triton.runtime.errors import OutOfResources

    seconds = {"slow": 3.0, "fast": 1.0, "too_big": None}
    timed = []

    def launch(config):
        timed.append(config)
        if seconds[config] is None:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return seconds[config]

    monkeypatch.setattr(triton_kernels, "do_bench", lambda fn, **options: fn())
    monkeypatch.setattr(triton_kernels, "_TUNED", {})
    with pytest.warns(UserWarning, match="too_big skipped by autotuning: OutOfResources"):
        assert triton_kernels._fastest(("kernel", 1), ["slow", "too_big", "fast"], launch) == "fast"
    assert triton_kernels._fastest(("kernel", 1), ["slow", "too_big", "fast"], launch) == "fast"
    assert timed == ["slow", "too_big", "fast"]  # timed once per key
    assert triton_kernels.tuned_configs() == {("kernel", 1): "fast"}
    with pytest.warns(UserWarning):  # nothing compiles: the first is kept, its launch will say why
        assert triton_kernels._fastest(("kernel", 2), ["too_big"], launch) == "too_big"


def test_w4a16_linear_zero_rows():
    q = _weight(16, 32, seed=7)
    assert tk.w4a16_linear(torch.zeros(0, 32), *q).shape == (0, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["decode_split_k", "prefill_tiles"])
def test_w4a4_linear_matches_fake_quantized_matmul(shape, dtype):
    m, n, k = LINEAR_SHAPES[shape]
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    input_gs = ref.global_scale_from_amax(torch.tensor(3.0))  # some activations saturate
    q = _weight(n, k, seed=9)
    bias = torch.randn(n, generator=g).to(dtype)
    y = tk.w4a4_linear(x, input_gs, *q, bias=bias)
    x_hat = ref.fake_quant_activation(x, input_gs)
    _assert_linear_close(y, x_hat, ref.dequantize(*q, dtype=dtype), bias)


# ------------------------------------------------------------------------- errors


def test_bad_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        tk.fake_quant(torch.randn(4, 24))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        tk.quantize(torch.ones(4, 16, dtype=torch.float64))
    q = _weight(16, 32, seed=10)
    with pytest.raises(ValueError, match="does not match input"):
        tk.w4a16_linear(torch.randn(2, 64), *q)
    with pytest.raises(ValueError, match="same tensor"):
        tk.dequantize(q.packed, q.block_scale[:, :1], q.global_scale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        tk.dequantize(q.packed, q.block_scale.float(), q.global_scale)
    with pytest.raises(ValueError, match="bias"):
        tk.w4a16_linear(torch.randn(2, 32), *q, bias=torch.zeros(3))


def test_errors_name_the_tensor_and_refuse_wrong_block_scales():
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"'{name}' to be a multiple of 16"):
        tk.fake_quant(torch.randn(4, 24), name=name)
    x = torch.randn(4, 32)
    gs = torch.ones(1)
    with pytest.raises(ValueError, match=f"'{name}'.*float8_e4m3fn \\(4, 2\\)"):
        tk.quantize(x, gs, torch.ones(4, 1).to(torch.float8_e4m3fn), name=name)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        tk.fake_quant(x, gs, torch.ones(4, 2))


# ---------------------------------------------- activations, rounded as serving does


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(adversarial_activations(torch.float32)))
def test_activation_rounding_is_the_runtime_formula(case, dtype):
    x, global_scale = adversarial_activations(dtype)[case]
    _assert_bits_equal(tk.fake_quant_activation(x, global_scale), runtime_fake_quant(x, global_scale))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["heavy_tailed", "subnormal_scales", "zero_blocks", "wide_range"])
def test_activation_rounding_matches_the_reference(case, dtype):
    x = CASES[case].to(dtype)
    own = ref.global_scale_from_amax(x.abs().amax())
    _assert_bits_equal(tk.fake_quant_activation(x), ref.fake_quant_activation(x))
    _assert_bits_equal(tk.fake_quant_activation(x, own * 4), ref.fake_quant_activation(x, own * 4))


@pytest.mark.parametrize("case", sorted(_strided_views()))
def test_activation_rounding_strided_and_odd_shapes(case):
    x = _strided_views()[case].to(torch.bfloat16)
    gs = ref.global_scale_from_amax(torch.tensor(2.0))
    _assert_bits_equal(tk.fake_quant_activation(x, gs), ref.fake_quant_activation(x, gs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_global_scales_per_leading_index_equal_the_2d_path_on_each_slice(dtype):
    """Fused experts [E, 2, N, K] with one global scale per expert and half, as NVFP4Experts quantizes them."""
    torch.manual_seed(0)
    experts = (torch.randn(3, 2, 8, 32) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1, 1)).to(dtype)
    experts[1, 0, 0, :16] = 0  # a zero block
    global_scale = torch.stack([torch.cat([ref.global_scale_from_amax(half.abs().amax()) for half in expert])
                                for expert in experts])
    fake = tk.fake_quant(experts, global_scale)
    q = tk.quantize(experts, global_scale)
    assert torch.equal(q.global_scale, global_scale)
    searched = search_block_scales(experts[2, 1], global_scale[2, 1], "mse")
    for e in range(3):
        for half in range(2):
            slice_, gs = experts[e, half], global_scale[e, half]
            assert torch.equal(fake[e, half], ref.fake_quant(slice_, gs))
            expected = ref.quantize(slice_, gs)
            assert torch.equal(q.packed[e, half], expected.packed)
            assert torch.equal(_scale_bits(q)[e, half], _scale_bits(expected))
    assert torch.equal(tk.dequantize(*q, dtype=dtype), fake)
    given = q.block_scale.clone()
    given[2, 1] = searched
    assert torch.equal(tk.fake_quant(experts, global_scale, given)[2, 1], ref.fake_quant(experts[2, 1], global_scale[2, 1], searched))


def test_a_global_scale_per_leading_index_must_match_the_leading_dimensions():
    with pytest.raises(ValueError, match=r"experts: a global scale per leading index must have shape x\.shape\[:d\]"):
        tk.fake_quant(torch.randn(4, 8, 32), torch.ones(3), name="experts")
