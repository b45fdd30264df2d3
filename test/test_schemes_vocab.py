"""The scheme-name vocabulary shared by the CLI and TorchqConfig: exact names, clear errors."""

import pytest

import torchq
from torchq.formats.affine import config as configs
from torchq.quantize.schemes import config_from_scheme, register_scheme, scheme_names


def test_affine_names_build_their_configs():
    assert config_from_scheme("int8") == configs.int8_weight_only()
    assert config_from_scheme("int8", group_size=32) == configs.int8_weight_only(group_size=32)
    assert config_from_scheme("int4") == configs.int4_weight_only()
    assert config_from_scheme("int4", group_size=64) == configs.int4_weight_only(group_size=64)
    assert config_from_scheme("w8a8") == configs.int8_dynamic_activation_int8_weight()
    assert config_from_scheme("w4a8", group_size=32) == configs.int8_dynamic_activation_int4_weight(group_size=32)
    assert config_from_scheme("int4", group_size=64, symmetric=True) == configs.int4_weight_only(64, symmetric=True)
    assert {"int8", "int4", "w8a8", "w4a8"} <= set(scheme_names())
    assert torchq.config_from_scheme is config_from_scheme


@pytest.mark.parametrize("name", ["fp4", "int", "INT4", "int4 ", "int4_weight_only", "w4", ""])
def test_only_exact_names(name):
    with pytest.raises(ValueError, match="valid schemes: .*int4.*w8a8"):
        config_from_scheme(name)


def test_codebook_names_build_their_configs():
    assert config_from_scheme("nf4") == torchq.nf4_weight_only()
    assert config_from_scheme("nf4", group_size=128) == torchq.nf4_weight_only(block_size=128)
    assert config_from_scheme("fp4_e2m1") == torchq.fp4_weight_only(variant="e2m1")
    assert config_from_scheme("fp4_e2m1_bnb", group_size=32) == torchq.fp4_weight_only(variant="bnb", block_size=32)
    assert config_from_scheme("nf4", double_quant=True) == torchq.nf4_weight_only(double_quant=True)
    assert scheme_names() == ["int8", "int4", "w8a8", "w4a8", "nf4", "fp4_e2m1", "fp4_e2m1_bnb"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="w8a8.*takes no group size"):
        config_from_scheme("w8a8", group_size=32)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['bits'\].*group_size"):
        config_from_scheme("int4", bits=3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        config_from_scheme("int4", group_size=48)


def test_registration_table():
    def make(group_size=128):
        return configs.intx_weight_only(3, group_size=group_size)

    register_scheme("int3_test", make, "3-bit, test only")
    try:
        assert config_from_scheme("int3_test", group_size=64) == configs.intx_weight_only(3, group_size=64)
        register_scheme("int3_test", make, "same factory again is fine")
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("int3_test", lambda group_size=128: make(group_size), "another factory")
        with pytest.raises(ValueError, match="lower-case"):
            register_scheme("Int3", make, "bad name")
    finally:
        from torchq.quantize import schemes as schemes_vocab

        schemes_vocab._SCHEMES.pop("int3_test", None)
