"""Test helpers (ct_oracle, tiny_models, nvfp4_cases) are imported from this folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
