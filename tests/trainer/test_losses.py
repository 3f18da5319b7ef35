"""Chunked distillation loss against the naive full-logits loss."""

import pytest
import torch
import torch.nn.functional as F

from hf_qad.trainer.losses import _live_chunk_sums, chunked_distillation_loss, token_divergence


def _setup(n=37, hidden=16, vocab=50, seed=0):
    torch.manual_seed(seed)
    s_head, t_head = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden, vocab)
    h_s = torch.randn(n, hidden, requires_grad=True)
    h_t = torch.randn(n, hidden)
    targets = torch.randint(0, vocab, (n,))
    return s_head, t_head, h_s, h_t, targets


def _naive(s_head, t_head, h_s, h_t, targets, divergence, beta, temperature):
    s = s_head(h_s).float()
    with torch.no_grad():
        t = t_head(h_t).float()
    q, p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if divergence == "forward_kl":
        div = (p.exp() * (p - q)).sum(-1)
    elif divergence == "reverse_kl":
        div = (q.exp() * (q - p)).sum(-1)
    else:
        m = (beta * p.exp() + (1 - beta) * q.exp()).log()
        div = beta * (p.exp() * (p - m)).sum(-1) + (1 - beta) * (q.exp() * (q - m)).sum(-1)
    return div.sum() * temperature**2, F.cross_entropy(s, targets, reduction="sum")


@pytest.mark.parametrize("divergence, beta, temperature", [
    ("forward_kl", 0.5, 1.0), ("forward_kl", 0.5, 2.0), ("reverse_kl", 0.5, 1.0), ("reverse_kl", 0.5, 2.0),
    ("jsd", 0.3, 1.0), ("jsd", 0.7, 0.5),
])
@pytest.mark.parametrize("chunk_size", [5, 1000])
@pytest.mark.parametrize("head_path", ["linear", "checkpoint"])
def test_chunked_loss_and_gradients_equal_the_naive_loss(divergence, beta, temperature, chunk_size, head_path):
    # "linear": an nn.Linear head takes the one-buffer weight-gradient path; any other callable the checkpoint.
    s_head, t_head, h_s, h_t, targets = _setup()
    head = s_head if head_path == "linear" else lambda hidden: s_head(hidden)
    sums = chunked_distillation_loss(h_s, head, h_t, t_head, targets, divergence=divergence, beta=beta,
                                     temperature=temperature, chunk_size=chunk_size, kl_weight=0.7, ce_weight=0.3)
    sums.loss.backward()
    got = [h_s.grad.clone(), s_head.weight.grad.clone(), s_head.bias.grad.clone()]
    assert t_head.weight.grad is None  # the teacher never gets gradients
    for tensor in (h_s, s_head.weight, s_head.bias):
        tensor.grad = None
    div, ce = _naive(s_head, t_head, h_s, h_t, targets, divergence, beta, temperature)
    (0.7 * div + 0.3 * ce).backward()
    assert torch.allclose(sums.divergence, div, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sums.student_nll, ce, rtol=1e-5)
    assert torch.allclose(sums.loss, 0.7 * div + 0.3 * ce, rtol=1e-5, atol=1e-5)
    for g, want in zip(got, (h_s.grad, s_head.weight.grad, s_head.bias.grad)):
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence, temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0)])
@pytest.mark.parametrize("head_path", ["linear", "checkpoint"])
def test_at_ce_weight_0_the_ce_is_a_metric_and_the_divergence_gradient_is_unchanged(divergence, temperature,
                                                                                     head_path):
    s_head, t_head, h_s, h_t, targets = _setup()
    head = s_head if head_path == "linear" else lambda hidden: s_head(hidden)
    kwargs = dict(divergence=divergence, temperature=temperature, chunk_size=8)
    sums = chunked_distillation_loss(h_s, head, h_t, t_head, targets, **kwargs)
    assert sums.loss.requires_grad and not (sums.student_nll.requires_grad or sums.divergence.requires_grad)
    sums.loss.backward()
    got = [h_s.grad.clone(), s_head.weight.grad.clone()]
    for tensor in (h_s, s_head.weight, s_head.bias):
        tensor.grad = None
    div, ce = _naive(s_head, t_head, h_s, h_t, targets, divergence, 0.5, temperature)
    div.backward()
    assert torch.allclose(sums.student_nll, ce.detach(), rtol=1e-5)  # still reported
    assert torch.allclose(sums.divergence, div, rtol=1e-5, atol=1e-5)
    for g, want in zip(got, (h_s.grad, s_head.weight.grad)):
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence, temperature, ce_grad, kept", [
    ("forward_kl", 1.0, False, 2), ("forward_kl", 1.0, True, 2), ("forward_kl", 2.0, False, 2),
    ("forward_kl", 2.0, True, 3), ("reverse_kl", 1.0, False, 2), ("jsd", 1.0, True, 2),
])
def test_a_chunk_keeps_two_vocabulary_sized_tensors_three_with_a_tempered_ce_gradient(divergence, temperature,
                                                                                      ce_grad, kept):
    # Outside the checkpoint, what the chunk's graph saves is what its backward holds at once: the CE
    # adds nothing at temperature 1 (it shares the student softmax) and one tensor otherwise.
    s_head, t_head, h_s, h_t, targets = _setup(n=6, vocab=50)
    head = torch.nn.Linear(16, 50, bias=False)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _live_chunk_sums(h_s, h_t, targets, head, t_head, (divergence, 0.5, temperature, 1.0, float(ce_grad)))
    assert sum(shape == (6, 50) for shape in saved) == kept, saved


@pytest.mark.parametrize("head_path", ["linear", "checkpoint"])
def test_bfloat16_logits_get_bfloat16_gradients(head_path):
    s_head, t_head, h_s, h_t, targets = _setup()
    s_head, t_head = s_head.to(torch.bfloat16), t_head.to(torch.bfloat16)
    h = h_s.detach().to(torch.bfloat16).requires_grad_(True)
    head = s_head if head_path == "linear" else lambda hidden: s_head(hidden)
    sums = chunked_distillation_loss(h, head, h_t.to(torch.bfloat16), t_head, targets, chunk_size=8, ce_weight=1.0)
    sums.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and s_head.weight.grad.dtype == torch.bfloat16
    got = h.grad.float()
    h.grad = None
    s = s_head(h).float()
    t = t_head(h_t.to(torch.bfloat16)).float().detach()
    (token_divergence(s, t).sum() + F.cross_entropy(s, targets, reduction="sum")).backward()
    assert torch.allclose(got, h.grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("head_path", ["linear", "checkpoint"])
def test_under_autocast_the_heads_run_in_bfloat16_like_the_model_and_the_gradients_follow(head_path):
    # Float32 master weights under bf16 autocast (bf16=True in training): the head matmuls are bf16 as the
    # model's own lm_head would be; the loss and the gradients match the naive loss under the same autocast.
    s_head, t_head, h_s, h_t, targets = _setup(n=40, vocab=64)
    head = s_head if head_path == "linear" else lambda hidden: s_head(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = chunked_distillation_loss(h_s, head, h_t, t_head, targets, chunk_size=16, ce_weight=0.5)
    sums.loss.backward()
    got = [h_s.grad.clone(), s_head.weight.grad.clone()]
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for tensor in (h_s, s_head.weight, s_head.bias):
        tensor.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = s_head(h_s), t_head(h_t).detach()
    assert s.dtype == torch.bfloat16
    want = token_divergence(s.float(), t.float()).sum() + 0.5 * F.cross_entropy(s.float(), targets, reduction="sum")
    want.backward()
    assert torch.allclose(sums.loss, want, rtol=1e-3)
    for g, ref in zip(got, (h_s.grad, s_head.weight.grad)):  # bf16 products: compare as vectors
        assert (g - ref).norm() < 1e-2 * ref.norm()
    fp32 = chunked_distillation_loss(h_s, head, h_t, t_head, targets, chunk_size=16, ce_weight=0.5).loss
    assert not torch.equal(fp32, sums.loss)  # the autocast run really multiplied in bf16


def test_backward_twice_through_the_linear_path_is_refused():
    s_head, t_head, h_s, h_t, targets = _setup()
    loss = chunked_distillation_loss(h_s, s_head, h_t, t_head, targets).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_no_gradient_buffers_without_grad_mode():
    s_head, t_head, h_s, h_t, targets = _setup()
    with torch.no_grad():
        sums = chunked_distillation_loss(h_s, s_head, h_t, t_head, targets)
    assert not sums.loss.requires_grad
    assert torch.allclose(sums.divergence, _naive(s_head, t_head, h_s, h_t, targets, "forward_kl", 0.5, 1.0)[0])


@pytest.mark.parametrize("divergence, temperature", [("reverse_kl", 1.0), ("forward_kl", 2.0), ("jsd", 0.5)])
def test_metrics(divergence, temperature):
    # Whatever the trained divergence, the metrics are at temperature 1: forward KL and both CEs.
    s_head, t_head, h_s, h_t, targets = _setup()
    sums = chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, divergence=divergence,
                                     temperature=temperature, chunk_size=5)
    s, t = s_head(h_s).detach(), t_head(h_t).detach()
    kl = token_divergence(s, t, "forward_kl").sum()
    assert torch.allclose(sums.kl, kl, rtol=1e-5)
    assert sums.top1_agreement == (s.argmax(-1) == t.argmax(-1)).sum()
    assert torch.allclose(sums.teacher_nll, F.cross_entropy(t, targets, reduction="sum"))
    assert sums.tokens == 37


def test_the_linear_path_is_taken_for_plain_linear_heads_only():
    from hf_qad.trainer import losses

    s_head, t_head, h_s, h_t, targets = _setup()
    calls = []
    original = losses._LinearHeadLoss.apply
    try:
        losses._LinearHeadLoss.apply = lambda *args: calls.append(args) or original(*args)
        chunked_distillation_loss(h_s, s_head, h_t, t_head, targets)
        assert len(calls) == 1
        handle = s_head.register_forward_hook(lambda module, args, output: None)  # hooked: the checkpoint path
        chunked_distillation_loss(h_s, s_head, h_t, t_head, targets)
        handle.remove()
        assert len(calls) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast too: it casts inside the Function
            chunked_distillation_loss(h_s, s_head, h_t, t_head, targets)
        assert len(calls) == 2
    finally:
        losses._LinearHeadLoss.apply = original


def test_frozen_linear_head_gets_no_gradient_and_the_hidden_states_do():
    s_head, t_head, h_s, h_t, targets = _setup()
    s_head.requires_grad_(False)
    chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, chunk_size=8).loss.backward()
    assert s_head.weight.grad is None and s_head.bias.grad is None
    got = h_s.grad.clone()
    h_s.grad = None
    _naive(s_head, t_head, h_s, h_t, targets, "forward_kl", 0.5, 1.0)[0].backward()
    assert torch.allclose(got, h_s.grad, rtol=1e-4, atol=1e-6)


def test_no_loss_tokens_gives_zero_and_a_connected_graph():
    s_head, t_head, h_s, h_t, targets = _setup(n=0)
    sums = chunked_distillation_loss(h_s, s_head, h_t, t_head, targets)
    assert sums.loss.item() == 0.0 and sums.divergence.item() == 0.0 and sums.tokens == 0
    sums.loss.backward()  # no error, no NaN
    assert torch.isfinite(h_s.grad).all()


def test_bad_arguments():
    s_head, t_head, h_s, h_t, targets = _setup()
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, divergence="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, chunk_size=0)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        token_divergence(torch.zeros(1, 4), torch.zeros(1, 4), "jsd", beta=1.0)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, divergence="jsd", beta=0.0)
