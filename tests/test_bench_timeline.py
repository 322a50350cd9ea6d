"""``bench/step_timeline.py``'s bookkeeping on synthetic profiler records (CPU): which kernels belong to
which replay, and the span and main-kernel time it reports per step."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

timeline = pytest.importorskip("step_timeline")


def _replay(t0: float, fp_us: float, main_us: float, combine_us: float) -> list[tuple[str, float, float]]:
    """One decode step's records from ``t0``: the full-precision launch, the planar kernel starting
    1 us later while it runs (a programmatic dependent), the combine after the planar kernel."""
    return [
        ("_attn_split_kernel", t0, t0 + fp_us),
        ("planar_split_kernel", t0 + 1.0, t0 + 1.0 + main_us),
        ("_combine_kernel", t0 + 1.5 + main_us, t0 + 1.5 + main_us + combine_us),
    ]


def test_split_replays_keeps_overlapping_kernels_of_one_replay_together():
    steps = [_replay(100.0 * i, 10.0, 70.0 + i, 3.0) for i in range(4)]
    flat = [record for step in reversed(steps) for record in step]  # the profiler's order is not kept
    assert timeline.split_replays(flat, 4) == steps


def test_split_replays_rejects_a_count_that_does_not_divide():
    with pytest.raises(RuntimeError, match="7 kernel records for 2 replays"):
        timeline.split_replays(_replay(0.0, 10.0, 70.0, 3.0) * 2 + [("x", 500.0, 501.0)], 2)
    with pytest.raises(RuntimeError, match="0 kernel records"):
        timeline.split_replays([], 3)


def test_summarize_reports_span_main_kernel_and_per_kernel_means():
    steps = [_replay(100.0 * i, 10.0, main, 3.0) for i, main in enumerate((70.0, 72.0, 74.0))]
    per_kernel, span, main = timeline.summarize(steps)
    assert span == pytest.approx(1.5 + 72.0 + 3.0)  # median step: first start to last end
    assert main == pytest.approx(72.0)
    assert per_kernel["planar_split_kernel"] == pytest.approx((1.0, 72.0))
    assert per_kernel["_attn_split_kernel"] == pytest.approx((1.0, 10.0))
    assert per_kernel["_combine_kernel"] == pytest.approx((1.0, 3.0))


def test_summarize_takes_the_longer_of_two_launches_of_the_main_kernel():
    """With a mask the planar kernel runs twice per step; the main kernel is the longer launch."""
    step = _replay(0.0, 10.0, 76.0, 3.0) + [("planar_split_kernel", 77.5, 82.5)]
    per_kernel, _, main = timeline.summarize([step])
    assert main == pytest.approx(76.0)
    assert per_kernel["planar_split_kernel"] == pytest.approx((2.0, 40.5))


def test_device_kernels_keeps_gpu_records_of_positive_length():
    from types import SimpleNamespace

    import torch

    def event(name, device, start, end):
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(name=name, device_type=device, time_range=span)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event("k1", cuda, 1.0, 3.0), event("aten::mm", cpu, 0.0, 9.0), event("k0", cuda, 4.0, 4.0)]
    assert timeline.device_kernels(events) == [("k1", 1.0, 3.0)]
    with pytest.raises(RuntimeError, match="no kernels"):
        timeline.device_kernels(events[1:])
