"""Shared by the tests and the docstring examples (``pytest --doctest-modules hf_qad``).

Triton kernels run on CPU tensors through Triton's interpreter. ``TRITON_INTERPRET``
is read when a kernel is decorated, so it must be set before hf_qad is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
