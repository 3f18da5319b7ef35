"""Backend dispatch and the straight-through estimator."""

import torch
import torch.nn.functional as F

from hf_qad.nvfp4 import reference as ref
from hf_qad.nvfp4 import functional


def test_fake_quant_matches_reference_on_cpu():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    gs = ref.global_scale_from_amax(torch.tensor(2.0))
    assert torch.equal(functional.fake_quant(x), ref.fake_quant(x))
    assert torch.equal(functional.fake_quant(x, gs), ref.fake_quant(x, gs))


def test_straight_through_gradient_is_identity():
    x = torch.randn(4, 32, requires_grad=True)
    grad = torch.randn(4, 32)
    functional.fake_quant(x * 100).backward(grad)  # saturating values pass the gradient too
    assert torch.equal(x.grad, grad * 100)


def test_quantize_dequantize_round_trip_matches_reference():
    x = torch.randn(16, 48)
    q = functional.quantize(x)
    expected = ref.quantize(x)
    for got, want in zip(q, expected):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)
    assert torch.equal(functional.dequantize(*q, dtype=torch.float32), ref.fake_quant(x))


def test_linear_w4a16_and_w4a4_match_reference_composition():
    x = torch.randn(3, 5, 32)
    w = torch.randn(24, 32)
    b = torch.randn(24)
    q = ref.quantize(w)
    w_hat = ref.dequantize(*q, dtype=torch.float32)
    assert torch.equal(functional.linear(x, q, b), F.linear(x, w_hat, b))
    gs = ref.global_scale_from_amax(x.abs().amax())
    assert torch.equal(functional.linear(x, q, b, gs), F.linear(ref.fake_quant_activation(x, gs), w_hat, b))


def test_disable_triton_sends_cuda_tensors_to_the_pytorch_path(monkeypatch):
    from types import SimpleNamespace

    from hf_qad.nvfp4 import cpu, functional

    cuda_like = SimpleNamespace(is_cuda=True)
    assert functional._use_triton(cuda_like)
    monkeypatch.setenv("HF_QAD_DISABLE_TRITON", "1")
    assert not functional._use_triton(cuda_like)
    assert functional._backend(cuda_like) is cpu
    assert not functional._use_triton(SimpleNamespace(is_cuda=False))


def test_backends_take_the_same_arguments_op_for_op():
    import inspect

    from hf_qad.nvfp4 import cpu, triton_kernels

    for op in ("fake_quant", "fake_quant_activation", "quantize", "dequantize", "w4a16_linear", "w4a4_linear"):
        assert op in cpu.__all__ and op in triton_kernels.__all__
        cpu_signature = inspect.signature(getattr(cpu, op))
        assert cpu_signature == inspect.signature(getattr(triton_kernels, op)), op


def test_given_block_scales_go_to_the_backend_with_a_straight_through_gradient(monkeypatch):
    from hf_qad.nvfp4 import cpu
    from hf_qad.nvfp4.scale_search import search_block_scales

    x = torch.randn(8, 64, requires_grad=True)
    gs = ref.global_scale_from_amax(x.abs().amax())
    block_scale = search_block_scales(x, gs, "mse")
    calls = []
    original = cpu.fake_quant
    monkeypatch.setattr(cpu, "fake_quant", lambda *a, **k: calls.append(1) or original(*a, **k))
    y = functional.fake_quant(x, gs, block_scale, name="w")
    assert calls == [1]
    assert torch.equal(y, ref.fake_quant(x, gs, block_scale))
    y.sum().backward()
    assert bool((x.grad == 1).all())
    q = functional.quantize(x, gs, block_scale)
    assert q.block_scale is block_scale
    assert torch.equal(q.packed, ref.quantize(x, gs, block_scale).packed)


def test_package_exports_the_dispatching_ops():
    import hf_qad.nvfp4 as nvfp4

    assert nvfp4.fake_quant is functional.fake_quant
    assert nvfp4.fake_quant_activation is functional.fake_quant_activation
    assert nvfp4.quantize is functional.quantize
    assert nvfp4.dequantize is functional.dequantize


def test_fake_quant_activation_dispatches_with_a_straight_through_gradient(monkeypatch):
    from hf_qad.nvfp4 import cpu

    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    gs = ref.global_scale_from_amax(torch.tensor(1.0))  # most blocks saturate
    calls = []
    original = cpu.fake_quant_activation
    monkeypatch.setattr(cpu, "fake_quant_activation", lambda *a, **k: calls.append(1) or original(*a, **k))
    y = functional.fake_quant_activation(x, gs, name="x")
    assert calls == [1]
    assert torch.equal(y, ref.fake_quant_activation(x, gs))
    y.float().sum().backward()
    assert bool((x.grad == 1).all())
