"""Attention over a sliding-window store (``StoreLayout.sliding``): the layer keeps only its last ``W``
tokens (``W`` = the layout's capacity), so only those are quantized and held.

A query at position ``p`` sees the keys at positions ``p - W + 1 .. p`` (transformers' sliding
window: ``kv_idx > q_idx - W``), restricted further by the model's mask, whose ``M`` columns are the
positions ``max(0, end - M) .. end - 1`` (``end`` = the last new position + 1): transformers builds
the mask of a sliding layer over its window, not over the whole sequence. This path runs in PyTorch
on every device (the fused Triton kernels read the store of a full-attention layer only).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .store import KVStore

log = logging.getLogger("mixkvq_compile")
_warned_cuda: list[bool] = []


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    store: KVStore,
    start: int,
    length: int,
    packed: int,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    kv_limit: int = -1,
) -> torch.Tensor:
    """Attend ``query`` (``[B, Hq, Lq, D]``, at positions ``start..``) to the window of stored tokens
    plus the new ``key``/``value`` (``[B, H, Lq, D]``), then append them; a write at position 0 starts
    a new sequence. ``length``/``packed``: the store header's counts. ``kv_limit`` >= 0: only positions
    below it are visible (the graph read a slice of a window that is not full yet, where positions
    are buffer slots). One SDPA with ``enable_gqa`` (no K/V copies per query head). Returns
    ``[B, Hq, Lq, Dv]`` in ``query.dtype``."""
    lay = store.layout
    if query.is_cuda and not _warned_cuda:
        _warned_cuda.append(True)
        log.warning(
            "mixkvq: sliding-window layers run on the PyTorch path (the fused kernels cover full-attention "
            "layers): their KV cache is quantized but their decode is slower than fp16; "
            "options={'quantize_sliding_windows': False} keeps them in the model's dtype"
        )
    if start == 0:
        store.reset()
        length = packed = 0
    lay.plan_write(length, packed, start, key.shape[2])  # appends only
    end = start + query.shape[2]
    new_positions = torch.arange(start, end, device=query.device)
    keys, values, positions = key.to(lay.dtype), value.to(lay.dtype), new_positions
    if start:
        reader = None
        if query.is_cuda:  # one Triton pass over the packed groups
            from .kernels.dequantize import dequantize_groups as reader
        past_key, past_value, past_positions = store.read_window(start, packed, reader)
        keys = torch.cat([past_key, keys], dim=2)
        values = torch.cat([past_value, values], dim=2)
        positions = torch.cat([past_positions, new_positions])
    mask = window_mask(attn_mask, positions, start, end, lay.capacity, is_causal, kv_limit)
    out = F.scaled_dot_product_attention(
        query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask, scale=scale, enable_gqa=True
    ).contiguous()  # the op's fake output is contiguous; CUDA SDPA may return another layout
    store.accumulate_queries(query)
    store.append(key, value, start, length=length, packed=packed)
    return out


def window_mask(
    attn_mask: torch.Tensor | None,
    positions: torch.Tensor,
    start: int,
    end: int,
    window: int,
    is_causal: bool,
    kv_limit: int = -1,
) -> torch.Tensor:
    """Mask ``[..., end - start, n]`` of the queries at ``start..end-1`` over keys at ``positions``
    (``[n]``, any order): inside the window, causal when ``is_causal``, below ``kv_limit`` when it is
    >= 0, and the model's mask (module docstring) where it has a column; keys before its first column
    are outside every window. Boolean (True = attend) unless ``attn_mask`` is additive."""
    q_pos = torch.arange(start, end, device=positions.device)[:, None]
    visible = positions > q_pos - window
    if is_causal:
        visible &= positions <= q_pos
    if kv_limit >= 0:
        visible &= positions < kv_limit
    if attn_mask is None:
        return visible
    if attn_mask.shape[-1] == 1:  # broadcast over the keys
        model = attn_mask
    else:
        columns = positions - max(0, end - attn_mask.shape[-1])
        visible &= columns >= 0
        model = attn_mask[..., columns.clamp(min=0)]
    if model.dtype == torch.bool:
        return model & visible
    return model.masked_fill(~visible, float("-inf"))
