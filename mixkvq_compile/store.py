"""The quantized KV store: layout, allocation, append (with group flushes) and dequantized reads.

Memory ownership: the store of one attention layer lives in two byte blobs, one for keys and one for
values. Each blob is handed to the model as a *handle*: a tensor of the cache buffer's shape
``[B, H_kv, L, D]`` and dtype whose strides are all 0, so it points at one scratch element of the
blob's header and holds no fp16 KV memory. The model's cache object (e.g. transformers'
``StaticLayer.keys``) keeps the handle, which keeps the blob alive; when the cache is dropped, so is
the store. ``cache.reset()`` (``zero_()``) only writes the scratch element. A sliding-window store's
handles have strides of 1 over a scratch region of ``B + H + L + D`` elements instead: transformers
ends such a layer's cache update with ``buffer.copy_(...)`` (erased by the rewrite, but traced
first), and ``copy_`` refuses a destination with a zero stride; strides of 1 overlap too, but pass
that check.

Token placement (``n`` tokens written, positions ``0..n-1``):
- positions ``< S`` (sink tokens) stay in full precision in ``sink``;
- ``P`` groups of ``G`` tokens after the sinks are packed (keys per channel in mixed tiers, values
  per token); ``P`` is kept in the header and grows after each write (``StoreLayout.groups_after``):
  of the ``F = n - S - P * G`` full-precision tokens, ``keep(F) = max(R, floor(r * F))`` stay and
  the oldest whole groups of the rest are packed (r = ``rpc_ratio``; with r = 0, the default,
  ``P = max(0, n - S - R) // G`` whatever the history of writes);
- the full-precision rest sits in a ring buffer of ``W = min(max(R, r * (L - S)) + G, L - S)``
  slots, token ``p`` at slot ``(p - S) % W``.

Sliding-window stores (``StoreLayout.sliding``, a layer that keeps only its last ``L`` tokens, e.g.
transformers' ``StaticSlidingWindowLayer``; ``L`` is then the window, and positions grow past it):
no sinks and no RPC; the ring has ``R + G`` slots; packed groups live in a ring of
``num_groups = max(1, ceil((L - 1 - R) / G))`` slots, group ``g`` at slot ``g % num_groups``, which
is exactly what the queries of the next write can see (``L`` positions back from the first of them;
``read_window``); older groups are overwritten. Writes only append (or start over at position 0).

Key group layout (per batch row ``b``, KV head ``h``, group ``g``): ``order[b, h, g]`` is a
permutation of the ``D`` channels, high tier first, then mid, then low (each ascending). Tier
``t`` with ``c_t`` channels stores ``[c_t, G]`` full-precision values (16-bit tier) or packed codes
``[c_t, G * bits // 8]`` plus float16 ``(scale, zero)`` per channel. With a single non-empty tier the
order is the identity and is not stored. Values store codes ``[G, Dv * bits // 8]`` and float16
``(scale, zero)`` per (token, ``value_group_size`` channels).

Planar layout (``StoreLayout.planar``: uniform 2-bit keys and 2-bit values, float16/bfloat16, head
dims 128 or 256): the same codes and (scale, zero), ordered for the decode kernel's tensor cores.
Codes are int16 words of 8 two-bit fields (``reference.pack_planar``), packed along channels: keys
``[G, D / 8]`` per group (token-major), values ``[Dv / 8, G]`` (tokens contiguous); key qparams
``[2, D]`` (scales, then zeros) and value qparams ``[2, Dv / value_group_size, G]``. Same bytes as the
default layout.

Planar layout of mixed key tiers (``StoreLayout.planar_mixed``: tiers of 16, 4 and 2 bits, at most 64
channels in the first two, values as in the planar layout): every channel has a 2-bit field in planar
words ``[G, D / 8]`` with its (scale, zero) in ``[2, D]``, in channel order, so the decode kernel reads
them as a kivi2 group.
A 2-bit channel holds its code; a 4-bit channel the high 2 bits of its code, with scale ``4 * s4``; a
16-bit channel 0 with scale and zero 0. The rest, in tier order: ``order [high + mid]`` (the channels of
the high and mid tiers), the low 2 bits of each 4-bit code ``[mid, G / 4]`` (``reference.pack``) with
``s4`` ``[mid]``, and the 16-bit channels ``[high, G]``. The codes are the default layout's: both
dequantize to the same keys. Key bytes: -1.4% at 4 / 16 / 108 channels of 128, +4.7% at 13 / 26 / 89.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import zlib

import torch

from . import reference
from .config import MixKVQConfig

MAGIC = 0x6D69786B7671  # "mixkvq"
# int64: [0] scratch under the handle, [1] magic, [2] tokens written, [3] layout hash, [4] packed groups,
# [5] the group a decode step's append must pack (-1: none; written by the step's ring write)
HEADER_FIELDS = 8
ALIGN = 64
#: Strides of a store handle (module docstring): full-attention stores, sliding-window stores.
HANDLE_STRIDES = ((0, 0, 0, 0), (1, 1, 1, 1))


@dataclasses.dataclass(frozen=True)
class WritePlan:
    """Where a write lands: ``end`` = new length; groups packed before/after it; first unpacked position."""

    end: int
    old_groups: int
    new_groups: int
    pending_start: int


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Static shape of one layer's store. All sizes are fixed at compile time."""

    batch: int
    heads: int
    capacity: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    group_size: int
    value_group_size: int
    residual_length: int
    sink_tokens: int
    key_channels: tuple[int, int, int]
    key_bits: tuple[int, int, int]
    value_bits: int
    salience: bool
    rpc_permille: int = 0
    sliding: bool = False  # keeps only the last ``capacity`` tokens (module docstring)
    # Mixed key tiers in the planar code layout, where ``planar_mixed`` allows it (module docstring);
    # ``create`` asks for it (decode 2.9x faster than the default layout at 8 x 32k, H200); False keeps
    # the default layout (the tests compare the two).
    planar_tiers: bool = False

    @classmethod
    def create(
        cls,
        config: MixKVQConfig,
        batch: int,
        heads: int,
        capacity: int,
        head_dim: int,
        value_dim: int,
        dtype: torch.dtype,
        sliding: bool = False,
    ) -> StoreLayout:
        """Layout for a ``[batch, heads, capacity, head_dim]`` cache under ``config`` (one layer);
        ``sliding``: a sliding-window layer of ``capacity`` tokens (no sinks, no RPC)."""
        if value_dim % config.value_group_size and config.value_bits != 16:
            raise ValueError(
                f"value_group_size={config.value_group_size} does not divide the model's value head_dim "
                f"{value_dim}; choose a divisor of {value_dim}"
            )
        channels = config.tier_channels(head_dim)
        return cls(
            batch=batch,
            heads=heads,
            capacity=capacity,
            head_dim=head_dim,
            value_dim=value_dim,
            dtype=dtype,
            group_size=config.group_size,
            value_group_size=config.value_group_size,
            residual_length=config.residual_length,
            sink_tokens=0 if sliding else min(config.sink_tokens, capacity),
            key_channels=channels,
            key_bits=config.key_bits,
            value_bits=config.value_bits,
            salience=config.key_tiering.query_aware and sum(c > 0 for c in channels) > 1,
            rpc_permille=0 if sliding else config.rpc_permille,
            sliding=sliding,
            planar_tiers=True,
        )

    def to_key(self) -> str:
        """A string that identifies this layout (a custom-op argument); inverse of ``from_key``."""
        fields = dataclasses.asdict(self)
        fields["dtype"] = str(self.dtype).removeprefix("torch.")
        return json.dumps(fields, sort_keys=True)

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def from_key(key: str) -> StoreLayout:
        fields = json.loads(key)
        fields["dtype"] = getattr(torch, fields["dtype"])
        for name in ("key_channels", "key_bits"):
            fields[name] = tuple(fields[name])
        return StoreLayout(**fields)

    @functools.cached_property
    def fingerprint(self) -> int:
        """A 31-bit hash of the layout, kept in the header to catch a store opened with another layout."""
        return zlib.crc32(self.to_key().encode()) & 0x7FFFFFFF

    @property
    def window(self) -> int:
        """Ring-buffer slots of the full-precision window: the most tokens a write can leave there."""
        if self.sliding:
            return self.residual_length + self.group_size
        span = self.capacity - self.sink_tokens
        return min(max(self.residual_length, self.rpc_permille * span // 1000) + self.group_size, span)

    @property
    def num_groups(self) -> int:
        """Packed groups the store can hold (sliding stores: slots of the group ring)."""
        if self.sliding:
            return max(1, -(-(self.capacity - 1 - self.residual_length) // self.group_size))
        return max(0, self.capacity - self.sink_tokens - self.residual_length) // self.group_size

    @property
    def mixed_keys(self) -> bool:
        """True when more than one key tier is non-empty (a per-group channel order is stored)."""
        return sum(c > 0 for c in self.key_channels) > 1

    @property
    def key_tier(self) -> int | None:
        """Index of the only non-empty key tier, or None when the tiers are mixed."""
        tiers = [t for t, channels in enumerate(self.key_channels) if channels]
        return tiers[0] if len(tiers) == 1 else None

    @property
    def planar(self) -> bool:
        """True when groups use the planar code layout (module docstring): one 2-bit key tier, 2-bit
        values, a float16/bfloat16 store, head dims 128 or 256, groups of >= 16 tokens and value groups
        that are whole multiples of ``Dv / 8`` channels (at most 16 of them per token)."""
        return self.key_tier is not None and self.key_bits[self.key_tier] == 2 and self._planar_shapes()

    @property
    def planar_mixed(self) -> bool:
        """True when the key tiers (16, 4, 2 bits; the 2-bit one not empty, at most 64 channels in the
        others) use the planar layout of mixed tiers (module docstring), as asked by ``planar_tiers``;
        values and shapes as for ``planar``."""
        high, mid, low = self.key_channels
        return (
            self.planar_tiers
            and self.mixed_keys
            and self.key_bits == (16, 4, 2)
            and low > 0
            and high + mid <= 64
            and self._planar_shapes()
        )

    @property
    def planar_words(self) -> bool:
        """True for ``planar`` and ``planar_mixed`` stores: values in the planar code layout, and packed
        groups that ``planar_attention.planar_split_kernel`` reads."""
        return self.planar or self.planar_mixed

    @property
    def planar_key_tier(self) -> int | None:
        """The key tier whose ``codes`` and ``qparams`` are the planar words of a ``planar_words`` store:
        the only tier of a ``planar`` one, the 2-bit tier (2) of a ``planar_mixed`` one; else None."""
        return 2 if self.planar_mixed else self.key_tier if self.planar else None

    def _planar_shapes(self) -> bool:
        fields_k, fields_v = self.head_dim // 8, self.value_dim // 8
        return (
            self.value_bits == 2
            and self.dtype in (torch.float16, torch.bfloat16)
            and self.head_dim in (128, 256)
            and self.value_dim in (128, 256)
            and self.group_size >= 16
            and self.value_group_size % fields_v == 0
            and self.value_dim // self.value_group_size <= 16
            and fields_k >= 16
        )

    def keep(self, fp_tokens: int) -> int:
        """Full-precision tokens kept of ``fp_tokens``: ``max(R, floor(r * F))`` (integer arithmetic)."""
        return max(self.residual_length, self.rpc_permille * fp_tokens // 1000)

    def groups_after(self, packed: int, end: int) -> int:
        """Packed groups after a write that leaves ``end`` tokens in a store with ``packed`` groups."""
        fp = end - self.sink_tokens - packed * self.group_size
        if fp <= 0:
            return packed
        flushed = packed + max(0, fp - self.keep(fp)) // self.group_size
        return flushed if self.sliding else min(flushed, self.num_groups)

    def packed_kept(self, position: int, packed: int) -> int:
        """Of ``packed`` packed groups, those before ``position``: all of them, or none when
        ``position`` lies in the sinks (a write there rewinds past every group and repacks them)."""
        return 0 if position < self.sink_tokens else packed

    def flushed_groups(self, length: int) -> int:
        """Packed groups once ``length`` tokens are written into an empty store in one write (with
        ``rpc_ratio = 0``, after any sequence of writes that ends at ``length``)."""
        return self.groups_after(0, length)

    def plan_write(self, length: int, packed: int, start: int, count: int) -> WritePlan:
        """Check a write of ``count`` tokens at ``start`` into a store holding ``length`` tokens, of
        which ``packed`` groups are packed.

        ``start`` must equal ``length`` (append) or lie in the full-precision window (a rewind that
        overwrites unflushed tokens; a rewind into the sinks repacks every group); writing into packed
        groups or past the capacity is refused. Sliding stores take appends only (and writes at 0,
        which the caller turns into a reset), at any position.
        """
        if self.sliding and start != length:
            raise ValueError(
                f"mixkvq sliding-window store: write at position {start} after {length} tokens; a "
                "sliding-window layer only appends (or starts over at position 0)"
            )
        if start > length:
            raise ValueError(f"mixkvq store: write at position {start} leaves a gap after {length} tokens")
        kept_flushed = self.sink_tokens + packed * self.group_size
        if start < length and self.sink_tokens <= start < kept_flushed:
            raise ValueError(
                f"mixkvq store: position {start} is already quantized (tokens < {kept_flushed} are packed); "
                "rewinding a cache is supported only within the full-precision window"
            )
        end = start + count
        if end > self.capacity and not self.sliding:
            raise ValueError(
                f"mixkvq store: {end} tokens exceed the cache capacity of {self.capacity} "
                "(max_cache_len); allocate a larger cache"
            )
        old_groups = self.packed_kept(start, packed)
        return WritePlan(
            end,
            old_groups,
            self.groups_after(old_groups, end),
            self.sink_tokens + old_groups * self.group_size,
        )

    def key_regions(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor in the key blob, in blob order."""
        b, h, d, ng, g = self.batch, self.heads, self.head_dim, self.num_groups, self.group_size
        regions = {
            "header": ((HEADER_FIELDS,), torch.int64),
            **self._scratch(),
            "sink": ((b, h, self.sink_tokens, d), self.dtype),
            "ring": ((b, h, self.window, d), self.dtype),
        }
        if self.planar_mixed:
            high, mid, _ = self.key_channels
            regions["order"] = ((b, h, ng, high + mid), torch.uint8)
            regions["tier2_codes"] = ((b, h, ng, g, d // 8), torch.int16)
            regions["tier2_qparams"] = ((b, h, ng, 2, d), torch.float16)
            if mid:
                regions["tier1_codes"] = ((b, h, ng, mid, g * 2 // 8), torch.uint8)
                regions["tier1_scales"] = ((b, h, ng, mid), torch.float16)
            if high:
                regions["tier0_values"] = ((b, h, ng, high, g), self.dtype)
        else:
            if self.mixed_keys:
                regions["order"] = ((b, h, ng, d), torch.uint8)
            for tier, (channels, bits) in enumerate(zip(self.key_channels, self.key_bits)):
                if channels == 0:
                    continue
                if bits == 16:
                    regions[f"tier{tier}_values"] = ((b, h, ng, channels, g), self.dtype)
                elif self.planar:
                    regions[f"tier{tier}_codes"] = ((b, h, ng, g, d // 8), torch.int16)
                    regions[f"tier{tier}_qparams"] = ((b, h, ng, 2, d), torch.float16)
                else:
                    regions[f"tier{tier}_codes"] = ((b, h, ng, channels, g * bits // 8), torch.uint8)
                    regions[f"tier{tier}_qparams"] = ((b, h, ng, channels, 2), torch.float16)
        if self.salience:
            regions["query_abs_sum"] = ((b, h, d), torch.float32)
            regions["query_count"] = ((b, h), torch.float32)
        return regions

    def value_regions(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor in the value blob, in blob order."""
        b, h, dv, ng, g = self.batch, self.heads, self.value_dim, self.num_groups, self.group_size
        regions = {
            "header": ((HEADER_FIELDS,), torch.int64),
            **self._scratch(),
            "sink": ((b, h, self.sink_tokens, dv), self.dtype),
            "ring": ((b, h, self.window, dv), self.dtype),
        }
        if self.value_bits == 16:
            regions["values"] = ((b, h, ng, g, dv), self.dtype)
        elif self.planar_words:
            regions["codes"] = ((b, h, ng, dv // 8, g), torch.int16)
            regions["qparams"] = ((b, h, ng, 2, dv // self.value_group_size, g), torch.float16)
        else:
            regions["codes"] = ((b, h, ng, g, dv * self.value_bits // 8), torch.uint8)
            regions["qparams"] = ((b, h, ng, g, dv // self.value_group_size, 2), torch.float16)
        return regions

    @property
    def handle_strides(self) -> tuple[int, int, int, int]:
        """Strides of this store's handles (module docstring)."""
        return HANDLE_STRIDES[1] if self.sliding else HANDLE_STRIDES[0]

    def _scratch(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The memory under a sliding-window handle with strides of 1 (none for zero strides)."""
        if not self.sliding:
            return {}
        size = self.batch + self.heads + self.capacity + max(self.head_dim, self.value_dim)
        return {"scratch": ((size,), self.dtype)}

    def blob_bytes(self, regions: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
        """Bytes of a blob holding ``regions`` (each region aligned to 64 bytes)."""
        return _offsets(regions)[1]


def _offsets(regions: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[dict[str, int], int]:
    offsets, cursor = {}, 0
    for name, (shape, dtype) in regions.items():
        offsets[name] = cursor
        nbytes = math.prod(shape) * dtype.itemsize
        cursor += -(-nbytes // ALIGN) * ALIGN
    return offsets, cursor


# Blobs allocated by this process: data_ptr -> (bytes, layout fingerprint). Lets ``KVStore.open`` skip
# reading the header (a device sync per call on CUDA) for a blob it allocated itself; ``allocate``
# overwrites the entry when a new blob lands at a freed blob's address.
_VERIFIED: dict[int, tuple[int, int]] = {}


def allocate(layout: StoreLayout, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate a fresh store; returns the (key, value) handles ``[B, H, L, D]`` (``handle_strides``)."""
    handles = []
    for regions, dim in ((layout.key_regions(), layout.head_dim), (layout.value_regions(), layout.value_dim)):
        blob = torch.zeros(layout.blob_bytes(regions), dtype=torch.uint8, device=device)
        header = _region(blob, regions, "header")
        header.zero_()
        header[1] = MAGIC
        header[3] = layout.fingerprint
        _VERIFIED[blob.data_ptr()] = (blob.numel(), layout.fingerprint)
        shape = (layout.batch, layout.heads, layout.capacity, dim)
        under = _region(blob, regions, "scratch") if layout.sliding else blob[: layout.dtype.itemsize]
        handle = under.view(layout.dtype).as_strided(shape, layout.handle_strides)
        # The decode graph must read this very tensor: CUDA graphs would otherwise copy it (a copy of a
        # zero-stride tensor is one element, not the store) into a static input buffer.
        torch._dynamo.mark_static_address(handle)
        handles.append(handle)
    return handles[0], handles[1]


def has_handle_shape(tensor: torch.Tensor) -> bool:
    """True for a non-empty 4-d tensor with a store handle's strides (``HANDLE_STRIDES``); fake
    tensors included (no memory is read)."""
    return tensor.dim() == 4 and tensor.numel() > 0 and tensor.stride() in HANDLE_STRIDES


def is_handle(tensor: torch.Tensor) -> bool:
    """True for a store handle: ``has_handle_shape`` over a blob with our magic."""
    if not has_handle_shape(tensor):
        return False
    storage = tensor.untyped_storage()
    if storage.nbytes() < HEADER_FIELDS * 8 or tensor.device.type == "meta":
        return False
    header = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)[: HEADER_FIELDS * 8]
    return int(header.view(torch.int64)[1]) == MAGIC


def blob_of(handle: torch.Tensor) -> torch.Tensor:
    """The uint8 blob behind a handle."""
    storage = handle.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=handle.device).set_(storage)


def _region(blob: torch.Tensor, regions: dict, name: str) -> torch.Tensor:
    offsets, total = _offsets(regions)
    if blob.numel() < total:
        raise ValueError(f"mixkvq store blob has {blob.numel()} bytes, the layout needs {total}")
    shape, dtype = regions[name]
    nbytes = math.prod(shape) * dtype.itemsize
    return blob[offsets[name] : offsets[name] + nbytes].view(dtype).view(shape)


@dataclasses.dataclass
class KVStore:
    """Typed views of one layer's store (keys and values) over the two blobs."""

    layout: StoreLayout
    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]

    @classmethod
    def open(cls, layout: StoreLayout, key_handle: torch.Tensor, value_handle: torch.Tensor) -> KVStore:
        """Views of the store behind two handles; ``ValueError`` if they are not mixkvq handles."""
        for name, handle in (("key", key_handle), ("value", value_handle)):
            storage = handle.untyped_storage()
            known = _VERIFIED.get(storage.data_ptr()) == (storage.nbytes(), layout.fingerprint)
            if known and handle.dim() == 4 and handle.stride() == layout.handle_strides:
                continue
            if handle.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"mixkvq: the {name} cache handle seen while capturing a CUDA graph is not the store "
                    "allocated by the compiled prefill (CUDA graphs copied it, or it comes from another "
                    "process); compile with options={'cuda_graphs': False} and report this"
                )
            if not is_handle(handle):
                raise ValueError(
                    f"the {name} cache buffer is not a mixkvq store (it was allocated outside the graph "
                    "compiled with backend='mixkvq'); run the prefill through the compiled forward"
                )
            if int(blob_of(handle)[: HEADER_FIELDS * 8].view(torch.int64)[3]) != layout.fingerprint:
                raise ValueError(
                    "this mixkvq store was allocated with another layout (config or shapes changed since "
                    "the cache was created); create a new cache for the new configuration"
                )
        key_blob, value_blob = blob_of(key_handle), blob_of(value_handle)
        key_regions, value_regions = layout.key_regions(), layout.value_regions()
        store = cls(
            layout,
            {name: _region(key_blob, key_regions, name) for name in key_regions},
            {name: _region(value_blob, value_regions, name) for name in value_regions},
        )
        return store

    @property
    def length(self) -> int:
        """Tokens written so far."""
        return int(self.keys["header"][2])

    @property
    def packed_groups(self) -> int:
        """Groups packed so far."""
        return int(self.keys["header"][4])

    def set_length(self, length: int, packed: int | None = None) -> None:
        """Set the token count and the packed-group count (default: ``flushed_groups(length)``)."""
        packed = self.layout.flushed_groups(length) if packed is None else packed
        for header in (self.keys["header"], self.values["header"]):
            header[2] = length
            header[4] = packed

    def reset(self) -> None:
        """Forget every token and every query statistic."""
        self.set_length(0)
        if self.layout.salience:
            self.keys["query_abs_sum"].zero_()
            self.keys["query_count"].zero_()

    def read(
        self,
        length: int,
        packed: int | None = None,
        rows: slice = slice(None),
        dequantize_groups=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys ``[B, H, length, D]`` and values ``[B, H, length, Dv]`` at positions < length.

        Sinks and residual tokens come back exactly; packed groups in float32 rounded to the model dtype.
        ``packed`` is the store's packed-group count when the caller knows it (saves a header read);
        ``length`` must not end inside the packed groups. ``rows``: only these batch rows (``B`` is then
        the slice's length), to bound the memory of a long read. ``dequantize_groups``: see
        ``read_into``.
        """
        lay = self.layout
        batch = len(range(*rows.indices(lay.batch)))
        device = self.keys["ring"].device
        keys = torch.empty((batch, lay.heads, length, lay.head_dim), dtype=lay.dtype, device=device)
        values = torch.empty((batch, lay.heads, length, lay.value_dim), dtype=lay.dtype, device=device)
        self.read_into(keys, values, length, packed, rows, dequantize_groups)
        return keys, values

    def read_into(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        length: int,
        packed: int | None = None,
        rows: slice = slice(None),
        dequantize_groups=None,
    ) -> None:
        """``read`` into ``keys [B, H, >= length, D]`` / ``values [B, H, >= length, Dv]`` (views in the
        store dtype, e.g. the front of a buffer that also takes a prompt chunk): positions < length are
        written, nothing else. ``dequantize_groups(store, count, rows, out=(keys, values))`` replaces
        the PyTorch dequantization of the first ``count`` packed groups (it must write the same values,
        e.g. ``kernels.dequantize.dequantize_groups``).
        """
        lay = self.layout
        if lay.sliding:
            raise ValueError("mixkvq: a sliding-window store is read with read_window")
        sinks = min(lay.sink_tokens, length)
        groups = lay.packed_kept(length, self.packed_groups if packed is None else packed)
        if length < lay.sink_tokens + groups * lay.group_size:
            if length > lay.sink_tokens:
                raise ValueError(
                    f"mixkvq store: cannot read {length} tokens, positions {lay.sink_tokens}.."
                    f"{lay.sink_tokens + groups * lay.group_size - 1} are packed as whole groups"
                )
            groups = 0
        start = lay.sink_tokens + groups * lay.group_size
        keys[:, :, :sinks] = self.keys["sink"][rows, :, :sinks]
        values[:, :, :sinks] = self.values["sink"][rows, :, :sinks]
        if groups:
            out = (keys[:, :, lay.sink_tokens : start], values[:, :, lay.sink_tokens : start])
            if dequantize_groups is not None:
                dequantize_groups(self, groups, rows, out=out)
            else:
                out[0].copy_(self._dequantize_key_groups(groups, rows))
                out[1].copy_(self._dequantize_value_groups(groups, rows))
        if length > start:
            slots = (torch.arange(start, length, device=keys.device) - lay.sink_tokens) % max(lay.window, 1)
            keys[:, :, start:length] = self.keys["ring"][rows][:, :, slots]
            values[:, :, start:length] = self.values["ring"][rows][:, :, slots]

    def accumulate_queries(self, query: torch.Tensor) -> None:
        """Add ``|query|`` (``[B, Hq, Lq, D]``, post-RoPE) to the per-KV-head channel statistics.

        The statistic is a running sum of |q_d| over the query heads of each KV head and over every
        query token (prefill chunks and decode steps alike), with a count of the summands, so
        ``query_importance`` is the mean over the query heads of a KV head (not the sum: the scale of
        A_d does not depend on the GQA ratio) and over the whole sequence so far (a cumulative mean,
        the "running accumulator" of MixKVQ; reset when a new sequence starts at position 0).
        """
        if not self.layout.salience:
            return
        b, hq, lq, d = query.shape
        grouped = query.detach().float().abs().reshape(b, self.layout.heads, hq // self.layout.heads, lq, d)
        per_head = grouped.sum(dim=3)  # [B, H, Hq / H, D]
        total = per_head[:, :, 0]
        for r in range(1, per_head.shape[2]):  # in order: the decode kernel sums the same way, bit for bit
            total = total + per_head[:, :, r]
        self.keys["query_abs_sum"].add_(total)
        self.keys["query_count"].add_(float(grouped.shape[2] * lq))

    def append(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        start: int,
        length: int | None = None,
        packed: int | None = None,
    ) -> None:
        """Write ``key``/``value`` ``[B, H, Lq, D]`` at positions ``start..start+Lq-1`` and flush groups.

        ``start`` must equal the current length (append) or lie in the full-precision residual (a
        rewind that overwrites unflushed tokens); writing into packed groups is refused. ``length``
        and ``packed``: the header's token and packed-group counts when the caller has read them
        (saves two device syncs on CUDA).
        """
        lay = self.layout
        length = self.length if length is None else length
        packed = self.packed_groups if packed is None else packed
        plan = lay.plan_write(length, packed, start, key.shape[2])
        end, old_groups, new_groups, pending_start = (
            plan.end,
            plan.old_groups,
            plan.new_groups,
            plan.pending_start,
        )
        # Full-precision tokens from pending_start to end: old ones from the ring, new ones from the input.
        old_positions = torch.arange(pending_start, max(pending_start, start), device=key.device)
        old_slots = (old_positions - lay.sink_tokens) % max(lay.window, 1)
        first_new = max(lay.sink_tokens, start)
        new_k, new_v = key[:, :, first_new - start :], value[:, :, first_new - start :]
        pending_k = torch.cat([self.keys["ring"][:, :, old_slots], new_k.to(lay.dtype)], dim=2)
        pending_v = torch.cat([self.values["ring"][:, :, old_slots], new_v.to(lay.dtype)], dim=2)
        # Sinks.
        if start < lay.sink_tokens:
            count = min(end, lay.sink_tokens) - start
            self.keys["sink"][:, :, start : start + count] = key[:, :, :count]
            self.values["sink"][:, :, start : start + count] = value[:, :, :count]
        # Whole groups leave the window.
        flush_tokens = (new_groups - old_groups) * lay.group_size
        # A sliding store keeps the last ``num_groups`` of them (older ones would be overwritten).
        dropped = max(0, new_groups - old_groups - lay.num_groups) if lay.sliding else 0
        if flush_tokens:
            kept = slice(dropped * lay.group_size, flush_tokens)
            self._store_groups(old_groups + dropped, pending_k[:, :, kept], pending_v[:, :, kept])
        # The remainder goes to the ring.
        remain_start = pending_start + flush_tokens
        if end > remain_start:
            slots = (torch.arange(remain_start, end, device=key.device) - lay.sink_tokens) % lay.window
            self.keys["ring"][:, :, slots] = pending_k[:, :, flush_tokens:]
            self.values["ring"][:, :, slots] = pending_v[:, :, flush_tokens:]
        self.set_length(end, new_groups)

    # -- packed groups -------------------------------------------------------------------------

    def _store_groups(self, first: int, key: torch.Tensor, value: torch.Tensor) -> None:
        lay = self.layout
        b, h, t, d = key.shape
        count, g = t // lay.group_size, lay.group_size
        groups = self._group_slots(first, first + count)
        k = key.float().reshape(b, h, count, g, d).transpose(-1, -2)  # [B, H, n, D, G]
        order = self._choose_key_order(k)
        k_sorted = torch.gather(k, 3, order.unsqueeze(-1).expand(-1, -1, -1, -1, g))
        if lay.planar_mixed:
            self._store_planar_mixed_keys(groups, order, k_sorted)
        else:
            self._store_key_tiers(groups, order, k_sorted)
        v = value.reshape(b, h, count, g, lay.value_dim)
        if lay.value_bits == 16:
            self.values["values"][:, :, groups] = v.to(lay.dtype)
        elif lay.planar_words:
            grouped = v.float().reshape(b, h, count, g, -1, lay.value_group_size)
            scale, zero = reference.choose_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), lay.value_bits)
            codes = reference.quantize(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), lay.value_bits)
            words = reference.pack_planar(codes.reshape(b, h, count, g, lay.value_dim))
            self.values["codes"][:, :, groups] = words.transpose(-1, -2)
            self.values["qparams"][:, :, groups] = torch.stack([scale, zero], dim=3).transpose(-1, -2)
        else:
            grouped = v.float().reshape(b, h, count, g, -1, lay.value_group_size)
            codes, qparams = reference.quantize_groups(grouped, lay.value_bits)
            self.values["codes"][:, :, groups] = codes.reshape(b, h, count, g, -1)
            self.values["qparams"][:, :, groups] = qparams

    def _store_key_tiers(self, groups, order: torch.Tensor, k_sorted: torch.Tensor) -> None:
        """Keys of ``n`` groups in the default or the planar layout, tier by tier: ``order [B, H, n, D]``
        (high tier first), ``k_sorted [B, H, n, D, G]`` float32 in that order."""
        lay = self.layout
        if lay.mixed_keys:
            self.keys["order"][:, :, groups] = order.to(torch.uint8)
        offset = 0
        for tier, (channels, bits) in enumerate(zip(lay.key_channels, lay.key_bits)):
            if channels == 0:
                continue
            part = k_sorted[:, :, :, offset : offset + channels]
            offset += channels
            if bits == 16:
                self.keys[f"tier{tier}_values"][:, :, groups] = part.to(lay.dtype)
            elif lay.planar:
                scale, zero = reference.choose_qparams(part.amin(dim=-1), part.amax(dim=-1), bits)
                codes = reference.quantize(part, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
                self.keys[f"tier{tier}_codes"][:, :, groups] = reference.pack_planar(codes.transpose(-1, -2))
                self.keys[f"tier{tier}_qparams"][:, :, groups] = torch.stack([scale, zero], dim=3)
            else:
                codes, qparams = reference.quantize_groups(part, bits)
                self.keys[f"tier{tier}_codes"][:, :, groups] = codes
                self.keys[f"tier{tier}_qparams"][:, :, groups] = qparams

    def _store_planar_mixed_keys(self, groups, order: torch.Tensor, k_sorted: torch.Tensor) -> None:
        """Keys of ``n`` groups in the planar layout of mixed tiers (module docstring): ``order [B, H, n,
        D]`` (high tier first, then mid, then low), ``k_sorted [B, H, n, D, G]`` float32 in that order.
        The 4-bit codes are those of the default layout, so both dequantize to the same keys."""
        lay = self.layout
        high, mid, _ = lay.key_channels
        sel = high + mid
        self.keys["order"][:, :, groups] = order[..., :sel].to(torch.uint8)
        codes = torch.zeros(k_sorted.shape, dtype=torch.uint8, device=k_sorted.device)
        scale = torch.zeros(k_sorted.shape[:-1], dtype=torch.float16, device=k_sorted.device)
        zero = torch.zeros_like(scale)
        if high:
            self.keys["tier0_values"][:, :, groups] = k_sorted[:, :, :, :high].to(lay.dtype)
        if mid:
            part = k_sorted[:, :, :, high:sel]
            s4, z4 = reference.choose_qparams(part.amin(dim=-1), part.amax(dim=-1), 4)
            c4 = reference.quantize(part, s4.unsqueeze(-1), z4.unsqueeze(-1), 4)
            codes[:, :, :, high:sel] = c4 >> 2  # the high 2 bits, in the planar words at weight 4 * s4
            scale[:, :, :, high:sel] = (s4.float() * 4).to(torch.float16)  # exact
            zero[:, :, :, high:sel] = z4
            self.keys["tier1_codes"][:, :, groups] = reference.pack(c4 & 3, 2)
            self.keys["tier1_scales"][:, :, groups] = s4
        low = k_sorted[:, :, :, sel:]
        s2, z2 = reference.choose_qparams(low.amin(dim=-1), low.amax(dim=-1), 2)
        codes[:, :, :, sel:] = reference.quantize(low, s2.unsqueeze(-1), z2.unsqueeze(-1), 2)
        scale[:, :, :, sel:] = s2
        zero[:, :, :, sel:] = z2
        # Back to channel order: the planar words and their (scale, zero) cover every channel.
        natural = torch.empty_like(codes).scatter_(3, order.unsqueeze(-1).expand_as(codes), codes)
        scale = torch.empty_like(scale).scatter_(3, order, scale)
        zero = torch.empty_like(zero).scatter_(3, order, zero)
        self.keys["tier2_codes"][:, :, groups] = reference.pack_planar(natural.transpose(-1, -2))
        self.keys["tier2_qparams"][:, :, groups] = torch.stack([scale, zero], dim=3)

    def planar_mixed_selected(
        self, count: int, rows: slice, codes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys of a ``planar_mixed`` store's 16-bit and 4-bit channels (those the planar words do
        not hold whole) in its first ``count`` groups: channel indices ``[B, H, count, G, high + mid]``
        (int64) and float32 keys of that shape. ``codes``: the unpacked planar words ``[B, H, count, G,
        D]`` when the caller has them."""
        lay = self.layout
        high, mid, _ = lay.key_channels
        g = lay.group_size
        order = self.keys["order"][rows, :, :count].long()  # [B, H, n, high + mid]
        index = order.unsqueeze(3).expand(-1, -1, -1, g, -1)
        parts = []
        if high:
            parts.append(self.keys["tier0_values"][rows, :, :count].transpose(-1, -2).float())
        if mid:
            if codes is None:
                codes = reference.unpack_planar(self.keys["tier2_codes"][rows, :, :count])
            idx = index[..., high:]
            upper = torch.gather(codes, 4, idx).to(torch.int32)
            lower = reference.unpack(self.keys["tier1_codes"][rows, :, :count], 2).transpose(-1, -2)
            zeros = self.keys["tier2_qparams"][rows, :, :count, 1].unsqueeze(3).expand(-1, -1, -1, g, -1)
            scale = self.keys["tier1_scales"][rows, :, :count].unsqueeze(3)
            parts.append(
                reference.dequantize(upper * 4 + lower.to(torch.int32), scale, torch.gather(zeros, 4, idx))
            )
        return index, torch.cat(parts, dim=4)

    def _group_slots(self, first: int, end: int) -> slice | torch.Tensor:
        """Where packed groups ``first..end-1`` live: a slice, or ring slots ``[n]`` in a sliding store."""
        if not self.layout.sliding:
            return slice(first, end)
        return torch.arange(first, end, device=self.keys["ring"].device) % self.layout.num_groups

    def read_window(
        self, length: int, packed: int, dequantize_groups=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sliding stores: every token held, dequantized: keys ``[B, H, n, D]``, values ``[B, H, n, Dv]``
        and their positions ``[n]`` (int64). The packed groups come in ring-slot order, not by
        position (attention does not depend on the order of its keys, and slots ``0..count-1`` are
        one contiguous read), then the full-precision ring. Groups older than the window are still
        there until overwritten; the caller masks by position. ``dequantize_groups``: as in
        ``read_into`` (on the GPU: ``kernels.dequantize.dequantize_groups``).
        """
        lay = self.layout
        g, device = lay.group_size, self.keys["ring"].device
        count = min(packed, lay.num_groups)
        oldest_visible = max(0, length - lay.capacity + 1) // g
        if oldest_visible < packed - count:
            raise RuntimeError(
                f"mixkvq sliding-window store: group {oldest_visible} is visible but was overwritten "
                f"({packed} groups packed in a ring of {lay.num_groups}); please report this"
            )
        fp_positions = torch.arange(packed * g, length, device=device)
        keys = self.keys["ring"][:, :, fp_positions % lay.window]
        values = self.values["ring"][:, :, fp_positions % lay.window]
        if not count:
            return keys, values, fp_positions
        slots = torch.arange(count, device=device)
        held = packed - 1 - (packed - 1 - slots) % lay.num_groups  # the group in each slot
        positions = (held[:, None] * g + torch.arange(g, device=device)).reshape(-1)
        if dequantize_groups is not None:
            group_keys, group_values = dequantize_groups(self, count)
        else:
            group_keys = self._dequantize_key_groups(count).to(lay.dtype)
            group_values = self._dequantize_value_groups(count).to(lay.dtype)
        return (
            torch.cat([group_keys, keys], dim=2),
            torch.cat([group_values, values], dim=2),
            torch.cat([positions, fp_positions]),
        )

    def _choose_key_order(self, k: torch.Tensor) -> torch.Tensor:
        """Channel permutation ``[B, H, n, D]`` (int64): high tier first, each tier ascending.

        ``k`` is ``[B, H, n, D, G]`` float32 (``n`` groups being flushed). Channels are ranked by a score
        and fill the static tiers in rank order (see ``KeyTiering``):
        - query-aware policies (``budget``, ``thresholds``; ``layout.salience``): ``A_d = I_d * S_d``,
          I_d the mean |q_d| over every query seen so far (``query_abs_sum / query_count``), S_d the
          2-bit step ``(max - min) / 3`` of channel d over the group; ties (e.g. channels whose queries
          are all zero) are broken by S_d, then by channel index;
        - ``difficulty``: S_d alone.
        For ``thresholds`` the rank fill is the threshold rule under fixed tier sizes: channels with
        A_d > tau_high rank above those with tau_mid < A_d <= tau_high, which rank above the rest, so
        ranking by A_d assigns every channel the tier the thresholds give it whenever the tier has room,
        and otherwise the nearest tier with room (see ``KeyTiering.THRESHOLDS``).
        """
        lay = self.layout
        b, h, n, d, _ = k.shape
        identity = torch.arange(d, device=k.device).expand(b, h, n, d)
        if not lay.mixed_keys:
            return identity
        step = (k.amax(dim=-1) - k.amin(dim=-1)) / 3.0
        ranked = torch.argsort(step, dim=-1, descending=True, stable=True)
        if lay.salience:
            salience = self.query_importance()[:, :, None, :] * step
            by_step = torch.gather(salience, -1, ranked)
            ranked = torch.gather(ranked, -1, torch.argsort(by_step, dim=-1, descending=True, stable=True))
        tiers = []
        offset = 0
        for channels in lay.key_channels:
            tiers.append(torch.sort(ranked[..., offset : offset + channels], dim=-1).values)
            offset += channels
        return torch.cat(tiers, dim=-1)

    def query_importance(self) -> torch.Tensor:
        """I_d: mean |q_d| per (batch row, KV head) over every query seen so far, ``[B, H, D]`` float32.

        Zero before any query (the ranking then falls back to S_d). Only for query-aware layouts.
        """
        count = self.keys["query_count"].clamp(min=1.0)
        return self.keys["query_abs_sum"] / count[..., None]

    def _dequantize_key_groups(self, count: int, rows: slice = slice(None)) -> torch.Tensor:
        """float32 keys ``[B, H, count * G, D]`` of the first ``count`` packed groups (batch ``rows``;
        in a sliding store, group slots ``0..count-1``)."""
        lay = self.layout
        if lay.planar_words:
            tier = lay.planar_key_tier
            codes = reference.unpack_planar(self.keys[f"tier{tier}_codes"][rows, :, :count])  # [B,H,n,G,D]
            qparams = self.keys[f"tier{tier}_qparams"][rows, :, :count].unsqueeze(3)  # [B, H, n, 1, 2, D]
            k = reference.dequantize(codes, qparams[..., 0, :], qparams[..., 1, :])
            if lay.planar_mixed:  # the 16-bit and 4-bit channels, which the words do not hold whole
                index, keys = self.planar_mixed_selected(count, rows, codes)
                k.scatter_(4, index, keys)
            return k.reshape(k.shape[0], k.shape[1], -1, lay.head_dim)
        parts = []
        for tier, (channels, bits) in enumerate(zip(lay.key_channels, lay.key_bits)):
            if channels == 0:
                continue
            if bits == 16:
                parts.append(self.keys[f"tier{tier}_values"][rows, :, :count].float())
            else:
                parts.append(
                    reference.dequantize_groups(
                        self.keys[f"tier{tier}_codes"][rows, :, :count],
                        self.keys[f"tier{tier}_qparams"][rows, :, :count],
                        bits,
                    )
                )
        sorted_k = torch.cat(parts, dim=3)  # [B, H, n, D, G] in tier order
        if lay.mixed_keys:
            order = self.keys["order"][rows, :, :count].long()
            k = torch.empty_like(sorted_k).scatter_(3, order.unsqueeze(-1).expand_as(sorted_k), sorted_k)
        else:
            k = sorted_k
        b, h, n, d, g = k.shape
        return k.transpose(-1, -2).reshape(b, h, n * g, d)

    def _dequantize_value_groups(self, count: int, rows: slice = slice(None)) -> torch.Tensor:
        """float32 values ``[B, H, count * G, Dv]`` of the first ``count`` packed groups (as for keys)."""
        lay = self.layout
        if lay.value_bits == 16:
            v = self.values["values"][rows, :, :count].float()
        elif lay.planar_words:
            codes = reference.unpack_planar(self.values["codes"][rows, :, :count].transpose(-1, -2))
            b, h, n, g, _ = codes.shape
            grouped = codes.reshape(b, h, n, g, -1, lay.value_group_size)  # [B, H, n, G, NVG, VGS]
            qparams = self.values["qparams"][rows, :, :count].transpose(-1, -2)  # [B, H, n, 2, G, NVG]
            v = reference.dequantize(grouped, qparams[:, :, :, 0, ..., None], qparams[:, :, :, 1, ..., None])
        else:
            codes = self.values["codes"][rows, :, :count]
            b, h, n, g, _ = codes.shape
            grouped = codes.reshape(b, h, n, g, lay.value_dim // lay.value_group_size, -1)
            v = reference.dequantize_groups(grouped, self.values["qparams"][rows, :, :count], lay.value_bits)
        b, h, n, g = v.shape[:4]
        return v.reshape(b, h, n * g, lay.value_dim)
