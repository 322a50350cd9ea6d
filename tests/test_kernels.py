"""Triton kernels against the PyTorch store/reference (CPU: Triton interpreter; GPU: compiled).

Small odd shapes on the CPU (3 sequences, 5 query heads over 1 KV head, residual 32, group 32), larger
GQA shapes on a GPU only. Outputs are poisoned with NaN before every launch.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mixkvq_compile import ops, reference  # noqa: E402
from mixkvq_compile.chunk_attention import attend_split  # noqa: E402
from mixkvq_compile.config import PRESETS, KeyTiering, MixKVQConfig  # noqa: E402
from mixkvq_compile.store import KVStore, StoreLayout, allocate  # noqa: E402

triton = pytest.importorskip("triton")

from mixkvq_compile.kernels import _runtime  # noqa: E402
from mixkvq_compile.kernels import quantize as qkern  # noqa: E402
from mixkvq_compile.kernels._runtime import tl, unpack_codes  # noqa: E402
from mixkvq_compile.kernels.decode_attention import (  # noqa: E402
    combine_partials,
    decode_attention,
    split_count,
)
from mixkvq_compile.kernels.dequantize import dequantize_groups  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (large grids are too slow in the interpreter)"
)

# Relative error ||out - ref|| / ||ref|| against a float32 reference on the same dequantized K/V.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

MIX = MixKVQConfig(key_tier_fractions=(0.1, 0.2), key_bits=(16, 4, 2), value_bits=2)
CONFIGS = {
    "kivi2": PRESETS["kivi2"],
    "mix": MIX,
    "mix_sinks_v4": dataclasses.replace(MIX, sink_tokens=3, value_bits=4, value_group_size=16),
    "kivi4": PRESETS["kivi4"],
    "passthrough": PRESETS["passthrough"],
    "mix_uniform_keys_v16": MixKVQConfig(
        key_tier_fractions=(0.0, 0.0), key_tiering=KeyTiering.UNIFORM, value_bits=16
    ),
    "difficulty": dataclasses.replace(MIX, key_tiering=KeyTiering.DIFFICULTY),
    # Small 2-bit and 4-bit tiers (16-channel tiles): the tile shape where a joined 4-bit unpack broke.
    "mix_small_tiers": MixKVQConfig(key_tier_fractions=(0.5, 0.25), key_bits=(16, 4, 2), value_bits=2),
    # KVmix's recent pivotal context: the packed-group count follows the history of writes.
    "mix_rpc_sinks": dataclasses.replace(MIX, rpc_ratio=0.3, sink_tokens=2),
}


def _small_window(config):
    """Groups of 32 that leave a short window: a 32-token residual, or RPC alone (R = 0)."""
    return dataclasses.replace(config, residual_length=0 if config.rpc_ratio else 32, group_size=32)


def _store(
    config,
    batch=3,
    heads=1,
    capacity=160,
    head_dim=64,
    dtype=torch.float16,
    tokens=130,
    seed=0,
    chunks=(77,),
    residual=32,
    group=32,
):
    """A store holding ``tokens`` random tokens, written by ``KVStore.append`` in the given chunks."""
    config = dataclasses.replace(config, residual_length=residual, group_size=group)
    lay = StoreLayout.create(config, batch, heads, capacity, head_dim, head_dim, dtype)
    store = KVStore.open(lay, *allocate(lay, DEVICE))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if lay.salience:
        store.keys["query_abs_sum"].copy_(torch.rand(batch, heads, head_dim, generator=gen))
        store.keys["query_count"].fill_(4.0)
    k = (torch.randn(batch, heads, tokens, head_dim, generator=gen) * 2).to(dtype).to(DEVICE)
    v = torch.randn(batch, heads, tokens, head_dim, generator=gen).to(dtype).to(DEVICE)
    start = 0
    for end in (*(c for c in chunks if c < tokens), tokens):
        store.append(k[:, :, start:end], v[:, :, start:end], start)
        start = end
    return store


def _reference(query, store, length, mask, scale, causal, new=None):
    k, v = store.read(length)
    if new is not None:
        k = torch.cat([k, new[0].to(k.dtype)], dim=2)
        v = torch.cat([v, new[1].to(v.dtype)], dim=2)
    total = k.shape[2]
    if mask is not None:
        mask = mask[..., :total]
        if mask.dtype != torch.bool:
            mask = mask.float()
    causal_start = total - query.shape[2] if causal else None
    return reference.attention(query.float(), k.float(), v.float(), mask, scale, causal_start)


def _rel(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def _run(query, store, length, mask=None, causal=True, new=None, scale=None, **kw):
    lay = store.layout
    out = torch.full((*query.shape[:3], lay.value_dim), float("nan"), dtype=query.dtype, device=DEVICE)
    scale = 0.7 / lay.head_dim**0.5 if scale is None else scale
    kwargs = {"new_key": new[0], "new_value": new[1]} if new is not None else {}
    res = decode_attention(query, store, length, mask, scale, causal=causal, out=out, **kwargs, **kw)
    assert res is out
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    return out, _reference(query, store, int(length), mask, scale, causal, new)


@triton.jit
def _unpack_kernel(
    src, dst, ROWS: tl.constexpr, NBYTES: tl.constexpr, BITS: tl.constexpr, dtype: tl.constexpr
):
    r = tl.arange(0, ROWS)[:, None]
    byt = tl.load(src + r * NBYTES + tl.arange(0, NBYTES)[None, :])
    codes = unpack_codes(byt, ROWS, NBYTES, BITS, dtype)
    N: tl.constexpr = NBYTES * 8 // BITS
    tl.store(dst + r * N + tl.arange(0, N)[None, :], codes.to(tl.float32))


# (bits, rows, bytes per row, dtype): the decode kernel's tile shapes; 64 x 8 is the smallest joined
# 2-bit tile. The interpreter runs a few (each launch compiles nothing but runs slowly).
UNPACK_SHAPES = [(16, 16), (32, 16), (64, 8), (16, 8), (128, 8), (32, 32), (16, 4)]
UNPACK_CASES = (
    [(b, r, n, d) for b in (2, 4) for r, n in UNPACK_SHAPES for d in ("float32", "float16")]
    if CUDA
    else [(2, 64, 8, "float32"), (2, 16, 8, "float16"), (4, 16, 16, "float32"), (4, 32, 16, "float16")]
)


@pytest.mark.parametrize(("bits", "rows", "nbytes", "dtype"), UNPACK_CASES)
def test_unpack_codes_matches_reference(bits, rows, nbytes, dtype):
    """The kernels' unpack gives ``reference.unpack``'s codes in float32 and float16 (magic exponents)
    for the tile shapes the decode kernel uses, at 1, 2 and 4 warps (layouts differ)."""
    gen = torch.Generator(device="cpu").manual_seed(rows * nbytes + bits)
    packed = torch.randint(0, 256, (rows, nbytes), generator=gen, dtype=torch.uint8).to(DEVICE)
    expected = reference.unpack(packed, bits).float()
    for warps in (1, 2, 4) if CUDA else (1,):
        out = torch.full((rows, nbytes * 8 // bits), float("nan"), device=DEVICE)
        _unpack_kernel[(1,)](packed, out, rows, nbytes, bits, getattr(tl, dtype), num_warps=warps)
        assert torch.equal(out, expected), (bits, rows, nbytes, dtype, warps)


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("kivi2", torch.float16),
        ("mix", torch.bfloat16),
        ("mix_sinks_v4", torch.float16),
        ("kivi4", torch.float32),
        ("passthrough", torch.bfloat16),
        ("mix_uniform_keys_v16", torch.float16),
        ("mix_small_tiers", torch.float16),
    ],
)
def test_decode_matches_reference(name, dtype):
    for length, chunks in ((77, (40,)), (130, (77,))):
        store = _store(
            CONFIGS[name], dtype=dtype, seed=hash(name) % 1000 + length, tokens=length, chunks=chunks
        )
        query = torch.randn(3, 5, 1, 64, dtype=dtype, device=DEVICE)
        out, ref = _run(query, store, length, num_splits=2)
        assert _rel(out, ref) < TOL[dtype], (name, length)


@pytest.mark.parametrize("gather", [False, True])
def test_decode_tensor_length_and_left_padded_mask(gather):
    store = _store(MIX, seed=1)
    query = torch.randn(3, 5, 1, 64, dtype=torch.float16, device=DEVICE)
    length = torch.tensor([130], device=DEVICE)
    mask = torch.ones(3, 1, 1, 160, dtype=torch.bool, device=DEVICE)
    mask[0, :, :, :40] = False  # left padding of row 0 spans packed groups
    mask[2, :, :, :3] = False
    out, ref = _run(query, store, length, mask=mask, gather=gather)
    assert _rel(out, ref) < TOL[torch.float16]


def test_decode_additive_mask_and_query_chunk():
    store = _store(PRESETS["kivi2"], seed=2)
    query = torch.randn(3, 5, 4, 64, dtype=torch.float16, device=DEVICE)  # Lq = 4, causal
    mask = torch.randn(3, 1, 4, 130, device=DEVICE).to(torch.float16)
    out, ref = _run(query, store, 130, mask=mask, num_splits=1)
    assert _rel(out, ref) < TOL[torch.float16]


def test_decode_with_new_tokens_causal_chunk():
    """ops.kv_attention semantics: stored prefix (quantized) + a full-precision chunk of new tokens."""
    dtype = torch.bfloat16
    store = _store(dataclasses.replace(MIX, sink_tokens=2), dtype=dtype, seed=3)
    new_k = torch.randn(3, 1, 7, 64, dtype=dtype, device=DEVICE)
    new_v = torch.randn(3, 1, 7, 64, dtype=dtype, device=DEVICE)
    query = torch.randn(3, 5, 7, 64, dtype=dtype, device=DEVICE)
    mask = torch.ones(3, 1, 7, 160, dtype=torch.bool, device=DEVICE)
    mask[1, :, :, :50] = False
    out, ref = _run(query, store, 101, mask=mask, new=(new_k, new_v), num_splits=2)
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "head_dim,group,gather", [(128, 32, False), (256, 32, True), (64, 8, False), (64, 8, True)]
)
def test_decode_head_dims_and_small_groups(head_dim, group, gather):
    store = _store(
        MIX, heads=1, head_dim=head_dim, batch=1, tokens=100, residual=group * 2, group=group, seed=4
    )
    query = torch.randn(1, 2, 1, head_dim, dtype=torch.float16, device=DEVICE)
    out, ref = _run(query, store, 100, num_splits=2, gather=gather)
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("block_m", [4, 16, 32])
@pytest.mark.parametrize("name", ["kivi2", "mix"])
def test_decode_query_row_blocks(name, block_m):
    """20 query rows (5 heads over 1 KV head, 4 causal queries each) in blocks of 4, 16 or 32 rows: many
    blocks, a partial last block, one block mostly padding; planar (kivi2, head_dim 128) and default
    layout."""
    store = _store(CONFIGS[name], heads=1, head_dim=128, tokens=130, seed=6)
    assert store.layout.planar == (name == "kivi2")
    query = torch.randn(3, 5, 4, 128, dtype=torch.float16, device=DEVICE)
    out, ref = _run(query, store, 130, num_splits=2, block_m=block_m)
    assert _rel(out, ref) < TOL[torch.float16]


def _fill(programs, splits, slots):
    waves = -(-programs * splits // slots)
    return programs * splits / (waves * slots)


def test_split_count_fills_the_device():
    """Batch 8 and batch 1 keep their split counts; batch 112 (896 KV heads on 8 x 132 slots) takes 7
    splits (99% of the slots busy) instead of 1 (85%); batch 120 (960 KV heads) 11 (100%) instead of 1
    (91%)."""
    assert split_count(64, 1056, 256) == 16
    assert split_count(8, 1056, 256) == 132
    assert split_count(896, 1056, 256) == 7
    assert split_count(960, 1056, 256) == 11
    assert split_count(896, 1056, 3) == 3  # the limit wins
    assert split_count(4000, 1056, 0) == 1


@settings(deadline=None)  # a 2-core CI machine running other tests beside it: no per-example time limit
@given(hs.integers(1, 5000), hs.integers(1, 2000), hs.integers(1, 512))
def test_split_count_is_the_fewest_that_fill(programs, slots, limit):
    """Between ``slots // programs`` and ``limit``: the first split count whose grid fills 95% of its
    waves, or else the last of those that fill the most."""
    got = split_count(programs, slots, limit)
    lo = max(1, slots // programs)
    assert 1 <= got <= max(1, limit)
    if lo < limit:
        fills = [_fill(programs, s, slots) for s in range(lo, limit + 1)]
        assert got >= lo
        if max(fills) >= 0.95:
            assert _fill(programs, got, slots) >= 0.95
            assert all(f < 0.95 for f in fills[: got - lo])
        else:
            assert got - lo == len(fills) - 1 - fills[::-1].index(max(fills))


def test_decode_short_sequence_no_groups():
    store = _store(dataclasses.replace(MIX, sink_tokens=4), tokens=20, chunks=(3,), seed=5)
    for length in (2, 20):
        query = torch.randn(3, 5, 1, 64, dtype=torch.float16, device=DEVICE)
        out, ref = _run(query, store, length)
        assert _rel(out, ref) < TOL[torch.float16]


def test_decode_rejects_bad_inputs():
    store = _store(PRESETS["kivi2"], tokens=40, seed=6)
    with pytest.raises(ValueError, match="does not match the store"):
        decode_attention(torch.randn(3, 5, 1, 32, device=DEVICE), store, 40)
    with pytest.raises(ValueError, match="attn_mask covers"):
        decode_attention(
            torch.randn(3, 5, 1, 64, device=DEVICE),
            store,
            40,
            torch.ones(3, 1, 1, 20, dtype=torch.bool, device=DEVICE),
        )


PER_GROUP_KEYS = (
    "order",
    "tier0_values",
    "tier1_codes",
    "tier1_qparams",
    "tier1_scales",
    "tier2_codes",
    "tier2_qparams",
)


def test_write_tokens_query_statistics_rejects_bad_input():
    """The decode step's query goes into the statistics only with a device position, a query-aware
    store and matching shapes; anything else is a clear error, not a silent skip."""
    mix = StoreLayout.create(MIX, 2, 2, 64, 64, 64, torch.float16)
    kivi = StoreLayout.create(PRESETS["kivi2"], 2, 2, 64, 64, 64, torch.float16)
    assert mix.salience and not kivi.salience
    k = torch.randn(2, 2, 1, 64, device=DEVICE).half()
    q = torch.randn(2, 4, 1, 64, device=DEVICE).half()
    position = torch.tensor([5], device=DEVICE)
    mix_store = KVStore.open(mix, *allocate(mix, DEVICE))
    with pytest.raises(ValueError, match="needs a tensor start"):
        qkern.write_tokens(mix_store, k, k, 5, query=q)
    with pytest.raises(ValueError, match="query-aware store"):
        qkern.write_tokens(KVStore.open(kivi, *allocate(kivi, DEVICE)), k, k, position, query=q)
    with pytest.raises(ValueError, match="3 query heads over 2"):
        qkern.write_tokens(mix_store, k, k, position, query=q[:, :3])
    with pytest.raises(ValueError, match="does not match the store"):
        qkern.write_tokens(mix_store, k, k, position, query=q[..., :32])


def _packed_groups_equal(a: KVStore, b: KVStore, count: int) -> None:
    """The first ``count`` packed groups of two mixed-tier stores (default or planar layout) are
    identical, byte for byte: every per-group key tensor the layout has, and the value codes and
    qparams."""
    names = [n for n in PER_GROUP_KEYS if n in a.keys]
    assert "order" in names and "tier2_codes" in names, names
    for name in names:
        assert torch.equal(a.keys[name][:, :, :count], b.keys[name][:, :, :count]), name
    for name in ("codes", "qparams"):
        assert torch.equal(a.values[name][:, :, :count], b.values[name][:, :, :count]), name


def _stores_equal(a: KVStore, b: KVStore, length: int) -> None:
    for side_a, side_b in ((a.keys, b.keys), (a.values, b.values)):
        for name in side_a:
            if name in ("ring", "header"):
                continue  # stale ring slots may differ; live ones are compared through read()
            assert torch.equal(side_a[name].view(torch.uint8), side_b[name].view(torch.uint8)), name
    ka, va = a.read(length)
    kb, vb = b.read(length)
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert a.length == b.length == length


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("kivi2", torch.float16),
        ("mix", torch.bfloat16),
        ("mix_sinks_v4", torch.float16),
        ("passthrough", torch.float16),
        ("mix_uniform_keys_v16", torch.bfloat16),
        ("mix_rpc_sinks", torch.float16),
    ],
)
def test_append_bit_exact(name, dtype):
    """Bulk prompt, a chunk that mixes old ring tokens with new ones, and single tokens across a flush."""
    config = _small_window(CONFIGS[name])
    lay = StoreLayout.create(config, 2, 1, 200, 64, 64, dtype)
    stores = [KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2)]
    for st in stores:  # the same bytes everywhere outside the live data
        for side in (st.keys, st.values):
            for region, t in side.items():
                if region != "header":
                    t.view(torch.uint8).zero_()
        if lay.salience:
            st.keys["query_abs_sum"].copy_(
                torch.arange(64, device=DEVICE).float().remainder(7).expand(2, 1, 64)
            )
            st.keys["query_count"].fill_(2.0)
    k = (torch.randn(2, 1, 170, 64) * 3).to(dtype).to(DEVICE)
    v = torch.randn(2, 1, 170, 64).to(dtype).to(DEVICE)
    for start, end in ((0, 77), (77, 130), (130, 131), (131, 139), (139, 140), (140, 170)):
        stores[0].append(k[:, :, start:end], v[:, :, start:end], start)
        qkern.append(stores[1], k[:, :, start:end], v[:, :, start:end], start)
        _stores_equal(stores[0], stores[1], end)
    if lay.rpc_permille:  # r = 0.3: after 170 tokens written as above, 4 groups are packed
        assert stores[0].packed_groups == 4


def test_store_groups_bulk_with_explicit_order():
    """Many groups in one launch from a strided source, with a caller-chosen channel order."""
    lay = StoreLayout.create(MIX, 2, 2, 300, 64, 64, torch.float16)
    a, b = (KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2))
    k = torch.randn(2, 200, 2, 64, device=DEVICE).to(torch.float16).transpose(1, 2)  # non-contiguous
    v = torch.randn(2, 2, 200, 64, device=DEVICE).to(torch.float16)
    count = 5
    kk = k[:, :, 8 : 8 + count * 32].float().reshape(2, 2, count, 32, 64).transpose(-1, -2)
    order = a._choose_key_order(kk)
    a._store_groups(0, k[:, :, 8 : 8 + count * 32], v[:, :, 8 : 8 + count * 32])
    qkern.store_groups(b, 0, k, v, count=count, order=order.to(torch.int32), offset=8)
    _packed_groups_equal(a, b, count)


def test_quantize_rounding_edge_cases():
    """Ties at half a step, constant groups (scale 0) and negative zero points survive bit-exactly."""
    lay = StoreLayout.create(PRESETS["kivi2"], 1, 1, 200, 64, 64, torch.float32)
    a, b = (KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2))
    k = torch.randn(1, 1, 64, 64, device=DEVICE)
    k[..., :32, 0] = 1.0  # a constant channel in group 0
    k[..., :32, 1] = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.5] * 4)  # step 1: exact ties at .5
    k[..., 32:, 2] = torch.tensor([1e-8, -1e-8] * 16)  # zero point next to 0
    v = k.clone()
    a._store_groups(0, k, v)
    qkern.store_groups(b, 0, k, v)
    for name in ("tier2_codes", "tier2_qparams"):
        assert torch.equal(a.keys[name][:, :, :2], b.keys[name][:, :, :2]), name
    assert torch.equal(a.values["codes"][:, :, :2], b.values["codes"][:, :, :2])
    assert torch.equal(a.values["qparams"][:, :, :2], b.values["qparams"][:, :, :2])


@pytest.mark.parametrize("name", ["mix", "difficulty", "mix_sinks_v4"])
def test_bulk_flush_ranks_channels_in_kernel(name):
    """Without a given order the flush kernel ranks the channels itself: the same order, codes and
    qparams as ``KVStore._choose_key_order`` + ``_store_groups``, for query-aware and S_d-only ranking,
    including ties (channels with equal range and equal query statistics)."""
    config = dataclasses.replace(CONFIGS[name], residual_length=32, group_size=32)
    lay = StoreLayout.create(config, 2, 2, 300, 64, 64, torch.bfloat16)
    a, b = (KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    stats = torch.rand(2, 2, 64, generator=gen)
    stats[..., 10:20] = 0.5  # tied query statistics
    k = (torch.randn(2, 2, 200, 64, generator=gen) * 2).to(torch.bfloat16)
    k[..., 10:20] = torch.linspace(-1, 1, 200).to(torch.bfloat16)[:, None]  # ... and tied ranges
    v = torch.randn(2, 2, 200, 64, generator=gen).to(torch.bfloat16)
    k, v = k.to(DEVICE), v.to(DEVICE)
    for st in (a, b):
        if lay.salience:
            st.keys["query_abs_sum"].copy_(stats)
            st.keys["query_count"].fill_(3.0)
    a._store_groups(0, k[:, :, 8 : 8 + 5 * 32], v[:, :, 8 : 8 + 5 * 32])
    qkern.store_groups(b, 0, k, v, count=5, offset=8)
    _packed_groups_equal(a, b, 5)


@pytest.mark.parametrize(
    "name,dtype,head_dim",
    [
        ("mix", torch.bfloat16, 64),
        ("kivi2", torch.float16, 64),
        ("kivi2", torch.bfloat16, 128),  # planar layout
        ("mix_sinks_v4", torch.float16, 64),
        ("mix_rpc_sinks", torch.float16, 64),
    ],
)
def test_decode_step_without_host_reads_matches_reference(name, dtype, head_dim):
    """``ops.decode_step`` (the CUDA-graph path: position, flush and ranking on the device) against the
    host path (reference attention + ``KVStore.append``) over steps that cross group flushes: the same
    outputs within the dtype's tolerance and the same store, bit for bit, query statistics included."""
    config = _small_window(CONFIGS[name])
    lay = StoreLayout.create(config, 2, 1, 160, head_dim, head_dim, dtype)
    host, device = (KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2))
    gen = torch.Generator().manual_seed(5)
    k = (torch.randn(2, 1, 140, head_dim, generator=gen) * 2).to(dtype).to(DEVICE)
    v = torch.randn(2, 1, 140, head_dim, generator=gen).to(dtype).to(DEVICE)
    q = torch.randn(2, 5, 140, head_dim, generator=gen).to(dtype).to(DEVICE)
    for st in (host, device):
        st.accumulate_queries(q[:, :, :90])
        st.append(k[:, :, :90], v[:, :, :90], 0)
    mask = torch.ones(2, 1, 1, 160, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :7] = False  # a left-padded row
    scale = 0.7 / head_dim**0.5
    assert lay.planar == (head_dim == 128)
    flushes = []
    # Writes that pack a group: 95 (98 with 3 sinks); with RPC (r = 0.3, 2 sinks, 88 full-precision
    # tokens after the prompt, 56 after its flush) 90 (F = 57, keep 17) and 110 (F = 45, keep 13).
    for t in range(90, 101 if not lay.rpc_permille else 112):
        step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        packed = host.packed_groups
        expected = ops._attend_with_reference(*step, host, t, packed, t + 1, mask, scale, True)
        host.accumulate_queries(step[0])
        host.append(step[1], step[2], t)
        out = ops.decode_step(*step, torch.tensor([t], device=DEVICE), device, mask, scale, True)
        assert _rel(out, expected.float()) < TOL[dtype]
        _stores_equal(host, device, t + 1)
        assert device.length == t + 1 and device.packed_groups == host.packed_groups
        if host.packed_groups > packed:
            flushes.append(t)
        if lay.salience:
            assert torch.equal(host.keys["query_abs_sum"], device.keys["query_abs_sum"])
    assert flushes == ([90, 110] if lay.rpc_permille else [98] if lay.sink_tokens else [95])
    # Position 0 starts a new sequence: the statistics restart from this query alone.
    ops.decode_step(
        q[:, :, :1], k[:, :, :1], v[:, :, :1], torch.tensor([0], device=DEVICE), device, None, scale, True
    )
    assert device.length == 1 and device.packed_groups == 0
    if lay.salience:
        fresh = KVStore.open(lay, *allocate(lay, DEVICE))
        fresh.accumulate_queries(q[:, :, :1])
        assert torch.equal(fresh.keys["query_abs_sum"], device.keys["query_abs_sum"])
        assert torch.equal(fresh.keys["query_count"], device.keys["query_count"])


@pytest.mark.parametrize(
    ("masked", "rows_per_read", "fused"),
    [(False, None, False), (True, None, False), (True, 2, False), (True, None, True)],
)
def test_long_chunk_after_prefix_matches_reference(masked, rows_per_read, fused, monkeypatch):
    """The CUDA path's chunked prefill equals the reference path on the same store: a chunk longer than
    ``FUSED_MAX_QUERY`` dequantizes the prefix once and runs one SDPA with ``enable_gqa`` (lower-right
    causal mask or the model's mask; the batch in slices of ``rows_per_read``), a shorter one the fused
    kernel."""
    if rows_per_read is not None:
        monkeypatch.setattr(ops, "_rows_per_read", lambda layout, total, chunk: rows_per_read)
    monkeypatch.setattr(ops, "FUSED_MAX_QUERY", 40 if fused else 39)  # the chunk has 40 tokens
    dtype = torch.float32
    store = _store(MIX, dtype=dtype, heads=2, tokens=90, chunks=(50,), seed=6)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 6, 40, 64, generator=gen).to(DEVICE)  # 3 query heads per KV head
    k = torch.randn(3, 2, 40, 64, generator=gen).to(DEVICE)
    v = torch.randn(3, 2, 40, 64, generator=gen).to(DEVICE)
    mask = None
    if masked:  # causal + left padding of row 1, as transformers builds it
        pos = torch.arange(160, device=DEVICE)
        mask = (pos[None, :] <= (90 + torch.arange(40, device=DEVICE))[:, None]).expand(3, 1, 40, 160).clone()
        mask[1, ..., :9] = False
    scale = 0.7 / 8
    packed = store.packed_groups
    out = ops._attend_with_kernels(q, k, v, store, 90, packed, mask, scale, not masked)
    ref = ops._attend_with_reference(q, k, v, store, 90, packed, 130, mask, scale, not masked)
    assert _rel(out, ref.float()) < TOL[dtype]


PLANAR = dataclasses.replace(PRESETS["kivi2"], residual_length=32, group_size=32, sink_tokens=2)


def _planar_store(
    head_dim,
    dtype,
    batch=2,
    heads=2,
    tokens=170,
    k_scale=2.0,
    v_scale=1.0,
    seed=8,
    config=PLANAR,
    capacity=200,
):
    """A planar store (uniform 2-bit keys and values) written by the kernels, with the tokens written."""
    lay = StoreLayout.create(config, batch, heads, capacity, head_dim, head_dim, dtype)
    assert lay.planar
    store = KVStore.open(lay, *allocate(lay, DEVICE))
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(batch, heads, tokens, head_dim, generator=gen) * k_scale).to(dtype).to(DEVICE)
    v = (torch.randn(batch, heads, tokens, head_dim, generator=gen) * v_scale).to(dtype).to(DEVICE)
    for start, end in ((0, 77), (77, tokens)):
        qkern.append(store, k[:, :, start:end], v[:, :, start:end], start)
    return store, k, v


@pytest.mark.parametrize(
    "head_dim,dtype", [(128, torch.float16), (128, torch.bfloat16), (256, torch.float16)]
)
def test_planar_append_bit_exact_and_dequantizes_like_reference(head_dim, dtype):
    """Planar stores: the kernels write the same bytes as ``KVStore.append`` (bulk, mixed and one-token
    writes across flushes), and ``read`` gives ``reference.quantize_groups``'s reconstruction (keys per
    channel over 32 tokens, values per token over 32 channels) of the written tokens."""
    lay = StoreLayout.create(PLANAR, 2, 2, 200, head_dim, head_dim, dtype)
    assert lay.planar and lay.key_channels == (0, 0, head_dim)
    stores = [KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2)]
    gen = torch.Generator().manual_seed(head_dim)
    k = (torch.randn(2, 2, 170, head_dim, generator=gen) * 3).to(dtype).to(DEVICE)
    v = torch.randn(2, 2, 170, head_dim, generator=gen).to(dtype).to(DEVICE)
    for start, end in ((0, 77), (77, 130), (130, 131), (131, 139), (139, 140), (140, 170)):
        stores[0].append(k[:, :, start:end], v[:, :, start:end], start)
        qkern.append(stores[1], k[:, :, start:end], v[:, :, start:end], start)
        _stores_equal(stores[0], stores[1], end)
    n = stores[0].packed_groups
    assert n == (170 - 2 - 32) // 32
    got_k, got_v = stores[1].read(170)
    packed = slice(2, 2 + n * 32)
    kg = k[:, :, packed].float().reshape(2, 2, n, 32, head_dim).transpose(-1, -2)
    want_k = reference.dequantize_groups(*reference.quantize_groups(kg, 2), 2).transpose(-1, -2)
    assert torch.equal(got_k[:, :, packed], want_k.reshape(2, 2, n * 32, head_dim).to(dtype))
    vg = v[:, :, packed].float().reshape(2, 2, n * 32, head_dim // 32, 32)
    want_v = reference.dequantize_groups(*reference.quantize_groups(vg, 2), 2)
    assert torch.equal(got_v[:, :, packed], want_v.reshape(2, 2, n * 32, head_dim).to(dtype))
    # The Triton dequantization (long prompt chunks) reads the same tensors, bit for bit.
    for rows in (slice(None), slice(1, 2)):
        fast_k, fast_v = stores[1].read(170, rows=rows, dequantize_groups=dequantize_groups)
        assert torch.equal(fast_k, got_k[rows]) and torch.equal(fast_v, got_v[rows])


@pytest.mark.parametrize(
    "name", ["mix", "mix_sinks_v4", "kivi4", "mix_uniform_keys_v16", "mix_small_tiers", "mix_rpc_sinks"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_groups_default_layout_bit_exact(name, dtype):
    """``kernels.dequantize.dequantize_groups`` on stores of the default layout (key tiers of 16, 4 and
    2 bits with a channel order per group, uniform keys, 4-bit and 16-bit values, sinks, RPC) writes
    exactly ``store._dequantize_*_groups(...).to(dtype)``, for all rows and for a slice of them, into
    poisoned outputs."""
    store = _store(_small_window(CONFIGS[name]), dtype=dtype, heads=2, tokens=150, chunks=(77, 100), seed=5)
    lay = store.layout
    assert not lay.planar
    n = store.packed_groups
    assert n >= 2
    for rows in (slice(None), slice(1, 3)):
        want_k = store._dequantize_key_groups(n, rows).to(dtype)
        want_v = store._dequantize_value_groups(n, rows).to(dtype)
        out = (torch.full_like(want_k, float("nan")), torch.full_like(want_v, float("nan")))
        got_k, got_v = dequantize_groups(store, n, rows, out=out)
        assert got_k is out[0] and got_v is out[1]
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize(
    "head_dim,dtype,query_dtype",
    [
        (128, torch.float16, torch.float16),
        (128, torch.bfloat16, torch.bfloat16),
        (256, torch.float16, torch.float16),
        (128, torch.float16, torch.float32),
    ],
)
def test_planar_decode_tensor_length_and_masked_groups(head_dim, dtype, query_dtype):
    """The planar packed-group kernel (float16 tensor-core operands whatever the query dtype) against
    the float32 reference: length read on the device, 3 query heads per KV head, a left-padding mask
    that hides a whole packed group of one row and part of a group of another."""
    store, _, _ = _planar_store(head_dim, dtype)
    assert store.packed_groups == 4
    query = torch.randn(2, 6, 1, head_dim, dtype=query_dtype, device=DEVICE)
    mask = torch.ones(2, 1, 1, 200, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :40] = False  # sinks + group 0 + part of group 1
    mask[1, ..., :5] = False
    out, ref = _run(query, store, torch.tensor([170], device=DEVICE), mask=mask, num_splits=3)
    tol = TOL[torch.float16] if query_dtype == torch.float32 else TOL[query_dtype]  # float16 operands
    assert _rel(out, ref) < tol


@pytest.mark.parametrize("head_dim,value_group_size", [(128, 16), (128, 64), (128, 128), (256, 64)])
def test_planar_decode_value_group_sizes(head_dim, value_group_size):
    """Value groups of 1, 4 and 8 fields (the planar kernel picks each field's value scale from its
    group): against the float32 reference, with a left-padding mask."""
    config = dataclasses.replace(PLANAR, value_group_size=value_group_size)
    store, _, _ = _planar_store(head_dim, torch.float16, config=config, seed=31)
    assert store.layout.planar and store.layout.value_group_size == value_group_size
    query = torch.randn(2, 4, 1, head_dim, dtype=torch.float16, device=DEVICE)
    mask = torch.ones(2, 1, 1, 200, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :37] = False
    out, ref = _run(query, store, torch.tensor([170], device=DEVICE), mask=mask, num_splits=2)
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("num_splits", [1, 2])
def test_planar_decode_odd_group_count_per_split(num_splits):
    """Three packed groups split unevenly (one split of three, or splits of two and one), with and without
    a mask over the last group."""
    store, _, _ = _planar_store(128, torch.float16, tokens=150, seed=13)
    assert store.packed_groups == 3
    query = torch.randn(2, 4, 1, 128, dtype=torch.float16, device=DEVICE)
    mask = torch.ones(2, 1, 1, 200, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 66:100] = False  # the third group of row 1, and two tokens of the ring
    for m in (None, mask):
        out, ref = _run(query, store, 150, mask=m, num_splits=num_splits)
        assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("prefetch", ["0", "1"])
@pytest.mark.parametrize(("tokens", "num_splits"), [(200, 1), (200, 2), (270, 1), (270, 2), (270, 3)])
def test_planar_decode_groups_per_step(prefetch, tokens, num_splits, monkeypatch):
    """The walk in steps of two packed groups, with and without the L2 prefetch (``MIXKVQ_PREFETCH``),
    over 5 or 7 groups in 1 to 3 splits, whose group counts leave 0 or 1 group after the last whole
    step, with and without a mask over some packed tokens of one row."""
    monkeypatch.setenv("MIXKVQ_PREFETCH", prefetch)
    store, _, _ = _planar_store(128, torch.float16, tokens=tokens, seed=21, capacity=300)
    assert store.packed_groups == (5 if tokens == 200 else 7)
    query = torch.randn(2, 4, 1, 128, dtype=torch.float16, device=DEVICE)
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 40:140] = False  # packed groups 1 to 4 of row 1, in part
    for m in (None, mask):
        out, ref = _run(query, store, tokens, mask=m, num_splits=num_splits)
        assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("changed", [False, True])
def test_planar_decode_mask_that_keeps_the_packed_tokens(kind, changed):
    """A decode step's mask over a static cache (transformers' kind: keep every position up to the
    query, drop the rest) keeps every packed token, and the kernel then skips it in the packed loop;
    ``changed``: row 1's mask also drops (bool) or biases (additive, +4) a token of packed group 2, in
    the second split, which must take the masked loop. Both against the float32 reference."""
    store, _, _ = _planar_store(128, torch.float16, seed=21)
    assert store.packed_groups == 4
    query = torch.randn(2, 4, 1, 128, dtype=torch.float16, device=DEVICE)
    keep = torch.arange(200, device=DEVICE) < 170
    if kind == "bool":
        mask = keep.expand(2, 1, 1, 200).clone()
    else:
        mask = torch.where(keep, 0.0, torch.finfo(torch.float16).min).to(torch.float16).expand(2, 1, 1, 200)
        mask = mask.clone()
    clean_ref = _run(query, store, 170, mask=mask.clone(), num_splits=2)[1]
    if changed:
        token = PLANAR.sink_tokens + 2 * PLANAR.group_size + 5
        if kind == "bool":
            mask[1, ..., token - 5 : token + 20] = False
        else:
            mask[1, ..., token] = 4.0
    out, ref = _run(query, store, 170, mask=mask, num_splits=2)
    assert _rel(out, ref) < TOL[torch.float16]
    assert (_rel(ref, clean_ref) > 0.05) == changed  # the change matters, so a skipped mask would fail


def test_planar_decode_per_head_mask():
    """A decode mask with a row per query head (not broadcast over heads, so each program's query rows
    read different mask rows): one head of row 1 drops 20 tokens of packed group 2, the others keep
    everything; against the float32 reference and against the mask that keeps everything."""
    store, _, _ = _planar_store(128, torch.float16, seed=23)
    query = torch.randn(2, 4, 1, 128, dtype=torch.float16, device=DEVICE)
    mask = (torch.arange(200, device=DEVICE) < 170).expand(2, 4, 1, 200).clone()
    clean_ref = _run(query, store, 170, mask=mask.clone(), num_splits=2)[1]
    token = PLANAR.sink_tokens + 2 * PLANAR.group_size
    mask[1, 2, :, token : token + 20] = False
    out, ref = _run(query, store, 170, mask=mask, num_splits=2)
    assert _rel(out, ref) < TOL[torch.float16]
    assert _rel(ref[1, 2], clean_ref[1, 2]) > 0.05 and torch.equal(ref[0], clean_ref[0])


def test_planar_decode_query_chunk_additive_mask_and_new_tokens():
    """Four causal queries with an additive mask and 4 new full-precision tokens, over a planar store."""
    store, _, _ = _planar_store(128, torch.float16, seed=9)
    query = torch.randn(2, 4, 4, 128, dtype=torch.float16, device=DEVICE)
    new = (
        torch.randn(2, 2, 4, 128, dtype=torch.float16, device=DEVICE),
        torch.randn(2, 2, 4, 128, dtype=torch.float16, device=DEVICE),
    )
    mask = torch.randn(2, 1, 4, 174, device=DEVICE).to(torch.float16)
    out, ref = _run(query, store, 170, mask=mask, new=new, num_splits=2)
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("seed", [0, 122])
def test_planar_decode_large_magnitudes_stay_finite(seed):
    """bfloat16 keys of magnitude ~600 and queries ~100: ``q * scale`` exceeds float16's range unless
    the query is scaled down first (QSCALE); the output stays finite and close to the reference.

    The softmax scale keeps the logits near 1: at the default scale they are ~1e4 apart, the softmax
    is an argmax, and a float16 rounding of ``q * scale`` can pick the other token of a near tie (a
    random query did, 1 in ~300, before the query was seeded: 122 here)."""
    store, _, _ = _planar_store(128, torch.bfloat16, k_scale=600.0, v_scale=50.0, seed=10)
    gen = torch.Generator().manual_seed(seed)
    query = (torch.randn(2, 4, 1, 128, generator=gen) * 100).to(torch.bfloat16).to(DEVICE)
    out, ref = _run(query, store, 170, num_splits=2, scale=5e-6)
    assert _rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    ("one_gqa_call", "mask_kind"), [(False, "padded"), (True, "padded"), (True, "causal"), (True, None)]
)
def test_long_chunk_over_planar_prefix_matches_reference(one_gqa_call, mask_kind, monkeypatch):
    """A long chunk after a planar prefix: the prefix dequantized by the Triton kernel one batch row at
    a time into the buffer that also takes the chunk, then attention against the reference path. With
    a left-padded mask: SDPA under the mask (one call with ``enable_gqa``, or one per query-head offset);
    with no mask or the model's plain causal mask: ``chunk_attention.attend_split`` (prefix and chunk
    apart, merged)."""
    monkeypatch.setattr(ops, "ONE_GQA_CALL", one_gqa_call)
    monkeypatch.setattr(ops, "_rows_per_read", lambda layout, total, chunk: 1)
    monkeypatch.setattr(ops, "FUSED_MAX_QUERY", 8)
    store, _, _ = _planar_store(128, torch.bfloat16, tokens=150, seed=11)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(2, 4, 20, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(2, 2, 20, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(2, 2, 20, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    packed = store.packed_groups
    mask = None
    if mask_kind:
        pos = torch.arange(200, device=DEVICE)
        mask = (
            (pos[None, :] <= (150 + torch.arange(20, device=DEVICE))[:, None]).expand(2, 1, 20, 200).clone()
        )
        if mask_kind == "padded":
            mask[1, ..., :7] = False
    split_calls = []
    monkeypatch.setattr(ops, "attend_split", lambda *a: split_calls.append(1) or attend_split(*a))
    out = ops._attend_with_kernels(q, k, v, store, 150, packed, mask, 0.1, True)
    ref = ops._attend_with_reference(q, k, v, store, 150, packed, 170, mask, 0.1, True)
    assert bool(split_calls) == (mask_kind != "padded")
    assert _rel(out, ref.float()) < TOL[torch.bfloat16]


@gpu_only
@pytest.mark.parametrize("name", ["kivi2", "mix"])
def test_decode_gpu_gqa_large(name):
    torch.manual_seed(0)
    store = _store(
        CONFIGS[name],
        batch=2,
        heads=8,
        capacity=4096,
        head_dim=128,
        tokens=4000,
        chunks=(3001,),
        residual=128,
        group=32,
    )
    for dtype in (torch.float16, torch.bfloat16):
        for gather in (False, True):
            query = torch.randn(2, 32, 1, 128, dtype=dtype, device=DEVICE)
            out, ref = _run(query.to(dtype), store, 4000, gather=gather)
            assert _rel(out, ref) < TOL[dtype]
    query = torch.randn(2, 32, 16, 128, dtype=torch.float16, device=DEVICE)
    out, ref = _run(query, store, 4000)
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize(("parts", "dv", "n_rep", "lq"), [(300, 64, 4, 1), (133, 128, 4, 1), (5, 16, 2, 3)])
def test_combine_partials_matches_reference(parts, dv, n_rep, lq):
    """The split partials combined against float64 on the same partials: more than 256 partials (two
    loads per program), empty partials (max -inf), a row with none, several query tokens."""
    gen = torch.Generator(device="cpu").manual_seed(parts)
    batch, heads = 2, 3
    rows = n_rep * lq
    acc = torch.randn(batch * heads, parts, rows, dv, generator=gen)
    ml = torch.stack(
        (
            torch.randn(batch * heads, parts, rows, generator=gen) * 4,
            torch.rand(batch * heads, parts, rows, generator=gen) + 0.5,
        ),
        dim=-1,
    )
    ml[:, ::3, :, 0] = float("-inf")  # empty partials
    ml[1, :, 0, 0] = float("-inf")  # a row with no keys at all
    out = torch.full((batch, heads * n_rep, lq, dv), float("nan"), device=DEVICE)
    combine_partials(acc.to(DEVICE), ml.to(DEVICE), out, heads, n_rep)
    m = ml[..., 0].double()
    m_max = m.amax(dim=1, keepdim=True)
    w = torch.exp2(m - torch.where(torch.isinf(m_max), 0.0, m_max))
    total = (w * ml[..., 1].double()).sum(dim=1)
    ref = (w[..., None] * acc.double()).sum(dim=1) / torch.where(total > 0, total, 1.0)[..., None]
    ref = torch.where(total[..., None] > 0, ref, 0.0)  # [B * H, rows, dv]
    ref = ref.reshape(batch, heads, n_rep, lq, dv).reshape(batch, heads * n_rep, lq, dv)
    assert torch.isfinite(out).all()
    assert (out[0, n_rep, 0] == 0).all()  # the row with no keys: KV head 1 of batch 0, row 0
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-6)


@gpu_only
@pytest.mark.parametrize("name", ["kivi2", "mix"])
def test_decode_gpu_long_walk(name):
    """One split: a program walks 1024 packed groups of quantized random values under wide attention,
    whose output is far smaller than the values (the value sums cancel). With the walk's running sums
    as the tensor-core accumulator this measured 2.4e-2 (H200, 8 x 32k); summed per step in float32,
    8e-4, as with many splits."""
    torch.manual_seed(0)
    store = _store(
        CONFIGS[name],
        batch=1,
        heads=2,
        capacity=32768 + 64,
        head_dim=128,
        tokens=32768,
        chunks=(),
        residual=64,
    )
    query = torch.randn(1, 8, 1, 128, dtype=torch.float16, device=DEVICE)
    for splits in (1, None):
        out, ref = _run(query, store, 32768, num_splits=splits)
        assert _rel(out, ref) < TOL[torch.float16], splits


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("", {"kivi2": True, "mix": True, "kivi4": False}),
        ("1", {"kivi2": True, "mix": True, "kivi4": False}),
        ("0", {"kivi2": False, "mix": False, "kivi4": False}),
    ],
)
def test_overlap_launches_policy(flag, expected, monkeypatch):
    """Which decode calls overlap their launches on a PDL-capable GPU: every planar store, unless
    ``MIXKVQ_PDL=0``; never a non-planar store, a CPU tensor or the interpreter. A bad ``MIXKVQ_PDL``
    is an error."""
    monkeypatch.setattr(_runtime, "_pdl_capable", lambda index: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MIXKVQ_PDL", flag)
    cuda = torch.device("cuda", 0)
    layouts = {
        name: StoreLayout.create(CONFIGS[name], 2, 8, 4096, 128, 128, torch.float16) for name in expected
    }
    assert layouts["kivi2"].planar and layouts["mix"].planar_mixed and not layouts["kivi4"].planar_words
    assert {name: _runtime.overlap_launches(lay, cuda) for name, lay in layouts.items()} == expected
    assert not _runtime.overlap_launches(layouts["kivi2"], torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _runtime.overlap_launches(layouts["kivi2"], cuda)
    monkeypatch.setenv("MIXKVQ_PDL", "yes")
    with pytest.raises(ValueError, match="MIXKVQ_PDL"):
        _runtime.overlap_launches(layouts["kivi2"], cuda)


@pytest.mark.parametrize(
    ("flag", "steps"),
    [
        ("", {"kivi2": 0, "mix": 1, "mixkvq": 0}),
        ("1", {"kivi2": 1, "mix": 1, "mixkvq": 1}),
        ("0", {"kivi2": 0, "mix": 0, "mixkvq": 0}),
    ],
)
def test_prefetch_steps_setting(flag, steps, monkeypatch):
    """``MIXKVQ_PREFETCH``: unset prefetches one step ahead for mixed key tiers of more than 16 4-bit
    channels only (the 10/20/70 mix: 26; MixKVQ's default tiers have 16 and spill with it), 1 or 0 sets
    it for every store."""
    monkeypatch.setenv("MIXKVQ_PREFETCH", flag)
    configs = {**CONFIGS, "mixkvq": PRESETS["mixkvq"]}
    layouts = {name: StoreLayout.create(configs[name], 1, 2, 256, 128, 128, torch.float16) for name in steps}
    assert layouts["mix"].planar_mixed and layouts["mixkvq"].planar_mixed and layouts["kivi2"].planar
    assert layouts["mix"].key_channels[1] == 26 and layouts["mixkvq"].key_channels[1] == 16
    assert {name: _runtime.prefetch_steps(lay) for name, lay in layouts.items()} == steps


def test_prefetch_steps_rejects_other_values(monkeypatch):
    monkeypatch.setenv("MIXKVQ_PREFETCH", "2")
    with pytest.raises(ValueError, match="MIXKVQ_PREFETCH"):
        _runtime.prefetch_steps(StoreLayout.create(CONFIGS["kivi2"], 1, 2, 256, 128, 128, torch.float16))


@gpu_only
@pytest.mark.parametrize("name", ["kivi2", "mix"])
def test_decode_gpu_prefetch_changes_nothing(name, monkeypatch):
    """The L2 prefetch of the planar kernel is a hint: with ``MIXKVQ_PREFETCH`` 0 and 1 the output is
    bit-equal and within the float16 bound of the reference, for walks of many groups per program (one
    and three splits: even and odd group counts, the prefetch clamped at the walk's last pair)."""
    torch.manual_seed(5)
    store = _store(CONFIGS[name], batch=2, heads=8, capacity=4096, head_dim=128, tokens=4000, chunks=(3001,))
    query = torch.randn(2, 32, 1, 128, dtype=torch.float16, device=DEVICE)
    for splits in (1, 3):
        outs = []
        for flag in ("0", "1"):
            monkeypatch.setenv("MIXKVQ_PREFETCH", flag)
            out, ref = _run(query, store, 4000, num_splits=splits)
            assert _rel(out, ref) < TOL[torch.float16]
            outs.append(out)
        assert torch.equal(outs[0], outs[1])


@gpu_only
@pytest.mark.parametrize("name", ["kivi2", "mix"])
def test_decode_gpu_overlapped_launches_equal(name, monkeypatch):
    """The packed-group launch started while the full-precision launch runs (programmatic dependent
    launch, compute capability 9.0+) gives the output of the two launched one after the other, bit for
    bit, also replayed from a CUDA graph; the output is also checked against the float32 reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    torch.manual_seed(0)
    store = _store(CONFIGS[name], batch=2, heads=8, capacity=4096, head_dim=128, tokens=4000, chunks=(3001,))
    query = torch.randn(2, 32, 1, 128, dtype=torch.float16, device=DEVICE)
    packed = store.layout.flushed_groups(4000)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MIXKVQ_PDL", flag)
        out, ref = _run(query, store, 4000)
        assert _rel(out, ref) < TOL[torch.float16]
        graph_out = torch.full_like(out, float("nan"))
        # ``packed`` given: without it the packed-group count is read from the header, a device sync.
        step = functools.partial(
            decode_attention, query, store, 4000, None, 0.7 / 128**0.5, out=graph_out, packed=packed
        )
        step()  # compiled before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(graph_out, out)
        outs[flag] = out
    assert torch.equal(outs["0"], outs["1"])


@gpu_only
@pytest.mark.parametrize("planar_tiers", [True, False])
def test_append_gpu_prompt_bit_exact(planar_tiers):
    lay = StoreLayout.create(MIX, 2, 8, 4096, 128, 128, torch.bfloat16)
    lay = dataclasses.replace(lay, planar_tiers=planar_tiers)
    assert lay.planar_mixed == planar_tiers
    a, b = (KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2))
    for st in (a, b):
        st.keys["query_abs_sum"].fill_(1.0)
        st.keys["query_count"].fill_(1.0)
    k = torch.randn(2, 8, 3000, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(2, 8, 3000, 128, device=DEVICE, dtype=torch.bfloat16)
    a.append(k, v, 0)
    qkern.append(b, k, v, 0)
    groups = lay.flushed_groups(3000)
    _packed_groups_equal(a, b, groups)


# (16-bit, 4-bit) channel fractions of the mixed-tier cases: MixKVQ's default tiers (16 4-bit channels:
# one 16-row product of low bits), the benchmark's mix (26: two, the second part-filled), no 16-bit tier
# (32: two full ones), and 48 4-bit channels (three).
PLANAR_MIXED_CASES = [
    ((1 / 32, 1 / 8), torch.float16),
    ((0.1, 0.2), torch.bfloat16),
    ((0.0, 0.25), torch.float16),
    ((1 / 16, 3 / 8), torch.float16),
]


def _planar_mixed_store(fractions, dtype, heads=2, seed=17):
    """A planar store of mixed key tiers (``fractions`` of 16-bit and 4-bit channels), batch 2, head_dim
    128, 170 tokens written by the PyTorch path (4 packed groups, 2 sink tokens), the channels ranked on
    a query of ``heads * 3`` query heads, which it returns ``[2, heads * 3, 1, 128]``. Keys have
    channels of very different magnitudes, as real keys do."""
    config = MixKVQConfig(
        key_tier_fractions=fractions, key_bits=(16, 4, 2), value_bits=2, residual_length=32, sink_tokens=2
    )
    lay = dataclasses.replace(StoreLayout.create(config, 2, heads, 200, 128, 128, dtype), planar_tiers=True)
    assert lay.planar_mixed
    store = KVStore.open(lay, *allocate(lay, DEVICE))
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(2, heads, 170, 128, generator=gen) * torch.rand(128, generator=gen) * 3).to(dtype)
    v = torch.randn(2, heads, 170, 128, generator=gen).to(dtype)
    query = (torch.randn(2, heads * 3, 1, 128, generator=gen) * torch.rand(128, generator=gen) * 3).to(dtype)
    store.accumulate_queries(query.to(DEVICE))
    store.append(k.to(DEVICE), v.to(DEVICE), 0)
    assert store.packed_groups == 4
    return store, query.to(DEVICE)


@pytest.mark.parametrize(("fractions", "dtype"), PLANAR_MIXED_CASES)
def test_planar_mixed_decode_matches_reference(fractions, dtype):
    """The planar kernel over mixed key tiers (planar words plus the 16-bit channels and the 4-bit codes'
    low bits, gathered query) against the float32 reference on the store's dequantized keys; a
    left-padding mask and 3 splits. The store is written by the PyTorch path."""
    store, query = _planar_mixed_store(fractions, dtype)
    mask = torch.ones(2, 1, 1, 200, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :40] = False
    out, ref = _run(query, store, 170, mask=mask, num_splits=3)
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("gather_first", [None, True])
@pytest.mark.parametrize("block_m", [4, 16])
def test_planar_mixed_decode_query_row_blocks(block_m, gather_first):
    """Mixed key tiers, 20 query rows (5 query heads over 1 KV head, 4 causal queries each) in blocks of
    4 or 16 rows, a partial last block, with a mask per head that drops packed tokens of one head (the
    second, masked walk runs): the walk gathering the tier queries itself (the default for more than 8
    rows) and every program gathering them first (each block its own rows of the scratch)."""
    store, _ = _planar_mixed_store((0.1, 0.2), torch.float16, heads=1, seed=29)
    gen = torch.Generator().manual_seed(30)
    query = (torch.randn(2, 5, 4, 128, generator=gen) * 2).half().to(DEVICE)
    mask = torch.ones(2, 5, 4, 170, dtype=torch.bool, device=DEVICE)
    mask[1, 3, :, 10:60] = False
    out, ref = _run(query, store, 170, mask=mask, num_splits=2, block_m=block_m, gather_first=gather_first)
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("fractions", [(1 / 32, 1 / 8), (1 / 16, 1 / 8), (0.1, 0.2)])
def test_planar_mixed_decode_at_llama_heads(fractions):
    """The planar kernel over mixed key tiers at 32 query heads over 8 KV heads, 2048 tokens, no mask,
    default splits, against the float32 reference. With 16 4-bit channels (MixKVQ's default tiers, and 8
    16-bit channels) read as a 16-row byte tile, the kernel compiled for an H200 was wrong (relative
    error 0.24); this test and ``test_planar_mixed_decode_matches_reference`` with (1/32, 1/8) failed
    there on that kernel (2026-11-27; a Triton 3.6 bug, see ``_low_bits``). ``_low_bits`` now reads such
    tiles as int16 words."""
    config = MixKVQConfig(key_tier_fractions=fractions, key_bits=(16, 4, 2), value_bits=2)
    lay = StoreLayout.create(config, 1, 8, 2048 + 64, 128, 128, torch.float16)
    assert lay.planar_mixed
    store = KVStore.open(lay, *allocate(lay, DEVICE))
    gen = torch.Generator().manual_seed(31)
    store.keys["query_abs_sum"].copy_(torch.rand(store.keys["query_abs_sum"].shape, generator=gen))
    store.keys["query_count"].fill_(1.0)
    k = torch.randn(1, 8, 2048, 128, generator=gen).half().to(DEVICE)
    store.append(k, torch.randn(1, 8, 2048, 128, generator=gen).half().to(DEVICE), 0)
    query = torch.randn(1, 32, 1, 128, generator=gen).half().to(DEVICE)
    out, ref = _run(query, store, 2048)
    assert _rel(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize(("fractions", "dtype"), PLANAR_MIXED_CASES)
def test_planar_mixed_append_bit_exact(fractions, dtype):
    """The quantize kernel writes a planar mixed-tier store byte for byte like ``KVStore.append``
    (channels ranked by query salience in the kernel; bulk, mixed and one-token writes across flushes),
    and one-token decode appends flush the same groups."""
    config = MixKVQConfig(
        key_tier_fractions=fractions, key_bits=(16, 4, 2), value_bits=2, residual_length=32, sink_tokens=2
    )
    lay = dataclasses.replace(StoreLayout.create(config, 2, 2, 200, 128, 128, dtype), planar_tiers=True)
    assert lay.planar_mixed
    stores = [KVStore.open(lay, *allocate(lay, DEVICE)) for _ in range(2)]
    gen = torch.Generator().manual_seed(23)
    k = (torch.randn(2, 2, 170, 128, generator=gen) * torch.rand(128, generator=gen) * 3).to(dtype).to(DEVICE)
    v = torch.randn(2, 2, 170, 128, generator=gen).to(dtype).to(DEVICE)
    q = (torch.randn(2, 4, 3, 128, generator=gen) * torch.rand(128, generator=gen)).to(DEVICE)
    for store in stores:
        store.accumulate_queries(q)
    for start, end in ((0, 77), (77, 130), (130, 131), (131, 139), (139, 140), (140, 170)):
        stores[0].append(k[:, :, start:end], v[:, :, start:end], start)
        qkern.append(stores[1], k[:, :, start:end], v[:, :, start:end], start)
        _stores_equal(stores[0], stores[1], end)
    assert stores[0].packed_groups == 4
    extra_k = (torch.randn(2, 2, 24, 128, generator=gen) * 3).to(dtype).to(DEVICE)
    extra_v = torch.randn(2, 2, 24, 128, generator=gen).to(dtype).to(DEVICE)
    for i in range(24):  # decode steps: position on the device, the flush predicated in the kernel
        pos = 170 + i
        stores[0].append(extra_k[:, :, i : i + 1], extra_v[:, :, i : i + 1], pos)
        qkern.append_token(
            stores[1], extra_k[:, :, i : i + 1], extra_v[:, :, i : i + 1], torch.tensor([pos], device=DEVICE)
        )
    assert stores[0].packed_groups == 5
    _stores_equal(stores[0], stores[1], 194)
    # The dequantization for long prompt chunks (planar kernel, then the 16-bit and 4-bit channels).
    slow_k, slow_v = stores[1].read(194)
    for rows in (slice(None), slice(1, 2)):
        fast_k, fast_v = stores[1].read(194, rows=rows, dequantize_groups=dequantize_groups)
        assert torch.equal(fast_k, slow_k[rows]) and torch.equal(fast_v, slow_v[rows])
