"""memory_report: the KV cache really shrinks, and the report counts every byte the cache holds."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixkvq_compile
from tests.models import tiny_llama


def reachable_tensor_bytes(cache) -> int:
    """Bytes of every distinct storage reachable from the cache object and its layers' attributes."""
    storages = {}
    for owner in [cache, *cache.layers]:
        for value in vars(owner).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def kivi2_bytes_per_layer(batch, heads, capacity, head_dim, group=32, residual=128, dtype_bytes=2):
    """Independent count for preset kivi2: 2-bit codes + fp16 (scale, zero) per 32-element group, the
    full-precision ring of residual + group tokens, and a 64-byte header, for keys and for values."""
    groups = (capacity - residual) // group
    packed_tokens = groups * group
    per_tensor = (
        batch
        * heads
        * (
            (residual + group) * head_dim * dtype_bytes  # ring
            + packed_tokens * head_dim * 2 // 8  # 2-bit codes
            + packed_tokens * head_dim // group * 2 * 2  # fp16 scale + zero per group of 32
        )
        + 64
    )
    return 2 * per_tensor


def test_kivi2_cache_at_4096_tokens_holds_under_a_quarter_of_fp16():
    model = tiny_llama(4, 2, 64, layers=2, dtype=torch.bfloat16)
    prompt = torch.randint(3, 256, (1, 4090), generator=torch.Generator().manual_seed(0))
    model.forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "kivi2"})
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=7,
        min_new_tokens=7,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
    )
    cache = out.past_key_values
    report = mixkvq_compile.memory_report(cache)
    assert [layer.tokens for layer in report.layers] == [4096, 4096]
    assert report.fp16_token_bytes == 2 * 2 * (1 * 2 * 4096 * 64 * 2)
    assert report.held_bytes <= 0.25 * report.fp16_token_bytes
    assert report.held_bytes == 2 * kivi2_bytes_per_layer(1, 2, report.layers[0].capacity, 64)
    capacity = report.layers[0].capacity
    assert report.held_bytes == 2 * mixkvq_compile.store_bytes(
        "kivi2", 1, 2, capacity, 64, dtype=torch.bfloat16
    )
    # Every other tensor the cache holds is a scalar counter: the report misses nothing.
    assert 0 <= reachable_tensor_bytes(cache) - report.held_bytes <= 8 * len(cache.layers)
    assert "held" in str(report)


def test_memory_report_errors_without_a_cache():
    with pytest.raises(ValueError, match="no KV cache found"):
        mixkvq_compile.memory_report(torch.nn.Linear(2, 2))


def test_backend_is_listed_in_a_fresh_process_without_importing_the_package():
    code = (
        "import sys, torch; backends = torch._dynamo.list_backends(); "
        "assert 'mixkvq_compile' not in sys.modules; print('mixkvq' in backends)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    capacity=st.integers(160, 5000),
    head_dim=st.sampled_from([64, 128]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
)
def test_store_bytes_of_kivi2_equals_an_independent_count(batch, heads, capacity, head_dim, dtype):
    """``store_bytes`` plans what ``memory_report`` then measures (above, on a real cache); here against
    the byte count of kivi2's layout written out by hand, over sizes and dtypes."""
    want = kivi2_bytes_per_layer(batch, heads, capacity, head_dim, dtype_bytes=dtype.itemsize)
    assert mixkvq_compile.store_bytes("kivi2", batch, heads, capacity, head_dim, dtype=dtype) == want


def test_store_bytes_at_32k_tokens_is_under_a_quarter_of_fp16_and_follows_layer_plans():
    fp16 = 8 * 32768 * (128 + 128) * 2
    kivi2 = mixkvq_compile.store_bytes("kivi2", 1, 8, 32768, 128)
    default = mixkvq_compile.store_bytes("mixkvq", 1, 8, 32768, 128)
    assert 0.18 < kivi2 / fp16 < default / fp16 < 0.25
    # At 367 tokens the full-precision window (128 + 32 tokens) is most of the store: over half of fp16.
    assert mixkvq_compile.store_bytes("kivi2", 1, 8, 367, 128) > 0.5 * 8 * 367 * 256 * 2
    plan = mixkvq_compile.MixKVQConfig(layer_overrides={1: {"value_bits": 4}})
    assert mixkvq_compile.store_bytes(plan, 1, 8, 32768, 128, layer=1) > mixkvq_compile.store_bytes(
        plan, 1, 8, 32768, 128, layer=0
    )
    assert mixkvq_compile.store_bytes(plan, 1, 8, 32768, 128, layer=0) == default


@pytest.mark.parametrize(
    "args, message",
    [
        (("kivi2", 0, 8, 1024, 128), "batch must be a positive integer"),
        (("kivi2", 1, 8, 1024.0, 128), "capacity must be a positive integer"),
        (("kivi2", 1, True, 1024, 128), "heads must be a positive integer"),
        (("kivi3", 1, 8, 1024, 128), "unknown mixkvq preset 'kivi3'"),
    ],
)
def test_store_bytes_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        mixkvq_compile.store_bytes(*args)
