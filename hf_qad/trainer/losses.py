"""Token-level distillation losses, computed in chunks so memory does not grow with length.

Two losses, one per teacher source, both walking the tokens ``chunk_size`` at a time:

* :func:`chunked_distillation_loss`: against a live teacher, from both models' final hidden
  states and output layers (any divergence below);
* :func:`cached_distillation_loss`: against a teacher cache
  (:mod:`hf_qad.trainer.teacher_cache`), the forward KL over the teacher's top-k tokens.

The naive loss materializes ``[tokens, vocab]`` logits for the student and the teacher
plus their softmaxes and gradients: at vocabulary 49k and 2k tokens that is several
GB. Here both models' heads are applied to ``chunk_size`` tokens at a time and only sums
are kept. Each chunk computes both log-softmaxes once and has hand-written gradients, so
its float32 temporaries peak at about ``4 * chunk_size * vocab * 4`` bytes (forward KL at
temperature 1; one or two more ``[chunk, vocab]`` tensors for the other divergences or
another temperature): 0.1 GB for chunk 128 at vocabulary 49k (``benchmarks/RESULTS.md``).

The loss is one differentiable scalar, ``kl_weight * divergence + ce_weight * student_nll``,
so its gradient is known up to the scale the backward brings. Two paths give the same
values and gradients:

* a plain ``nn.Linear`` student head (one device, DDP) goes to one autograd Function that
  computes each chunk's gradients in the forward, while the chunk's softmaxes exist (as
  Liger's fused linear cross-entropy does), into one buffer per input: the head's weight
  gradient (which becomes ``.grad``) and the hidden states'. The backward only scales
  them, so nothing is recomputed: per token, four head matmuls instead of six;
* any other head (FSDP, DeepSpeed ZeRO-3, hooked or wrapped modules) is called as a module
  per chunk inside ``torch.utils.checkpoint``, which recomputes the chunk in the backward.
  There autograd makes the weight gradient of a trainable head per chunk and adds it into a
  running sum, so the backward holds one more vocab x hidden tensor than the naive loss
  (0.1 GB at SmolLM2-135M in float32).

Under autocast (``bf16=True`` in the training arguments) the head matmuls run in the
autocast dtype, as the model's own ``lm_head`` would; softmaxes, sums and the head's
weight-gradient accumulation stay float32.

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
always the forward KL at ``T = 1``, the quantity evaluations report
(:func:`hf_qad.evaluation.compare_to_teacher` computes it with :func:`token_kl`).

The cached loss is the forward KL between two distributions over ``k + 1`` buckets, the
top-k tokens and one tail bucket. Teacher: its cached top-k probabilities and tail mass.
Student: its probabilities of the same ``k`` tokens and its own remaining mass. With ``k`` =
vocabulary size this is the full KL; with smaller ``k`` it is a lower bound of it (merging
outcomes never increases a KL) that misses only how the student spreads the tail (measured
in ``benchmarks/RESULTS.md``). Each chunk applies the student's head as a module inside
``torch.utils.checkpoint``, as the live loss does for heads other than a plain ``nn.Linear``.

Example:
    >>> import torch
    >>> from hf_qad.trainer.losses import chunked_distillation_loss
    >>> head = torch.nn.Linear(8, 32, bias=False)
    >>> h = torch.randn(5, 8, requires_grad=True)
    >>> out = chunked_distillation_loss(h, head, h.detach(), head, torch.randint(0, 32, (5,)))
    >>> out.loss.backward()  # kl_weight * divergence + ce_weight * student_nll (1 and 0 by default)
    >>> abs(round(out.divergence.item(), 6)), out.top1_agreement.item(), out.tokens  # abs: -0.0 prints as 0.0
    (0.0, 5.0, 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DIVERGENCES",
    "DistillationSums",
    "cached_distillation_loss",
    "check_divergence",
    "chunked_distillation_loss",
    "token_divergence",
    "token_kl",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillationSums:
    """Sums over the loss tokens of one batch (divide by a token count to average).

    ``loss`` (``kl_weight * divergence + ce_weight * student_nll``) carries the gradient;
    every other field is a detached metric.
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    student_nll: torch.Tensor
    kl: torch.Tensor
    top1_agreement: torch.Tensor
    teacher_nll: torch.Tensor
    tokens: int


def check_divergence(divergence: str, beta: float = 0.5, temperature: float = 1.0) -> None:
    """Raise ``ValueError`` unless ``divergence``, ``beta`` and ``temperature`` define a loss (see the module doc).

    Example:
        >>> check_divergence("jsd", beta=1.0)
        Traceback (most recent call last):
        ...
        ValueError: jsd needs 0 < beta < 1, got 1.0; beta=0 or 1 is a plain KL.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}.")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}; beta=0 or 1 is a plain KL.")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")


def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) ``[...]`` from log-probabilities ``[..., vocab]`` (``log_p``: the reference, the teacher).

    Example:
        >>> import torch
        >>> log_p = torch.tensor([[0.5, 0.5]]).log()
        >>> token_kl(log_p, torch.tensor([[0.25, 0.75]]).log())  # 0.5 * log(2) + 0.5 * log(2/3)
        tensor([0.1438])
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence ``[n]`` between teacher and student logits ``[n, vocab]`` (see module doc)."""
    check_divergence(divergence, beta, temperature)
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward_kl":
        value = token_kl(p, q)
    elif divergence == "reverse_kl":
        value = token_kl(q, p)
    else:  # jsd
        m = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log(1 - beta)]), dim=0)
        value = beta * token_kl(p, m) + (1 - beta) * token_kl(q, m)
    return value * temperature**2


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` for ``[n, vocab]`` tensors without materializing the product."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).view(a.shape[:-1])


def _total_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` without materializing the product."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _chunk_forward(s_logits, teacher_hidden, teacher_head, targets, divergence, beta, temperature, ce_grad):
    """One chunk's sums ``(divergence, student_nll, kl, top1_agreement, teacher_nll)`` and what its gradient needs.

    Runs without autograd: :func:`_chunk_grad` turns the kept tensors into the logits' gradient.
    Each log-softmax is computed once, and the teacher's logits are made here rather than passed
    in, so that they are freed once their log-softmax exists: at temperature 1 the forward KL
    peaks at four ``[chunk, vocab]`` float32 tensors (student logits, both log-softmaxes, one
    difference) and keeps two (both softmaxes) for the gradient; the CE gradient (``ce_grad``)
    adds one more only at another temperature.
    """
    T = temperature
    index = targets[:, None]
    s = s_logits.float()
    s_top = s.argmax(-1)
    q = F.log_softmax(s / T if T != 1.0 else s, dim=-1)
    s1 = q if T == 1.0 else F.log_softmax(s, dim=-1)  # log-probabilities at T = 1
    del s
    t = teacher_head(teacher_hidden).float()
    agree = (s_top == t.argmax(-1)).sum().float()
    p = F.log_softmax(t / T if T != 1.0 else t, dim=-1)
    t1 = p if T == 1.0 else F.log_softmax(t, dim=-1)
    del t
    student_nll = -s1.gather(-1, index).sum()
    teacher_nll = -t1.gather(-1, index).sum()
    kl = _total_dot(t1.exp(), t1 - s1) if T != 1.0 else None  # forward KL at T = 1; at T = 1 from q and p below
    student_ce = s1.exp_() if ce_grad and T != 1.0 else None  # softmax(student) at T = 1 for the CE gradient
    del s1, t1
    if divergence == "forward_kl":
        diff = p - q
        P = p.exp_()
        value = _total_dot(P, diff)
        del diff
        saved = (q.exp_(), P)
        kl = value if kl is None else kl
    elif divergence == "reverse_kl":
        kl = _total_dot(p.exp(), p - q) if kl is None else kl
        Q = q.exp()
        diff = q.sub_(p)  # log Q - log P
        del p, q
        r = _row_dot(Q, diff)
        value = r.sum()
        saved = (Q, diff, r)
    else:  # jsd (check_divergence ran at the loss's entry)
        kl = _total_dot(p.exp(), p - q) if kl is None else kl
        m = torch.logaddexp(p + math.log(beta), q + math.log(1 - beta))  # log M
        P, Q = p.exp(), q.exp()
        dp, dq = p.sub_(m), q.sub_(m)  # log P - log M, log Q - log M
        del m
        r = _row_dot(Q, dq)
        value = beta * _total_dot(P, dp) + (1 - beta) * r.sum()
        del P, dp
        saved = (Q, dq, r)
    if student_ce is not None:
        saved = (*saved, student_ce)
    return (value * T**2, student_nll, kl, agree, teacher_nll), saved


def _chunk_grad(saved, targets, kl_weight, ce_weight, divergence, beta, temperature):
    """The float32 gradient of ``kl_weight * divergence + ce_weight * student_nll`` in a chunk's student logits.

    With ``Q``/``P`` the student/teacher softmax at temperature ``T`` and ``r`` a per-token sum:

    * forward KL: ``T * (Q - P)``;
    * reverse KL: ``T * Q * (log Q - log P - r)``, ``r = KL(Q || P)`` per token;
    * JSD: ``T * (1 - beta) * Q * (log Q - log M - r)``, ``M = beta * P + (1 - beta) * Q``, ``r = KL(Q || M)``;
    * student CE: ``softmax(student) - onehot(target)``.

    ``None`` when both weights are 0.
    """
    T = temperature
    grad = None
    if kl_weight:
        if divergence == "forward_kl":
            Q, P = saved[:2]
            grad = torch.sub(Q, P).mul_(kl_weight * T)
        else:  # reverse KL, JSD: Q * (diff - r), scaled
            Q, diff, r = saved[:3]
            scale = T if divergence == "reverse_kl" else T * (1 - beta)
            grad = torch.sub(diff, r[:, None]).mul_(Q).mul_(kl_weight * scale)
    if ce_weight:
        student = saved[0] if T == 1.0 else saved[-1]  # softmax of the student at T = 1
        grad = student * ce_weight if grad is None else grad.add_(student, alpha=ce_weight)
        grad.scatter_add_(-1, targets[:, None], grad.new_full((targets.shape[0], 1), -ce_weight))
    return grad


def weighted_loss(divergence: torch.Tensor, student_nll: torch.Tensor, kl_weight: float,
                  ce_weight: float) -> torch.Tensor:
    """``kl_weight * divergence + ce_weight * student_nll``; at ``ce_weight=0`` the CE stays out of the graph."""
    return kl_weight * divergence + ce_weight * student_nll if ce_weight else kl_weight * divergence


def _with_loss(sums, options):
    """``(loss, *sums)``: the chunk's sums led by the weighted loss, the one differentiable output."""
    return (weighted_loss(*sums[:2], *options[3:]), *sums)


def _non_differentiable(ctx, outputs):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*outputs[1:])


class _ChunkLoss(torch.autograd.Function):
    """One chunk from the student's logits, for any student head: run inside ``torch.utils.checkpoint``."""

    @staticmethod
    def forward(ctx, s_logits, teacher_hidden, teacher_head, targets, options):
        divergence, beta, temperature, _, ce_weight = options
        sums, saved = _chunk_forward(s_logits, teacher_hidden, teacher_head, targets, divergence, beta, temperature,
                                     ce_grad=bool(ce_weight))
        ctx.save_for_backward(*saved, targets)
        ctx.options = options
        ctx.logits_dtype = s_logits.dtype
        outputs = _with_loss(sums, options)
        _non_differentiable(ctx, outputs)
        return outputs

    @staticmethod
    def backward(ctx, g_loss, *unused):
        *saved, targets = ctx.saved_tensors
        divergence, beta, temperature, kl_weight, ce_weight = ctx.options
        grad = None if g_loss is None else _chunk_grad(saved, targets, kl_weight, ce_weight, divergence, beta,
                                                       temperature)
        return (None if grad is None else grad.mul_(g_loss).to(ctx.logits_dtype)), *([None] * 4)


class _LinearHeadLoss(torch.autograd.Function):
    """All chunks of a plain ``nn.Linear`` student head, with the gradients made in the forward.

    The same per-chunk computation as :class:`_ChunkLoss`. While a chunk's softmaxes exist, its
    logits' gradient (at loss scale 1) goes straight into the hidden states' gradient and, with
    ``addmm_``, into one weight (and bias) gradient buffer; the backward multiplies them by the
    incoming scale. Under the checkpoint, autograd would recompute every chunk's logits and make a
    vocab x hidden weight-gradient temporary per chunk besides the running sum.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_head, targets, options, chunk_size, with_grad):
        divergence, beta, temperature, kl_weight, ce_weight = options
        needs = ctx.needs_input_grad[:3] if with_grad else (False, False, False)
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight) if needs[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
        totals = None
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            sums, saved = _chunk_forward(F.linear(hidden[part], weight, bias), teacher_hidden[part], teacher_head,
                                         targets[part], divergence, beta, temperature, ce_grad=bool(ce_weight))
            totals = sums if totals is None else tuple(total + value for total, value in zip(totals, sums))
            grad = _chunk_grad(saved, targets[part], kl_weight, ce_weight, divergence, beta, temperature) \
                if any(needs) else None
            del saved  # before the gradient products: only the chunk's gradient is still vocabulary-sized
            if grad is None:
                continue
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = torch.mm(grad, weight)  # in the autocast dtype under autocast, as F.linear
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), hidden[part].to(weight.dtype))
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del grad  # before the next chunk's logits
        ctx.gradients = (grad_hidden, grad_weight, grad_bias)
        outputs = _with_loss(totals, options)
        _non_differentiable(ctx, outputs)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *unused):
        gradients, ctx.gradients = ctx.gradients, None
        if gradients is None:
            raise RuntimeError(
                "the distillation loss's gradients were computed in its forward and have been used: "
                "call backward through it once per forward (retain_graph=True cannot reuse them)."
            )
        if g_loss is None:
            return (None,) * 9
        return *(None if g is None else g.mul_(g_loss) for g in gradients), *([None] * 6)


def _plain_linear(head) -> bool:
    """Whether ``head`` is an ``nn.Linear`` whose forward is exactly ``F.linear(x, weight, bias)``.

    Not when anything hooks into its forward (DeepSpeed ZeRO-3, FSDP2's subclass, PEFT and
    quantized layers are other classes) or its weight is a distributed tensor.
    """
    from torch.nn.modules import module

    return (
        type(head) is torch.nn.Linear
        and type(head.weight) in (torch.Tensor, torch.nn.Parameter)
        and not hasattr(head.weight, "ds_id")
        and not (head._forward_hooks or head._forward_pre_hooks)
        and not (module._global_forward_hooks or module._global_forward_pre_hooks)
    )


def _live_chunk_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    options: tuple,
) -> tuple[torch.Tensor, ...]:
    """One chunk of :func:`chunked_distillation_loss` for any student head: ``(loss, *metrics)``."""
    # The student's logits are passed straight in: nothing outside _ChunkLoss holds them once it has run.
    return _ChunkLoss.apply(student_head(student_hidden), teacher_hidden, teacher_head, targets, options)


def _cached_chunk_sums(
    student_hidden: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    tail: torch.Tensor,
    target_logprob: torch.Tensor,
    targets: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    kl_weight: float,
    ce_weight: float,
) -> tuple[torch.Tensor, ...]:
    """One chunk of :func:`cached_distillation_loss`: ``(loss, *metrics)``, its ``kl`` being its divergence."""
    logits = student_head(student_hidden).float()
    student = F.log_softmax(logits, dim=-1)
    # The student's own tail: a finite fill keeps the gradient finite when the top k cover the vocabulary.
    student_tail = student.scatter(-1, top_ids, torch.finfo(student.dtype).min).logsumexp(-1)
    student_buckets = torch.cat([student.gather(-1, top_ids), student_tail[:, None]], dim=-1)
    # Renormalized so float16 rounding of the stored log-probs cannot make the teacher sum past 1.
    teacher = F.log_softmax(torch.cat([top_logprobs.float(), tail.float()[:, None]], dim=-1), dim=-1)
    # Not token_kl: an empty tail bucket (k = vocabulary) has log-probability -inf, and 0 * -inf is NaN.
    terms = torch.where(teacher.isneginf(), 0.0, teacher.exp() * (teacher - student_buckets))
    divergence = terms.sum()
    student_nll = -student.gather(-1, targets[:, None]).sum()
    with torch.no_grad():
        agree = (logits.argmax(-1) == top_ids[:, 0]).sum().float()
        teacher_nll = -target_logprob.float().sum()
    loss = weighted_loss(divergence, student_nll, kl_weight, ce_weight)
    kl = divergence.detach()
    return loss, kl, student_nll.detach(), kl, agree, teacher_nll


def _sum_chunks(chunk_sums: Callable[..., tuple[torch.Tensor, ...]], chunk_size: int,
                per_token: tuple[torch.Tensor, ...], *shared: object) -> tuple[torch.Tensor, ...]:
    """The sums of ``chunk_sums(*chunk of each per_token tensor, *shared)`` over ``chunk_size``-token chunks.

    Each chunk runs under ``torch.utils.checkpoint``, so its vocabulary-sized temporaries are freed
    when it returns and remade, one chunk at a time, in the backward.
    """
    totals = None
    for start in range(0, per_token[0].shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        outputs = checkpoint(chunk_sums, *(tensor[part] for tensor in per_token), *shared, use_reentrant=False)
        totals = outputs if totals is None else tuple(total + value for total, value in zip(totals, outputs))
    return totals


def _as_sums(outputs: tuple[torch.Tensor, ...], tokens: int) -> DistillationSums:
    loss, *metrics = outputs
    return DistillationSums(loss, *(metric.detach() for metric in metrics), tokens=tokens)


def _no_token_sums(student_hidden: torch.Tensor) -> DistillationSums:
    zero = student_hidden.sum() * 0.0  # keeps the graph connected when there are no loss tokens
    return DistillationSums(zero, *(torch.zeros((), device=student_hidden.device) for _ in range(5)), tokens=0)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")


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
    chunk_size: int = 128,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> DistillationSums:
    """Distillation sums over ``n`` loss tokens against a live teacher, ``chunk_size`` tokens at a time.

    Args:
        student_hidden: ``[n, hidden]`` final hidden states of the student at the loss
            positions (with gradient).
        student_head: the student's output layer (``lm_head`` module), applied per chunk.
        teacher_hidden: ``[n, hidden_t]`` teacher hidden states at the same positions.
        teacher_head: the teacher's output layer.
        targets: ``[n]`` next-token ids (for the cross-entropy terms).
        divergence, beta, temperature: see the module docstring.
        chunk_size: tokens per chunk; peak loss memory is about
            ``4 * chunk_size * vocab * 4`` bytes whatever the sequence length (see the module doc).
        kl_weight, ce_weight: the differentiable ``loss`` is
            ``kl_weight * divergence + ce_weight * student_nll``. With ``ce_weight=0`` the
            student CE is computed from the same log-probabilities as a metric only.

    With a plain ``nn.Linear`` student head and grad mode on, the gradients are made in this
    call and kept until ``loss.backward()`` (a hidden-states-sized and a head-weight-sized
    buffer), so backward through ``loss`` once.
    """
    _check_chunk_size(chunk_size)
    check_divergence(divergence, beta, temperature)
    n = student_hidden.shape[0]
    if n == 0:
        return _no_token_sums(student_hidden)
    options = (divergence, beta, temperature, kl_weight, ce_weight)
    if _plain_linear(student_head):
        outputs = _LinearHeadLoss.apply(
            student_hidden, student_head.weight, student_head.bias, teacher_hidden, teacher_head, targets, options,
            chunk_size, torch.is_grad_enabled(),
        )
        return _as_sums(outputs, n)
    totals = _sum_chunks(_live_chunk_sums, chunk_size, (student_hidden, teacher_hidden, targets), student_head,
                         teacher_head, options)
    return _as_sums(totals, n)


def cached_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    tail: torch.Tensor,
    target_logprob: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> DistillationSums:
    """Top-k forward KL sums over ``n`` loss tokens against a teacher cache, ``chunk_size`` at a time.

    Args:
        student_hidden: ``[n, hidden]`` student final hidden states at the loss positions.
        student_head: the student's output layer, applied per chunk (recomputed in the backward).
        top_ids, top_logprobs: ``[n, k]`` cached teacher top-k token ids and log-probabilities.
        tail: ``[n]`` cached log of the teacher's mass outside the top k.
        target_logprob: ``[n]`` cached teacher log-probability of ``targets`` (for ``teacher_nll``).
        targets: ``[n]`` next-token ids of the data.
        chunk_size: tokens per chunk, as in :func:`chunked_distillation_loss`.
        kl_weight, ce_weight: the differentiable ``loss`` is
            ``kl_weight * divergence + ce_weight * student_nll``; the other fields are metrics.

    The four cached tensors are what :func:`hf_qad.trainer.teacher_cache.teacher_topk` makes of the
    teacher's logits, as the cache stores them. The divergence is the forward KL at temperature 1, so
    the logged ``kl`` is the divergence itself.

    Example:
        >>> import torch
        >>> from hf_qad.trainer.teacher_cache import teacher_topk
        >>> head = torch.nn.Linear(8, 32, bias=False)
        >>> h, targets = torch.randn(5, 8), torch.randint(0, 32, (5,))
        >>> cache = teacher_topk(head(h), targets, top_k=32)  # the teacher is the student itself
        >>> sums = cached_distillation_loss(h, head, *cache, targets)
        >>> abs(round(float(sums.divergence), 5)), float(sums.top1_agreement), sums.tokens  # abs: -0.0 prints 0.0
        (0.0, 5.0, 5)
    """
    _check_chunk_size(chunk_size)
    n = student_hidden.shape[0]
    if not top_ids.shape[0] == top_logprobs.shape[0] == tail.shape[0] == target_logprob.shape[0] == n:
        raise ValueError(
            f"the teacher cache has {top_ids.shape[0]} entries for {n} loss tokens: it does not line up "
            "with this batch. Rebuild it with the training config (same dataset, tokenizer, max_length)."
        )
    if n == 0:
        return _no_token_sums(student_hidden)
    totals = _sum_chunks(_cached_chunk_sums, chunk_size, (student_hidden, top_ids, top_logprobs, tail,
                                                          target_logprob, targets), student_head, kl_weight, ce_weight)
    return _as_sums(totals, n)
