"""The ordered pass manager and the rewrite counters.

Order (each step sees the graph the previous one left):
1. ``find_sites``: every attention (SDPA or eager matmul-softmax-matmul), matched to its cache buffers
   and writes, or skipped with a reason and a kind.
2. ``window.resolve``: the rolled, concatenated and fresh graphs of a sliding-window layer become
   sliding sites; ``frame.cache_layer_sliding`` (read from the traced frame) marks the plain sites of
   sliding-window layers (written with ``index_copy_`` until the window is full) as sliding too;
   with ``quantize_sliding_windows=False`` every sliding site is skipped (kind ``SLIDING_WINDOW``).
3. ``layer_overrides`` check: an override for a layer the graph does not have is an error.
4. ``check_site``: metadata checks (dtype, head_dim, shapes, buffer ownership); failures are skipped.
5. ``rewrite_site``: allocation -> ``mixkvq::new_store``; writes + attention -> ``mixkvq::kv_attention``.
   An unquantized site over a plain buffer passed into the graph gets ``mixkvq::check_cache``.
6. safety net: a skipped attention that reads a mixkvq store handle is an error (its eager semantics
   would read the handle's scratch element), never a silent fallback.
7. graph lint and recompile.

Reporting: unsupported sites keep their eager semantics, are counted under ``attention_skipped``,
recorded (``site_reports``, ``skipped_sites``, see ``mixkvq_compile.explain``) and logged on the logger
``mixkvq_compile``: a warning per unsupported site, ONE warning per process for a dynamic cache
(saying how to enable mixkvq), debug only for attention without any cache (nothing to quantize).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import logging

import torch
import torch.fx as fx

from ..config import MixKVQConfig
from ..store import has_handle_shape
from . import frame, rewrite, runtime_checks, sites, window

log = logging.getLogger("mixkvq_compile")

#: Process-wide rewrite counters: ``graphs``, ``attention_found``, ``attention_rewritten``,
#: ``attention_skipped``, ``stores_allocated``. Reset with ``reset_counters()``.
counters: collections.Counter = collections.Counter()
#: (graph number, attention node name, reason) of every skipped site since the last reset.
skipped_sites: list[tuple[int, str, str]] = []


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One attention the passes saw. ``reason`` is None for a rewritten site."""

    graph: int
    layer: int
    node: str
    pattern: str  # "sdpa" or "eager"
    rewritten: bool
    kind: str  # "rewritten" or a ``sites`` skip kind
    reason: str | None
    allocates: bool = False


#: Every site since the last ``reset_counters()``, in compile order.
site_reports: list[SiteReport] = []
_warned_dynamic: list[bool] = []

DYNAMIC_CACHE_HINT = (
    "mixkvq: the model uses a growing (dynamic) KV cache, which mixkvq leaves unquantized (results are "
    "those of the model). To quantize the cache, generate with a static cache: "
    "model.generate(..., cache_implementation='static')"
)


def reset_counters() -> None:
    """Clear the counters and the site records (also re-arms the one-time dynamic-cache warning)."""
    counters.clear()
    skipped_sites.clear()
    site_reports.clear()
    _warned_dynamic.clear()


class PassManager:
    """Runs the mixkvq passes over one Dynamo graph for one config."""

    def __init__(self, config: MixKVQConfig):
        self.config = config

    def uuid(self) -> str:
        """Changes whenever a pass's source or the config changes (compiled-graph cache key)."""
        digest = hashlib.sha256(repr(self.config).encode())
        for module in (sites, window, rewrite, frame, runtime_checks):
            digest.update(inspect.getsource(module).encode())
        return digest.hexdigest()

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        graph_number = counters["graphs"]
        counters["graphs"] += 1
        found = window.resolve(sites.find_sites(gm.graph), gm.graph)
        self._check_layer_overrides(len(found))
        sliding = frame.cache_layer_sliding() if found else None
        if sliding is not None and any(sliding) and len(sliding) != len(found):
            # Sites cannot be mapped to layers: treat every layer as sliding. A full layer then gets a
            # sliding store as long as its cache, which keeps (and attends over) all its tokens.
            sliding = [True] * len(found)
        for layer, site in enumerate(found):
            counters["attention_found"] += 1
            if isinstance(site, sites.AttentionSite) and sliding and sliding[layer]:
                site.sliding = True
            keep = not self.config.quantize_sliding_windows
            if isinstance(site, sites.AttentionSite) and site.sliding and keep:
                site = sites.SkippedSite(
                    site.sdpa,
                    "sliding-window layer kept in the model's dtype (quantize_sliding_windows=False)",
                    sites.SLIDING_WINDOW,
                    site.pattern,
                    (site.key_buffer, site.value_buffer),
                )
            if isinstance(site, sites.SkippedSite):
                self._skip(gm.graph, graph_number, layer, site, site.reason, site.kind)
                continue
            layer_config = self.config.for_layer(layer)
            reason = rewrite.check_site(site, layer_config)
            if reason is not None:
                self._skip(gm.graph, graph_number, layer, site, reason, sites.UNSUPPORTED)
                continue
            layout = rewrite.layout_for(site, layer_config)
            allocates = site.allocates
            rewrite.rewrite_site(gm.graph, site, layout)
            counters["attention_rewritten"] += 1
            counters["stores_allocated"] += int(allocates)
            site_reports.append(
                SiteReport(
                    graph_number, layer, site.sdpa.name, site.pattern, True, "rewritten", None, allocates
                )
            )
            log.debug(
                "graph %d: rewrote %s attention %s (layer %d, %s)",
                graph_number,
                site.pattern,
                site.sdpa.name,
                layer,
                "new store" if allocates else "store passed in",
            )
        gm.graph.lint()
        gm.recompile()
        return gm

    def _check_layer_overrides(self, layers: int) -> None:
        overrides = self.config.layer_overrides
        if overrides and layers and max(overrides) >= layers:
            raise ValueError(
                f"mixkvq: layer_overrides names layer(s) {sorted(i for i in overrides if i >= layers)} but "
                f"the compiled model has {layers} attention layer(s) (indices 0..{layers - 1}); "
                f"the per-layer plan was made for {max(overrides) + 1} or more layers"
            )

    def _skip(self, graph: fx.Graph, graph_number: int, layer: int, site, reason: str, kind: str) -> None:
        name = site.sdpa.name
        buffers = (
            (site.key_buffer, site.value_buffer) if isinstance(site, sites.AttentionSite) else site.buffers
        )
        if any(_is_store_handle(buffer) for buffer in buffers):
            raise RuntimeError(
                f"mixkvq: attention {name} (layer {layer}) reads a mixkvq quantized store but cannot be "
                f"rewritten ({reason}); running it unquantized would read garbage. This cache layout is "
                "not supported after a quantized prefill: compile with options={'preset': 'passthrough'} "
                "or without backend='mixkvq'."
            )
        counters["attention_skipped"] += 1
        skipped_sites.append((graph_number, name, reason))
        site_reports.append(SiteReport(graph_number, layer, name, site.pattern, False, kind, reason))
        if kind == sites.NOT_A_CACHE:
            log.debug("graph %d: attention %s has no KV cache to quantize: %s", graph_number, name, reason)
        elif kind == sites.SLIDING_WINDOW:
            log.info("graph %d: attention %s (layer %d): %s", graph_number, name, layer, reason)
        elif kind == sites.DYNAMIC_CACHE:
            log.debug("graph %d: attention %s left unquantized: %s", graph_number, name, reason)
            if not _warned_dynamic:
                _warned_dynamic.append(True)
                log.warning(DYNAMIC_CACHE_HINT)
        else:
            log.warning("mixkvq: attention %s (layer %d) left unquantized: %s", name, layer, reason)
        if isinstance(site, sites.AttentionSite) and site.key_buffer.op == "placeholder":
            _insert_cache_check(graph, site)


def _is_store_handle(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return False
    value = rewrite.fake_tensor(node)
    return value is not None and has_handle_shape(value)


def _insert_cache_check(graph: fx.Graph, site: sites.AttentionSite) -> None:
    """``query = query + mixkvq::check_cache(key_buffer, positions, query)`` for the attention's uses."""
    query = site.query
    if not isinstance(query, fx.Node) or not isinstance(site.positions, fx.Node):
        return
    order = {node: index for index, node in enumerate(graph.nodes)}
    latest = max((query, site.positions, site.key_buffer), key=order.__getitem__)
    with graph.inserting_after(latest):
        zero = graph.call_function(
            torch.ops.mixkvq.check_cache.default, (site.key_buffer, site.positions, query)
        )
    with graph.inserting_after(zero):
        checked = graph.call_function(torch.add, (query, zero))
    for key in ("example_value", "val"):
        if key in query.meta:
            checked.meta[key] = query.meta[key]
    for user in list(query.users):
        if user not in (zero, checked) and order.get(user, -1) > order[latest]:
            user.replace_input_with(query, checked)
