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

from . import reference
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
) -> torch.Tensor:
    """Attend ``query`` (``[B, Hq, Lq, D]``, at positions ``start..``) to the window of stored tokens
    plus the new ``key``/``value`` (``[B, H, Lq, D]``), then append them; a write at position 0 starts
    a new sequence. Returns ``[B, Hq, Lq, Dv]`` in ``query.dtype``."""
    lay = store.layout
    if query.is_cuda and not _warned_cuda:
        _warned_cuda.append(True)
        log.warning(
            "mixkvq: sliding-window layers run on the PyTorch path (the fused kernels cover full-attention "
            "layers); their KV cache is quantized, their decode is not faster than fp16"
        )
    if start == 0:
        store.reset()
        length = packed = 0
    lay.plan_write(length, packed, start, key.shape[2])  # appends only
    end = start + query.shape[2]
    if start:
        past_key, past_value, origin = store.read_recent(start, packed, start - lay.capacity + 1)
        keys = torch.cat([past_key, key.to(lay.dtype)], dim=2)
        values = torch.cat([past_value, value.to(lay.dtype)], dim=2)
    else:
        keys, values, origin = key.to(lay.dtype), value.to(lay.dtype), 0
    mask = window_mask(attn_mask, origin, start, end, lay.capacity, is_causal, query.device)
    out = reference.attention(query, keys, values, mask, scale, None).contiguous()
    store.accumulate_queries(query)
    store.append(key, value, start)
    return out


def window_mask(
    attn_mask: torch.Tensor | None,
    origin: int,
    start: int,
    end: int,
    window: int,
    is_causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Mask ``[..., end - start, end - origin]`` of the queries at ``start..end-1`` over the keys at
    ``origin..end-1``: inside the window, causal when ``is_causal``, and the model's mask (module
    docstring) where it has a column; keys before its first column are outside every window.
    Boolean (True = attend) unless ``attn_mask`` is additive."""
    k_pos = torch.arange(origin, end, device=device)
    q_pos = torch.arange(start, end, device=device)[:, None]
    visible = k_pos > q_pos - window
    if is_causal:
        visible &= k_pos <= q_pos
    if attn_mask is None:
        return visible
    columns = k_pos - max(0, end - attn_mask.shape[-1])
    visible &= columns >= 0
    model = attn_mask[..., columns.clamp(min=0)]
    if model.dtype == torch.bool:
        return model & visible
    return model.masked_fill(~visible, float("-inf"))
