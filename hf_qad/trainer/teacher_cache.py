"""Offline teacher cache: the teacher's top-k log-probabilities, computed once, so QAD runs without it.

:func:`build_teacher_cache` prepares the training set exactly as ``QADTrainer`` does (it runs
``SFTTrainer``'s own preparation with the same config: tokenization, chat template, masks,
truncation), runs the teacher over it and stores, for every loss token (``labels[1:] != -100``,
the positions ``QADTrainer.compute_loss`` uses):

* ``teacher_topk_ids`` (int32, ``[n][k]``): the teacher's ``k`` most likely next tokens, most likely first;
* ``teacher_topk_logprobs`` (float16 or float32, ``[n][k]``): their log-probabilities;
* ``teacher_tail_logprob`` (float32, ``[n]``): log of the probability left outside the top k,
  computed as a log-sum-exp over the other logits (``1 - sum`` would cancel); ``-inf`` when
  ``k`` is the vocabulary size;
* ``teacher_target_logprob`` (float32, ``[n]``): the teacher's log-probability of the data's
  token, so the logged ``teacher_ce`` stays exact.

``QADConfig(teacher_cache_path=...)`` then trains with no teacher in memory.

Storage: a ``datasets`` dataset (``save_to_disk``, Arrow), holding the tokenized rows
(``input_ids``, ``labels``) with the cache as four more columns, rather than safetensors shards.
The cache entries are columns of the very rows they belong to, so shuffling, padding,
padding-free flattening and per-process sharding carry them along and cannot misalign them
(shards would need an example-to-offset index that every data-pipeline step respects), and
Arrow files are memory-mapped, so a large cache is not read into RAM. When training starts,
the rows ``QADTrainer`` prepares are compared token for token with the cached ones, so a
changed dataset, tokenizer, chat template or ``max_length`` is an error, not a silent
misalignment. Packing is refused: it cuts and merges examples after tokenization.

Loss (:func:`cached_distillation_loss`): forward KL between two distributions over ``k + 1``
buckets, the top-k tokens and one tail bucket. Teacher: its top-k probabilities and its tail
mass. Student: its probabilities of the same ``k`` tokens and its own remaining mass. With
``k`` = vocabulary size this is the full KL; with smaller ``k`` it is a lower bound of it
(merging outcomes never increases a KL) that misses only how the student spreads the tail.

Measured (teacher: the BF16 weights in float32; student: its W4A4 NVFP4 fake-quant, calibrated
on the same text; per-token KL of the bucketed loss against the full KL, and the cosine between
the two losses' gradients over all student weights; float16 log-probs, whose float32 version
gives the same gradient cosines to 3 digits and, at k = vocabulary size, the exact KL):

=============================  =====  =================  ==================  ===============  =========
model (loss tokens)            top-k  per-token KL corr  mean KL rel. error  gradient cosine  tail mass
=============================  =====  =================  ==================  ===============  =========
tiny test Llama, vocab 128     8      0.51               -92%                0.740            0.92
(random weights, 252 tokens)   32     0.84               -69%                0.917            0.70
                               128    0.9997             +0.26% (fp16)       1.0000           0
SmolLM2-135M-Instruct, 49152   8      0.964              -29%                0.983            0.23
(wikitext-2 valid, 381 tok.,   32     0.981              -17%                0.993            0.13
full KL 0.57 nats/token)       128    0.993              -9.6%               0.998            0.07
=============================  =====  =================  ==================  ===============  =========

The random tiny model is nearly uniform (top 32 of 128 hold 30% of the mass), so it is the
worst case. On SmolLM2 the gradient direction is close from k = 32 on while the KL value is
under-estimated (the student's spread over the teacher's tail is invisible to the bucket), so
the logged ``kl`` of a cached run reads lower than a live run's. Measured on CPU with 3
paragraphs of 128 tokens; a larger run on longer data is still to be made.

Example:
    >>> import torch
    >>> from hf_qad.trainer.teacher_cache import cached_distillation_loss, teacher_topk
    >>> head = torch.nn.Linear(8, 32, bias=False)
    >>> h, targets = torch.randn(5, 8), torch.randint(0, 32, (5,))
    >>> cache = teacher_topk(head(h), targets, top_k=32)  # the teacher is the student itself
    >>> sums = cached_distillation_loss(h, head, *cache, targets)
    >>> abs(round(float(sums.divergence), 5)), float(sums.top1_agreement), sums.tokens  # abs: -0.0 prints as 0.0
    (0.0, 5.0, 5)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets, load_from_disk
from torch.utils.checkpoint import checkpoint

from hf_qad.trainer.generation import eval_mode, is_prompt_only
from hf_qad.trainer.losses import DistillationSums, weighted_loss

__all__ = [
    "CACHE_COLUMNS",
    "TeacherCacheCollator",
    "TeacherCacheInfo",
    "attach_teacher_cache",
    "build_teacher_cache",
    "cached_distillation_loss",
    "read_cache_info",
    "teacher_topk",
]

CACHE_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob", "teacher_target_logprob")
_INFO_FILE = "hf_qad_teacher_cache.json"
_TOKEN_COLUMNS = ["input_ids", "labels"]
_PACKING_ERROR = (
    "the teacher cache does not support packing: packing cuts and merges examples after tokenization, so "
    "cached rows would not line up with the packed ones. Set packing=False (padding_free=True keeps the "
    "batches dense)."
)


@dataclass(frozen=True)
class TeacherCacheInfo:
    """What a cache was built with (stored beside it as ``hf_qad_teacher_cache.json``)."""

    top_k: int
    vocab_size: int
    logprob_dtype: str
    teacher: str


def read_cache_info(path: str | Path) -> TeacherCacheInfo:
    """The :class:`TeacherCacheInfo` of the cache at ``path`` (a clear error if there is none)."""
    info = Path(path) / _INFO_FILE
    if not info.is_file():
        raise FileNotFoundError(
            f"no hf_qad teacher cache at {path} ({_INFO_FILE} is missing): build one with "
            "hf_qad.trainer.teacher_cache.build_teacher_cache."
        )
    return TeacherCacheInfo(**json.loads(info.read_text()))


def teacher_topk(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache entries of ``[n, vocab]`` teacher logits: top-k ids and log-probs, tail and target log-prob."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    top_logprobs, top_ids = logprobs.topk(top_k, dim=-1)
    tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids, top_logprobs, tail, logprobs.gather(-1, targets[:, None])[:, 0]


def _chunk_sums(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    tail: torch.Tensor,
    target_logprob: torch.Tensor,
    targets: torch.Tensor,
    kl_weight: float,
    ce_weight: float,
) -> tuple[torch.Tensor, ...]:
    logits = student_head(student_hidden).float()
    student = F.log_softmax(logits, dim=-1)
    # The student's own tail: a finite fill keeps the gradient finite when the top k cover the vocabulary.
    student_tail = student.scatter(-1, top_ids, torch.finfo(student.dtype).min).logsumexp(-1)
    student_buckets = torch.cat([student.gather(-1, top_ids), student_tail[:, None]], dim=-1)
    # Renormalized so float16 rounding of the stored log-probs cannot make the teacher sum past 1.
    teacher = F.log_softmax(torch.cat([top_logprobs.float(), tail.float()[:, None]], dim=-1), dim=-1)
    terms = torch.where(teacher.isneginf(), 0.0, teacher.exp() * (teacher - student_buckets))
    divergence = terms.sum()
    student_nll = -student.gather(-1, targets[:, None]).sum()
    with torch.no_grad():
        agree = (logits.argmax(-1) == top_ids[:, 0]).sum().float()
        teacher_nll = -target_logprob.float().sum()
    return weighted_loss(divergence, student_nll, kl_weight, ce_weight), divergence.detach(), student_nll.detach(), agree, teacher_nll


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
    """Top-k forward KL sums over ``n`` loss tokens (see the module docstring), ``chunk_size`` at a time.

    Args:
        student_hidden: ``[n, hidden]`` student final hidden states at the loss positions.
        student_head: the student's output layer, applied per chunk (recomputed in the backward).
        top_ids, top_logprobs: ``[n, k]`` cached teacher top-k token ids and log-probabilities.
        tail: ``[n]`` cached log of the teacher's mass outside the top k.
        target_logprob: ``[n]`` cached teacher log-probability of ``targets`` (for ``teacher_nll``).
        targets: ``[n]`` next-token ids of the data.
        chunk_size: tokens per chunk, as in :func:`hf_qad.trainer.losses.chunked_distillation_loss`.
        kl_weight, ce_weight: the differentiable ``loss`` is
            ``kl_weight * divergence + ce_weight * student_nll``; the other fields are metrics.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    n = student_hidden.shape[0]
    if not top_ids.shape[0] == top_logprobs.shape[0] == tail.shape[0] == target_logprob.shape[0] == n:
        raise ValueError(
            f"the teacher cache has {top_ids.shape[0]} entries for {n} loss tokens: it does not line up "
            "with this batch. Rebuild it with the training config (same dataset, tokenizer, max_length)."
        )
    zero = student_hidden.sum() * 0.0  # keeps the graph connected when there are no loss tokens
    totals = [zero] + [torch.zeros((), device=student_hidden.device) for _ in range(4)]
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        sums = checkpoint(
            _chunk_sums, student_hidden[part], student_head, top_ids[part], top_logprobs[part], tail[part],
            target_logprob[part], targets[part], kl_weight, ce_weight, use_reentrant=False,
        )
        totals = [total + value for total, value in zip(totals, sums)]
    loss, divergence, student_nll, agree, teacher_nll = totals
    return DistillationSums(loss, divergence, student_nll, divergence, agree.detach(), teacher_nll.detach(), n)


def _loss_token_count(labels: list[int]) -> int:
    return sum(label != -100 for label in labels[1:])


@dataclass
class TeacherCacheCollator:
    """Collates the cache columns (concatenated over the batch's loss tokens, in row order) and
    hands the rest of each example to the SFT collator.

    Row order is the order of ``hidden[labels != -100]`` in ``compute_loss`` for padded and
    padding-free batches alike (padding-free masks each example's first label).
    """

    fallback: Callable[[list[dict[str, Any]]], dict[str, Any]]
    top_k: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if CACHE_COLUMNS[0] not in examples[0]:
            return self.fallback(examples)
        rest = [{k: v for k, v in example.items() if k not in CACHE_COLUMNS} for example in examples]
        for example in examples:
            if len(example[CACHE_COLUMNS[0]]) != _loss_token_count(example["labels"]):
                raise ValueError(
                    f"a cached example has {len(example[CACHE_COLUMNS[0]])} teacher entries for "
                    f"{_loss_token_count(example['labels'])} loss tokens: the cache does not line up with the data."
                )
        batch = self.fallback(rest)
        ids, logprobs, tail, target = (
            [torch.as_tensor(example[column]) for example in examples] for column in CACHE_COLUMNS
        )
        batch["teacher_topk_ids"] = torch.cat([t.reshape(-1, self.top_k) for t in ids]).long()
        batch["teacher_topk_logprobs"] = torch.cat([t.reshape(-1, self.top_k) for t in logprobs])
        batch["teacher_tail_logprob"] = torch.cat(tail).float()
        batch["teacher_target_logprob"] = torch.cat(target).float()
        return batch


def _prepare_like_qad(
    teacher: nn.Module, dataset: Dataset, processing_class: Any, args: Any
) -> Dataset:
    # SFTTrainer's own preparation with the training config, so the cached rows are the rows QAD trains on.
    from trl import SFTTrainer

    return SFTTrainer(teacher, args=args, train_dataset=dataset, processing_class=processing_class).train_dataset


def _cache_columns(batch: dict[str, list], teacher: nn.Module, top_k: int, chunk_size: int) -> dict[str, list]:
    """The cache entries of a batch of tokenized rows: one teacher forward, the head applied per chunk."""
    head = teacher.get_output_embeddings()
    device = head.weight.device
    rows = [torch.as_tensor(ids) for ids in batch["input_ids"]]
    input_ids = nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device)
    attention_mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).to(device)
    labels = [torch.as_tensor(lbl) for lbl in batch["labels"]]
    labels = nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100).to(device)[:, 1:]
    hidden = teacher.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    mask = labels != -100
    hidden, targets = hidden.last_hidden_state[:, :-1][mask], labels[mask]
    # max(n, 1): a batch without loss tokens still runs one (empty) chunk, so the columns keep their shapes.
    parts = [
        teacher_topk(head(hidden[i:i + chunk_size]), targets[i:i + chunk_size], top_k)
        for i in range(0, max(len(targets), 1), chunk_size)
    ]
    counts = mask.sum(1).tolist()
    return {
        name: [part.tolist() for part in torch.cat(values).cpu().split(counts)]
        for name, values in zip(CACHE_COLUMNS, zip(*parts))
    }


def build_teacher_cache(
    teacher: nn.Module,
    train_dataset: Dataset,
    processing_class: Any,
    args: Any,
    *,
    path: str | Path,
    top_k: int = 32,
    logprob_dtype: str = "float16",
    batch_size: int | None = None,
) -> Dataset:
    """Run ``teacher`` once over the training set as QAD prepares it and save its top-k cache.

    Args:
        teacher: the BF16 teacher (a transformers causal LM), already loaded and placed.
        train_dataset: the raw training set, as passed to ``QADTrainer``.
        processing_class: the tokenizer, as passed to ``QADTrainer``.
        args: the ``QADConfig`` of the training run (tokenization, chat template, ``max_length``,
            ``padding_free``... must be those of the run; packing is refused).
        path: folder to write (``datasets.save_to_disk`` plus ``hf_qad_teacher_cache.json``).
        top_k: teacher tokens kept per position (at most the vocabulary size, which gives the exact KL).
        logprob_dtype: ``"float16"`` (half the storage of the log-probs) or ``"float32"``.
        batch_size: rows per teacher forward; default ``args.per_device_eval_batch_size``.

    Returns the cached dataset. Then ``QADTrainer(model, args=QADConfig(..., teacher_cache_path=path),
    train_dataset=train_dataset)`` trains without a teacher.
    """
    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}.")
    if logprob_dtype not in ("float16", "float32"):
        raise ValueError(f"logprob_dtype must be 'float16' or 'float32', got {logprob_dtype!r}.")
    if args.packing:
        raise ValueError(_PACKING_ERROR)
    prompt_only = is_prompt_only(train_dataset)  # SFTTrainer itself would fail on it, less clearly
    prepared = None if prompt_only else _prepare_like_qad(teacher, train_dataset, processing_class, args)
    if not isinstance(prepared, Dataset) or "labels" not in prepared.column_names:
        raise ValueError(
            "the teacher cache needs a map-style dataset with fixed completions (text, messages, "
            "prompt/completion or tokenized): prompt-only and iterable datasets are not supported."
        )
    features = Features({
        **{name: prepared.features[name] for name in _TOKEN_COLUMNS},
        "teacher_topk_ids": List(List(Value("int32"), length=top_k)),
        "teacher_topk_logprobs": List(List(Value(logprob_dtype), length=top_k)),
        "teacher_tail_logprob": List(Value("float32")),
        "teacher_target_logprob": List(Value("float32")),
    })
    with eval_mode(teacher), torch.no_grad():
        cached = prepared.select_columns(_TOKEN_COLUMNS).map(
            _cache_columns,
            fn_kwargs={"teacher": teacher, "top_k": top_k, "chunk_size": getattr(args, "loss_chunk_size", 1024)},
            batched=True,
            batch_size=batch_size or args.per_device_eval_batch_size,
            features=features,
            new_fingerprint=f"hf_qad_teacher_cache_{top_k}_{logprob_dtype}",  # no hashing of the teacher
            load_from_cache_file=False,
            desc="Caching teacher top-k",
        )
    cached.save_to_disk(str(path))
    info = TeacherCacheInfo(top_k, vocab_size, logprob_dtype, str(getattr(teacher.config, "_name_or_path", "")))
    (Path(path) / _INFO_FILE).write_text(json.dumps(info.__dict__, indent=2))
    return cached


def attach_teacher_cache(dataset: Dataset | IterableDataset, path: str | Path, *, vocab_size: int) -> Dataset:
    """``dataset`` (prepared by QADTrainer) with the cache columns, after checking every row's tokens match."""
    info = read_cache_info(path)
    if info.vocab_size != vocab_size:
        raise ValueError(
            f"the teacher cache at {path} was built with a vocabulary of {info.vocab_size}, the student has "
            f"{vocab_size} logits: teacher and student must share the tokenizer."
        )
    if not isinstance(dataset, Dataset) or "labels" not in dataset.column_names:
        raise ValueError(
            "teacher_cache_path needs a map-style dataset with fixed completions (text, messages, prompt/completion "
            "or tokenized); prompt-only datasets generate their completions, and iterable datasets are not supported."
        )
    cache = load_from_disk(str(path))
    if len(cache) != len(dataset):
        raise ValueError(
            f"the teacher cache at {path} has {len(cache)} examples but the prepared training set has "
            f"{len(dataset)}: rebuild it from the same dataset and config."
        )
    batches = zip(*(d.select_columns(_TOKEN_COLUMNS).with_format("arrow").iter(1024) for d in (dataset, cache)))
    for start, (ours, cached) in zip(range(0, len(dataset), 1024), batches):
        if not all(ours.column(c).equals(cached.column(c)) for c in _TOKEN_COLUMNS):
            row = next(i for i in range(ours.num_rows) if ours.slice(i, 1) != cached.slice(i, 1))
            raise ValueError(
                f"the teacher cache at {path} does not match the training set at example {start + row}: its "
                "tokens or loss mask differ (another dataset, order, tokenizer, chat template or max_length?). "
                "Rebuild the cache with the training config."
            )
    return concatenate_datasets([dataset, cache.select_columns(list(CACHE_COLUMNS))], axis=1)
