"""Diagnostics: which attention sites the mixkvq passes found, which they rewrote, and why not.

    report = mixkvq_compile.explain(lambda: model.generate(**inputs, cache_implementation="static"))
    print(report)                 # one line per attention site of every graph compiled meanwhile
    report.skipped                # the sites left unquantized, with their reasons

``explain()`` without arguments reports every site since the last ``reset_counters()``. The same
information goes to the Python logger ``mixkvq_compile`` (debug: every site; warning: every site that
could hold a quantized cache but does not). ``MIXKVQ_LOGS=debug`` (or ``info``/``warning``) sets that
logger's level and gives it a stderr handler, for runs that cannot change code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

from .passes import manager
from .passes.manager import SiteReport

log = logging.getLogger("mixkvq_compile")


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The attention sites of the graphs compiled with backend='mixkvq' (see ``SiteReport``)."""

    sites: tuple[SiteReport, ...]
    result: Any = None  # what the explained callable returned

    @property
    def rewritten(self) -> tuple[SiteReport, ...]:
        return tuple(site for site in self.sites if site.rewritten)

    @property
    def skipped(self) -> tuple[SiteReport, ...]:
        return tuple(site for site in self.sites if not site.rewritten)

    def __str__(self) -> str:
        lines = [f"mixkvq: {len(self.sites)} attention site(s), {len(self.rewritten)} rewritten"]
        for s in self.sites:
            status = "rewritten" + (" (new store)" if s.allocates else "") if s.rewritten else s.kind
            line = f"  graph {s.graph} layer {s.layer:>3} {s.node:<24} {s.pattern:<5} {status}"
            lines.append(line + (f": {s.reason}" if s.reason else ""))
        return "\n".join(lines)


def explain(fn: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Explanation:
    """Report the attention sites of every graph compiled while ``fn(*args, **kwargs)`` runs.

    Resets the counters first (``mixkvq_compile.reset_counters()``) and also compiles from scratch
    (``torch._dynamo.reset()``) so that graphs compiled earlier are seen again. Without ``fn``, reports
    the sites recorded since the last reset, without running anything.

    Example::

        model.forward = torch.compile(model.forward, backend="mixkvq")
        report = mixkvq_compile.explain(model.generate, ids, max_new_tokens=4, cache_implementation="static")
        assert not report.skipped, str(report)
    """
    if fn is None:
        return Explanation(tuple(manager.site_reports))
    import torch

    torch._dynamo.reset()
    manager.reset_counters()
    result = fn(*args, **kwargs)
    return Explanation(tuple(manager.site_reports), result)


def _configure_from_environment() -> None:
    level = os.environ.get("MIXKVQ_LOGS", "").strip().upper()
    if not level:
        return
    log.setLevel(getattr(logging, level, logging.DEBUG))
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[mixkvq] %(levelname)s %(message)s"))
        log.addHandler(handler)


_configure_from_environment()
