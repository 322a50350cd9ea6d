"""Find attention sites: a scaled-dot-product attention whose keys and values are cache buffers
written earlier in the same graph.

Shapes recognised (all measured on transformers' StaticCache and gpt-fast-style models):
- the buffer is a graph input (a cache tensor passed in) or an in-graph ``torch.zeros`` (a cache
  created lazily inside a compiled prefill);
- the write is ``buffer.index_copy_(2, positions, new)`` or ``buffer[:, :, positions] = new``
  (``operator.setitem``) or ``buffer.index_put_((.., .., positions), new)``;
- the attention reads the buffer directly or through ``repeat_kv`` (``buffer[:, :, None]
  .expand(B, H, n_rep, L, D).reshape(B, H * n_rep, L, D)``), with ``enable_gqa`` or not.
A candidate that does not match is reported with the reason, never rewritten.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
ZEROS_TARGETS = (torch.zeros,)


@dataclasses.dataclass
class AttentionSite:
    """One attention layer reading a KV cache written in the graph."""

    sdpa: fx.Node
    key_buffer: fx.Node
    value_buffer: fx.Node
    key_write: fx.Node
    value_write: fx.Node
    new_key: fx.Node
    new_value: fx.Node
    positions: fx.Node
    kv_limit: int | None = None  # the attention reads only positions < kv_limit (``key[:, :, :n]``)

    @property
    def allocates(self) -> bool:
        """True when the buffers are created in this graph (compiled prefill)."""
        return self.key_buffer.op == "call_function"


@dataclasses.dataclass
class SkippedSite:
    sdpa: fx.Node
    reason: str


def find_sites(graph: fx.Graph) -> list[AttentionSite | SkippedSite]:
    """Every SDPA node of ``graph``, as a matched site or with the reason it cannot be rewritten."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    writes = _cache_writes(graph)
    results: list[AttentionSite | SkippedSite] = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            results.append(_match(node, writes, order))
    return results


def _match(sdpa: fx.Node, writes: dict, order: dict) -> AttentionSite | SkippedSite:
    args = sdpa_args(sdpa)
    if args["dropout_p"] not in (0, 0.0):
        return SkippedSite(sdpa, "attention dropout is active (training graph)")
    buffers, limits = [], []
    for name in ("key", "value"):
        buffer, limit = _strip_views(args[name])
        if buffer is None:
            return SkippedSite(
                sdpa,
                f"the {name}s are not read from a KV-cache buffer through plain views (no cache, or an "
                "unsupported view)",
            )
        buffers.append(buffer)
        limits.append(limit)
    key_buffer, value_buffer = buffers
    if limits[0] != limits[1]:
        return SkippedSite(sdpa, "keys and values are sliced to different lengths")
    if key_buffer is value_buffer:
        return SkippedSite(sdpa, "keys and values come from the same buffer")
    found = []
    for buffer in buffers:
        candidates = [w for w in writes.get(buffer, []) if order[w.node] < order[sdpa]]
        if not candidates:
            return SkippedSite(
                sdpa, f"no cache write into {buffer.name} before the attention (not a KV cache)"
            )
        if len(candidates) > 1:
            return SkippedSite(sdpa, f"{buffer.name} is written more than once before the attention")
        found.append(candidates[0])
    key_write, value_write = found
    if key_write.positions is not value_write.positions:
        return SkippedSite(sdpa, "keys and values are written at different positions")
    for buffer in buffers:
        if buffer.op == "call_function" and buffer.target not in ZEROS_TARGETS:
            return SkippedSite(
                sdpa, f"cache buffer {buffer.name} is produced by {buffer.target}, not allocated"
            )
    return AttentionSite(
        sdpa=sdpa,
        key_buffer=key_buffer,
        value_buffer=value_buffer,
        key_write=key_write.node,
        value_write=value_write.node,
        new_key=key_write.source,
        new_value=value_write.source,
        positions=key_write.positions,
        kv_limit=limits[0],
    )


def sdpa_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return values


@dataclasses.dataclass
class _Write:
    node: fx.Node
    positions: fx.Node
    source: fx.Node


def _cache_writes(graph: fx.Graph) -> dict[fx.Node, list[_Write]]:
    """buffer node -> writes of whole token rows along dim 2 (index_copy_/setitem/index_put_)."""
    writes: dict[fx.Node, list[_Write]] = {}
    for node in graph.nodes:
        write = None
        if node.op == "call_method" and node.target == "index_copy_" and len(node.args) == 4:
            buffer, dim, positions, source = node.args
            if dim in (2, -2):
                write = (buffer, positions, source)
        elif node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3:
            buffer, index, source = node.args
            positions = _dim2_index(index)
            if positions is not None:
                write = (buffer, positions, source)
        elif node.op == "call_method" and node.target == "index_put_" and len(node.args) >= 3:
            buffer, index, source = node.args[:3]
            positions = _dim2_index(tuple(index)) if isinstance(index, (tuple, list)) else None
            if positions is not None:
                write = (buffer, positions, source)
        if write and isinstance(write[0], fx.Node) and isinstance(write[1], fx.Node):
            writes.setdefault(write[0], []).append(_Write(node, write[1], write[2]))
    return writes


def _dim2_index(index) -> fx.Node | None:
    """The positions node of an index ``(:, :, positions)`` (or ``[:, :, positions, :]``)."""
    if not isinstance(index, tuple) or len(index) not in (3, 4):
        return None
    full = slice(None, None, None)
    if any(part != full for part in index[:2]) or (len(index) == 4 and index[3] != full):
        return None
    return index[2] if isinstance(index[2], fx.Node) else None


def _strip_views(node) -> tuple[fx.Node | None, int | None]:
    """(buffer, kv_limit) behind a chain of full-slice indexing, ``[:, :, :n]`` slicing, expand,
    reshape, view and contiguous; (None, None) when the chain holds anything else."""
    limit = None
    while isinstance(node, fx.Node):
        if node.op in ("placeholder", "get_attr") or (
            node.op == "call_function" and node.target in ZEROS_TARGETS
        ):
            return node, limit
        is_getitem = node.op == "call_function" and node.target is operator.getitem
        stop = _token_limit(node.args[1]) if is_getitem else None
        if stop is not None:
            limit = stop if limit is None else min(limit, stop)
        elif not (
            (node.op == "call_method" and node.target in ("expand", "reshape", "view", "contiguous"))
            or (node.op == "call_function" and node.target is torch.reshape)
            or (is_getitem and _is_plain_index(node.args[1]))
        ):
            return (node, limit) if _is_buffer_like(node) else (None, None)
        node = node.args[0]
    return None, None


def _token_limit(index) -> int | None:
    """n for an index ``(:, :, :n)`` or ``(:, :, :n, :)`` with an int n > 0, else None."""
    full = slice(None, None, None)
    if not isinstance(index, tuple) or len(index) not in (3, 4) or any(p != full for p in index[:2]):
        return None
    if len(index) == 4 and index[3] != full:
        return None
    part = index[2]
    plain = isinstance(part, slice) and part.start in (None, 0) and part.step in (None, 1)
    return part.stop if plain and isinstance(part.stop, int) and part.stop > 0 else None


def _is_plain_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(part is None or part is Ellipsis or part == slice(None, None, None) for part in parts)


def _is_buffer_like(node: fx.Node) -> bool:
    # A buffer produced by another op (e.g. torch.empty/full) is reported by _match with its target.
    return node.op == "call_function" and node.target in (torch.empty, torch.full, torch.zeros_like)
