"""Chunked distillation loss against the naive full-logits loss."""

import pytest
import torch
import torch.nn.functional as F

from hf_qad.trainer.losses import chunked_distillation_loss, token_divergence


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
    ("forward_kl", 0.5, 1.0), ("forward_kl", 0.5, 2.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.3, 1.0),
])
@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_chunked_loss_and_gradients_equal_the_naive_loss(divergence, beta, temperature, chunk_size):
    s_head, t_head, h_s, h_t, targets = _setup()
    sums = chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, divergence=divergence, beta=beta,
                                     temperature=temperature, chunk_size=chunk_size)
    (0.7 * sums.divergence + 0.3 * sums.student_nll).backward()
    got = [h_s.grad.clone(), s_head.weight.grad.clone(), s_head.bias.grad.clone()]
    assert t_head.weight.grad is None  # the teacher never gets gradients
    for tensor in (h_s, s_head.weight, s_head.bias):
        tensor.grad = None
    div, ce = _naive(s_head, t_head, h_s, h_t, targets, divergence, beta, temperature)
    (0.7 * div + 0.3 * ce).backward()
    assert torch.allclose(sums.divergence, div, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sums.student_nll, ce, rtol=1e-5)
    for g, want in zip(got, (h_s.grad, s_head.weight.grad, s_head.bias.grad)):
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6)


def test_metrics():
    s_head, t_head, h_s, h_t, targets = _setup()
    sums = chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, divergence="reverse_kl", chunk_size=5)
    s, t = s_head(h_s).detach(), t_head(h_t).detach()
    kl = token_divergence(s, t, "forward_kl").sum()
    assert torch.allclose(sums.kl, kl, rtol=1e-5)
    assert sums.top1_agreement == (s.argmax(-1) == t.argmax(-1)).sum()
    assert torch.allclose(sums.teacher_nll, F.cross_entropy(t, targets, reduction="sum"))
    assert sums.tokens == 37


def test_no_loss_tokens_gives_zero_and_a_connected_graph():
    s_head, t_head, h_s, h_t, targets = _setup(n=0)
    sums = chunked_distillation_loss(h_s, s_head, h_t, t_head, targets)
    assert sums.divergence.item() == 0.0 and sums.tokens == 0
    sums.divergence.backward()  # no error, no NaN
    assert torch.isfinite(h_s.grad).all()


def test_bad_arguments():
    s_head, t_head, h_s, h_t, targets = _setup()
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, divergence="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss(h_s, s_head, h_t, t_head, targets, chunk_size=0)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        token_divergence(torch.zeros(1, 4), torch.zeros(1, 4), "jsd", beta=1.0)
