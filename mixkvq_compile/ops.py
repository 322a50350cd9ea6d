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

On CUDA the op runs the Triton kernels (``kernels/``); elsewhere, or with the diagnostic environment
variable ``MIXKVQ_DISABLE_KERNELS=1``, the pure-PyTorch reference.
"""

from __future__ import annotations

import os

import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right

from . import reference, sliding
from .chunk_attention import attend_split, is_plain_causal, supports_split
from .store import KVStore, StoreLayout, allocate


@torch.library.custom_op("mixkvq::new_store", mutates_args=(), device_types=None)
def new_store(layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate a store; returns (key handle, value handle), ``[B, H, L, D]`` (``handle_strides``)."""
    return allocate(StoreLayout.from_key(layout), device)


@new_store.register_fake
def _(layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lay = StoreLayout.from_key(layout)
    handles = []
    for dim in (lay.head_dim, lay.value_dim):
        shape = (lay.batch, lay.heads, lay.capacity, dim)
        # A fresh tensor, not a view, so AOTAutograd hands the op's own output objects to the cache.
        handles.append(torch.empty_strided(shape, lay.handle_strides, dtype=lay.dtype, device=device))
    return handles[0], handles[1]


@torch.library.custom_op("mixkvq::kv_attention", mutates_args=())
def kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor | None,
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
        positions: ``[Lq]`` int64 cache positions of the new tokens, consecutive; None: right after
            the stored tokens (a sliding-window layer whose graph does not say).
        key_handle, value_handle: the store handles from ``new_store``.
        attn_mask: bool or additive mask broadcastable to ``[B, Hq, Lq, L]`` (L = cache capacity),
            or None. Sliding-window stores: ``[..., M]``, its columns the positions ``max(0, end - M)
            ..`` (end = last new position + 1), as transformers builds it for a sliding layer.
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
    _check_shapes(lay, query, key, value)
    store = KVStore.open(lay, key_handle, value_handle)
    if lay.sliding:
        if positions is None:
            start, length, packed = _header(store)
        else:
            start, length, packed = _host_positions(positions, store)
        return sliding.attention(
            query, key, value, store, start, length, packed, attn_mask, scale, is_causal, kv_limit
        )
    if positions is None:
        raise ValueError("mixkvq: cache positions are required for a store that is not a sliding window")
    use_kernels = query.is_cuda and not kernels_disabled()
    if use_kernels and is_device_step(query.shape[2], kv_limit):
        return decode_step(query, key, value, positions, store, attn_mask, scale, is_causal)
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "mixkvq: only one-token decode steps can be captured in a CUDA graph (this call has "
            f"{query.shape[2]} query tokens); compile with options={{'cuda_graphs': False}}"
        )
    start, length, packed = _host_positions(positions, store)
    if start == 0:
        store.reset()
        length = packed = 0
    packed_before = lay.packed_kept(start, packed)
    end = start + query.shape[2]
    if end > lay.capacity:
        raise ValueError(
            f"mixkvq store: {end} tokens exceed the cache capacity of {lay.capacity} (max_cache_len); "
            "allocate a larger cache"
        )
    visible = end if kv_limit < 0 else min(end, kv_limit)
    if use_kernels and visible == end:
        out = _attend_with_kernels(
            query, key, value, store, start, packed_before, attn_mask, scale, is_causal
        )
    else:
        out = _attend_with_reference(
            query, key, value, store, start, packed_before, visible, attn_mask, scale, is_causal
        )
    store.accumulate_queries(query)
    if use_kernels:
        from .kernels.quantize import append

        append(store, key, value, start, length=length, packed=packed)
    else:
        store.append(key, value, start)
    return out


def kernels_disabled() -> bool:
    """True when ``MIXKVQ_DISABLE_KERNELS`` forces the reference path on CUDA (diagnostics)."""
    return bool(os.environ.get("MIXKVQ_DISABLE_KERNELS"))


def is_device_step(query_len: int, kv_limit: int) -> bool:
    """True when a CUDA call takes the sync-free path of ``decode_step`` (CUDA-graph capturable)."""
    return query_len == 1 and kv_limit < 0


def decode_step(query, key, value, positions, store, attn_mask, scale, is_causal):
    """One decode token on the CUDA kernels with no host read (capturable in a CUDA graph).

    The position stays on the device: the fused attention reads the store length from it, the append
    writes the token (and adds the query to the channel statistics, restarted at position 0, a new
    sequence) and flushes the group it completes in predicated launches. On compute capability 9.0+
    the append's launches overlap the attention's end (``append_token``'s ``overlap``). Positions past
    the capacity stop the program with a device-side assert (as an out-of-range ``index_copy_`` does).
    """
    from .kernels._runtime import overlap_launches
    from .kernels.decode_attention import decode_attention
    from .kernels.quantize import append_token

    if positions.dim() != 1 or positions.numel() != 1:
        raise ValueError(f"mixkvq: a decode step needs one cache position, got {tuple(positions.shape)}")
    position = positions.to(torch.int64)
    torch._assert_async(position[0] < store.layout.capacity, "mixkvq: cache position past max_cache_len")
    out = decode_attention(
        query, store, position, attn_mask, scale, new_key=key, new_value=value, causal=is_causal
    )
    # The query statistics (restarted at position 0) are updated in the append's first launch, before
    # its flush ranks the channels: as ``accumulate_queries`` after ``mul_(position != 0)`` would.
    overlap = overlap_launches(store.layout, query.device)  # as decode_attention's
    append_token(store, key, value, position, query=query if store.layout.salience else None, overlap=overlap)
    return out


def _attend_with_reference(query, key, value, store, start, packed, visible, attn_mask, scale, is_causal):
    """CPU path (and GPU fallback): dequantize the stored tokens, then SDPA in the model dtype."""
    dtype = store.layout.dtype
    past_key, past_value = store.read(start, packed)
    keys = torch.cat([past_key, key.to(dtype)], dim=2)[:, :, :visible]
    values = torch.cat([past_value, value.to(dtype)], dim=2)[:, :, :visible]
    mask = None if attn_mask is None else attn_mask[..., :visible]
    return reference.attention(query, keys, values, mask, scale, start if is_causal else None).contiguous()


# Query tokens up to which the fused kernel attends over the packed store (decode, speculative and
# short prompt chunks); longer chunks dequantize the prefix once and run SDPA, which amortizes the
# dequantization over the chunk (the fused kernel repeats it for every block of 64 query rows).
# Measured on an H200 (bench/prefill_chunk.py, 8 x 32k, bfloat16): fused 5.3 / 20.5 / 81 ms against
# 25.2 / 25.9 / 27.8 ms for the dequantize-then-SDPA path at 64 / 256 / 1024 query tokens.
FUSED_MAX_QUERY = 256
# Long chunks: one SDPA call with ``enable_gqa`` (True) or one call per query-head offset (False).
# Measured with bench/prefill_chunk.py (H200, bf16, 8 x 32k, 2026-11-26): one call 6.96 / 13.32 /
# 53.48 ms against 7.27 / 13.66 / 53.47 ms for chunks of 512 / 1024 / 4096 tokens.
ONE_GQA_CALL = True


def _attend_with_kernels(query, key, value, store, start, packed, attn_mask, scale, is_causal):
    """CUDA path: up to ``FUSED_MAX_QUERY`` queries after a stored prefix, the fused Triton kernel reads
    the packed store once, plus the new tokens; a prompt (or a long chunk) runs cuDNN/flash SDPA over
    the new tokens, after the prefix dequantized once (``store.read``; planar stores on a Triton kernel)
    when there is one."""
    lq = query.shape[2]
    if start > 0 and lq <= FUSED_MAX_QUERY:
        from .kernels.decode_attention import decode_attention

        out = decode_attention(
            query,
            store,
            start,
            attn_mask,
            scale,
            new_key=key,
            new_value=value,
            causal=is_causal,
            packed=packed,
        )
        return out.contiguous()
    dtype = store.layout.dtype
    total = start + lq
    mask = None if attn_mask is None else attn_mask[..., :total]
    # Query i sits at position start + i. The plain causal rule (no mask, or the model's mask saying no
    # more than that) needs no mask tensor: the prefix and the chunk are attended apart and merged
    # (inputs the split's GPU backends do not take, e.g. float32, keep a lower-right causal bias).
    split = (mask is None and is_causal) or (mask is not None and is_plain_causal(mask, start, total))
    if split:
        mask = None
        if not supports_split(query, key, value):
            split, mask = False, causal_lower_right(lq, total) if start else None
    tensor_mask = mask is not None and not isinstance(mask, CausalBias) and mask.dim() == 4
    # Grouped-query heads without copying K/V: one SDPA with enable_gqa (cuDNN takes it with a mask,
    # torch 2.11, H200), or one SDPA per query-head offset r (query heads r, r + n_rep, ... use KV heads
    # 0, 1, ..., as repeat_interleave pairs them: plain multi-head attention). Repeating K/V instead
    # held 2 * n_rep more bytes than the dequantized prefix (3.8 GB per layer at 8 x 28k, bfloat16).
    n_rep = query.shape[1] // key.shape[1]
    out = query.new_empty((*query.shape[:3], value.shape[-1]))
    batch = query.shape[0]
    step = _rows_per_read(store.layout, total, lq) if start else batch
    from .kernels.dequantize import dequantize_groups as reader  # one pass, no PyTorch intermediates

    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    minus_inf = torch.full((), float("-inf"), dtype=query.dtype, device=query.device)
    for b0 in range(0, batch, step):
        rows = slice(b0, b0 + step)
        if start:  # the prefix of these batch rows, dequantized once for every query head, then the chunk
            n = len(range(*rows.indices(batch)))
            keys = query.new_empty((n, key.shape[1], total, key.shape[3]), dtype=dtype)
            values = query.new_empty((n, value.shape[1], total, value.shape[3]), dtype=dtype)
            store.read_into(keys, values, start, packed, rows, dequantize_groups=reader)
            keys[:, :, start:] = key[rows]
            values[:, :, start:] = value[rows]
        else:
            keys, values = key[rows].to(dtype), value[rows].to(dtype)
        keys, values = keys.to(query.dtype), values.to(query.dtype)
        if split:
            out[rows] = attend_split(query[rows], keys, values, start, scale)
            continue
        row_mask = mask[rows] if tensor_mask and mask.shape[0] > 1 else mask
        if ONE_GQA_CALL:
            out[rows] = torch.nn.functional.scaled_dot_product_attention(
                query[rows],
                keys,
                values,
                attn_mask=row_mask,
                scale=scale,
                is_causal=is_causal and mask is None,
                enable_gqa=True,
            )
            continue
        if tensor_mask and row_mask.dtype == torch.bool:  # made additive once (one kernel), not by every SDPA
            row_mask = torch.where(row_mask, zero, minus_inf)
        for r in range(n_rep):
            head_mask = row_mask[:, r::n_rep] if tensor_mask and row_mask.shape[1] > 1 else row_mask
            out[rows, r::n_rep] = torch.nn.functional.scaled_dot_product_attention(
                query[rows, r::n_rep],
                keys,
                values,
                attn_mask=head_mask,
                scale=scale,
                is_causal=is_causal and mask is None,
            )
    return out.contiguous()


def _rows_per_read(layout, total: int, chunk: int) -> int:
    """Batch rows whose prefix is dequantized at once in a long chunk (by the Triton kernel, no
    intermediates), so that their dense keys and values (``total`` tokens, 2 bytes per element) and an
    additive mask (``chunk`` x ``total``) stay under 2 GiB: 5 rows at 32k tokens, 8 KV heads, head_dim
    128 and a 4096-token chunk. The whole batch at once would grow with the batch."""
    per_row = layout.heads * total * (layout.head_dim + layout.value_dim) * 2 + chunk * total * 2
    return max(1, (2 << 30) // per_row)


@kv_attention.register_fake
def _(query, key, value, positions, key_handle, value_handle, attn_mask, scale, is_causal, kv_limit, layout):
    return query.new_empty((*query.shape[:3], value.shape[-1]))


def _check_shapes(lay: StoreLayout, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """``ValueError`` naming the mismatch when the new tokens do not fit the store (before any kernel)."""
    expected = (lay.batch, lay.heads, key.shape[2] if key.dim() == 4 else -1)
    if key.dim() != 4 or tuple(key.shape) != (*expected, lay.head_dim):
        raise ValueError(
            f"mixkvq: new keys {tuple(key.shape)} do not fit the cache store (batch {lay.batch}, {lay.heads} "
            f"KV heads, head_dim {lay.head_dim}); a batch larger than the cache needs a new cache"
        )
    if value.dim() != 4 or tuple(value.shape) != (*expected, lay.value_dim):
        raise ValueError(f"mixkvq: new values {tuple(value.shape)} do not fit the cache store")
    if (
        query.dim() != 4
        or query.shape[0] != lay.batch
        or query.shape[1] % lay.heads
        or query.shape[3] != lay.head_dim
    ):
        raise ValueError(f"mixkvq: queries {tuple(query.shape)} do not fit the cache store")


def _header(store: KVStore) -> tuple[int, int, int]:
    """(tokens in the store, the same, packed groups): a write right after the stored tokens."""
    length, packed = store.keys["header"][2:5:2].tolist()
    return length, length, packed


def _host_positions(positions: torch.Tensor, store: KVStore) -> tuple[int, int, int]:
    """(first position of a consecutive run, tokens in the store, packed groups) with one device sync.

    ``ValueError`` for positions that are not a non-empty consecutive 1-d run (checked fully on the
    CPU; by the end points on a GPU, where HF's ``cache_position`` is an ``arange``).
    """
    if positions.dim() != 1 or positions.numel() == 0:
        raise ValueError(
            f"mixkvq: cache positions must be a non-empty 1-d tensor, got {tuple(positions.shape)}"
        )
    header = store.keys["header"][2:5:2].to(positions.device)  # tokens, packed groups
    if positions.is_cuda:
        first, last, length, packed = torch.cat([positions[:1], positions[-1:], header]).tolist()
        consecutive = last - first == positions.numel() - 1
    else:
        values = positions.tolist()
        first, (length, packed) = values[0], header.tolist()
        consecutive = values == list(range(first, first + len(values)))
    if not consecutive:
        raise ValueError("mixkvq: cache positions of one write must be consecutive")
    return first, length, packed
