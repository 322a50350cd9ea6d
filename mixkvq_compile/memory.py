"""``memory_report``: bytes really held by a KV cache vs. the 16-bit bytes of the same tokens;
``store_bytes``: what a layer's store would allocate, for planning (how many tokens fit)."""

from __future__ import annotations

import dataclasses

import torch

from .config import MixKVQConfig, preset_config
from .store import HEADER_FIELDS, StoreLayout, blob_of, is_handle

FP16_BYTES = 2


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """One cache layer. ``held_bytes`` counts every byte of every tensor the layer holds."""

    layer: int
    quantized: bool
    batch: int
    heads: int
    capacity: int
    tokens: int
    held_bytes: int
    fp16_capacity_bytes: int
    fp16_token_bytes: int
    dense_capacity_bytes: int  # an unquantized cache of the same capacity in the model's dtype


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    layers: tuple[LayerMemory, ...]

    @property
    def held_bytes(self) -> int:
        return sum(layer.held_bytes for layer in self.layers)

    @property
    def fp16_capacity_bytes(self) -> int:
        """What a 16-bit cache of the same capacity (``max_cache_len``) allocates."""
        return sum(layer.fp16_capacity_bytes for layer in self.layers)

    @property
    def fp16_token_bytes(self) -> int:
        """What the tokens cached right now take in 16 bits."""
        return sum(layer.fp16_token_bytes for layer in self.layers)

    @property
    def dense_capacity_bytes(self) -> int:
        """What an unquantized cache of the same capacity takes in the model's own dtype."""
        return sum(layer.dense_capacity_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """held bytes / 16-bit bytes of the same capacity."""
        return self.held_bytes / max(self.fp16_capacity_bytes, 1)

    def __str__(self) -> str:
        lines = [
            f"{'layer':>5} {'quantized':>9} {'tokens':>7} {'capacity':>8} {'held MiB':>9} {'fp16 MiB':>9}"
        ]
        for m in self.layers:
            lines.append(
                f"{m.layer:>5} {str(m.quantized):>9} {m.tokens:>7} {m.capacity:>8} "
                f"{m.held_bytes / 2**20:>9.3f} {m.fp16_capacity_bytes / 2**20:>9.3f}"
            )
        lines.append(
            f"total: {self.held_bytes / 2**20:.3f} MiB held, "
            f"{self.fp16_capacity_bytes / 2**20:.3f} MiB in fp16 "
            f"for the same capacity ({self.ratio:.3f}x); cached tokens in fp16: "
            f"{self.fp16_token_bytes / 2**20:.3f} MiB; unquantized in the model dtype: "
            f"{self.dense_capacity_bytes / 2**20:.3f} MiB "
            f"({self.held_bytes / max(self.dense_capacity_bytes, 1):.3f}x)"
        )
        return "\n".join(lines)


def memory_report(obj) -> MemoryReport:
    """Bytes held by the KV cache of ``obj``, per layer and in total.

    Args:
        obj: a transformers ``Cache`` (e.g. ``generate(..., return_dict_in_generate=True).past_key_values``),
            a model that keeps its last generation cache (transformers keeps it in ``model._cache``),
            a ``torch.compile``d module, or a module that keeps cache tensors as buffers.

    Raises:
        ValueError: no KV cache could be found in ``obj``.
    """
    pairs = _cache_pairs(obj)
    if not pairs:
        raise ValueError(
            f"no KV cache found in {type(obj).__name__}: pass the cache object "
            "(generate(..., return_dict_in_generate=True).past_key_values) or the model after generate()"
        )
    return MemoryReport(tuple(_layer_memory(i, k, v, tokens) for i, (k, v, tokens) in enumerate(pairs)))


def _cache_pairs(obj) -> list[tuple[torch.Tensor, torch.Tensor, int | None]]:
    obj = getattr(obj, "_orig_mod", obj)
    cache = getattr(obj, "_cache", None) if not hasattr(obj, "layers") else obj
    if cache is not None and hasattr(cache, "layers"):
        pairs = []
        for layer in cache.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
                length = getattr(layer, "cumulative_length", None)
                pairs.append((keys, values, int(length) if length is not None else None))
        return pairs
    if isinstance(obj, torch.nn.Module):
        handles = [t for _, t in obj.named_buffers() if is_handle(t)]
        return [(handles[i], handles[i + 1], None) for i in range(0, len(handles) - 1, 2)]
    return []


def _layer_memory(index: int, keys: torch.Tensor, values: torch.Tensor, tokens: int | None) -> LayerMemory:
    batch, heads, capacity, head_dim = keys.shape
    value_dim = values.shape[-1]
    quantized = is_handle(keys) and is_handle(values)
    if quantized:
        header = blob_of(keys)[: HEADER_FIELDS * 8].view(torch.int64)
        tokens = int(header[2])
    held = _storage_bytes(keys) + _storage_bytes(values)
    tokens = capacity if tokens is None else tokens
    per_token = batch * heads * (head_dim + value_dim) * FP16_BYTES
    return LayerMemory(
        layer=index,
        quantized=quantized,
        batch=batch,
        heads=heads,
        capacity=capacity,
        tokens=tokens,
        held_bytes=held,
        fp16_capacity_bytes=per_token * capacity,
        fp16_token_bytes=per_token * min(tokens, capacity),  # a sliding window holds its last tokens
        dense_capacity_bytes=per_token * capacity * keys.dtype.itemsize // FP16_BYTES,
    )


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def store_bytes(
    config: MixKVQConfig | str,
    batch: int,
    heads: int,
    capacity: int,
    head_dim: int,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    layer: int = 0,
    sliding: bool = False,
) -> int:
    """Bytes the quantized store of one attention layer allocates (keys and values, every region), as
    ``memory_report`` would count them once the cache exists: plan a batch or a context length before
    allocating anything.

    Args:
        config: a ``MixKVQConfig`` or a preset name (``PRESETS``); per-layer overrides (a KVmix layer
            plan) apply to layer ``layer``.
        batch, heads, capacity, head_dim: the cache's ``[batch, KV heads, max_cache_len, head_dim]``.
        value_dim: the values' head_dim (default ``head_dim``).
        dtype: the model's dtype (the full-precision window and the 16-bit key tier are kept in it).
        sliding: a sliding-window layer of ``capacity`` tokens.

    The 16-bit cache of the same capacity takes ``batch * heads * capacity * (head_dim + value_dim) * 2``
    bytes. At short capacities the full-precision window of the most recent tokens (``residual_length``
    plus one group) is most of the store.

    Raises:
        ValueError: a size that is not a positive integer, or a config the cache shape does not fit.
    """
    value_dim = head_dim if value_dim is None else value_dim
    for name, value in (
        ("batch", batch),
        ("heads", heads),
        ("capacity", capacity),
        ("head_dim", head_dim),
        ("value_dim", value_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"store_bytes: {name} must be a positive integer, got {value!r}")
    if isinstance(config, str):
        config = preset_config(config)
    layout = StoreLayout.create(
        config.for_layer(layer), batch, heads, capacity, head_dim, value_dim, dtype, sliding=sliding
    )
    return layout.blob_bytes(layout.key_regions()) + layout.blob_bytes(layout.value_regions())
