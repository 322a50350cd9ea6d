"""Rewrite matched attention sites into the quantized store's custom ops.

For each ``AttentionSite`` (see ``sites.py``):
- an in-graph buffer pair ``torch.zeros([B, H, L, D])`` becomes ``mixkvq::new_store`` (the store
  handles take the buffers' place everywhere, including the graph outputs that hand them to the
  model's cache object);
- the two cache writes and the SDPA become one ``mixkvq::kv_attention`` (for a sliding-window layer,
  with the rest of its cache update: ``window.py``);
- the view chains that only fed the SDPA are erased.
Sites whose buffers are graph inputs must be store handles (``HANDLE_STRIDES``): a plain fp16 buffer
allocated outside the compiled graph is reported and left untouched.

Supported shapes (``check_site``): model dtype float16/bfloat16/float32; head_dim a power of two in
``SUPPORTED_HEAD_DIMS`` (what the Triton kernels take: powers of two >= 8; we require >= 16 so value
groups fit) and divisible by ``value_group_size`` when values are quantized; a sliding-window layer
at least as long as its full-precision ring (``residual_length + group_size`` tokens); cache buffers
of static shape (the store is sized when the graph compiles). Anything else keeps its eager
(unquantized) attention, with a warning naming the reason.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.mixkvq)
from ..config import MixKVQConfig
from ..store import HANDLE_STRIDES, StoreLayout
from .sites import AttentionSite, sdpa_args

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def check_site(site: AttentionSite, config: MixKVQConfig | None = None) -> str | None:
    """Why ``site`` cannot be rewritten (under ``config``, the layer's config), or None."""
    key_meta, value_meta = fake_tensor(site.key_buffer), fake_tensor(site.value_buffer)
    query_meta = fake_tensor(site.query if site.query is not None else sdpa_args(site.sdpa)["query"])
    new_meta = fake_tensor(site.new_key)
    if key_meta is None or value_meta is None or query_meta is None:
        return "no shape metadata on the cache buffers or the query"
    if not (_static_shape(key_meta) and _static_shape(value_meta)):
        return (
            f"cache buffers of symbolic shape {tuple(key_meta.shape)} (torch.compile(dynamic=True), or a "
            "batch or cache length marked dynamic): mixkvq sizes its store when it compiles; compile "
            "without dynamic=True"
        )
    if key_meta.dim() != 4 or value_meta.dim() != 4:
        return f"cache buffers are not [B, H, L, D] (got {tuple(key_meta.shape)})"
    if key_meta.dtype not in SUPPORTED_DTYPES or query_meta.dtype != key_meta.dtype:
        return f"dtype {key_meta.dtype} (query {query_meta.dtype}) is not one of {SUPPORTED_DTYPES}"
    if key_meta.shape[:3] != value_meta.shape[:3]:
        return "key and value buffers differ in batch, heads or length"
    if query_meta.shape[1] % key_meta.shape[1]:
        return f"{query_meta.shape[1]} query heads are not a multiple of {key_meta.shape[1]} KV heads"
    if new_meta is not None and (
        new_meta.dim() != 4
        or new_meta.shape[:2] != key_meta.shape[:2]
        or query_meta.shape[0] != key_meta.shape[0]
    ):
        return (
            f"new keys {tuple(new_meta.shape)} / queries {tuple(query_meta.shape)} do not match the cache "
            f"{tuple(key_meta.shape)} in batch or heads (batch larger than the cache?)"
        )
    for name, dim in (("head_dim", key_meta.shape[-1]), ("value head_dim", value_meta.shape[-1])):
        if dim not in SUPPORTED_HEAD_DIMS:
            return (
                f"{name} {int(dim)} is not supported by the mixkvq kernels (supported: "
                f"{list(SUPPORTED_HEAD_DIMS)})"
            )
    if config is not None:
        try:
            layout = layout_for(site, config)
        except ValueError as error:
            return str(error)
        if layout.sliding and layout.capacity < layout.window:
            return (
                f"sliding-window layer of {layout.capacity} tokens, fewer than its full-precision ring "
                f"(residual_length + group_size = {layout.window}): quantizing would not shrink it; lower "
                "residual_length to quantize it"
            )
    if site.key_buffer.op != "call_function" and not {key_meta.stride(), value_meta.stride()} <= set(
        HANDLE_STRIDES
    ):
        return (
            "cache buffers are plain tensors allocated outside the compiled graph (an eager prefill, or "
            "module buffers allocated by e.g. setup_caches()): run the prefill through the forward "
            "compiled with backend='mixkvq', and allocate module caches inside the compiled forward "
            "(lazily, on the first call) so that mixkvq can own their memory"
        )
    return None


def layout_for(site: AttentionSite, config: MixKVQConfig) -> StoreLayout:
    key_meta, value_meta = fake_tensor(site.key_buffer), fake_tensor(site.value_buffer)
    batch, heads, capacity, head_dim = key_meta.shape
    return StoreLayout.create(
        config,
        int(batch),
        int(heads),
        int(capacity),
        int(head_dim),
        int(value_meta.shape[-1]),
        key_meta.dtype,
        sliding=site.sliding,
    )


def rewrite_site(graph: fx.Graph, site: AttentionSite, layout: StoreLayout) -> None:
    """Replace the site's allocation (if any), writes and SDPA with mixkvq ops, in place."""
    key_handle, value_handle = site.key_buffer, site.value_buffer
    if site.allocates:
        first = min((site.key_buffer, site.value_buffer), key=_position(graph))
        device = site.key_buffer.kwargs.get("device") or fake_tensor(site.key_buffer).device
        with graph.inserting_before(first):
            handles = graph.call_function(torch.ops.mixkvq.new_store.default, (layout.to_key(), device))
            key_handle = graph.call_function(operator.getitem, (handles, 0))
            value_handle = graph.call_function(operator.getitem, (handles, 1))
        for old, new in ((site.key_buffer, key_handle), (site.value_buffer, value_handle)):
            new.meta.update(old.meta)
    query = site.query
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(fake_tensor(query).shape[-1])
    positions = site.positions
    with graph.inserting_before(site.sdpa):
        if site.fresh:  # a new sequence: positions 0..n-1
            count = graph.call_method("size", (site.new_key, 2))
            device = fake_tensor(site.new_key).device
            positions = graph.call_function(torch.arange, (count,), {"device": device})
        attention = graph.call_function(
            torch.ops.mixkvq.kv_attention.default,
            (
                query,
                site.new_key,
                site.new_value,
                positions,
                key_handle,
                value_handle,
                site.attn_mask,
                float(scale),
                bool(site.is_causal),
                -1 if site.kv_limit is None else site.kv_limit,
                layout.to_key(),
            ),
        )
    attention.meta.update(site.sdpa.meta)
    site.sdpa.replace_all_uses_with(attention)
    dead = [site.sdpa]
    for write in (site.key_write, site.value_write, *site.extra_writes):
        if not write.users:
            dead.append(write)
    _erase_dead(graph, dead, keep={site.key_buffer, site.value_buffer})
    if site.allocates:
        for old, new in ((site.key_buffer, key_handle), (site.value_buffer, value_handle)):
            old.replace_all_uses_with(new)
            graph.erase_node(old)


def _static_shape(meta: torch.Tensor) -> bool:
    """Whether ``meta``'s sizes and strides are all plain ints (not symbols of a dynamic graph)."""
    return all(type(n) is int for n in (*meta.shape, *meta.stride()))


def fake_tensor(node):
    """The fake tensor a graph node produces (Dynamo's ``example_value`` or ``val``), or None."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _position(graph: fx.Graph):
    order = {node: index for index, node in enumerate(graph.nodes)}
    return order.__getitem__


def _erase_dead(graph: fx.Graph, nodes: list, keep: set) -> None:
    """Erase ``nodes`` (which must have no users) and then every pure input left without users: the
    view chains that fed the attention and, for eager attention, the softmax chain."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if (
            not isinstance(node, fx.Node)
            or node.users
            or node in keep
            or node.op
            not in (
                "call_function",
                "call_method",
            )
        ):
            continue
        if node not in nodes and (_mutates(node) or node.target in (torch.zeros, torch.empty)):
            continue
        inputs = [arg for arg in node.all_input_nodes]
        graph.erase_node(node)
        stack.extend(inputs)


def _mutates(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target is operator.setitem or node.is_impure()
