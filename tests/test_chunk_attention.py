"""Mask-free attention of a prompt chunk over its prefix (``chunk_attention``) against masked attention
in float64, and the test that decides when the model's mask may be dropped."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixkvq_compile.chunk_attention import attend_split, is_plain_causal, supports_split


def _causal(lq: int, width: int, start: int, device="cpu") -> torch.Tensor:
    """``[Lq, width]`` bool: query i (position start + i) sees keys <= start + i."""
    return torch.arange(width, device=device)[None, :] <= (start + torch.arange(lq, device=device))[:, None]


def _masked_reference(q, k, v, start, scale):
    """float64 attention with the causal rule as a mask and K/V repeated per query head."""
    n_rep = q.shape[1] // k.shape[1]
    mask = _causal(q.shape[2], k.shape[2], start, q.device)
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(),
        k.double().repeat_interleave(n_rep, 1),
        v.double().repeat_interleave(n_rep, 1),
        attn_mask=mask,
        scale=scale,
    )


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    n_rep=st.sampled_from([1, 2, 5]),
    start=st.integers(0, 40),
    lq=st.integers(1, 24),
    dv=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_split_attention_equals_masked_attention(batch, kv_heads, n_rep, start, lq, dv, seed):
    """Any prefix length (0 included) and chunk length, any grouped-query ratio, head dims for keys and
    values that differ: the merged prefix and chunk attentions equal one masked attention."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * n_rep, lq, 16, generator=gen) * 2
    k = torch.randn(batch, kv_heads, start + lq, 16, generator=gen) * 2
    v = torch.randn(batch, kv_heads, start + lq, dv, generator=gen)
    out = attend_split(q, k, v, start, 0.3)
    ref = _masked_reference(q, k, v, start, 0.3)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_is_plain_causal_accepts_the_causal_rule_only():
    """Broadcast batch and head dims, columns past ``total`` ignored; one padded key, one extra visible
    key, a float mask or a mask narrower than ``total`` are not plain causal."""
    start, lq, width = 6, 5, 16
    total = start + lq
    causal = _causal(lq, width, start)
    assert is_plain_causal(causal[None, None], start, total)
    batched = causal.expand(3, 1, lq, width).clone()
    batched[..., total:] = True  # beyond the keys attended: ignored
    assert is_plain_causal(batched, start, total)
    padded = batched.clone()
    padded[1, 0, :, 0] = False  # row 1 is left-padded by one token
    assert not is_plain_causal(padded, start, total)
    extra = batched.clone()
    extra[2, 0, 0, start + 1] = True  # a key after the query's position
    assert not is_plain_causal(extra, start, total)
    additive = torch.zeros(1, 1, lq, width).masked_fill(~causal, float("-inf"))
    assert not is_plain_causal(additive, start, total)
    assert not is_plain_causal(causal[None, None, :, : total - 1], start, total)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN/flash log-sum-exp backends need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_attention_gpu_backends(dtype):
    """On the GPU the two parts run on cuDNN or flash with their log-sum-exp: against masked SDPA with
    grouped-query heads (4 query heads per KV head) at a prefix of 1000 and a chunk of 300."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(2, 8, 300, 128, generator=gen, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 1300, 128, generator=gen, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, 1300, 128, generator=gen, device="cuda", dtype=dtype)
    out = attend_split(q, k, v, 1000, 128**-0.5)
    ref = _masked_reference(q, k, v, 1000, 128**-0.5)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), err


def test_supports_split_on_the_gpu_only_for_what_its_backends_take():
    """float32, unequal key/value head dims or head dims over 256 keep the masked path on the GPU;
    everything runs split on the CPU. Shapes on the meta device stand in for CUDA tensors."""

    def cuda_like(dtype, d):
        t = torch.empty(1, 1, 1, d, dtype=dtype, device="meta")
        return type("CudaLike", (), {"is_cuda": True, "dtype": dtype, "shape": t.shape})()

    half = cuda_like(torch.bfloat16, 128)
    assert supports_split(half, half, half)
    assert not supports_split(cuda_like(torch.float32, 128), half, half)
    assert not supports_split(half, half, cuda_like(torch.bfloat16, 64))
    big = cuda_like(torch.float16, 512)
    assert not supports_split(big, big, big)
    cpu = torch.empty(1, 1, 1, 8)
    assert supports_split(cpu, cpu, cpu)
