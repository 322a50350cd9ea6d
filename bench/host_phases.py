"""Where the host's time goes in a decode step, measured without a profiler: timestamps taken at the
entry and exit of a few patched callables during a generate().

A profiler slows the host (CUPTI instruments every kernel of a CUDA graph launch), so its host times
are proportions at best. Here ``HostClock`` patches, for the duration of a ``with`` block:
- the compiled call that generate() runs per decode step (``model.get_compiled_call``'s result:
  generate() compiles ``model.__call__`` itself whenever the cache is static, and for the mixkvq
  methods that call enters the mixkvq-compiled ``model.forward``);
- ``CompiledFxGraph.__call__`` (Inductor's compiled graph, entered after Dynamo's guard check and
  AOTAutograd's runtime wrappers);
- ``torch.cuda.CUDAGraph.replay`` (the graph launch inside cudagraph trees);
and a logits processor (``HostClock.marker``) synchronizes and records a mark at every token.
``step_phases`` cuts the events between consecutive marks into the phases of ``PHASES``.
"""

from __future__ import annotations

import contextlib
import statistics
import time

#: A decode step's host phases, in order, from one token's mark to the next:
PHASES = (
    # generate()'s Python after the previous token, up to the compiled call
    "before call",
    # the compiled call up to Inductor's graph: Dynamo's guard check, AOTAutograd's wrappers
    "call to graph",
    # Inductor's graph up to the graph launch: cudagraph trees' input checks and copies
    "graph to launch",
    # the CUDA graph launch (cudaGraphLaunch)
    "launch",
    # after the launch to the end of the compiled call (outputs rebuilt), while the GPU runs
    "launch to return",
    # generate()'s Python after the call, waiting for the GPU, the synchronization, the mark
    "after call",
)


class HostClock:
    """Records ``(label, perf_counter seconds)`` events; ``patch`` times a callable's entry and exit."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        #: per label, the arguments (args, kwargs) of the latest timed call
        self.last_arguments: dict[str, tuple[tuple, dict]] = {}
        #: the compiled call that ``instrumented`` saw generate() take (None before)
        self.compiled_call = None

    def mark(self, label: str) -> None:
        self.events.append((label, time.perf_counter()))

    def timed(self, function, label: str):
        """``function`` wrapped to record ``label + ":enter"`` and ``label + ":exit"``."""

        def wrapper(*args, **kwargs):
            self.last_arguments[label] = (args, kwargs)
            self.mark(label + ":enter")
            try:
                return function(*args, **kwargs)
            finally:
                self.mark(label + ":exit")

        return wrapper

    @contextlib.contextmanager
    def patch(self, owner, attribute: str, label: str):
        """Replace ``owner.attribute`` by its timed wrapper within the block, then restore it exactly
        (delete it again where it was inherited, not set on ``owner``)."""
        own = attribute in vars(owner)
        original = vars(owner)[attribute] if own else getattr(owner, attribute)
        setattr(owner, attribute, self.timed(original, label))
        try:
            yield
        finally:
            if own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)

    def marker(self, synchronize):
        """A logits processor that calls ``synchronize()`` and records a ``token`` mark."""

        def processor(input_ids, scores):
            synchronize()
            self.mark("token")
            return scores

        return processor


@contextlib.contextmanager
def instrumented(model, clock: HostClock):
    """Within the block, ``clock`` times ``model``'s compiled decode call, Inductor's graph calls and
    the CUDA graph launches (module docstring)."""
    import torch
    from torch._inductor.output_code import CompiledFxGraph

    original_get = model.get_compiled_call

    def get_compiled_call(*args, **kwargs):
        compiled = original_get(*args, **kwargs)
        clock.compiled_call = compiled
        return clock.timed(compiled, "call")

    with (
        clock.patch(CompiledFxGraph, "__call__", "graph"),
        clock.patch(torch.cuda.CUDAGraph, "replay", "launch"),
    ):
        model.get_compiled_call = get_compiled_call
        try:
            yield
        finally:
            del model.get_compiled_call


def back_to_back_seconds(call, args: tuple, kwargs: dict, calls: int) -> float:
    """Device seconds per call of ``call(*args, **kwargs)`` over ``calls`` calls made back to back
    without synchronizing (timed with CUDA events): for a decode step whose host time is shorter than
    its GPU time, the GPU time of its CUDA graph with its kernels' launch gaps, without the host's time
    between steps. Each call runs the step again (a decode step writes one more token: the cache needs
    room for ``calls`` + 1 more). The step must run through its compiled call (cudagraph trees copy the
    inputs into the graph's buffers): a CUDA graph replayed alone reads whatever those buffers hold."""
    import torch

    if calls < 1:
        raise ValueError(f"calls must be positive, got {calls}")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():  # as in generate(): with grad mode on, Dynamo would compile another graph
        call(*args, **kwargs)  # warm
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            call(*args, **kwargs)
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def step_phases(events: list[tuple[str, float]]) -> list[dict[str, float]]:
    """Per decode step (the events between two consecutive ``token`` marks that hold exactly one
    compiled call), microseconds per phase of ``PHASES``, plus ``launches`` and ``graphs`` (the counts
    of graph launches and Inductor graph calls in it). ``ValueError`` if no step qualifies.

    A step's phases are cut at the call's entry, its first graph entry, its first launch's entry and
    exit, and the call's exit; a step without a launch or graph (a forward run eagerly) has those
    phases at 0 (its time counts in ``call to graph`` / ``launch to return``)."""
    marks = [i for i, (label, _) in enumerate(events) if label == "token"]
    steps = []
    for first, last in zip(marks, marks[1:]):
        inside = events[first + 1 : last]
        labels = [label for label, _ in inside]
        if labels.count("call:enter") != 1 or labels.count("call:exit") != 1:
            continue
        at = dict(reversed(inside))  # label -> the first time it occurs
        start, end = events[first][1], events[last][1]
        call_in, call_out = at["call:enter"], at["call:exit"]
        graph_in = at.get("graph:enter", call_in)
        launch_in = at.get("launch:enter", graph_in)
        launch_out = at.get("launch:exit", launch_in)
        cuts = (start, call_in, graph_in, launch_in, launch_out, call_out, end)
        phases = {name: (b - a) * 1e6 for name, a, b in zip(PHASES, cuts, cuts[1:])}
        if any(value < 0 for value in phases.values()):
            raise ValueError(f"events out of order in a step: {inside}")
        phases["launches"] = labels.count("launch:enter")
        phases["graphs"] = labels.count("graph:enter")
        steps.append(phases)
    if not steps:
        raise ValueError("no decode step with exactly one compiled call between two token marks")
    return steps


def median_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    """The median of each phase (and count) over ``steps`` (``step_phases``' result)."""
    return {name: statistics.median(step[name] for step in steps) for name in steps[0]}
