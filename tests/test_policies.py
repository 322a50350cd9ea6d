"""Key tiering policies (uniform / budget / thresholds / difficulty) on inputs with a known answer."""

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixkvq_compile import PRESETS, KeyTiering, MixKVQConfig
from mixkvq_compile.store import KVStore, StoreLayout, allocate

HEAD_DIM = 64


def open_store(config, heads=1, capacity=64, head_dim=HEAD_DIM):
    layout = StoreLayout.create(config, 1, heads, capacity, head_dim, head_dim, torch.float32)
    return KVStore.open(layout, *allocate(layout, "cpu"))


def outlier_keys(seed=0):
    """Keys of one 64-token block: channel 7 and 9 have a 50x range, the rest are small."""
    keys = torch.randn(1, 1, 64, HEAD_DIM, generator=torch.Generator().manual_seed(seed)) * 0.1
    keys[..., 7] *= 50
    keys[..., 9] *= 50
    return keys


def tiers_of_first_group(store):
    high, mid, _ = store.layout.key_channels
    order = store.keys["order"][0, 0, 0].long().tolist()
    return set(order[:high]), set(order[high : high + mid])


POLICIES = {
    "budget": {"key_tiering": "budget", "key_bits_budget": 2.5},
    "thresholds": {
        "key_tiering": "thresholds",
        "key_thresholds": (1.0, 0.1),
        "key_tier_fractions": (2 / 64, 2 / 64),
    },
    "salience (alias)": {"key_tiering": "salience", "key_tier_fractions": (2 / 64, 2 / 64)},
}


@pytest.mark.parametrize("fields", list(POLICIES.values()), ids=list(POLICIES))
def test_query_aware_policies_promote_large_queries_times_large_range(fields):
    config = dataclasses.replace(PRESETS["mixkvq"], residual_length=0, **fields)
    store = open_store(config)
    assert store.layout.key_channels == (2, 2, 60)
    keys = outlier_keys()
    queries = torch.ones(1, 3, 5, HEAD_DIM)  # 3 query heads share the KV head
    queries[..., 9] = 0.0  # channel 9: large range, never queried
    queries[..., 20] = 40.0  # channel 20: small range, large queries
    store.accumulate_queries(queries)
    store.append(keys, torch.randn(1, 1, 64, HEAD_DIM), 0)
    high, mid = tiers_of_first_group(store)
    assert 7 in high and 20 in high | mid
    assert 9 not in high | mid
    k, _ = store.read(64)
    assert torch.equal(k[..., 7], keys[..., 7])  # the 16-bit tier is exact


def test_difficulty_only_promotes_by_range_regardless_of_queries():
    config = dataclasses.replace(
        PRESETS["mixkvq"], residual_length=0, key_tiering="difficulty", key_bits_budget=2.5
    )
    store = open_store(config)
    queries = torch.ones(1, 1, 1, HEAD_DIM)
    queries[..., 9] = 0.0
    store.accumulate_queries(queries)  # ignored: difficulty keeps no query statistics
    assert "query_abs_sum" not in store.keys
    store.append(outlier_keys(), torch.randn(1, 1, 64, HEAD_DIM), 0)
    high, _ = tiers_of_first_group(store)
    assert high == {7, 9}


def test_uniform_policy_stores_no_order():
    store = open_store(dataclasses.replace(PRESETS["kivi2"], residual_length=0))
    assert "order" not in store.keys and "query_abs_sum" not in store.keys


def test_channels_without_any_query_fall_back_to_range():
    """Before any query (I = 0 everywhere) the ranking uses S_d, not the channel index."""
    config = dataclasses.replace(PRESETS["mixkvq"], residual_length=0, key_bits_budget=2.5)
    store = open_store(config)
    store.append(outlier_keys(), torch.randn(1, 1, 64, HEAD_DIM), 0)
    high, _ = tiers_of_first_group(store)
    assert high == {7, 9}


def test_prefill_and_decode_both_feed_the_query_statistics():
    config = dataclasses.replace(PRESETS["mixkvq"], residual_length=32)
    layout = StoreLayout.create(config, 1, 2, 128, HEAD_DIM, HEAD_DIM, torch.float32)
    handles = allocate(layout, "cpu")
    store = KVStore.open(layout, *handles)
    queries = torch.randn(1, 4, 41, HEAD_DIM)
    kv = torch.randn(1, 2, 41, HEAD_DIM)
    for start, end in ((0, 40), (40, 41)):  # a prefill chunk, then one decode step
        torch.ops.mixkvq.kv_attention(
            queries[:, :, start:end],
            kv[:, :, start:end],
            kv[:, :, start:end],
            torch.arange(start, end),
            *handles,
            None,
            0.125,
            True,
            -1,
            layout.to_key(),
        )
    expected = queries.abs().reshape(1, 2, 2, 41, HEAD_DIM).mean(dim=(2, 3))
    torch.testing.assert_close(store.query_importance(), expected)
    assert float(store.keys["query_count"][0, 0]) == 2 * 41


@given(
    head_dim=st.sampled_from([32, 64, 96, 128, 256]),
    spare=st.integers(0, 14 * 256),
    high_fraction=st.sampled_from([0.0, 1 / 64, 1 / 32, 1 / 8]),
)
def test_budget_is_met_exactly_when_reachable_and_never_exceeded(head_dim, spare, high_fraction):
    budget = 2 + (spare % (14 * head_dim + 1)) / head_dim
    config = MixKVQConfig(key_bits_budget=budget, key_tier_fractions=(high_fraction, 0.0))
    channels = config.tier_channels(head_dim)
    assert sum(channels) == head_dim and min(channels) >= 0
    used = sum(c * b for c, b in zip(channels, config.key_bits))
    assert used <= math.floor(budget * head_dim + 1e-6)
    # Reachable: up to all-mid (4 bits), in 2-bit steps per group token (one 2 -> 4 upgrade).
    if budget <= 4 and (round(budget * head_dim) - 2 * head_dim) % 2 == 0:
        assert used == round(budget * head_dim)
        assert config.key_bits_nominal(head_dim) == pytest.approx(budget)


@pytest.mark.parametrize(("budget", "channels"), [(2.5, (2, 2, 60)), (3.0, (2, 18, 44)), (2.0, (0, 0, 64))])
def test_budget_tier_sizes_and_the_stored_bits(budget, channels):
    config = dataclasses.replace(PRESETS["mixkvq"], key_bits_budget=budget, residual_length=0)
    store = open_store(config)
    assert store.layout.key_channels == channels
    stored_bits = sum(c * b for c, b in zip(store.layout.key_channels, store.layout.key_bits))
    assert stored_bits / HEAD_DIM == budget


def test_uniform_budget_selects_one_tier():
    assert MixKVQConfig(key_tiering="uniform", key_tier_fractions=(0, 0), key_bits_budget=4).tier_channels(
        64
    ) == (
        0,
        64,
        0,
    )


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"key_tiering": "thresholds"}, ["key_thresholds", "tau_high"]),
        (
            {"key_tiering": "thresholds", "key_thresholds": (0.1, 0.5)},
            ["key_thresholds", "tau_high >= tau_mid"],
        ),
        ({"key_bits_budget": 1.5}, ["key_bits_budget", "[2, 16]"]),
        ({"key_bits_budget": "lots"}, ["key_bits_budget"]),
        (
            {"key_tiering": "uniform", "key_tier_fractions": (0, 0), "key_bits_budget": 3},
            ["uniform", "key_bits"],
        ),
        ({"key_bits": (16, 4, 4), "key_bits_budget": 5}, ["strictly decreasing"]),
        ({"key_tiering": "random"}, ["budget", "thresholds", "difficulty", "uniform", "salience"]),
        ({"layer_plan": "/nonexistent/plan.json"}, ["layer_plan", "cannot read"]),
    ],
)
def test_policy_options_are_validated(fields, names):
    with pytest.raises(ValueError) as error:
        MixKVQConfig(**fields)
    for name in names:
        assert name in str(error.value)


def test_salience_is_an_alias_of_budget():
    assert KeyTiering("salience") is KeyTiering.BUDGET is KeyTiering.SALIENCE
    assert MixKVQConfig.from_options({"key_tiering": "salience"}) == MixKVQConfig()


def test_layer_plan_loads_and_explicit_overrides_win(tmp_path):
    plan = {
        "format": "mixkvq-layer-plan",
        "version": 1,
        "layer_overrides": {"0": {"value_bits": 4, "key_bits_budget": 3.0}, "2": {"residual_length": 64}},
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    config = MixKVQConfig(layer_plan=str(path), layer_overrides={0: {"value_bits": 16}})
    assert config.for_layer(0).value_bits == 16 and config.for_layer(0).key_bits_budget == 3.0
    assert config.for_layer(1) == dataclasses.replace(MixKVQConfig(), layer_plan=None)
    assert config.for_layer(2).residual_length == 64
    assert MixKVQConfig.from_plan(path) == MixKVQConfig.from_options({"layer_plan": str(path)})
    (tmp_path / "bad.json").write_text(json.dumps({"layer_overrides": {}}))
    with pytest.raises(ValueError, match="mixkvq-layer-plan"):
        MixKVQConfig(layer_plan=str(tmp_path / "bad.json"))
    plan["layer_overrides"]["1"] = {"value_bits": 3}
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"layer_overrides\[1\].*value_bits"):
        MixKVQConfig(layer_plan=str(path))
