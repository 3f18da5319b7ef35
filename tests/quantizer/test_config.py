"""NVFP4Config: its options are checked when it is made and when it is read from a dict."""

import pytest

from hf_qad import NVFP4Config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "w4a8"}, "unknown scheme"),
        ({"scale_method": "best"}, "unknown scale_method"),
        ({"modules_to_not_convert": "lm_head"}, "list of module-name patterns"),
        ({"weights_format": "zipped"}, "unknown weights_format"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Config(**kwargs)


def test_unknown_option_in_a_config_dict():
    with pytest.raises(ValueError, match="unknown NVFP4Config options: bits"):
        NVFP4Config.from_dict({"quant_method": "hf_qad_nvfp4", "bits": 4})
