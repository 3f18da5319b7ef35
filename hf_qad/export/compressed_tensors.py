"""Deprecated: compressed-tensors serialization moved to :mod:`hf_qad.quantizer.serialization`.

It is the quantizer's own on-disk format (what ``save_pretrained`` writes and hf_qad loads back).
"""

from hf_qad._deprecation import moved_names

__getattr__ = moved_names(
    __name__, "hf_qad.quantizer.serialization",
    ["FORMAT", "compressed_tensors_config", "is_hf_qad_checkpoint", "packed_state_dict"],
)
