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
    "leading_bos_id",
    "token_rows",
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


def leading_bos_id(tokenizer) -> int | None:
    """The BOS id ``tokenizer`` puts before every text, or ``None`` if it adds none.

    Found by encoding a text: flags such as ``add_bos_token`` do not say what a
    tokenizers post-processor does (Llama-3's adds BOS with the flag unset).
    SmolLM2's tokenizer has a BOS token (``<|im_start|>``) but does not add it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def chunk_token_ids(
    token_ids: list[int] | torch.Tensor, seq_len: int, max_tokens: int | None = None, bos_token_id: int | None = None
) -> torch.Tensor:
    """Cut a token stream into ``[n, seq_len]`` rows, dropping the incomplete tail.

    With ``bos_token_id``, every row is that BOS followed by the next ``seq_len - 1``
    tokens of the stream: the rows start mid-text, and a model whose tokenizer adds BOS
    was trained on sequences that start with it (without it, perplexities read several
    times too high). ``max_tokens`` caps the size of the result, ``n * seq_len``.

    Raises:
        ValueError: if ``seq_len`` is too small or the stream is shorter than one row.

    Example:
        >>> chunk_token_ids([5, 6, 7, 8, 9], 3, bos_token_id=1).tolist()
        [[1, 5, 6], [1, 7, 8]]
    """
    shortest = 1 if bos_token_id is None else 2
    if seq_len < shortest:
        raise ValueError(f"seq_len must be at least {shortest}, got {seq_len}.")
    width = seq_len - (bos_token_id is not None)
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    rows = ids.numel() // width
    if max_tokens is not None:
        rows = min(rows, max_tokens // seq_len)
    if rows == 0:
        available = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {available}.")
    body = ids[: rows * width].view(rows, width)
    if bos_token_id is None:
        return body
    return torch.cat([torch.full((rows, 1), bos_token_id, dtype=torch.long), body], dim=1)


def token_rows(tokenizer, texts: Iterable[str], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` rows of the token stream of ``texts``, each starting as the model was trained.

    The texts are tokenized without special tokens and concatenated (stopping once
    ``max_tokens`` are there), then cut by :func:`chunk_token_ids`, with BOS at the start
    of every row when the tokenizer adds one (:func:`leading_bos_id`).

    Raises:
        ValueError: as :func:`chunk_token_ids`.
    """
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return chunk_token_ids(ids, seq_len, max_tokens, bos_token_id=leading_bos_id(tokenizer))


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
def layer_quantization_errors(model: nn.Module, reference: nn.Module | None = None) -> dict[str, float]:
    """Relative weight error ``||W_hat - W|| / ||W||`` of every NVFP4 layer of ``model``, in model order.

    ``W_hat`` is the layer's NVFP4 weight. ``W`` is its master weight in fake-quant mode;
    a packed layer has none, so there ``W`` is the same-named weight of ``reference``
    (the teacher: for a PTQ export this is the quantization error, after QAD it also
    holds what training changed). Packed layers are left out without ``reference``.
    Fused MoE experts (:class:`~hf_qad.nvfp4.moe.NVFP4Experts`) give one entry per projection,
    ``<experts>.gate_up_proj`` and ``<experts>.down_proj``, the error over all their experts
    (one bar per layer in ``hf-qad eval``'s figure, as for a dense MLP).

    Raises:
        ValueError: if ``reference`` has no weight of that name and shape for a packed layer.
    """
    from hf_qad.nvfp4.conversion import nvfp4_experts, nvfp4_modules
    from hf_qad.nvfp4.moe import EXPERT_PROJECTIONS, NVFP4Experts

    layers = {**nvfp4_modules(model), **nvfp4_experts(model)}
    errors = {}
    for name, _ in model.named_modules():
        layer = layers.get(name)
        if layer is None or (layer.is_packed and reference is None):
            continue
        for tensor_name in EXPERT_PROJECTIONS if isinstance(layer, NVFP4Experts) else ("weight",):
            key = f"{name}.{tensor_name}" if isinstance(layer, NVFP4Experts) else name
            quantized, weight = _nvfp4_and_master_weight(layer, tensor_name)
            if weight is None:
                try:
                    weight = getattr(reference.get_submodule(name), tensor_name)
                except AttributeError:
                    weight = None
                if not isinstance(weight, torch.Tensor) or weight.shape != quantized.shape:
                    raise ValueError(f"the reference model has no weight {key} of shape {tuple(quantized.shape)}: "
                                     "it must be the model that was quantized.")
            weight = weight.to(quantized.device, torch.float32)
            errors[key] = float((quantized - weight).norm() / weight.norm().clamp(min=1e-30))
    return errors


def _nvfp4_and_master_weight(layer: nn.Module, tensor_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's NVFP4 weight ``tensor_name`` (float32) and its master weight, ``None`` when packed.

    Fake mode gives the fake-quantized weight the forward computes with.
    """
    from hf_qad.nvfp4.functional import dequantize
    from hf_qad.nvfp4.linear import NVFP4Linear

    if isinstance(layer, NVFP4Linear):
        if layer.is_packed:
            return dequantize(*layer.quantized_weight(), dtype=torch.float32), None
        return layer.fake_quantized_weight().float(), layer.weight
    if layer.is_packed:
        return layer.dequantized_weight(tensor_name), None
    return layer.fake_quantized_weight(tensor_name).float(), getattr(layer, tensor_name)
