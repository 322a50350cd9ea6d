"""What the graph cannot say about a cache, read from the frame Dynamo is compiling.

The FX graph of a transformers model does not say which cache layers are sliding-window layers: a
``StaticSlidingWindowLayer`` writes with ``index_copy_`` like a full layer until its window is full
(then it rolls the buffer, which ``window.py`` recognises), so its first graphs need a sliding-window
store although nothing in them shows it. Dynamo guards
on every cache layer object it reads (``L['kwargs']['cache'].layers[0]``); we evaluate those guard
sources against the frame's locals and read the class attribute ``is_sliding`` (present in
transformers 5.x). Best effort: outside Dynamo, or if anything fails, ``None`` (unknown).
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^(?P<cache>.+)\.layers\[(?P<index>\d+)\]$")


def cache_layer_sliding() -> list[bool] | None:
    """``is_sliding`` of every cache layer (in layer order) of the cache the traced frame reads, or
    None when no cache object with ``layers`` is visible."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = tx.output.root_tx
        context = torch._guards.TracingContext.try_get()
        names = {guard.name for guard in context.guards_context.dynamo_guards} if context else set()
    except Exception:  # noqa: BLE001 - introspection only
        return None
    caches = sorted({m.group("cache") for m in map(_LAYER.match, names) if m})
    for cache_name in caches:
        try:
            cache = eval(cache_name, {"__builtins__": {}, "L": root.f_locals, "G": root.f_globals})  # noqa: S307
            layers = list(cache.layers)
        except Exception:  # noqa: BLE001
            continue
        return [bool(getattr(layer, "is_sliding", False)) for layer in layers]
    return None
