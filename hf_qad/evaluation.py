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
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ComparisonResult", "chunk_token_ids", "compare_to_teacher"]


@dataclass
class ComparisonResult:
    """Averages over ``tokens`` predicted positions (see the module docstring)."""

    kl: float
    top1_agreement: float
    student_ppl: float
    teacher_ppl: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
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
    try:
        for input_ids in batches:
            s_logp = F.log_softmax(_logits(student, input_ids.to(device))[:, :-1], dim=-1)
            t_logp = F.log_softmax(_logits(teacher, input_ids.to(teacher_device))[:, :-1], dim=-1).to(device)
            target = input_ids[:, 1:].to(device).unsqueeze(-1)
            kl += float((t_logp.exp() * (t_logp - s_logp)).sum(-1).double().sum())
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
    )
