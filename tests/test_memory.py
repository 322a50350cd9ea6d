"""memory_report: the KV cache really shrinks, and the report counts every byte the cache holds."""

import subprocess
import sys

import pytest
import torch

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
