"""Pieces shared by the ``hf-qad`` subcommands: loading, token batches, printing."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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


def add_output_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """``--output_dir`` and ``--overwrite``, as :func:`check_output_dir` reads them."""
    parser.add_argument("--output_dir", required=True, help=help)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoint files in a non-empty --output_dir (its subfolders are kept)")


def check_output_dir(output_dir: str, overwrite: bool, inputs: Iterable[str]) -> Path:
    """The folder a command will write a checkpoint into, checked before any work is done.

    Refused: the folder of an input or one holding an input (replacing its files would replace what
    is being read: a training checkpoint's master weights beside its optimizer state), and a
    non-empty folder unless ``overwrite``.

    Raises:
        CommandError: for a refused folder.
    """
    out = Path(output_dir).expanduser().resolve()
    for source in inputs:
        source_path = Path(source).expanduser().resolve()
        if source_path == out or out in source_path.parents:
            raise CommandError(
                f"--output_dir {output_dir} {'is' if source_path == out else 'holds'} the input {source}; "
                "write to another folder."
            )
    if out.exists() and not out.is_dir():
        raise CommandError(f"--output_dir {output_dir} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CommandError(
            f"--output_dir {output_dir} is not empty; pass --overwrite to replace the checkpoint in it, or choose "
            "an empty folder."
        )
    return out


@contextmanager
def writing_into(out: Path) -> Iterator[Path]:
    """Yields where to write a checkpoint for ``out`` (checked by :func:`check_output_dir`), then puts it in place.

    An empty or new ``out`` is written directly. A non-empty one (``--overwrite``) gets the checkpoint
    written beside it first; once complete, the old files the new checkpoint does not have (a stale
    ``model.safetensors.index.json`` and its shards) are removed and the new files moved in, so no file
    of the old checkpoint can be read as part of the new one, and a failed write leaves the old one whole.
    Subfolders the new checkpoint does not have are kept.
    """
    if not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        written = {path.name for path in staging.iterdir()}
        for old in out.iterdir():
            if old.name not in written and (old.is_file() or old.is_symlink()):
                old.unlink()
        for new in staging.iterdir():
            target = out / new.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(new, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
