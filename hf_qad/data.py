"""Text data from a local file, a local folder, or a hub id, as a ``datasets.Dataset``.

Plain-text files (``.txt``) are split into documents at blank lines and the
documents are joined up to about ``max_chars`` characters, so that a corpus such as
WikiText-2 or TinyShakespeare becomes training examples of a useful length. A longer
paragraph (verse, code, logs: text without blank lines) is split at line ends, so that
no text lies beyond the length a trainer truncates examples to. Other
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
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, load_dataset

__all__ = ["load_text_dataset", "split_documents"]

_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def split_documents(text: str, max_chars: int = 2000) -> list[str]:
    """Paragraphs (separated by blank lines) packed greedily into pieces of at most ``max_chars``.

    A paragraph longer than ``max_chars`` is split into its lines, and a line longer than
    ``max_chars`` at its last whitespace within the limit (at ``max_chars`` if it has none),
    so every piece fits and nothing is dropped but the whitespace at the cuts.

    >>> split_documents("one two three\\nfour", max_chars=9)
    ['one two', 'three', 'four']
    """
    pieces: list[str] = []
    current = ""
    for part in _parts(text, max_chars):
        if current and len(current) + 1 + len(part) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n{part}" if current else part
    if current:
        pieces.append(current)
    return pieces


def _parts(text: str, max_chars: int) -> Iterator[str]:
    """The paragraphs of ``text``, the longer ones cut into lines and line pieces of at most ``max_chars``."""
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if len(paragraph) <= max_chars:
            if paragraph:
                yield paragraph
            continue
        for line in paragraph.splitlines():
            while len(line) > max_chars:
                # the last whitespace after text within the limit, so the piece ends in text
                cut = max((m.start() for m in re.finditer(r"(?<=\S)\s", line[: max_chars + 1])), default=max_chars)
                if line[:cut].strip():  # not a run of indentation
                    yield line[:cut]
                line = line[cut:].lstrip()
            if line.strip():
                yield line


def load_text_dataset(source: str, split: str = "train", max_chars: int = 2000, name: str | None = None) -> Dataset:
    """Load ``source`` (see the module docstring) as a Dataset.

    Raises:
        FileNotFoundError: for a path-like source that does not exist.
        ValueError: for a local file without text or rows.
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
            dataset = load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train")
        except StopIteration:  # what datasets raises for an empty .jsonl
            dataset = None
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{path} has no rows.")
        return dataset
    if path.is_dir():
        return load_dataset(str(path), name, split=split)
    if looks_local:
        raise FileNotFoundError(f"data file or folder not found: {source}")
    return load_dataset(source, name, split=split)
