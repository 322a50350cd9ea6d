"""Properties of the pure-PyTorch reference: packing, quantization error, attention."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixkvq_compile import reference

shapes = st.tuples(st.integers(1, 5), st.integers(1, 7))


@given(bits=st.sampled_from([2, 4]), lead=shapes, groups=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip_is_exact(bits, lead, groups, seed):
    generator = torch.Generator().manual_seed(seed)
    width = groups * (8 // bits)
    codes = torch.randint(0, 2**bits, (*lead, width), generator=generator, dtype=torch.int64).to(torch.uint8)
    packed = reference.pack(codes, bits)
    assert packed.shape == (*lead, width * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(reference.unpack(packed, bits), codes)


@given(lead=shapes, words=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_planar_pack_puts_each_run_of_codes_in_one_bit_field(lead, words, seed):
    """``pack_planar``: bit field f of word j holds code ``j + f * N / 8``; ``unpack_planar`` inverts it."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (*lead, 8 * words), generator=generator).to(torch.uint8)
    packed = reference.pack_planar(codes)
    assert packed.shape == (*lead, words) and packed.dtype == torch.int16
    as_int = packed.to(torch.int32) & 0xFFFF
    for field in range(8):
        assert torch.equal((as_int >> (2 * field)) & 3, codes[..., field * words : (field + 1) * words].int())
    assert torch.equal(reference.unpack_planar(packed), codes)


@given(
    bits=st.sampled_from([2, 4]),
    lead=shapes,
    groups=st.integers(1, 6),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_dequantization_error_is_at_most_half_a_step(bits, lead, groups, scale, offset, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, groups * 8, generator=generator) * scale + offset
    packed, qparams = reference.quantize_groups(x, bits)
    x_hat = reference.dequantize_groups(packed, qparams, bits)
    step = qparams[..., 0:1].float()
    assert bool((qparams[..., 1].float() <= x.amin(dim=-1)).all())
    # Half a step, plus float32 rounding of code * scale + zero.
    bound = step / 2 + 4 * torch.finfo(torch.float32).eps * (x.abs() + step * 2**bits)
    assert bool(((x - x_hat).abs() <= bound).all())


def test_constant_groups_and_zero_range_are_exact():
    x = torch.full((3, 32), 0.125)
    packed, qparams = reference.quantize_groups(x, 2)
    assert torch.equal(reference.dequantize_groups(packed, qparams, 2), x)


@settings(deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    n_rep=st.integers(1, 3),
    q_len=st.integers(1, 5),
    past=st.integers(0, 40),
    head_dim=st.sampled_from([8, 16, 64]),
    masked=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_attention_matches_sdpa_on_repeated_heads(
    batch, kv_heads, n_rep, q_len, past, head_dim, masked, seed
):
    generator = torch.Generator().manual_seed(seed)
    length = past + q_len
    q = torch.randn(batch, kv_heads * n_rep, q_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    mask = None
    if masked:
        mask = torch.rand(batch, 1, q_len, length, generator=generator) > 0.3
        mask[..., 0] = True
    scale = 1 / math.sqrt(head_dim)
    out = reference.attention(q, k, v, mask, scale, causal_start=past)
    causal = torch.arange(length) <= (torch.arange(q_len) + past)[:, None]
    full_mask = causal if mask is None else mask & causal
    expected = F.scaled_dot_product_attention(
        q.double(),
        k.double().repeat_interleave(n_rep, 1),
        v.double().repeat_interleave(n_rep, 1),
        attn_mask=full_mask,
        scale=scale,
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
