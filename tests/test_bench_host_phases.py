"""``bench/host_phases.py``: the phases cut from synthetic timestamps, the patching that leaves the
patched classes as they were, and the events of a real compiled generate() on CPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.models import tiny_llama

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

host_phases = pytest.importorskip("host_phases")


def _step(start: float) -> list[tuple[str, float]]:
    """One decode step's events from ``start`` (seconds): the phases take 1, 2, 3, 4, 5 and 6 us."""
    times = [start + t * 1e-6 for t in (1, 3, 6, 10, 15)]
    return [
        ("call:enter", times[0]),
        ("graph:enter", times[1]),
        ("launch:enter", times[2]),
        ("launch:exit", times[3]),
        ("graph:exit", times[4] - 0.5e-6),
        ("call:exit", times[4]),
    ]


def test_step_phases_cuts_each_step_at_its_call_graph_and_launch():
    events = [("token", 0.0)] + _step(0.0) + [("token", 21e-6)] + _step(21e-6) + [("token", 42e-6)]
    steps = host_phases.step_phases(events)
    expected = dict(zip(host_phases.PHASES, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)))
    assert len(steps) == 2
    for step in steps:
        assert {k: step[k] for k in host_phases.PHASES} == pytest.approx(expected)
        assert (step["launches"], step["graphs"]) == (1, 1)
    assert host_phases.median_phases(steps) == pytest.approx(expected | {"launches": 1, "graphs": 1})


def test_step_phases_skips_steps_without_exactly_one_call_and_rejects_disorder():
    eager = [("call:enter", 1e-6), ("call:exit", 5e-6)]  # a forward without a graph
    twice = _step(10e-6) + _step(30e-6)
    events = [("token", 0.0)] + eager + [("token", 8e-6)] + twice + [("token", 60e-6), ("token", 61e-6)]
    steps = host_phases.step_phases(events)
    assert len(steps) == 1  # the two-call step and the empty one are left out
    assert steps[0]["call to graph"] == 0.0 and steps[0]["launch to return"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="no decode step"):
        host_phases.step_phases([("token", 0.0), ("token", 1.0)])
    backwards = [
        ("token", 0.0),
        ("call:enter", 2e-6),
        ("graph:enter", 1e-6),
        ("call:exit", 3e-6),
        ("token", 4e-6),
    ]
    with pytest.raises(ValueError, match="out of order"):
        host_phases.step_phases(backwards)


def test_patch_times_a_call_and_restores_own_and_inherited_attributes():
    class Base:
        def run(self, x):
            return x + 1

    class Child(Base):
        def own(self, x):
            return x * 2

    own_before = vars(Child)["own"]
    clock = host_phases.HostClock()
    with clock.patch(Child, "run", "run"), clock.patch(Child, "own", "own"):
        assert Child().run(1) == 2 and Child().own(3) == 6
    assert [label for label, _ in clock.events] == ["run:enter", "run:exit", "own:enter", "own:exit"]
    assert "run" not in vars(Child) and vars(Child)["own"] is own_before
    assert clock.last_arguments["run"][0][1:] == (1,) and clock.last_arguments["own"][0][1:] == (3,)
    with pytest.raises(RuntimeError), clock.patch(Child, "own", "own"):
        raise RuntimeError("restored on errors too")
    assert vars(Child)["own"] is own_before


def test_instrumented_generate_records_one_compiled_call_per_decode_step():
    """A compiled generate() on CPU (Inductor without CUDA graphs): every decode step holds one call
    that enters one Inductor graph and launches no CUDA graph, and the phases add up to the step."""
    from transformers import CompileConfig, LogitsProcessorList, StaticCache

    torch._dynamo.reset()
    model = tiny_llama(heads=2, kv_heads=1, head_dim=16, layers=1)
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # generate() compiles its decode call on CPU too
    model.generation_config.compile_config = compile_config
    ids = torch.randint(0, 256, (1, 9))
    clock = host_phases.HostClock()
    with host_phases.instrumented(model, clock):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=StaticCache(config=model.config, max_cache_len=20),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock.marker(lambda: None)]),
        )
    assert "get_compiled_call" not in vars(model)  # the instance patch is gone
    steps = host_phases.step_phases(clock.events)
    marks = [t for label, t in clock.events if label == "token"]
    assert len(steps) == len(marks) - 1 == 5
    for step, (a, b) in zip(steps, zip(marks, marks[1:])):
        assert (step["graphs"], step["launches"]) == (1, 0)
        assert sum(step[name] for name in host_phases.PHASES) == pytest.approx((b - a) * 1e6)
        assert step["call to graph"] > 0 and step["after call"] > 0
    assert clock.compiled_call is not None and "input_ids" in clock.last_arguments["call"][1]
    with pytest.raises(ValueError, match="calls must be positive"):
        host_phases.back_to_back_seconds(clock.compiled_call, (), {}, 0)
