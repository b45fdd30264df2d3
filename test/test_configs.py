"""Config dataclasses: factories, validation, JSON round trip, versioning."""

import pytest

import torchq
from torchq.quantize.configs import config_from_dict, config_from_json, config_types

ALL = [
    torchq.int8_weight_only(),
    torchq.int8_weight_only(group_size=32),
    torchq.int4_weight_only(group_size=64, symmetric=True),
    torchq.int4_weight_only(group_size=256, zero_point_domain="float", pad_policy="largest_group"),
    torchq.intx_weight_only(bits=2, group_size=32),
    torchq.int8_dynamic_activation_int8_weight(),
    torchq.int8_dynamic_activation_int4_weight(group_size=128),
]


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.to_json())
def test_json_round_trip(cfg):
    assert config_from_json(cfg.to_json()) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["version"] == 1


def test_defaults():
    cfg = torchq.int4_weight_only()
    assert (cfg.group_size, cfg.symmetric, cfg.zero_point_domain, cfg.pad_policy) == (128, False, "int", "pad")
    w4a8 = torchq.int8_dynamic_activation_int4_weight()
    assert (w4a8.group_size, w4a8.symmetric) == (128, False)
    assert set(config_types()) >= {"int8_weight_only", "int4_weight_only", "intx_weight_only", "w8a8", "w4a8"}


def test_validation_errors():
    for bad in (16, 48, 512, None):
        with pytest.raises(ValueError, match="group_size must be one of"):
            torchq.int4_weight_only(group_size=bad)
    with pytest.raises(ValueError, match="zero_point_domain must be one of"):
        torchq.int4_weight_only(zero_point_domain="half")
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        torchq.intx_weight_only(bits=1)
    with pytest.raises(ValueError, match="unknown torchq config type 'int5'"):
        config_from_dict({"type": "int5"})
    with pytest.raises(ValueError, match=r"has no field\(s\) \['groupsize'\]"):
        config_from_dict({"type": "int4_weight_only", "groupsize": 32})
    with pytest.raises(ValueError, match="version 2 is not supported"):
        config_from_dict({"type": "int4_weight_only", "version": 2})
