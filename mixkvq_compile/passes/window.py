"""Sliding-window cache layers: the three graphs of transformers' ``StaticSlidingWindowLayer`` that
``find_sites`` skips, matched into sliding-window sites (``AttentionSite.sliding``).

While its window is not full, the layer writes with ``index_copy_`` like a full layer (a normal site,
marked sliding by the pass manager from the frame). Then (measured, transformers 5.24):
- **rolled**: one token once the window is full: ``new = buf.roll(-1, dims=-2)``, ``new[:, :, idx] =
  k``, ``buf.copy_(new)``, attention over ``buf``;
- **concatenated**: several tokens once the window is full (``cat((buf[:, :, 1:], k))``) or becoming
  full (``cat((buf[:, :, :n], k))``), ``buf.copy_(cat[:, :, -W:])``, attention over the ``cat``;
- **fresh**: a prompt longer than the window at position 0: ``buf.copy_(k[:, :, -W:])``, attention
  over ``k`` itself.
The first two append after the stored tokens (``positions`` None); the third starts a new sequence.
Each becomes one ``mixkvq::kv_attention`` over a sliding-window store that keeps the last ``W`` tokens.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .sites import (
    CAT_TARGETS,
    DYNAMIC_CACHE,
    NOT_A_CACHE,
    SLIDING_WINDOW,
    AttentionSite,
    SkippedSite,
    is_buffer,
    token_slice,
    view_base,
)

_FULL = slice(None, None, None)


def resolve(found: list, graph: fx.Graph) -> list:
    """``found`` with every skipped site that is one of the module docstring's graphs replaced by a
    sliding-window site."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    resolved = []
    for site in found:
        candidate = isinstance(site, SkippedSite) and site.attention is not None
        if candidate and site.kind in (SLIDING_WINDOW, DYNAMIC_CACHE, NOT_A_CACHE):
            site = match(site.attention, order) or site
        resolved.append(site)
    return resolved


def match(att, order: dict) -> AttentionSite | None:
    """The sliding-window site of attention ``att`` (a ``sites._Attention``), or None."""
    parts = []
    for read in (att.key, att.value):
        base = view_base(read)
        part = _rolled(base, order, att.node) or _concatenated(base, order, att.node)
        part = part or _fresh(base, order, att.node)
        if part is None:
            return None
        parts.append(part)
    (key_buffer, new_key, key_nodes, fresh), (value_buffer, new_value, value_nodes, fresh_v) = parts
    if key_buffer is value_buffer or fresh != fresh_v:
        return None
    return AttentionSite(
        sdpa=att.node,
        key_buffer=key_buffer,
        value_buffer=value_buffer,
        key_write=key_nodes[0],
        value_write=value_nodes[0],
        new_key=new_key,
        new_value=new_value,
        positions=None,
        query=att.query,
        attn_mask=att.attn_mask,
        scale=att.scale,
        is_causal=att.is_causal,
        pattern=att.pattern,
        key_read=att.key,
        value_read=att.value,
        sliding=True,
        fresh=fresh,
        extra_writes=key_nodes[1:] + value_nodes[1:],
    )


def _rolled(buffer, order: dict, attention: fx.Node):
    """(buffer, new token, (copy_, setitem, roll), False) for the rolled graph, else None."""
    if not is_buffer(buffer):
        return None
    rolls = [u for u in buffer.users if _method(u, "roll") and u.args[0] is buffer]
    copies = [u for u in buffer.users if _method(u, "copy_") and u.args[0] is buffer]
    if len(rolls) != 1 or len(copies) != 1:
        return None
    roll, copy = rolls[0], copies[0]
    shift = roll.args[1] if len(roll.args) > 1 else roll.kwargs.get("shifts")
    dims = roll.args[2] if len(roll.args) > 2 else roll.kwargs.get("dims")
    if shift != -1 or dims not in (-2, 2, (-2,), (2,)) or copy.args[1] is not roll:
        return None
    sets = [u for u in roll.users if u.op == "call_function" and u.target is operator.setitem]
    if len(sets) != 1 or not _before(order, sets[0], copy, attention):
        return None
    index = sets[0].args[1]
    if not isinstance(index, tuple) or len(index) != 3 or index[:2] != (_FULL, _FULL):
        return None
    return buffer, sets[0].args[2], (copy, sets[0], roll), False


def _concatenated(cat, order: dict, attention: fx.Node):
    """(buffer, new tokens, (copy_,), False) for the concatenated graph, else None."""
    if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target in CAT_TARGETS):
        return None
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    if dim not in (-2, 2) or not isinstance(tensors, (tuple, list)) or len(tensors) != 2:
        return None
    prefix, new = tensors
    if not (isinstance(prefix, fx.Node) and prefix.target is operator.getitem):
        return None
    buffer = prefix.args[0]
    if not is_buffer(buffer) or token_slice(prefix.args[1]) is None:
        return None
    copy = _tail_copy(cat, buffer)
    if copy is None or not _before(order, copy, attention):
        return None
    return buffer, new, (copy,), False


def _fresh(new, order: dict, attention: fx.Node):
    """(buffer, new tokens, (copy_,), True) for the fresh graph, else None."""
    if not isinstance(new, fx.Node) or is_buffer(new):
        return None
    copies = []
    for user in new.users:
        if user.op == "call_function" and user.target is operator.getitem:
            copies += [
                c for c in user.users if _method(c, "copy_") and c.args[1] is user and is_buffer(c.args[0])
            ]
    if len(copies) != 1 or not _before(order, copies[0], attention):
        return None
    copy = copies[0]
    if _tail_copy(new, copy.args[0]) is not copy:
        return None
    return copy.args[0], new, (copy,), True


def _tail_copy(source: fx.Node, buffer: fx.Node) -> fx.Node | None:
    """The ``buffer.copy_(source[:, :, -n:])`` node, if any."""
    for user in source.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            continue
        part = token_slice(user.args[1])
        if part is None or not (isinstance(part.start, int) and part.start < 0 and part.stop is None):
            continue
        for copy in user.users:
            if _method(copy, "copy_") and copy.args[0] is buffer and copy.args[1] is user:
                return copy
    return None


def _method(node: fx.Node, name: str) -> bool:
    return node.op == "call_method" and node.target == name


def _before(order: dict, *nodes: fx.Node) -> bool:
    """True when ``nodes`` come in this order in the graph."""
    positions = [order[n] for n in nodes]
    return positions == sorted(positions)
