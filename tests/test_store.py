"""The quantized store and the ``mixkvq::kv_attention`` op against float references."""

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixkvq_compile import PRESETS
from mixkvq_compile.config import MixKVQConfig
from mixkvq_compile.store import KVStore, StoreLayout, allocate, is_handle


def make_store(config, batch=2, heads=3, capacity=300, head_dim=64, dtype=torch.float32):
    layout = StoreLayout.create(config, batch, heads, capacity, head_dim, head_dim, dtype)
    key_handle, value_handle = allocate(layout, "cpu")
    return layout, key_handle, value_handle, KVStore.open(layout, key_handle, value_handle)


def write_in_chunks(store, keys, values, chunks):
    start = 0
    store.reset()
    for size in chunks:
        store.append(keys[:, :, start : start + size], values[:, :, start : start + size], start)
        start += size
    return start


@settings(deadline=None, max_examples=25)
@given(
    chunks=st.lists(st.integers(1, 70), min_size=1, max_size=8),
    sinks=st.sampled_from([0, 1, 5]),
    residual=st.sampled_from([0, 32, 64]),
    seed=st.integers(0, 2**31),
)
def test_full_precision_store_returns_every_token_exactly(chunks, sinks, residual, seed):
    config = dataclasses.replace(PRESETS["passthrough"], residual_length=residual, sink_tokens=sinks)
    layout, _, _, store = make_store(config, capacity=sum(chunks) + 3)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, layout.capacity, 64, generator=generator)
    values = torch.randn(2, 3, layout.capacity, 64, generator=generator)
    length = write_in_chunks(store, keys, values, chunks)
    assert store.length == length
    k, v = store.read(length)
    assert torch.equal(k, keys[:, :, :length]) and torch.equal(v, values[:, :, :length])


@pytest.mark.parametrize("preset", ["kivi2", "kivi4", "mixkvq"])
def test_quantized_store_keeps_window_exact_and_groups_within_half_a_step(preset):
    config = dataclasses.replace(PRESETS[preset], residual_length=64, sink_tokens=4)
    layout, _, _, store = make_store(config)
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 300, 64) * 2 + 0.5, torch.randn(2, 3, 300, 64)
    store.accumulate_queries(torch.randn(2, 6, 3, 64))
    length = write_in_chunks(store, keys, values, [100, 1, 1, 97, 40])
    k, v = store.read(length)
    packed_end = layout.sink_tokens + layout.flushed_groups(length) * layout.group_size
    assert layout.flushed_groups(length) == (239 - 4 - 64) // 32
    # Sinks and the residual window are exact.
    for got, want in ((k, keys), (v, values)):
        assert torch.equal(got[:, :, :4], want[:, :, :4])
        assert torch.equal(got[:, :, packed_end:length], want[:, :, packed_end:length])
    # Packed keys: per channel over a group of 32 tokens; the worst tier bounds the error.
    group = keys[:, :, 4:packed_end].reshape(2, 3, -1, 32, 64)
    low_bits = min(b for b, c in zip(layout.key_bits, layout.key_channels) if c)
    step = (group.amax(dim=3, keepdim=True) - group.amin(dim=3, keepdim=True)) / (2**low_bits - 1)
    error = (k[:, :, 4:packed_end].reshape(group.shape) - group).abs()
    assert bool((error <= step * 0.5 * 1.01 + 1e-3).all())
    assert error.max() > 0  # really quantized
    vgroup = values[:, :, 4:packed_end].reshape(2, 3, -1, 2, 32)
    vstep = (vgroup.amax(-1, keepdim=True) - vgroup.amin(-1, keepdim=True)) / (2**layout.value_bits - 1)
    verror = (v[:, :, 4:packed_end].reshape(vgroup.shape) - vgroup).abs()
    assert bool((verror <= vstep * 0.5 * 1.01 + 1e-3).all())


def test_salience_promotes_channels_with_large_queries_and_range():
    config = dataclasses.replace(PRESETS["mixkvq"], key_tier_fractions=(2 / 64, 4 / 64), residual_length=0)
    layout, _, _, store = make_store(config, batch=1, heads=1, capacity=64)
    keys = torch.randn(1, 1, 64, 64) * 0.1
    keys[..., 7] *= 50  # large range, large query: must be 16-bit
    keys[..., 9] *= 50  # large range, zero query: must not be promoted
    queries = torch.ones(1, 1, 1, 64)
    queries[..., 9] = 0.0
    store.accumulate_queries(queries)
    store.append(keys, torch.randn(1, 1, 64, 64), 0)
    order = store.keys["order"][0, 0, 0].long()
    high, mid = order[:2].tolist(), order[2:6].tolist()
    assert 7 in high and 9 not in high and 9 not in mid
    k, _ = store.read(64)
    assert torch.equal(k[..., 7], keys[..., 7])  # 16-bit tier is exact


def test_planar_layout_only_where_the_planar_kernel_applies():
    """Uniform 2-bit keys and values in float16/bfloat16 at head_dim 128/256 use the planar layout, with
    the same bytes as the default layout; anything else keeps the default layout."""
    kivi2 = PRESETS["kivi2"]

    def planar(config=kivi2, head_dim=128, dtype=torch.float16):
        return StoreLayout.create(config, 2, 2, 512, head_dim, head_dim, dtype).planar

    assert planar() and planar(head_dim=256) and planar(dtype=torch.bfloat16)
    assert not planar(head_dim=64)  # 8 channels per bit field: too few for a tensor-core operand
    assert not planar(dtype=torch.float32)
    assert not planar(PRESETS["mixkvq"]) and not planar(PRESETS["kivi4"])
    assert not planar(dataclasses.replace(kivi2, value_group_size=8))  # a field spans two value groups
    assert not planar(dataclasses.replace(kivi2, group_size=8))
    lay = StoreLayout.create(kivi2, 2, 2, 512, 128, 128, torch.float16)

    def nbytes(regions, name):
        shape, dtype = regions[name]
        return math.prod(shape) * dtype.itemsize

    codes = 2 * 2 * lay.num_groups * 32 * 128 * 2 // 8  # 2 bits per element
    assert nbytes(lay.key_regions(), "tier2_codes") == nbytes(lay.value_regions(), "codes") == codes
    assert nbytes(lay.key_regions(), "tier2_qparams") == 2 * 2 * lay.num_groups * 128 * 2 * 2  # per channel
    assert (
        nbytes(lay.value_regions(), "qparams") == 2 * 2 * lay.num_groups * 32 * 4 * 2 * 2
    )  # per token, group


def test_store_errors_are_clear():
    _, _, _, store = make_store(dataclasses.replace(PRESETS["kivi2"], residual_length=32), capacity=100)
    kv = torch.randn(2, 3, 101, 64)
    with pytest.raises(ValueError, match="exceed the cache capacity of 100"):
        store.append(kv, kv, 0)
    store.append(kv[:, :, :90], kv[:, :, :90], 0)
    with pytest.raises(ValueError, match="leaves a gap"):
        store.append(kv[:, :, :1], kv[:, :, :1], 95)
    with pytest.raises(ValueError, match="already quantized"):
        store.append(kv[:, :, :1], kv[:, :, :1], 10)
    store.append(kv[:, :, :1], kv[:, :, :1], 80)  # rewind inside the full-precision window is fine
    assert store.length == 81


def test_handles_hold_no_fp16_memory_and_survive_reset():
    layout, key_handle, value_handle, store = make_store(
        PRESETS["kivi2"], capacity=4096, dtype=torch.bfloat16
    )
    assert key_handle.shape == (2, 3, 4096, 64) and key_handle.stride() == (0, 0, 0, 0)
    assert is_handle(key_handle) and not is_handle(torch.zeros(2, 3, 4096, 64))
    kv = torch.randn(2, 3, 4096, 64, dtype=torch.bfloat16)
    store.append(kv, kv, 0)
    key_handle.zero_()  # what transformers' cache.reset() does
    value_handle.zero_()
    assert store.length == 4096
    held = key_handle.untyped_storage().nbytes() + value_handle.untyped_storage().nbytes()
    assert held <= 0.25 * (2 * 2 * 3 * 4096 * 64 * 2)
    with pytest.raises(ValueError, match="another layout"):
        other = StoreLayout.create(PRESETS["kivi4"], 2, 3, 4096, 64, 64, torch.bfloat16)
        KVStore.open(other, key_handle, value_handle)


def _op(query, key, value, start, handles, layout, mask=None, causal=False):
    positions = torch.arange(start, start + query.shape[2])
    return torch.ops.mixkvq.kv_attention(
        query,
        key,
        value,
        positions,
        *handles,
        mask,
        1 / math.sqrt(query.shape[-1]),
        causal,
        -1,
        layout.to_key(),
    )


@pytest.mark.parametrize(("heads", "n_rep"), [(1, 5), (2, 2), (3, 1)])
def test_attention_over_full_precision_store_equals_sdpa(heads, n_rep):
    config = dataclasses.replace(PRESETS["passthrough"], residual_length=32, sink_tokens=2)
    layout, key_handle, value_handle, _ = make_store(config, batch=3, heads=heads, capacity=260)
    torch.manual_seed(1)
    keys, values = torch.randn(3, heads, 260, 64), torch.randn(3, heads, 260, 64)
    mask = torch.ones(3, 1, 1, 260, dtype=torch.bool)
    mask[0, ..., :7] = False  # a left-padded row
    start = 0
    for size in (77, 53, 1, 1, 98):
        query = torch.randn(3, heads * n_rep, size, 64)
        chunk = slice(start, start + size)
        out = _op(
            query,
            keys[:, :, chunk],
            values[:, :, chunk],
            start,
            (key_handle, value_handle),
            layout,
            mask=None if size > 1 else mask[..., : start + 1].expand(3, 1, 1, -1).contiguous(),
            causal=size > 1,
        )
        end = start + size
        causal = torch.arange(end) <= (torch.arange(size) + start)[:, None]
        full_mask = causal if size > 1 else mask[..., :end]
        expected = F.scaled_dot_product_attention(
            query.double(),
            keys[:, :, :end].double().repeat_interleave(n_rep, 1),
            values[:, :, :end].double().repeat_interleave(n_rep, 1),
            attn_mask=full_mask,
            scale=1 / math.sqrt(64),
        )
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        start = end


def test_write_at_position_zero_starts_a_new_sequence():
    layout, key_handle, value_handle, store = make_store(PRESETS["mixkvq"], batch=1, heads=1, capacity=300)
    torch.manual_seed(2)
    first = torch.randn(1, 1, 250, 64) * 3
    query = torch.randn(1, 2, 250, 64)
    _op(query, first, first, 0, (key_handle, value_handle), layout, causal=True)
    stats_after_first = store.keys["query_abs_sum"].clone()
    second = torch.randn(1, 1, 200, 64)
    _op(query[:, :, :200], second, second, 0, (key_handle, value_handle), layout, causal=True)
    assert store.length == 200
    torch.testing.assert_close(
        store.keys["query_abs_sum"], query[:, :, :200].abs().sum(dim=(1, 2)).reshape(1, 1, 64)
    )
    assert not torch.equal(stats_after_first, store.keys["query_abs_sum"])


def test_fake_implementations_match_real_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = dataclasses.replace(PRESETS["kivi4"], residual_length=32)
    layout, key_handle, value_handle, _ = make_store(config, batch=1, heads=1, capacity=200)
    kv = torch.randn(1, 1, 100, 64)
    args = (
        torch.randn(1, 2, 100, 64),
        kv,
        kv,
        torch.arange(100),
        key_handle,
        value_handle,
        None,
        0.125,
        True,
        -1,
        layout.to_key(),
    )
    real = torch.ops.mixkvq.kv_attention(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = torch.ops.mixkvq.kv_attention(*fake_args)
        fake_handles = torch.ops.mixkvq.new_store(layout.to_key(), torch.device("cpu"))
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    for fake_handle, real_handle in zip(fake_handles, (key_handle, value_handle)):
        assert (fake_handle.shape, fake_handle.stride()) == (real_handle.shape, real_handle.stride())
    torch.library.opcheck(
        torch.ops.mixkvq.new_store.default,
        (layout.to_key(), torch.device("cpu")),
        test_utils=("test_schema", "test_faketensor"),
    )


def kvmix_rpc_packed(writes, ratio, group):
    """Packed tokens after each write under KVmix's RPC rule, written from its definition (exact
    fractions): of the F full-precision tokens, keep floor(r * F) and pack the oldest whole groups."""
    fp, packed, out = 0, 0, []
    for count in writes:
        fp += count
        keep = math.floor(Fraction(ratio) * fp)
        flush = (fp - keep) // group * group
        fp, packed = fp - flush, packed + flush
        out.append(packed)
    return out


def test_rpc_ratio_follows_the_kvmix_rule_and_keeps_its_window_exact():
    """r = 0.2, no fixed window: right after a 1000-token prompt 200 tokens stay in full precision;
    the next decode steps shrink the window to the rule's steady state (under G / (1 - r) tokens)."""
    config = dataclasses.replace(PRESETS["kivi2"], residual_length=0, rpc_ratio=0.2)
    layout, _, _, store = make_store(config, batch=1, heads=2, capacity=1100, head_dim=32)
    assert layout.window == 200 * 1100 // 1000 + 32  # the largest window a write can leave
    torch.manual_seed(3)
    keys, values = torch.randn(1, 2, 1100, 32), torch.randn(1, 2, 1100, 32)
    writes = [1000] + [1] * 40
    expected = kvmix_rpc_packed(writes, "0.2", 32)
    assert expected[:3] == [800, 960, 992]
    start = 0
    for count, packed_tokens in zip(writes, expected, strict=True):
        store.append(keys[:, :, start : start + count], values[:, :, start : start + count], start)
        start += count
        assert store.packed_groups * 32 == packed_tokens, start
        k, v = store.read(start)
        window = slice(packed_tokens, start)  # full precision: exact
        assert torch.equal(k[:, :, window], keys[:, :, window]) and torch.equal(
            v[:, :, window], values[:, :, window]
        )
        assert not torch.equal(k[:, :, :packed_tokens], keys[:, :, :packed_tokens])  # quantized
    assert start - store.packed_groups * 32 < 32 / (1 - 0.2)


@pytest.mark.parametrize(
    ("fractions", "dtype"),
    [((1 / 32, 1 / 8), torch.float16), ((0.1, 0.2), torch.bfloat16), ((0.0, 0.25), torch.float16)],
)
def test_planar_mixed_keys_dequantize_like_the_default_layout(fractions, dtype):
    """The planar layout of mixed key tiers (the 4-bit codes split into the planar words' high 2 bits
    and a 2-bit remainder) holds the same codes as the default layout: both stores, fed the same
    queries and tokens, read back the same keys and values, bit for bit."""
    config = MixKVQConfig(key_tier_fractions=fractions, key_bits=(16, 4, 2), value_bits=2, residual_length=32)
    mixed = StoreLayout.create(config, 2, 3, 200, 128, 128, dtype)
    default = dataclasses.replace(mixed, planar_tiers=False)
    assert mixed.planar_mixed and not default.planar_mixed and not mixed.planar
    # The planar words spend 2 bits on every 16-bit channel: +5% key bytes at 10% such channels.
    assert mixed.blob_bytes(mixed.key_regions()) <= default.blob_bytes(default.key_regions()) * 1.06
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 5, 128, generator=gen) * torch.rand(128, generator=gen) * 4
    k = (torch.randn(2, 3, 170, 128, generator=gen) * torch.rand(128, generator=gen) * 3).to(dtype)
    v = torch.randn(2, 3, 170, 128, generator=gen).to(dtype)
    reads = []
    for layout in (default, mixed):
        store = KVStore.open(layout, *allocate(layout, "cpu"))
        store.accumulate_queries(q)
        store.append(k[:, :, :77], v[:, :, :77], 0)
        store.accumulate_queries(q)
        store.append(k[:, :, 77:], v[:, :, 77:], 77)
        assert store.packed_groups == 4
        reads.append(store.read(170))
    assert torch.equal(reads[0][0], reads[1][0]) and torch.equal(reads[0][1], reads[1][1])
    packed = slice(0, 128)
    assert not torch.equal(reads[1][0][:, :, packed], k[:, :, packed])  # quantized, not a copy
