"""NVFP4Config: its options are checked when it is made and when it is read from a dict."""

import json

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


@pytest.mark.parametrize(
    "options",
    [{}, {"scheme": "w4a16", "scale_method": "mse"}, {"modules_to_not_convert": ["lm_head", "model.layers.1"],
                                                      "share_fused_global_scales": False, "weights_format": "packed"}],
)
def test_config_round_trips_and_shows_the_options(options):
    config = NVFP4Config(**options)
    assert NVFP4Config.from_dict(config.to_dict()) == config
    assert NVFP4Config.from_dict(json.loads(config.to_json_string())) == config
    assert repr(config).startswith("NVFP4Config(scheme=") and "config_groups" not in repr(config)
