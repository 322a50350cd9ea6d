"""Where a decode step's time goes between its launches: each kernel's device time and the step's span (GPU).

    python3 bench/step_timeline.py                                   # kivi2, 8 x 32k and 1 x 128k, float16
    python3 bench/step_timeline.py --configs kivi2,mixkvq-default --dtype bfloat16 --mask bool

For each batch x context (32 query heads over 8 KV heads, head_dim 128) and quantization setting, one
``decode_attention`` call is captured in a CUDA graph (as ``bench/decode_ab.py`` times it), replayed
``--replays`` times under ``torch.profiler``, and the profiler's kernel records are summarized:
- per kernel name, its launches per step and mean device microseconds;
- the step's span, from the first kernel's start to the last kernel's end within one replay (median
  over replays), and the main kernel's share of it (``planar_split_kernel``, or ``_attn_split_kernel``
  where the store is not planar);
- the step timed without the profiler (median of ``do_bench`` over graph replays, L2 flushed), and
  cuDNN SDPA over 16-bit K/V of the same size in the same process.
The difference between the span and the main kernel is what launches around it cost (the full-precision
tokens' launch, the combine, and their overlap with the main one: ``kernels._runtime.overlap_launches``);
the difference between the timed step and the span is the graph launch itself. The profiler's timestamps
are the GPU's; its own cost per kernel is small but not zero, so compare spans within one run.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from decode_ab import CONFIGS, cudnn_attention, decode_inputs  # noqa: E402
from gpu_state import describe, gpu_state  # noqa: E402
from kernels import bench_graph, capture_graph, random_store  # noqa: E402

from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402

MAIN_KERNELS = ("planar_split_kernel", "_attn_split_kernel")


def kernel_records(graph: torch.cuda.CUDAGraph, replays: int) -> list[list[tuple[str, float, float]]]:
    """Per replay of ``graph`` under the profiler, its kernels as (name, start us, end us)."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
    return split_replays(device_kernels(prof.events()), replays)


def device_kernels(events) -> list[tuple[str, float, float]]:
    """The GPU records among a profiler's ``events`` (``prof.events()``) as (name, start us, end us);
    ``RuntimeError`` if there are none (CUPTI unavailable)."""
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    ]
    if not kernels:
        raise RuntimeError("the profiler recorded no kernels (CUPTI unavailable?)")
    return kernels


def split_replays(
    kernels: list[tuple[str, float, float]], replays: int
) -> list[list[tuple[str, float, float]]]:
    """``kernels`` (name, start, end) of ``replays`` replays synchronized one after another, as one list
    per replay: sorted by start, each replay is the next ``len / replays`` records (a replay's kernels
    may overlap each other, launched as programmatic dependents, but not the next replay's)."""
    if not kernels or len(kernels) % replays:
        raise RuntimeError(f"{len(kernels)} kernel records for {replays} replays (CUPTI unavailable?)")
    kernels = sorted(kernels, key=lambda k: k[1])
    per_step = len(kernels) // replays
    return [kernels[i : i + per_step] for i in range(0, len(kernels), per_step)]


def short(name: str) -> str:
    """A kernel's name without its template or argument list."""
    return name.split("(")[0].split("<")[0][:40]


def summarize(steps: list[list[tuple[str, float, float]]]) -> tuple[dict, float, float]:
    """(kernel name -> (launches per step, mean us), median span us, median main-kernel us)."""
    durations = collections.defaultdict(list)
    spans, mains = [], []
    for step in steps:
        spans.append(max(e for _, _, e in step) - min(s for _, s, _ in step))
        main = [e - s for n, s, e in step if short(n) in MAIN_KERNELS]
        mains.append(max(main) if main else float("nan"))
        for name, start, end in step:
            durations[short(name)].append(end - start)
    per_kernel = {n: (len(d) / len(steps), statistics.fmean(d)) for n, d in durations.items()}
    return per_kernel, statistics.median(spans), statistics.median(mains)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="8x32768,1x131072")
    parser.add_argument("--configs", default="kivi2")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--mask", default="none", choices=["none", "bool"])
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
    if args.replays < 1:
        parser.error("--replays must be at least 1")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(
        f"{args.dtype}; mask {args.mask}; {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; GPU {describe(gpu_state())}"
    )
    for shape in args.shapes.split(","):
        batch, ctx = (int(n) for n in shape.split("x"))
        q, k, v, mask = decode_inputs(batch, ctx, dtype, args.mask == "bool")
        cudnn = functools.partial(cudnn_attention, q, k, v)
        base = bench_graph(cudnn)
        _, base_span, _ = summarize(kernel_records(capture_graph(cudnn), args.replays))
        print(f"\n{shape}: cuDNN step {base * 1e3:.1f} us timed, span {base_span:.1f} us")
        del k, v, cudnn  # (the baseline holds them)
        for name in args.configs.split(","):
            store = random_store(CONFIGS[name], batch, ctx, dtype)
            packed = store.layout.flushed_groups(ctx)

            def ours(s=store, q=q, n=ctx, m=mask, p=packed):
                return decode_attention(q, s, n, m, packed=p)

            timed = bench_graph(ours)
            per_kernel, span, main_us = summarize(kernel_records(capture_graph(ours), args.replays))
            print(
                f"  {name}: step {timed * 1e3:.1f} us timed ({base / timed:.2f}x cuDNN), span {span:.1f} us, "
                f"main kernel {main_us:.1f} us = {main_us / span:.0%} of the span; "
                f"cuDNN's span over the main kernel {base_span / main_us:.2f}x"
            )
            for kernel, (launches, mean_us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
                print(f"    {kernel:<40} {launches:4.1f} per step {mean_us:8.1f} us")
            del store
            torch.cuda.empty_cache()
    print(f"\nGPU at the end: {describe(gpu_state())}")


if __name__ == "__main__":
    main()
