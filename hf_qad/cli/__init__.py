"""The ``hf-qad`` command line."""
