"""Find attention sites: an attention whose keys and values are cache buffers written earlier in the
same graph.

Attention shapes recognised:
- ``scaled_dot_product_attention`` (every ``attn_implementation="sdpa"`` model);
- eager attention (``attn_implementation="eager"``), see ``match_eager``:
  ``softmax(matmul(q, k.transpose(-1, -2)) * scale [+ mask], dim=-1 [, dtype]) [.to/.type] [dropout(p,
  training=False)] @ v`` with the scale as ``* c``, ``/ c`` (also in place) or absent, and the matmuls
  as ``torch.matmul``, ``@`` or ``Tensor.matmul``.

Cache shapes recognised (all measured on transformers' StaticCache and gpt-fast-style models):
- the buffer is a graph input (a cache tensor passed in) or an in-graph ``torch.zeros`` (a cache
  created lazily inside a compiled prefill);
- the write is ``buffer.index_copy_(2, positions, new)`` or ``buffer[:, :, positions] = new``
  (``operator.setitem``) or ``buffer.index_put_((.., .., positions), new)``;
- the attention reads the buffer directly or through ``repeat_kv`` (``buffer[:, :, None]
  .expand(B, H, n_rep, L, D).reshape(B, H * n_rep, L, D)``), with ``enable_gqa`` or not.
A candidate that does not match is reported with the reason and a ``kind`` (see ``SkippedSite``),
never rewritten.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
ZEROS_TARGETS = (torch.zeros,)
MATMUL_TARGETS = (torch.matmul, operator.matmul)
SOFTMAX_TARGETS = (F.softmax, torch.softmax, torch.Tensor.softmax)
DROPOUT_TARGETS = (F.dropout,)
CAT_TARGETS = (torch.cat, torch.concat)

#: ``SkippedSite.kind`` values.
NOT_A_CACHE = "not_a_cache"  # attention over fresh keys (no cache, or the first step of a dynamic cache)
DYNAMIC_CACHE = "dynamic_cache"  # keys grown with torch.cat (transformers' DynamicCache)
SLIDING_WINDOW = "sliding_window"  # a rolling-window cache layer
UNSUPPORTED = "unsupported"  # a cache we recognise but cannot quantize (shape, dtype, ownership...)


@dataclasses.dataclass
class AttentionSite:
    """One attention layer reading a KV cache written in the graph.

    ``sdpa`` is the node whose value is the attention output (the SDPA, or the final matmul of an
    eager attention); ``query``/``attn_mask``/``scale``/``is_causal`` are its SDPA-equivalent arguments.
    """

    sdpa: fx.Node
    key_buffer: fx.Node
    value_buffer: fx.Node
    key_write: fx.Node
    value_write: fx.Node
    new_key: fx.Node
    new_value: fx.Node
    positions: fx.Node
    kv_limit: int | None = None  # the attention reads only positions < kv_limit (``key[:, :, :n]``)
    query: fx.Node | None = None
    attn_mask: Any = None
    scale: float | None = None
    is_causal: bool = False
    pattern: str = "sdpa"  # "sdpa" or "eager"
    key_read: Any = None  # the node the attention read the keys from (erased with its view chain)
    value_read: Any = None
    sliding: bool = False  # a sliding-window layer: the store keeps the buffer's length in tokens
    fresh: bool = False  # the write starts a new sequence at position 0 (``positions`` is None)
    extra_writes: tuple = ()  # more nodes of the cache update, erased with the writes (``window.py``)

    @property
    def allocates(self) -> bool:
        """True when the buffers are created in this graph (compiled prefill)."""
        return self.key_buffer.op == "call_function"


@dataclasses.dataclass
class SkippedSite:
    """An attention that keeps its eager semantics; ``kind`` says how loudly to report it."""

    sdpa: fx.Node
    reason: str
    kind: str = UNSUPPORTED
    pattern: str = "sdpa"
    buffers: tuple = ()
    attention: Any = None  # the ``_Attention`` (for ``window.resolve``)


@dataclasses.dataclass
class _Attention:
    """SDPA-equivalent arguments of one attention node (SDPA or an eager chain)."""

    node: fx.Node
    query: Any
    key: Any
    value: Any
    attn_mask: Any
    scale: float | None
    is_causal: bool
    dropout_p: float
    pattern: str


def find_sites(graph: fx.Graph) -> list[AttentionSite | SkippedSite]:
    """Every attention of ``graph`` in graph order, as a matched site or with the reason it cannot be
    rewritten."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    writes = _cache_writes(graph)
    results: list[AttentionSite | SkippedSite] = []
    for node in graph.nodes:
        attention = None
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            args = sdpa_args(node)
            attention = _Attention(
                node,
                args["query"],
                args["key"],
                args["value"],
                args["attn_mask"],
                args["scale"],
                bool(args["is_causal"]),
                args["dropout_p"],
                "sdpa",
            )
        elif _is_matmul(node):
            attention = match_eager(node)
        if attention is not None:
            results.append(_match(attention, writes, order))
    return results


def _match(att: _Attention, writes: dict, order: dict) -> AttentionSite | SkippedSite:
    sdpa = att.node

    def skip(reason: str, kind: str = UNSUPPORTED, buffers: tuple = ()) -> SkippedSite:
        return SkippedSite(sdpa, reason, kind, att.pattern, buffers, att)

    if att.dropout_p not in (0, 0.0):
        return skip("attention dropout is active (training graph)")
    buffers, limits = [], []
    for name, read in (("key", att.key), ("value", att.value)):
        buffer, limit = _strip_views(read)
        if buffer is None:
            if _is_cat_growth(read):
                return skip(
                    f"the {name}s are grown with torch.cat (a dynamic cache)",
                    DYNAMIC_CACHE,
                )
            return skip(
                f"the {name}s are not read from a KV-cache buffer through plain views (no cache, or an "
                "unsupported view)",
                NOT_A_CACHE,
            )
        buffers.append(buffer)
        limits.append(limit)
    key_buffer, value_buffer = buffers
    if limits[0] != limits[1]:
        return skip("keys and values are sliced to different lengths", buffers=tuple(buffers))
    if key_buffer is value_buffer:
        return skip("keys and values come from the same buffer", buffers=tuple(buffers))
    found = []
    for buffer in buffers:
        if _is_rolled(buffer, order, sdpa):
            return skip(
                "sliding-window cache layer whose rolled buffer (roll + copy_) does not match the "
                "pattern of passes/window.py; the layer stays unquantized",
                SLIDING_WINDOW,
                tuple(buffers),
            )
        candidates = [w for w in writes.get(buffer, []) if order[w.node] < order[sdpa]]
        if not candidates:
            return skip(
                f"no cache write into {buffer.name} before the attention (not a KV cache)",
                buffers=tuple(buffers),
            )
        if len(candidates) > 1:
            return skip(
                f"{buffer.name} is written more than once before the attention", buffers=tuple(buffers)
            )
        found.append(candidates[0])
    key_write, value_write = found
    if key_write.positions is not value_write.positions:
        return skip("keys and values are written at different positions", buffers=tuple(buffers))
    for buffer in buffers:
        if buffer.op == "call_function" and buffer.target not in ZEROS_TARGETS:
            return skip(
                f"cache buffer {buffer.name} is produced by {buffer.target}, not allocated",
                buffers=tuple(buffers),
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
        query=att.query,
        attn_mask=att.attn_mask,
        scale=att.scale,
        is_causal=att.is_causal,
        pattern=att.pattern,
        key_read=att.key,
        value_read=att.value,
    )


def sdpa_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return values


# -- eager attention ----------------------------------------------------------------------------


def match_eager(node: fx.Node) -> _Attention | None:
    """The SDPA-equivalent arguments of an eager attention ending in ``node`` (``probs @ value``), or
    None when ``node`` is not the output matmul of a matmul-scale-mask-softmax-matmul chain."""
    probs, value = _matmul_operands(node)
    dropout_p = 0.0
    # Casts and inference-mode dropout between softmax and the value matmul.
    while isinstance(probs, fx.Node):
        if _is_cast(probs):
            probs = probs.args[0]
        elif probs.op == "call_function" and probs.target in DROPOUT_TARGETS:
            p = probs.kwargs.get("p", probs.args[1] if len(probs.args) > 1 else 0.5)
            training = probs.kwargs.get("training", probs.args[2] if len(probs.args) > 2 else True)
            dropout_p = float(p) if training else 0.0
            probs = probs.args[0]
        else:
            break
    if not _is_softmax(probs):
        return None
    scores = probs.args[0]
    mask, scale = None, 1.0
    while isinstance(scores, fx.Node):
        target = scores.target if scores.op == "call_function" else None
        if target in (operator.add, operator.iadd, torch.add) and mask is None and scale == 1.0:
            left, right = scores.args[:2]
            if _reaches_scores(left):
                mask, scores = right, left
            elif _reaches_scores(right):
                mask, scores = left, right
            else:
                return None
        elif target in (operator.mul, operator.imul, torch.mul) and _number(scores.args) is not None:
            scale *= _number(scores.args)
            scores = next(a for a in scores.args[:2] if isinstance(a, fx.Node))
        elif target in (operator.truediv, operator.itruediv, torch.div) and _is_number(scores.args[1]):
            scale /= float(scores.args[1])
            scores = scores.args[0]
        elif _is_cast(scores):
            scores = scores.args[0]
        else:
            break
    if not _is_matmul(scores):
        return None
    query, key_t = _matmul_operands(scores)
    key = _untranspose(key_t)
    if key is None or (mask is not None and not isinstance(mask, fx.Node)):
        return None
    return _Attention(node, query, key, value, mask, scale, False, dropout_p, "eager")


def _is_matmul(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in MATMUL_TARGETS)
        or (node.op == "call_method" and node.target == "matmul")
    )


def _matmul_operands(node: fx.Node):
    return node.args[0], node.args[1]


def _is_softmax(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if not (
        (node.op == "call_function" and node.target in SOFTMAX_TARGETS)
        or (node.op == "call_method" and node.target == "softmax")
    ):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim in (-1, 3)


def _is_cast(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_method":
        return False
    if node.target in ("float", "half", "bfloat16", "contiguous"):
        return True
    if node.target in ("to", "type", "type_as"):
        extra = list(node.args[1:]) + list(node.kwargs.values())
        return all(isinstance(a, (torch.dtype, torch.device, fx.Node, bool)) or a is None for a in extra)
    return False


def _reaches_scores(node) -> bool:
    """True if ``node`` is the (scaled, cast) ``q @ k^T`` product rather than a mask."""
    while isinstance(node, fx.Node):
        if _is_matmul(node):
            return _untranspose(node.args[1]) is not None
        if _is_cast(node) or (
            node.op == "call_function"
            and node.target
            in (operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div)
        ):
            node = next((a for a in node.args[:2] if isinstance(a, fx.Node)), None)
        else:
            return False
    return False


def _untranspose(node) -> fx.Node | None:
    """``k`` for ``k.transpose(-1, -2)`` / ``(2, 3)`` / ``k.mT``; None otherwise."""
    if not isinstance(node, fx.Node):
        return None
    if (
        node.op == "call_method"
        and node.target == "transpose"
        or (node.op == "call_function" and node.target is torch.transpose)
    ):
        dims = {d % 4 if isinstance(d, int) else d for d in node.args[1:3]}
        return node.args[0] if dims == {2, 3} else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(args) -> float | None:
    numbers = [a for a in args[:2] if _is_number(a)]
    nodes = [a for a in args[:2] if isinstance(a, fx.Node)]
    return float(numbers[0]) if len(numbers) == 1 and len(nodes) == 1 else None


# -- cache writes and reads ---------------------------------------------------------------------


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


def _is_rolled(buffer: fx.Node, order: dict, before: fx.Node) -> bool:
    """True if ``buffer`` is overwritten with ``copy_`` or read by ``roll`` before ``before``."""
    for user in buffer.users:
        if order.get(user, len(order)) > order[before] or user.op != "call_method":
            continue
        if user.target == "roll" or (user.target == "copy_" and user.args[0] is buffer):
            return True
    return False


def _is_cat_growth(node) -> bool:
    """True if ``node`` (through views) is ``torch.cat([..., new], dim=-2 or 2)``."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in CAT_TARGETS:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            return dim in (-2, 2)
        is_view = node.op == "call_method" and node.target in (
            "expand",
            "reshape",
            "view",
            "contiguous",
            "to",
        )
        if not (is_view or (node.op == "call_function" and node.target in (operator.getitem, torch.reshape))):
            return False
        node = node.args[0]
    return False


def _strip_views(node) -> tuple[fx.Node | None, int | None]:
    """(buffer, kv_limit) behind a chain of full-slice indexing, ``[:, :, :n]`` slicing, expand,
    reshape, view and contiguous; (None, None) when the chain holds anything else."""
    limit = None
    while isinstance(node, fx.Node):
        if is_buffer(node):
            return node, limit
        is_getitem = node.op == "call_function" and node.target is operator.getitem
        stop = _token_limit(node.args[1]) if is_getitem else None
        if stop is not None:
            limit = stop if limit is None else min(limit, stop)
        elif not (
            (node.op == "call_method" and node.target in ("expand", "reshape", "view", "contiguous"))
            or (node.op == "call_function" and node.target is torch.reshape)
            or (is_getitem and _is_plain_index(node.args[1]))
            or _is_head_repeat(node)
        ):
            return (node, limit) if _is_buffer_like(node) else (None, None)
        node = node.args[0]
    return None, None


def view_base(node):
    """The node behind a chain of plain views (full-slice indexing, expand, reshape, view, contiguous,
    a head repeat): what an attention really reads."""
    while isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in ("expand", "reshape", "view", "contiguous"))
        or (node.op == "call_function" and node.target is torch.reshape)
        or (node.op == "call_function" and node.target is operator.getitem and _is_plain_index(node.args[1]))
        or _is_head_repeat(node)
    ):
        node = node.args[0]
    return node


def _is_head_repeat(node: fx.Node) -> bool:
    """``x.repeat_interleave(n, dim=1)`` / ``torch.repeat_interleave(x, n, dim=1)`` (GQA expansion)."""
    is_call = (node.op == "call_method" and node.target == "repeat_interleave") or (
        node.op == "call_function" and node.target is torch.repeat_interleave
    )
    if not is_call:
        return False
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
    return dim in (1, -3)


def _token_limit(index) -> int | None:
    """n for an index ``(:, :, :n)`` or ``(:, :, :n, :)`` with an int n > 0, else None."""
    part = token_slice(index)
    plain = part is not None and part.start in (None, 0)
    return part.stop if plain and isinstance(part.stop, int) and part.stop > 0 else None


def token_slice(index) -> slice | None:
    """The slice of an index ``(:, :, a:b)`` or ``(:, :, a:b, :)`` (step 1), else None."""
    full = slice(None, None, None)
    if not isinstance(index, tuple) or len(index) not in (3, 4) or any(p != full for p in index[:2]):
        return None
    if len(index) == 4 and index[3] != full:
        return None
    part = index[2]
    return part if isinstance(part, slice) and part.step in (None, 1) else None


def is_buffer(node) -> bool:
    """A cache buffer: a graph input (placeholder, attribute) or an in-graph ``torch.zeros``."""
    return isinstance(node, fx.Node) and (
        node.op in ("placeholder", "get_attr")
        or (node.op == "call_function" and node.target in ZEROS_TARGETS)
    )


def _is_plain_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(part is None or part is Ellipsis or part == slice(None, None, None) for part in parts)


def _is_buffer_like(node: fx.Node) -> bool:
    # A buffer produced by another op (e.g. torch.empty/full) is reported by _match with its target.
    return node.op == "call_function" and node.target in (torch.empty, torch.full, torch.zeros_like)
