"""The ordered pass manager and the rewrite counters.

Order (each step sees the graph the previous one left):
1. ``find_sites``: every SDPA, matched to its cache buffers and writes, or skipped with a reason.
2. ``check_site``: metadata checks (dtype, shapes, buffer ownership); failures are skipped.
3. ``rewrite_site``: allocation -> ``mixkvq::new_store``; writes + SDPA -> ``mixkvq::kv_attention``.
4. graph lint and recompile.
Unsupported sites are never an error: they keep their eager semantics, are counted under
``attention_skipped`` and logged (logger ``mixkvq_compile``) with the reason.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import logging

import torch.fx as fx

from ..config import MixKVQConfig
from . import rewrite, sites

log = logging.getLogger("mixkvq_compile")

#: Process-wide rewrite counters: ``graphs``, ``attention_found``, ``attention_rewritten``,
#: ``attention_skipped``, ``stores_allocated``. Reset with ``reset_counters()``.
counters: collections.Counter = collections.Counter()
#: (graph number, SDPA node name, reason) of every skipped site since the last reset.
skipped_sites: list[tuple[int, str, str]] = []


def reset_counters() -> None:
    counters.clear()
    skipped_sites.clear()


class PassManager:
    """Runs the mixkvq passes over one Dynamo graph for one config."""

    def __init__(self, config: MixKVQConfig):
        self.config = config

    def uuid(self) -> str:
        """Changes whenever a pass's source or the config changes (compiled-graph cache key)."""
        digest = hashlib.sha256(repr(self.config).encode())
        for module in (sites, rewrite):
            digest.update(inspect.getsource(module).encode())
        return digest.hexdigest()

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        graph_number = counters["graphs"]
        counters["graphs"] += 1
        found = sites.find_sites(gm.graph)
        for layer, site in enumerate(found):
            counters["attention_found"] += 1
            reason = site.reason if isinstance(site, sites.SkippedSite) else rewrite.check_site(site)
            if reason is None:
                layout = rewrite.layout_for(site, self.config.for_layer(layer))
                rewrite.rewrite_site(gm.graph, site, layout)
                counters["attention_rewritten"] += 1
                counters["stores_allocated"] += int(site.allocates)
                log.debug("graph %d: rewrote attention %s (layer %d)", graph_number, site.sdpa.name, layer)
            else:
                counters["attention_skipped"] += 1
                skipped_sites.append((graph_number, site.sdpa.name, reason))
                log.warning("mixkvq: attention %s left unquantized: %s", site.sdpa.name, reason)
        gm.graph.lint()
        gm.recompile()
        return gm
