"""Prompt-only datasets: tokenize the prompts, generate completions, build distillation rows.

RL pipelines (GRPO and the like) keep datasets with only a ``prompt`` column, plain text or
conversational messages. ``QADTrainer`` distills on them by generating the completions
during training: from the teacher, or on-policy from the quantized student with probability
``lmbda`` per batch (as in GKD, https://huggingface.co/papers/2306.13649). This module holds
the pieces that do not depend on the trainer:

* :func:`is_prompt_only` recognizes such a dataset, :func:`tokenize_prompts` turns it into
  one ``prompt_ids`` column (conversational prompts get the chat template's generation
  prompt);
* :class:`PromptCollator` left-pads prompt examples into ``input_ids``/``attention_mask``
  (a batch without ``labels``) and hands every other example to the SFT collator;
* :func:`generate_completions` samples with the model in eval mode, without gradients and
  with the KV cache, and cuts each completion after its first EOS;
* :func:`completion_rows` joins prompts and completions into SFT rows whose ``labels``
  are -100 on the prompt, so the loss covers exactly the generated tokens, EOS included.

The completions stay token ids from start to end: they are never decoded and re-tokenized,
so the student is trained on exactly the tokens that were sampled.

Example:
    >>> import torch
    >>> from hf_qad.trainer.generation import PromptCollator, completion_rows
    >>> batch = PromptCollator(pad_token_id=0)([{"prompt_ids": [5, 6, 7]}, {"prompt_ids": [8]}])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    >>> completion_rows(batch["input_ids"], batch["attention_mask"], [[9, 2], [4]])
    [{'input_ids': [5, 6, 7, 9, 2], 'labels': [-100, -100, -100, 9, 2]}, {'input_ids': [8, 4], 'labels': [-100, 4]}]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names

__all__ = [
    "PROMPT_IDS",
    "PromptCollator",
    "completion_rows",
    "eval_mode",
    "generate_completions",
    "is_prompt_batch",
    "is_prompt_only",
    "tokenize_prompts",
]

PROMPT_IDS = "prompt_ids"
"""The column :func:`tokenize_prompts` writes: the prompt's token ids."""

# Columns that make a dataset something SFT trains on directly, prompt or not.
_TRAINABLE_COLUMNS = ("completion", "input_ids", "messages")


def is_prompt_only(dataset: Dataset | IterableDataset, text_field: str = "text") -> bool:
    """Whether ``dataset`` has prompts and nothing to train on (no completion, text, messages or ids).

    Extra columns (a GRPO dataset's ``solution``, ``answer``, ...) are ignored.
    """
    columns = set(get_dataset_column_names(dataset) or ())
    return PROMPT_IDS in columns or ("prompt" in columns and not columns & {*_TRAINABLE_COLUMNS, text_field})


def tokenize_prompts(
    dataset: Dataset | IterableDataset,
    processing_class: Any,
    *,
    chat_template: str | None = None,
    max_prompt_length: int | None = None,
) -> Dataset | IterableDataset:
    """The ``prompt`` column as token ids, in a dataset with the single column ``prompt_ids``.

    Text prompts are tokenized as SFT tokenizes a text prompt; conversational prompts get the chat
    template with ``add_generation_prompt=True``, so generation starts the assistant turn.
    ``max_prompt_length`` keeps the end of longer prompts (where the generation prompt is).
    A dataset that already has ``prompt_ids`` is returned unchanged.
    """
    columns = get_dataset_column_names(dataset) or []
    if PROMPT_IDS in columns:
        return dataset

    def tokenize(example: dict[str, Any]) -> dict[str, list[int]]:
        prompt = example["prompt"]
        if isinstance(prompt, str):
            ids = processing_class(text=prompt)["input_ids"]
        else:
            ids = processing_class.apply_chat_template(
                prompt, tokenize=True, return_dict=True, add_generation_prompt=True, chat_template=chat_template
            )["input_ids"]
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        return {PROMPT_IDS: list(ids)}

    kwargs = {"desc": "Tokenizing prompts"} if isinstance(dataset, Dataset) else {}
    return dataset.map(tokenize, remove_columns=columns, **kwargs)


def is_prompt_batch(batch: dict[str, Any]) -> bool:
    """Whether a collated batch holds prompts still waiting for completions (it has no ``labels``)."""
    return "labels" not in batch and "input_ids" in batch


@dataclass
class PromptCollator:
    """Left-pads ``prompt_ids`` examples for generation; hands any other examples to ``fallback``.

    A prompt batch is ``{"input_ids", "attention_mask"}`` with no ``labels`` (see
    :func:`is_prompt_batch`), so W4A4 calibration can run on it as on any batch.
    """

    pad_token_id: int
    fallback: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if PROMPT_IDS not in examples[0]:
            if self.fallback is None:
                raise ValueError(f"PromptCollator got examples without {PROMPT_IDS!r} and has no fallback collator.")
            return self.fallback(examples)
        prompts = [torch.as_tensor(example[PROMPT_IDS], dtype=torch.long) for example in examples]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = prompt
            attention_mask[row, width - len(prompt):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) for the duration, then back in its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def generate_completions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
) -> list[list[int]]:
    """Completions of left-padded prompts, each cut after its first EOS (which it keeps).

    Samples from the model's full distribution at ``temperature`` (no top-k/top-p truncation,
    so on-policy completions follow the student's own distribution); ``temperature=0`` is greedy.
    A completion that reaches ``max_new_tokens`` without EOS is kept whole.
    """
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        sampling = {"do_sample": False}
    with eval_mode(model), torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=list(eos_token_ids),
            use_cache=True,
            **sampling,
        )
    completions = []
    for row in sequences[:, input_ids.shape[1]:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_token_ids), len(row))
        completions.append(row[:end])
    return completions


def completion_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completions: Sequence[Sequence[int]]
) -> list[dict[str, list[int]]]:
    """SFT rows ``{"input_ids", "labels"}`` of prompt + completion, labels -100 on the prompt.

    The prompts are left-padded (as :class:`PromptCollator` makes them); the rows are not, so
    the SFT collator pads them on the right and positions count from each prompt's first token,
    as in a prompt-completion dataset.
    """
    rows = []
    for ids, mask, completion in zip(input_ids.tolist(), attention_mask.tolist(), completions, strict=True):
        prompt = [token for token, keep in zip(ids, mask) if keep]
        rows.append({"input_ids": prompt + list(completion), "labels": [-100] * len(prompt) + list(completion)})
    return rows
