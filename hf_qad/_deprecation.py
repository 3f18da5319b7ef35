"""Deprecation shims for public names that moved to another module."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any


def moved_names(old_module: str, new_module: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module`` that serves ``names`` from ``new_module`` with a warning.

    The new module is imported on first use, so a shim adds no import cost and no import edge
    until someone uses the old name.

    Example:
        >>> __getattr__ = moved_names("pkg.old", "math", ["pi"])
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     round(__getattr__("pi"), 2), caught[0].category.__name__
        (3.14, 'DeprecationWarning')
    """
    names = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"{old_module}.{name} moved to {new_module}.{name}; the old name will be removed in a later release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), name)

    return __getattr__
