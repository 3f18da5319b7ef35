"""Deprecated: model surgery moved to :mod:`hf_qad.nvfp4.conversion`, beside the layer it selects for."""

from hf_qad._deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    "hf_qad.nvfp4.conversion",
    ["DEFAULT_MODULES_TO_NOT_CONVERT", "FUSED_PROJECTIONS", "ConversionPlan", "link_fused_projections",
     "nvfp4_modules", "plan_conversion", "replace_linears"],
)
