"""Token-level distillation losses, computed in chunks so memory does not grow with length.

The naive loss materializes ``[tokens, vocab]`` logits for the student and the teacher
plus their softmaxes and gradients: at vocabulary 49k and 2k tokens that is several
GB. Here both models' heads are applied to ``chunk_size`` tokens at a time inside
``torch.utils.checkpoint``: the forward keeps only per-token sums, and the backward
recomputes one chunk's logits at a time.

Why not TRL's ``ChunkedDivergenceFunction``: it fixes its tiles at 4096 x 32768 float32
(0.5 GB per buffer, two buffers), which is most of the naive loss at 2k tokens, and it
returns the divergence and entropy only. QAD also logs teacher-student top-1 agreement
and both models' cross-entropy, and mixes in the data's cross-entropy; computing them
in the same pass over each chunk avoids a second projection of every token.

Divergences (``p``: teacher, ``q``: student, both at temperature ``T``):

* ``"forward_kl"``: KL(p || q), the QAD paper's loss (mode-covering);
* ``"reverse_kl"``: KL(q || p) (mode-seeking);
* ``"jsd"``: generalized Jensen-Shannon with mixture ``m = beta * p + (1 - beta) * q``:
  ``beta * KL(p || m) + (1 - beta) * KL(q || m)``.

With a temperature the divergence is multiplied by ``T**2`` (Hinton et al.), so that
gradient magnitudes stay comparable across temperatures. The logged ``kl`` metric is
always the forward KL at ``T = 1``, the quantity evaluations report.

Example:
    >>> import torch
    >>> from hf_qad.trainer.losses import chunked_distillation_loss
    >>> head = torch.nn.Linear(8, 32, bias=False)
    >>> h = torch.randn(5, 8, requires_grad=True)
    >>> out = chunked_distillation_loss(h, head, h.detach(), head, torch.randint(0, 32, (5,)))
    >>> round(out.divergence.item(), 6), out.top1_agreement.item(), out.tokens
    (0.0, 5.0, 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["DIVERGENCES", "DistillationSums", "chunked_distillation_loss", "token_divergence"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillationSums:
    """Sums over the loss tokens of one batch (divide by a token count to average).

    ``divergence`` and ``student_nll`` carry gradients; the rest are detached metrics.
    """

    divergence: torch.Tensor
    student_nll: torch.Tensor
    kl: torch.Tensor
    top1_agreement: torch.Tensor
    teacher_nll: torch.Tensor
    tokens: int


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence ``[n]`` between teacher and student logits ``[n, vocab]`` (see module doc)."""
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward_kl":
        value = (p.exp() * (p - q)).sum(-1)
    elif divergence == "reverse_kl":
        value = (q.exp() * (q - p)).sum(-1)
    elif divergence == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}; beta=0 or 1 is a plain KL.")
        m = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log(1 - beta)]), dim=0)
        value = beta * (p.exp() * (p - m)).sum(-1) + (1 - beta) * (q.exp() * (q - m)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
    return value * temperature**2


def _chunk_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    divergence: str,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, ...]:
    s_logits = student_head(student_hidden).float()
    with torch.no_grad():
        t_logits = teacher_head(teacher_hidden).float()
    div = token_divergence(s_logits, t_logits, divergence, beta, temperature).sum()
    s_logp = F.log_softmax(s_logits, dim=-1)
    student_nll = -s_logp.gather(-1, targets[:, None]).sum()
    with torch.no_grad():
        t_logp = F.log_softmax(t_logits, dim=-1)
        if divergence == "forward_kl" and temperature == 1.0:
            kl = div.detach()
        else:
            kl = (t_logp.exp() * (t_logp - s_logp.detach())).sum()
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).sum().float()
        teacher_nll = -t_logp.gather(-1, targets[:, None]).sum()
    return div, student_nll, kl, agree, teacher_nll


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_hidden: torch.Tensor,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> DistillationSums:
    """Distillation sums over ``n`` loss tokens, ``chunk_size`` tokens at a time.

    Args:
        student_hidden: ``[n, hidden]`` final hidden states of the student at the loss
            positions (with gradient).
        student_head: the student's output layer (``lm_head`` module), applied per chunk.
        teacher_hidden: ``[n, hidden_t]`` teacher hidden states at the same positions.
        teacher_head: the teacher's output layer.
        targets: ``[n]`` next-token ids (for the cross-entropy terms).
        divergence, beta, temperature: see the module docstring.
        chunk_size: tokens per chunk; peak loss memory is about
            ``3 * chunk_size * vocab * 4`` bytes whatever the sequence length.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
    n = student_hidden.shape[0]
    zero = student_hidden.sum() * 0.0  # keeps the graph connected when there are no loss tokens
    totals = [zero, zero.clone()] + [torch.zeros((), device=student_hidden.device) for _ in range(3)]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        sums = checkpoint(
            _chunk_sums,
            student_hidden[start:end],
            teacher_hidden[start:end],
            targets[start:end],
            student_head,
            teacher_head,
            divergence,
            beta,
            temperature,
            use_reentrant=False,
        )
        totals = [total + value for total, value in zip(totals, sums)]
    div, student_nll, kl, agree, teacher_nll = totals
    return DistillationSums(div, student_nll, kl.detach(), agree.detach(), teacher_nll.detach(), n)
