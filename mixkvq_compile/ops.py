"""Custom ops that the rewritten graph calls (namespace ``mixkvq``), with fake implementations.

- ``mixkvq::new_store`` replaces the in-graph allocation of a cache buffer pair (``torch.zeros``
  in a compiled prefill): it allocates the quantized store and returns its two handles.
- ``mixkvq::kv_attention`` replaces a cache write (``index_copy_``/index assignment) plus the
  scaled-dot-product attention that reads the cache: attention of the new queries over the stored
  tokens (dequantized) and the new tokens (full precision), then the append of the new tokens.

The store lives in the blobs behind the handle tensors (see ``store.py``); ``kv_attention`` updates
it in place through views that do not overlap the handles' visible element, so the op is declared
without mutated arguments: functionalizing it would clone the handles. The attention output is
always consumed, so the op is never eliminated, and each layer's store has exactly one such op per
graph, so no reordering can change its result.
"""

from __future__ import annotations

import torch

from . import reference
from .store import KVStore, StoreLayout, allocate


@torch.library.custom_op("mixkvq::new_store", mutates_args=(), device_types=None)
def new_store(layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate a store; returns (key handle, value handle), ``[B, H, L, D]`` with zero strides."""
    return allocate(StoreLayout.from_key(layout), device)


@new_store.register_fake
def _(layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lay = StoreLayout.from_key(layout)
    handles = []
    for dim in (lay.head_dim, lay.value_dim):
        shape = (lay.batch, lay.heads, lay.capacity, dim)
        handles.append(torch.empty(1, dtype=lay.dtype, device=device).as_strided(shape, (0, 0, 0, 0)))
    return handles[0], handles[1]


@torch.library.custom_op("mixkvq::kv_attention", mutates_args=())
def kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    key_handle: torch.Tensor,
    value_handle: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    kv_limit: int,
    layout: str,
) -> torch.Tensor:
    """Attend ``query`` to the store plus the new tokens, then append the new tokens to the store.

    Args:
        query: ``[B, Hq, Lq, D]`` post-RoPE queries.
        key, value: ``[B, H, Lq, D]`` / ``[B, H, Lq, Dv]`` new keys (post-RoPE) and values.
        positions: ``[Lq]`` int64 cache positions of the new tokens, consecutive.
        key_handle, value_handle: the store handles from ``new_store``.
        attn_mask: bool or additive mask broadcastable to ``[B, Hq, Lq, L]`` (L = cache capacity),
            or None.
        scale: softmax scale.
        is_causal: apply causal masking by position (query at position p sees keys <= p).
        kv_limit: if >= 0, only positions < kv_limit are attended (the graph sliced the cache).
        layout: ``StoreLayout.to_key()`` of the store.

    Returns:
        ``[B, Hq, Lq, Dv]`` attention output in ``query.dtype``.

    Tokens already in the store are read back dequantized; the new tokens take part in full
    precision (prefill attention is exact, as in KIVI/MixKVQ/KVmix). A write at position 0 starts a
    new sequence: the store and its query statistics are reset.
    """
    lay = StoreLayout.from_key(layout)
    store = KVStore.open(lay, key_handle, value_handle)
    start = _start_position(positions)
    if start == 0:
        store.reset()
    end = start + query.shape[2]
    past_key, past_value = store.read(start)
    keys = torch.cat([past_key, key.to(lay.dtype)], dim=2)
    values = torch.cat([past_value, value.to(lay.dtype)], dim=2)
    visible = end if kv_limit < 0 else min(end, kv_limit)
    keys, values = keys[:, :, :visible], values[:, :, :visible]
    mask = None if attn_mask is None else attn_mask[..., :visible]
    out = reference.attention(query, keys, values, mask, scale, start if is_causal else None).contiguous()
    store.accumulate_queries(query)
    store.append(key, value, start)
    return out


@kv_attention.register_fake
def _(query, key, value, positions, key_handle, value_handle, attn_mask, scale, is_causal, kv_limit, layout):
    return query.new_empty((*query.shape[:3], value.shape[-1]))


def _start_position(positions: torch.Tensor) -> int:
    """First position of a consecutive run; ``ValueError`` for non-consecutive positions."""
    if positions.dim() != 1 or positions.numel() == 0:
        raise ValueError(
            f"mixkvq: cache positions must be a non-empty 1-d tensor, got {tuple(positions.shape)}"
        )
    start = int(positions[0])
    expected = torch.arange(start, start + positions.numel(), device=positions.device)
    if not torch.equal(positions.to(expected.dtype), expected):
        raise ValueError("mixkvq: cache positions of one write must be consecutive")
    return start
