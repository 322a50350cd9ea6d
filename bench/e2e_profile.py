"""Where an end-to-end decode step's time goes, by kind of kernel (GPU).

    python3 bench/e2e_profile.py --methods strong,kivi2,mixkvq --batch 8 --context 32768 --layers 8

For each method of ``bench/e2e.py`` (same model, same chunked prefill, same generate()), after two
warm-up calls that compile and capture the graphs: one unprofiled generate() gives the decode step's
time (median interval between tokens, as in ``e2e.py``); then the prompt is written to the cache again
and a generate() of ``--new-tokens`` tokens runs under ``torch.profiler``. All of its forwards are
one-token decode steps over the filled cache (generate() feeds the prompt's last token first); the
first is left out (transformers runs it eagerly where it compiles the decode step itself, ``hf`` and
``strong``), so each kernel's device time over the others, divided by ``--new-tokens`` - 1, is its
time per step. Printed per method:
- device microseconds per step by kind of kernel (``category``): the weight products (cuBLAS, CUTLASS
  or Inductor's matmul templates), attention (mixkvq's or SDPA's), mixkvq's KV writes, Inductor's
  other fused kernels, and the rest;
- ``busy``: the union of the kernels' intervals per step (overlapping kernels counted once) against
  the step's wall time: the difference is time the GPU waits (launches, synchronization);
- the kernels with the most time per step;
- with ``--host N``, the N host events with the most inclusive time per step (calls, self and
  inclusive microseconds per step): what the host does while the GPU waits. The profiler slows the
  host (the unprofiled step is the time to compare with), so read them as proportions.
- the GPU's idle gaps between kernels as the profiler records them: short ones (launch gaps, which
  CUPTI lengthens: a graph's unprofiled GPU time shows none) and long ones (the GPU waiting for the
  host);
- the host's phases of a decode step, measured in a separate unprofiled generate()
  (``bench/host_phases.py``): generate()'s Python, Dynamo's guards and AOTAutograd's wrappers,
  cudagraph trees' bookkeeping, the graph launch; and the last step's compiled call made again
  back to back (its CUDA graph's GPU time without the host's time between steps).
Each method runs in a fresh process (``bench/isolated.py`` says why).
``--layers`` below 32 shortens compile and prefill; the per-layer kinds scale with it, the LM head
and embedding do not. Results go to stdout and, when ``$OUT`` is set, to ``$OUT/e2e_profile.jsonl``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import llama3_8b, prefill_in_chunks, register_baselines, set_method, single_call, timed_generate  # noqa: E402
from gpu_state import describe  # noqa: E402
from host_phases import PHASES, HostClock, back_to_back_seconds, instrumented, median_phases, step_phases  # noqa: E402

#: Calls of the last decode step, timed back to back (``host_phases.back_to_back_seconds``); the
#: cache holds one token more than this beyond the prompt and the generated tokens.
REPLAYS = 10
from step_timeline import device_kernels  # noqa: E402

#: (category, substrings of a kernel's name), tried in this order; the first match wins.
CATEGORIES = (
    ("attention (mixkvq)", ("planar_split_kernel", "_attn_split_kernel", "_combine_kernel")),
    ("kv write (mixkvq)", ("_write_tokens_kernel", "_store_groups_kernel")),
    ("attention (sdpa)", ("sdpa", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "triton_tem_", "splitkreduce")),
    ("inductor fused", ("triton_",)),
)


def category(name: str) -> str:
    """The kind of a kernel from its name (``CATEGORIES``; ``other`` when none matches)."""
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(key.lower() in lowered for key in keys):
            return label
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The total length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


#: A gap between kernels at least this long (us) is counted as the GPU waiting for the host; shorter
#: ones are the launch latency between the kernels of one graph (or of back-to-back launches).
LONG_GAP_US = 20.0


def idle_gaps(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """The GPU's idle time between the profiled ``kernels`` (name, start us, end us), per step of
    ``steps``: ``short_us`` and ``long_us`` (gaps shorter or not than ``LONG_GAP_US``), ``long_count``,
    and ``short_before_us``: the short gaps by the category of the kernel that ends them."""
    ordered = sorted(kernels, key=lambda k: k[1])
    short, long, count = 0.0, 0.0, 0
    before: dict[str, float] = collections.defaultdict(float)
    reach = ordered[0][2] if ordered else 0.0
    for name, start, end in ordered[1:]:
        gap = start - reach
        if gap >= LONG_GAP_US:
            long, count = long + gap, count + 1
        elif gap > 0:
            short += gap
            before[category(name)] += gap / steps
        reach = max(reach, end)
    return {
        "short_us": short / steps,
        "long_us": long / steps,
        "long_count": count / steps,
        "short_before_us": dict(before),
    }


def per_step(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """Per step of ``steps``, from the profiled ``kernels`` (name, start us, end us): microseconds by
    category, the union of the kernels' intervals (``busy_us``), the idle gaps between them
    (``gaps``, see ``idle_gaps``), and per kernel name (its first 60 characters) its launches,
    microseconds and category (of the full name)."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    by_category: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[str, list] = {}
    for name, start, end in kernels:
        kind = category(name)
        by_category[kind] += (end - start) / steps
        entry = by_kernel.setdefault(name.split("(")[0][:60], [0.0, 0.0, kind])
        entry[0] += 1 / steps
        entry[1] += (end - start) / steps
    return {
        "category_us": dict(by_category),
        "busy_us": union_length([(s, e) for _, s, e in kernels]) / steps,
        "gaps": idle_gaps(kernels, steps),
        "kernels": {n: tuple(v) for n, v in by_kernel.items()},
    }


#: The name of the host event that ``TokenMarker`` records at every generated token.
TOKEN_MARK = "e2e_profile: token"


class TokenMarker:
    """A logits processor that synchronizes and records a ``TOKEN_MARK`` host event at every token: a
    forward's kernels start after the mark of the token before it."""

    def __call__(self, input_ids, scores):
        from torch.profiler import record_function

        torch.cuda.synchronize()
        with record_function(TOKEN_MARK):
            pass
        return scores


def after_first_token(records: list[tuple], marks: list[float]) -> list[tuple]:
    """The ``records`` (name, start us, ...) that start after the first of ``marks`` (the end times of
    the ``TOKEN_MARK`` events): the forwards after generate()'s first, which transformers runs
    eagerly when it compiles the decode step itself (``hf``, ``strong``)."""
    if len(marks) < 2:
        raise RuntimeError(f"{len(marks)} token marks: need at least 2 generated tokens")
    first = min(marks)
    return [r for r in records if r[1] >= first]


def generate_from_cache(model, ids, cache, new_tokens: int, processor) -> None:
    """generate() of ``new_tokens`` greedy tokens after ``ids``, whose tokens but the last are already
    in ``cache``, with the logits processor ``processor`` called at every token."""
    from transformers import LogitsProcessorList

    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([processor]),
    )


def profiled_generate(model, ids, cache, chunk: int, new_tokens: int):
    """The kernels (name, start us, end us) and host events (name, start us, self us, total us) of the
    forwards after the first of one generate() of ``new_tokens`` tokens (``after_first_token``; there
    are ``new_tokens - 1`` of them), after the prompt (all but its last token) was written to
    ``cache`` in ``chunk``-token forwards, unprofiled."""
    from torch.profiler import ProfilerActivity, profile

    prefill_in_chunks(model, ids, cache, chunk)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        generate_from_cache(model, ids, cache, new_tokens, TokenMarker())
        torch.cuda.synchronize()
    events = prof.events()
    marks = [e.time_range.end for e in events if e.name == TOKEN_MARK]
    kernels = device_kernels(events)
    host = [
        (e.name, e.time_range.start, e.self_cpu_time_total, e.cpu_time_total)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU and e.name != TOKEN_MARK
    ]
    return after_first_token(kernels, marks), after_first_token(host, marks)


def host_phase_generate(model, ids, cache, chunk: int, new_tokens: int) -> dict[str, float]:
    """The median host phases (``host_phases.PHASES``, microseconds, and the counts of graph launches
    and Inductor graph calls) of the decode steps in the second half of one unprofiled generate() of
    ``new_tokens`` tokens, after the prompt was written to ``cache`` in ``chunk``-token forwards; and
    ``graph replay``: the device microseconds per step of the last step's compiled call made
    ``REPLAYS`` times back to back (``cache`` must hold ``REPLAYS`` + 1 tokens more)."""
    clock = HostClock()
    prefill_in_chunks(model, ids, cache, chunk)
    torch.cuda.synchronize()
    with instrumented(model, clock):
        generate_from_cache(model, ids, cache, new_tokens, clock.marker(torch.cuda.synchronize))
    steps = step_phases(clock.events)
    phases = median_phases(steps[len(steps) // 2 :])
    if "launch" not in clock.last_arguments:
        raise RuntimeError("generate() launched no CUDA graph: nothing to replay")
    args, kwargs = clock.last_arguments["call"]
    return phases | {"graph replay": back_to_back_seconds(clock.compiled_call, args, kwargs, REPLAYS) * 1e6}


def host_per_step(events: list[tuple[str, float, float, float]], steps: int, top: int) -> list[tuple]:
    """The ``top`` host event names by inclusive time, per step: (name, calls, self us, total us), from
    ``events`` (name, start us, self us, total us)."""
    totals: dict[str, list[float]] = {}
    for name, _start, self_us, total_us in events:
        entry = totals.setdefault(name, [0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += self_us
        entry[2] += total_us
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        (name, calls / steps, self_us / steps, total_us / steps)
        for name, (calls, self_us, total_us) in ranked
    ]


def profile_method(
    model, method: str, batch: int, context: int, new_tokens: int, chunk: int, host: int = 0
) -> dict:
    """Warm up ``method`` (two generate() calls), time its step unprofiled, then profile one generate().
    Leaves ``model`` set up for ``method`` (each method runs in its own process)."""
    from transformers import StaticCache

    set_method(model, method)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=context + new_tokens + REPLAYS + 1)
    for _ in range(2):
        timed_generate(model, ids, new_tokens, cache, chunk)
    _, step, out, run_info = single_call(model, ids, new_tokens, cache, chunk)
    del out
    phases = host_phase_generate(model, ids, cache, chunk, new_tokens)
    kernels, events = profiled_generate(model, ids, cache, chunk, new_tokens)
    steps = new_tokens - 1
    result = {"method": method, "batch": batch, "context": context, "layers": model.config.num_hidden_layers}
    result |= {"step_us": step * 1e6, "gpu_last": run_info["gpu_last"], "host_phases_us": phases}
    result["host"] = host_per_step(events, steps, host) if host else []
    return result | per_step(kernels, steps)


def print_profile(result: dict, top: int) -> None:
    """A method's table: microseconds per step by category, busy against the step, the top kernels."""
    step = result["step_us"]
    print(
        f"\n{result['method']}: B {result['batch']}, context {result['context']}, {result['layers']} layers; "
        f"step {step:.0f} us, GPU busy {result['busy_us']:.0f} us ({result['busy_us'] / step:.0%}); "
        f"GPU at the end {describe(result['gpu_last'])}"
    )
    for label, us in sorted(result["category_us"].items(), key=lambda kv: -kv[1]):
        print(f"  {label:>20} {us:9.1f} us  {us / step:6.1%} of the step")
    gaps = result["gaps"]
    before = ", ".join(
        f"{k} {v:.0f}" for k, v in sorted(gaps["short_before_us"].items(), key=lambda kv: -kv[1])
    )
    print(
        f"  {'GPU idle':>20} {gaps['long_us']:9.1f} us in {gaps['long_count']:.1f} gaps "
        f">= {LONG_GAP_US:.0f} us, "
        f"{gaps['short_us']:.1f} us in shorter ones (before: {before})"
    )
    phases = result["host_phases_us"]
    print(
        "  host phases (unprofiled, median us): "
        + ", ".join(f"{name} {phases[name]:.0f}" for name in PHASES)
        + f"; {phases['launches']:.0f} graph launches, {phases['graphs']:.0f} graph calls; the graph "
        f"replayed back to back: {phases['graph replay']:.0f} us of GPU time"
    )
    print(f"  {'top kernels':>20} {'launches':>9} {'us':>9}")
    ranked = sorted(result["kernels"].items(), key=lambda kv: -kv[1][1])[:top]
    for name, (launches, us, kind) in ranked:
        print(f"  {name:<60} {launches:7.1f} {us:9.1f}  {kind}")
    if result["host"]:
        print(f"  {'host events (per step)':<60} {'calls':>7} {'self us':>9} {'total us':>9}")
        for name, calls, self_us, total_us in result["host"]:
            print(f"  {name[:60]:<60} {calls:7.1f} {self_us:9.1f} {total_us:9.1f}")


#: The options a child gets from its parent (besides ``--methods`` and ``--child``).
CHILD_OPTIONS = ("--batch", "--context", "--layers", "--new-tokens", "--prefill-chunk", "--host")


def child_argv(args: argparse.Namespace, method: str) -> list[str]:
    """The command line of the child process that profiles ``method`` with ``args``' settings."""
    from isolated import script_argv

    options = {name: getattr(args, name.strip("-").replace("-", "_")) for name in CHILD_OPTIONS}
    return script_argv(os.path.abspath(__file__), options | {"--methods": method, "--child": True})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="strong,kivi2,mixkvq")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per method")
    parser.add_argument(
        "--host", type=int, default=0, help="> 0: also profile the host and list this many of its events"
    )
    parser.add_argument("--child", action="store_true", help="profile the one method given, in this process")
    args = parser.parse_args(argv)
    if args.new_tokens < 4 or args.prefill_chunk < 1:
        parser.error("--new-tokens must be at least 4 and --prefill-chunk positive")
    if args.child and "," in args.methods:
        parser.error("--child profiles one method")
    return args


def main() -> None:
    from isolated import emit, run_child

    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/e2e_profile.py needs a CUDA GPU")
    if args.child:
        register_baselines()
        torch.manual_seed(0)
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        model = llama3_8b(args.layers)
        print(f"{args.methods}: warming up and profiling ...", flush=True)
        emit(
            profile_method(
                model, args.methods, args.batch, args.context, args.new_tokens, args.prefill_chunk, args.host
            )
        )
        return
    out_path = os.path.join(os.environ["OUT"], "e2e_profile.jsonl") if os.environ.get("OUT") else None
    for method in args.methods.split(","):  # each in a fresh process (``isolated``)
        (result,) = run_child(child_argv(args, method))
        print_profile(result, args.top)
        if out_path:
            with open(out_path, "a") as handle:
                handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
