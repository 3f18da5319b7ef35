"""What the benchmark scripts share: the checkout on ``sys.path``, the machine line, markdown tables.

The scripts run as ``python benchmarks/<script>.py`` from the repository root, which puts
this folder on ``sys.path``, so ``import common`` finds this module. Importing it puts the
repository root first on ``sys.path``: the scripts then measure the checkout's hf_qad and
import the test helpers as a package (``tests.tiny_models``, ``tests.ct_oracle``,
``tests.shared_data``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The checkout's short commit id, or ``unknown`` where git or the repository is missing (a copied tree)."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "unknown"
    return result.stdout.strip() or "unknown"


def machine() -> str:
    """The CPU, its core count, the GPU torch sees (if any), and the library versions, on one line."""
    import torch

    import hf_qad

    host = f"{cpu_name()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        host += f", GPU {torch.cuda.get_device_name()}"
    versions = []
    for package in ("torch", "transformers", "triton"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:  # triton: Linux only
            continue
    return f"{host}; {', '.join(versions)}, hf_qad {hf_qad.__version__}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table; an empty cell is written ``| |``.

    >>> print(markdown_table(["a", "b"], [["1", ""]]))
    | a | b |
    |---|---|
    | 1 | |
    """

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(row) for row in rows)])
