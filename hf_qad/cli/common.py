"""Pieces shared by the ``hf-qad`` subcommands: loading, token batches, printing."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_qad.data import load_text_dataset
from hf_qad.evaluation import token_rows
from hf_qad.quantizer.checkpoints import is_packed_export, load_packed_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CommandError(SystemExit):
    """A user error: printed as one line, exit status 2, no traceback.

    ``str(error)`` is the line; :func:`hf_qad.cli.main.main` prints it to stderr, and the
    exit status is :attr:`code` (Python would exit 1 after printing a message code itself).
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"hf-qad: error: {message}")
        self.code = 2


def existing_path(value: str) -> str:
    """argparse type: a file or folder that exists."""
    if not Path(value).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return str(Path(value).expanduser())


def model_folder(value: str) -> str:
    """argparse type: a folder that holds a saved model (its ``config.json``).

    Checked here so that a mistyped path fails at once, not after a minute of hub
    retries or with a message about the tokenizer's files.
    """
    path = existing_path(value)
    if not (Path(path) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{value} is not a model folder (no config.json): "
                                         "give the folder that save_pretrained wrote")
    return path


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer of at least ``minimum``.

    >>> int_at_least(1)("3")
    3
    """

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def load_model(path: str, **kwargs: Any) -> PreTrainedModel:
    """A causal LM from ``path``: packed NVFP4 exports as packed hf_qad models, anything else as saved."""
    if is_packed_export(path):
        return load_packed_model(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def text_token_rows(source: str, tokenizer, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """``[n, seq_len]`` token rows from a text file or dataset (its ``text`` column).

    Each row starts with BOS when the tokenizer adds one (:func:`hf_qad.evaluation.token_rows`).
    """
    try:
        dataset = load_text_dataset(source)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    if "text" not in dataset.column_names:
        raise CommandError(f"{source} has no 'text' column (columns: {', '.join(dataset.column_names)}).")
    try:
        return token_rows(tokenizer, dataset["text"], seq_len, max_tokens)
    except ValueError as error:
        raise CommandError(f"{source}: {error}") from error


def batches(rows: torch.Tensor, batch_size: int, desc: str) -> Iterable[torch.Tensor]:
    """Row batches with a progress bar."""
    starts = range(0, rows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, unit="batch"):
        yield rows[start : start + batch_size]


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` (floats to 4 significant digits), printed and returned."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    return table


def write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")
