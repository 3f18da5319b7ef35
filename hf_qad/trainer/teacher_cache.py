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

Loss: :func:`hf_qad.trainer.losses.cached_distillation_loss`, the forward KL over the
teacher's top-k tokens plus one tail bucket (a lower bound of the full KL, exact at ``k`` =
vocabulary size). How close it comes at smaller ``k``, in value and gradient direction, is
measured in ``benchmarks/RESULTS.md`` ("Teacher cache: top-k loss against the full KL"): on
SmolLM2-135M the gradient direction is close from k = 32 on, while the logged ``kl`` of a
cached run reads lower than a live run's.

Example:
    >>> import torch
    >>> from hf_qad.trainer.losses import cached_distillation_loss
    >>> from hf_qad.trainer.teacher_cache import teacher_topk
    >>> head = torch.nn.Linear(8, 32, bias=False)
    >>> h, targets = torch.randn(5, 8), torch.randint(0, 32, (5,))
    >>> cache = teacher_topk(head(h), targets, top_k=8)  # per loss token, the four CACHE_COLUMNS
    >>> [tuple(entry.shape) for entry in cache]
    [(5, 8), (5, 8), (5,), (5,)]
    >>> sums = cached_distillation_loss(h, head, *cache, targets)  # the teacher is the student itself
    >>> abs(round(float(sums.divergence), 5))  # abs: -0.0 prints as 0.0
    0.0
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets, load_from_disk

from hf_qad.trainer.generation import eval_mode, is_prompt_only

__all__ = [
    "CACHE_COLUMNS",
    "TeacherCacheCollator",
    "TeacherCacheInfo",
    "attach_teacher_cache",
    "build_teacher_cache",
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
    """The cache entries of ``[n, vocab]`` teacher logits: top-k ids and log-probs, tail and target log-prob.

    The entry format of the cache (its :data:`CACHE_COLUMNS`, in order) and the arguments that
    :func:`hf_qad.trainer.losses.cached_distillation_loss` reads.
    """
    logprobs = F.log_softmax(logits.float(), dim=-1)
    top_logprobs, top_ids = logprobs.topk(top_k, dim=-1)
    tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids, top_logprobs, tail, logprobs.gather(-1, targets[:, None])[:, 0]


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


def __getattr__(name: str) -> Any:
    # cached_distillation_loss was public here; it now lives with the live-teacher loss in losses.py.
    if name == "cached_distillation_loss":
        warnings.warn(
            "hf_qad.trainer.teacher_cache.cached_distillation_loss moved to "
            "hf_qad.trainer.losses.cached_distillation_loss; import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        from hf_qad.trainer.losses import cached_distillation_loss

        return cached_distillation_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
