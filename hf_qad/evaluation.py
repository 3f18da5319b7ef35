"""How far a quantized student is from its teacher: KL, top-1 agreement, perplexity.

Used by the benchmarks, the ``hf-qad eval`` command and the demo. All metrics are
per next-token prediction, averaged over every predicted token:

* ``kl``: forward KL(teacher || student) in nats/token, the quantity QAD minimizes;
* ``top1_agreement``: fraction of positions where both models' argmax agree;
* ``student_ppl`` / ``teacher_ppl``: perplexity of each model on the text itself.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_qad.evaluation import compare_to_teacher
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> result = compare_to_teacher(model, model, [torch.randint(0, 64, (2, 16))])
    >>> result.kl, result.top1_agreement
    (0.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_qad.trainer.losses import token_kl

__all__ = [
    "ComparisonResult",
    "chunk_token_ids",
    "compare_to_teacher",
    "layer_quantization_errors",
    "choice_log_likelihoods",
    "multiple_choice_accuracy",
]


@dataclass
class ComparisonResult:
    """Averages over ``tokens`` predicted positions (see the module docstring)."""

    kl: float
    top1_agreement: float
    student_ppl: float
    teacher_ppl: float
    tokens: int
    kl_by_position: list[float] = field(default_factory=list)
    """Mean KL at each position of the rows (position 0 predicts token 1)."""

    def as_dict(self) -> dict[str, float | list[float]]:
        return asdict(self)


def chunk_token_ids(token_ids: list[int] | torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a token stream into ``[n, seq_len]`` rows, dropping the incomplete tail.

    Raises:
        ValueError: if the stream is shorter than one row.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    rows = ids.numel() // seq_len
    if rows == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}.")
    return ids[: rows * seq_len].view(rows, seq_len)


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()


@torch.no_grad()
def compare_to_teacher(
    student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor]
) -> ComparisonResult:
    """Compare ``student`` with ``teacher`` on batches of token ids ``[batch, seq]``.

    Both models run in eval mode without a KV cache; the totals are accumulated in
    float64 so that long evaluations do not lose precision.
    """
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    kl = agree = nll_s = nll_t = 0.0
    count = 0
    kl_positions: torch.Tensor | None = None
    rows = 0
    try:
        for input_ids in batches:
            s_logp = F.log_softmax(_logits(student, input_ids.to(device))[:, :-1], dim=-1)
            t_logp = F.log_softmax(_logits(teacher, input_ids.to(teacher_device))[:, :-1], dim=-1).to(device)
            target = input_ids[:, 1:].to(device).unsqueeze(-1)
            kl_rows = token_kl(t_logp, s_logp)
            kl += float(kl_rows.double().sum())
            if kl_positions is None or kl_positions.shape[0] == kl_rows.shape[1]:
                position_sum = kl_rows.double().sum(0).cpu()
                kl_positions = position_sum if kl_positions is None else kl_positions + position_sum
                rows += kl_rows.shape[0]
            agree += float((s_logp.argmax(-1) == t_logp.argmax(-1)).sum())
            nll_s -= float(s_logp.gather(-1, target).double().sum())
            nll_t -= float(t_logp.gather(-1, target).double().sum())
            count += target.numel()
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    if count == 0:
        raise ValueError("compare_to_teacher() got no tokens to evaluate.")
    return ComparisonResult(
        kl=max(kl / count, 0.0),
        top1_agreement=agree / count,
        student_ppl=math.exp(nll_s / count),
        teacher_ppl=math.exp(nll_t / count),
        tokens=count,
        kl_by_position=(kl_positions / rows).clamp(min=0).tolist() if kl_positions is not None else [],
    )


def multiple_choice_accuracy(model: nn.Module, tokenizer, rows: Iterable[dict], batch_size: int = 8) -> float:
    """Accuracy on ARC-style multiple-choice rows by the log-likelihood of each choice.

    Each row has ``question``, ``choices`` (``{"text": [...], "label": [...]}``) and
    ``answerKey``. The model scores ``" " + choice`` after ``"Question: ...\nAnswer:"``
    by the sum of its token log-probabilities (the ``acc`` metric of common harnesses),
    ``batch_size`` questions per forward (see :func:`choice_log_likelihoods`).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("multiple_choice_accuracy() got no rows.")
    correct = 0
    for row, scores in zip(rows, choice_log_likelihoods(model, tokenizer, rows, batch_size)):
        predicted = row["choices"]["label"][max(range(len(scores)), key=scores.__getitem__)]
        correct += predicted == row["answerKey"]
    return correct / len(rows)


@torch.no_grad()
def choice_log_likelihoods(model: nn.Module, tokenizer, rows: list[dict], batch_size: int = 8) -> list[list[float]]:
    """Per row, the summed log-probability of each ``" " + choice`` after its question.

    The choices of ``batch_size`` questions go through the model in one right-padded
    forward: in a causal model the padding after a sequence never reaches its tokens, and
    NVFP4 activation blocks run along the hidden dimension of one token, so each score is
    what a forward of that sequence alone gives, up to the matmuls' summation order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    try:
        for start in range(0, len(rows), batch_size):
            sequences, choice_lengths = [], []
            for row in rows[start: start + batch_size]:
                prompt = tokenizer(f"Question: {row['question']}\nAnswer:", add_special_tokens=True)["input_ids"]
                for choice in row["choices"]["text"]:
                    choice_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                    sequences.append(prompt + choice_ids)
                    choice_lengths.append(len(choice_ids))
            width = max(len(seq) for seq in sequences)
            ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in sequences], device=device)
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
            token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            flat = [float(token_logp[i, len(seq) - 1 - n: len(seq) - 1].sum())
                    for i, (seq, n) in enumerate(zip(sequences, choice_lengths))]
            for row in rows[start: start + batch_size]:
                count = len(row["choices"]["text"])
                scores.append(flat[:count])
                flat = flat[count:]
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def layer_quantization_errors(model: nn.Module) -> dict[str, float]:
    """Relative weight error ``||W_hat - W|| / ||W||`` of every fake-quant NVFP4 layer."""
    from hf_qad.nvfp4.conversion import nvfp4_modules

    errors = {}
    for name, layer in nvfp4_modules(model).items():
        if layer.is_packed:
            continue
        weight = layer.weight.float()
        errors[name] = float((layer.fake_quantized_weight().float() - weight).norm() / weight.norm().clamp(min=1e-30))
    return errors
