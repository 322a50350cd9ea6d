"""Bad input and limits: each gives a clear error or a documented fallback to the unquantized path
with a warning; none corrupts results or crashes inside a kernel."""

import logging

import pytest
import torch

import mixkvq_compile
from mixkvq_compile import MixKVQConfig
from mixkvq_compile.passes import manager
from mixkvq_compile.store import StoreLayout
from tests import families
from tests.models import left_padded_batch

NEW = 6


def generate(model, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, **kwargs}
    return model.generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)


def compile_mixkvq(model, options=None):
    model.forward = torch.compile(
        model.forward, backend="mixkvq", options=options or {"preset": "passthrough"}
    )


@pytest.mark.parametrize(
    ("build", "dynamic", "reason"),
    [
        (lambda: families.llama(dtype=torch.float64), False, "dtype torch.float64"),
        (lambda: families.llama(heads=4, kv_heads=2, head_dim=24), False, "head_dim 24 is not supported"),
        # torch.compile(dynamic=True) traces the cache buffers with symbolic sizes, and the store is
        # sized at compile time (before: a TypeError from hashing a SymInt inside the pass).
        (families.llama, True, "symbolic shape"),
    ],
    ids=["float64", "head_dim-24", "dynamic-shapes"],
)
def test_unsupported_model_falls_back_to_eager_attention_with_a_warning(build, dynamic, reason, caplog):
    model = build()
    ids, mask = left_padded_batch(families.VOCAB, 2, 20, pads=[2, 0])
    expected = generate(model, ids, mask)
    model.forward = torch.compile(
        model.forward, backend="mixkvq", options={"preset": "passthrough"}, dynamic=dynamic
    )
    with caplog.at_level(logging.WARNING, logger="mixkvq_compile"):
        tokens = generate(model, ids, mask)
    assert torch.equal(tokens, expected)
    counters = mixkvq_compile.counters
    assert (
        counters["attention_rewritten"] == 0
        and counters["attention_skipped"] == counters["attention_found"] > 0
    )
    assert all(reason in r for _, _, r in manager.skipped_sites)
    assert any(reason in record.getMessage() for record in caplog.records)


def test_more_tokens_than_the_cache_holds_is_a_clear_error():
    from transformers import StaticCache

    model = families.llama()
    forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "passthrough"})
    cache = StaticCache(config=model.config, max_cache_len=24)
    ids = torch.randint(3, families.VOCAB, (1, 16))
    with torch.no_grad():
        forward(input_ids=ids, past_key_values=cache, use_cache=True)
        assert mixkvq_compile.counters["attention_rewritten"] == 1
        with pytest.raises(Exception, match="exceed the cache capacity of 24"):
            forward(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(16, 32))


def _store(batch=2, heads=2, capacity=96, head_dim=32, config=None):
    config = config or MixKVQConfig(residual_length=32)
    layout = StoreLayout.create(config, batch, heads, capacity, head_dim, head_dim, torch.float32)
    return layout.to_key(), *torch.ops.mixkvq.new_store(layout.to_key(), torch.device("cpu"))


def _attend(layout, handles, query, key, value, start):
    positions = torch.arange(start, start + key.shape[2])
    return torch.ops.mixkvq.kv_attention(query, key, value, positions, *handles, None, 0.2, True, -1, layout)


def test_batch_larger_than_the_store_is_a_clear_error():
    layout, *handles = _store(batch=2)
    query, key = torch.randn(3, 4, 5, 32), torch.randn(3, 2, 5, 32)
    with pytest.raises(ValueError, match=r"batch 2.*larger than the cache"):
        _attend(layout, handles, query, key, key.clone(), 0)


def test_nan_and_inf_stay_in_their_batch_row():
    """Non-finite keys/values propagate like eager attention (the poisoned row's outputs become
    non-finite), never into another batch row, and never crash (documented behaviour: no check on the
    hot path)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 80, 32), torch.randn(2, 2, 80, 32), torch.randn(2, 2, 80, 32)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[0, 1, 3, 5] = float("inf")
    bad_v[0, 0, 7, 2] = float("nan")
    outputs = []
    for keys, values in ((k, v), (bad_k, bad_v)):
        layout, *handles = _store()
        steps = [_attend(layout, handles, q[:, :, :64], keys[:, :, :64], values[:, :, :64], 0)]
        for t in range(64, 80):  # decode over quantized groups holding the non-finite tokens
            steps.append(
                _attend(
                    layout, handles, q[:, :, t : t + 1], keys[:, :, t : t + 1], values[:, :, t : t + 1], t
                )
            )
        outputs.append(torch.cat(steps, dim=2))
    clean, poisoned = outputs
    torch.testing.assert_close(poisoned[1], clean[1], rtol=0, atol=0)
    assert not torch.isfinite(poisoned[0, :, 64:]).all()


def test_layer_plan_longer_than_the_model_is_a_clear_error():
    model = families.llama(layers=2)
    ids, mask = left_padded_batch(families.VOCAB, 1, 12, pads=[0])
    compile_mixkvq(model, {"preset": "mixkvq", "layer_overrides": {5: {"value_bits": 4}}})
    with pytest.raises(Exception, match=r"layer\(s\) \[5\].*2 attention layer"):
        generate(model, ids, mask)


def test_unknown_preset_is_a_clear_error():
    model = families.llama()
    ids, mask = left_padded_batch(families.VOCAB, 1, 12, pads=[0])
    compile_mixkvq(model, {"preset": "kivi3"})
    with pytest.raises(Exception, match=r"unknown mixkvq preset 'kivi3'; allowed"):
        generate(model, ids, mask)
