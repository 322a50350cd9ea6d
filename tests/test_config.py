"""MixKVQConfig validation, presets and the three ways of reaching a config."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixkvq_compile
from mixkvq_compile import PRESETS, KeyTiering, MixKVQConfig
from mixkvq_compile.config import GROUP_SIZES_ALLOWED


def test_presets_are_distinct_and_named():
    assert set(PRESETS) >= {"passthrough", "kivi2", "kivi4", "mixkvq"}
    assert PRESETS["mixkvq"] == MixKVQConfig()
    assert PRESETS["passthrough"].tier_channels(64) == (64, 0, 0) and PRESETS["passthrough"].value_bits == 16
    assert PRESETS["kivi2"].tier_channels(64) == (0, 0, 64) and PRESETS["kivi2"].value_bits == 2
    assert PRESETS["kivi4"].tier_channels(128) == (0, 128, 0) and PRESETS["kivi4"].value_bits == 4
    assert PRESETS["kivi2"].group_size == 32 and PRESETS["kivi2"].residual_length == 128


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"value_bits": 3}, ["value_bits", "[2, 4, 16]"]),
        ({"key_bits": (16, 4, 3)}, ["key_bits", "(2, 4, 16)"]),
        ({"group_size": 24}, ["group_size", "32"]),
        ({"residual_length": -1}, ["residual_length", "non-negative"]),
        ({"residual_length": 48}, ["residual_length", "multiple of group_size"]),
        ({"sink_tokens": -4}, ["sink_tokens"]),
        ({"key_tier_fractions": (0.7, 0.5)}, ["key_tier_fractions", "high + mid <= 1"]),
        ({"key_tiering": "random"}, ["key_tiering", "salience"]),
        ({"key_tiering": "uniform", "key_tier_fractions": (0.5, 0.5)}, ["uniform"]),
        ({"layer_overrides": {0: {"value_bits": 5}}}, ["layer_overrides[0]", "value_bits"]),
        ({"layer_overrides": {0: {"colour": 1}}}, ["unknown field", "colour"]),
        ({"layer_overrides": {-1: {"value_bits": 4}}}, ["layer index"]),
        ({"prefill_compiler": "jit"}, ["prefill_compiler", "'auto', 'inductor', 'eager'"]),
        ({"rpc_ratio": 1.0}, ["rpc_ratio", "[0, 1)"]),
        ({"rpc_ratio": 0.0005}, ["rpc_ratio", "0.001"]),
        ({"rpc_ratio": True}, ["rpc_ratio"]),
    ],
)
def test_bad_fields_name_the_option_and_allowed_values(fields, names):
    with pytest.raises(ValueError) as error:
        MixKVQConfig(**fields)
    for name in names:
        assert name in str(error.value)


def test_options_preset_and_fields():
    config = MixKVQConfig.from_options({"preset": "kivi4", "residual_length": 64})
    assert config == dataclasses.replace(PRESETS["kivi4"], residual_length=64)
    assert MixKVQConfig.from_options(None) == MixKVQConfig()
    assert MixKVQConfig.from_options(
        {"key_tiering": "uniform", "key_tier_fractions": [0, 0]}
    ).key_tiering is (KeyTiering.UNIFORM)
    with pytest.raises(ValueError, match="unknown mixkvq preset 'kivi3'.*kivi2"):
        MixKVQConfig.from_options({"preset": "kivi3"})
    with pytest.raises(ValueError, match="unknown mixkvq option.*'bits'.*value_bits"):
        MixKVQConfig.from_options({"bits": 2})


def test_layer_overrides_apply_per_layer():
    config = MixKVQConfig(layer_overrides={"1": {"value_bits": 4, "key_tier_fractions": (0.0, 0.5)}})
    assert config.for_layer(0).value_bits == 2
    assert config.for_layer(1).value_bits == 4 and config.for_layer(1).tier_channels(64) == (0, 32, 32)
    assert config.for_layer(1).layer_overrides == {}


@given(
    group=st.sampled_from(GROUP_SIZES_ALLOWED),
    windows=st.integers(0, 8),
    high=st.floats(0, 1),
    mid=st.floats(0, 1),
    head_dim=st.sampled_from([64, 96, 128, 256]),
)
def test_tier_channels_always_partition_head_dim(group, windows, high, mid, head_dim):
    if high + mid > 1:
        with pytest.raises(ValueError):
            MixKVQConfig(key_tier_fractions=(high, mid), group_size=group, residual_length=group * windows)
        return
    config = MixKVQConfig(key_tier_fractions=(high, mid), group_size=group, residual_length=group * windows)
    channels = config.tier_channels(head_dim)
    assert sum(channels) == head_dim and min(channels) >= 0


def _tiny_fn(x):
    return x * 2


def test_bad_option_fails_when_backend_is_invoked():
    compiled = torch.compile(_tiny_fn, backend="mixkvq", options={"value_bits": 7})
    with pytest.raises(Exception, match="value_bits=7: allowed values are"):
        compiled(torch.randn(3))


def test_backend_callable_rejects_options_and_non_configs():
    with pytest.raises(TypeError, match="MixKVQConfig"):
        mixkvq_compile.backend({"value_bits": 2})
    compiled = torch.compile(_tiny_fn, backend=mixkvq_compile.backend(PRESETS["kivi2"]), options={"x": 1})
    with pytest.raises(Exception, match="put the settings in the MixKVQConfig"):
        compiled(torch.randn(3))


def test_backend_is_listed_by_dynamo():
    assert "mixkvq" in torch._dynamo.list_backends()
