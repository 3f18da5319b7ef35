"""Deprecated: renamed :mod:`hf_qad.smollm2`; its data helpers left the package.

Every name still resolves, with a :class:`DeprecationWarning`:

* ``smollm2_path``, ``smollm2_gguf``, ``default_cache_dir``, ``SMOLLM2_NAME``,
  ``SMOLLM2_GGUF`` and ``INSTALL_HINT``: import them from :mod:`hf_qad.smollm2`;
* ``shared_data_dir`` and ``read_text`` found the test data beside a source checkout
  (``../shared/data`` or ``$HF_QAD_DATA``). They are ``tests/shared_data.py`` in the
  repository now, which this module loads from a checkout; an installed package has no
  such file, and passing the data's path explicitly replaces them.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from hf_qad import smollm2

_REPOSITORY_HELPERS = ("shared_data_dir", "read_text")
_HELPERS_FILE = Path(__file__).resolve().parents[1] / "tests" / "shared_data.py"


def __getattr__(name: str) -> Any:
    if name in smollm2.__all__:
        warnings.warn(f"hf_qad.assets is deprecated: import {name} from hf_qad.smollm2.",
                      DeprecationWarning, stacklevel=2)
        return getattr(smollm2, name)
    if name in _REPOSITORY_HELPERS:
        if not _HELPERS_FILE.is_file():
            raise AttributeError(f"hf_qad.assets.{name} was removed: it only served a source checkout "
                                 f"(tests/shared_data.py), and {_HELPERS_FILE} does not exist.")
        warnings.warn(f"hf_qad.assets.{name} is deprecated: it is a repository helper, now tests/shared_data.py "
                      "in a source checkout; pass the data's path explicitly instead.",
                      DeprecationWarning, stacklevel=2)
        return getattr(_repository_helpers(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _repository_helpers() -> ModuleType:
    """``tests/shared_data.py`` of the checkout this package runs from, loaded by its path."""
    spec = importlib.util.spec_from_file_location("hf_qad._repository_shared_data", _HELPERS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
