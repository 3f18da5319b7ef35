"""Test setup shared by every test module.

Triton kernels run on CPU tensors through Triton's interpreter. ``TRITON_INTERPRET``
is read when a kernel is decorated, so it must be set before hf_qad is imported.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # test helpers such as ct_oracle
