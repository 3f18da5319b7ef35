"""Text data from a local file, a local folder, or a hub id, as a ``datasets.Dataset``.

Plain-text files (``.txt``) are split into documents at blank lines and the
documents are joined up to about ``max_chars`` characters, so that a corpus such as
WikiText-2 or TinyShakespeare becomes training examples of a useful length. Other
local files (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) and folders go through
``datasets.load_dataset``; anything else is taken as a hub dataset id.

Example:
    >>> import tempfile, pathlib
    >>> from hf_qad.data import load_text_dataset
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> _ = path.write_text("first paragraph\\n\\nsecond paragraph\\n")
    >>> list(load_text_dataset(str(path), max_chars=20)["text"])
    ['first paragraph', 'second paragraph']
"""

from __future__ import annotations

import re
from pathlib import Path

from datasets import Dataset, load_dataset

__all__ = ["load_text_dataset", "split_documents"]

_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def split_documents(text: str, max_chars: int = 2000) -> list[str]:
    """Paragraphs (separated by blank lines) packed greedily into pieces of at most ``max_chars``.

    A single paragraph longer than ``max_chars`` is kept whole.
    """
    pieces: list[str] = []
    current = ""
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        if current and len(current) + 1 + len(paragraph) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n{paragraph}" if current else paragraph
    if current:
        pieces.append(current)
    return pieces


def load_text_dataset(source: str, split: str = "train", max_chars: int = 2000, name: str | None = None) -> Dataset:
    """Load ``source`` (see the module docstring) as a Dataset.

    Raises:
        FileNotFoundError: for a path-like source that does not exist.
        ValueError: for an empty file.
    """
    path = Path(source).expanduser()
    looks_local = path.suffix in (".txt", *_LOADERS) or source.startswith((".", "/", "~"))
    if path.is_file() and path.suffix == ".txt":
        documents = split_documents(path.read_text(encoding="utf-8"), max_chars)
        if not documents:
            raise ValueError(f"{path} contains no text.")
        return Dataset.from_dict({"text": documents})
    if path.is_file():
        if path.suffix not in _LOADERS:
            raise ValueError(f"unsupported data file {path}: use .txt, {', '.join(_LOADERS)}.")
        try:
            return load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train")
        except StopIteration:  # datasets' builders infer the columns from the first row
            raise ValueError(f"{path} contains no rows.") from None
    if path.is_dir():
        return load_dataset(str(path), name, split=split)
    if looks_local:
        raise FileNotFoundError(f"data file or folder not found: {source}")
    return load_dataset(source, name, split=split)
