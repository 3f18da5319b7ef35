"""Shared by the tests and the docstring examples (``pytest --doctest-modules hf_qad``).

Triton kernels run on CPU tensors through Triton's interpreter. ``TRITON_INTERPRET``
is read when a kernel is decorated, so it must be set before hf_qad is imported.

Being at the repository root, this file also puts the root on ``sys.path`` (pytest's
default ``prepend`` import mode), so tests import their helpers from the ``tests`` package
(``from tests.tiny_models import ...``) whatever the current folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
