"""End-to-end decode benchmark on a Llama-3-8B-shaped model with random bf16 weights (GPU).

    python3 bench/e2e.py --methods strong,hf,kivi2,mixkvq --contexts 32768 --batches 8
    python3 bench/e2e.py --layers 32 --contexts 8192,32768 --batches 1,8 --new-tokens 32

Methods, each measured through a real ``generate()`` (prefill of ``context`` random tokens, then
``new-tokens`` greedy tokens with ``cache_implementation="static"``):
- ``hf``: transformers' StaticCache + SDPA + ``repeat_kv``; generate() compiles the decode step itself
  (Inductor, ``mode="reduce-overhead"``, its default on CUDA with a static cache);
- ``strong``: the same with an attention function registered through ``AttentionInterface`` that calls
  SDPA with ``enable_gqa=True`` (no ``repeat_kv`` copies): over the static buffer in a decode step, over
  the keys written so far in a prompt chunk, with the same mask-free attention as mixkvq's (since
  2026-11-27; before, over the static buffer without a mask, because transformers passed none);
- ``inductor``: the same model as ``hf`` with ``model.forward`` compiled by Inductor
  (``torch.compile(model.forward, mode="reduce-overhead")``, the issue's anchor), so that the prompt
  chunks go through compiled graphs as they do with mixkvq: Inductor's compile of the same flow;
  ``inductor-nograph``: the same in Inductor's default mode (no CUDA graphs). With torch 2.11 on an
  H200, ``inductor`` died twice in this flow (a segmentation fault in ``libtorch_python.so`` after
  Inductor skipped CUDA graphs for the prompt graphs, ``docs/performance.md`` session 20);
  ``inductor-nograph`` ran;
- ``kivi2`` / ``mixkvq``: ``backend="mixkvq"`` with that preset and the backend's defaults (the
  one-token decode graphs compiled by Inductor, in CUDA graphs; prompt graphs as traced since
  2026-11-27, compiled by Inductor before); ``kivi2-launch`` / ``mixkvq-launch``: the same with
  ``cuda_graphs=False`` (every kernel launched from Python); ``kivi2-eager`` / ``mixkvq-eager``: with
  ``prefill_compiler="eager"`` (prompt graphs as traced, the default now); ``kivi2-inductor`` /
  ``mixkvq-inductor``: with ``prefill_compiler="inductor"`` (prompt graphs compiled by Inductor).
With ``--prefill-chunk N`` the prompt (all but its last token) is written to the StaticCache N tokens per
forward before generate() continues from it; the prefill time then covers those forwards.
Decode step time: a logits processor synchronizes and takes the time at every generated token; a call's
step is the median interval between consecutive decode steps in its second half (the decode graph is
compiled and captured in the first steps), and the reported step is the median over ``--repeats``
calls after two warm-up calls (``step_ms_runs`` lists them all; ``runs`` gives each call's fastest and
slowest timed step and the GPU's clocks, temperature, power and clock limits after its first and last
token, from ``bench/gpu_state.py``, to tell a spread between calls caused by the card's state).
Until 2026-11-27 the step was (time of generate(new tokens) - time of generate(1 token)) /
(new tokens - 1): both calls include the prefill, whose run-to-run variation (0.5% of an 11 s prefill
is 2 ms per step at 32 tokens) made that difference noisier than the effects measured.
``--single-call`` (for the largest batch that fits, where every prefill of B x 32k tokens takes
minutes) runs generate() once, timed per step the same way;
prefill and first-call times are then that call's time to the first token, compiles included.
Weights do not change speed, so random weights measure the real cost. The byte roofline of a step is
(weight bytes + KV bytes held) / measured copy bandwidth.
``--sliding-window W`` builds the same shape as a Mistral model whose every layer keeps a W-token window
(KV / fp16 is then against a 16-bit cache of the window). Every point (method, batch,
context) runs in a fresh process (``bench/isolated.py`` says why; until 2026-11-28 all points ran in one
process, the methods after the first paying a slower graph launch). Results go to stdout (a table) and,
when ``$OUT`` is set, to ``$OUT/e2e.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from gpu_state import describe, gpu_state

from mixkvq_compile.chunk_attention import attend_split, is_plain_causal


def llama3_8b(layers: int, sliding_window: int = 0):
    """The Llama-3-8B shape with random weights; ``sliding_window`` > 0: the same shape as a Mistral
    model whose every layer has that window."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls, extra = LlamaConfig, LlamaForCausalLM, {}
    if sliding_window:
        config_cls, model_cls, extra = MistralConfig, MistralForCausalLM, {"sliding_window": sliding_window}
    config = config_cls(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        **extra,
    )
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config, device="cuda")
    return model.eval()


def strong_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """SDPA with grouped-query heads handled inside the kernel (no repeat_kv copies), under the mask
    transformers builds for sdpa (registered with the function). A prompt chunk (more than one query,
    run eagerly) attends to the keys written so far only, as a serving engine does; under the plain
    causal rule (no padding; the test mixkvq uses) without a mask tensor, by the same
    ``chunk_attention.attend_split`` (cuDNN) that mixkvq runs. A decode step (one query, in
    generate()'s CUDA graph) attends to the static buffer without a mask (see below)."""
    lq = query.shape[2]
    if lq == 1:
        # Decode: no mask, as before 2026-11-27 (no mask was registered then): the step also reads the
        # unwritten tail of the buffer (at most --new-tokens zero keys); the same bytes and time as the
        # filled length, which a CUDA graph cannot slice to, and no mask to read.
        attention_mask = None
    else:
        positions = kwargs.get("cache_position")
        if positions is None:
            raise ValueError("strong_attention: a prompt chunk needs cache_position (transformers >= 5)")
        filled = int(positions[-1]) + 1
        key, value = key[:, :, :filled], value[:, :, :filled]
        start = key.shape[2] - lq
        if attention_mask is not None:
            attention_mask = attention_mask[..., : key.shape[2]]
            plain = is_plain_causal(attention_mask, start, key.shape[2])  # no padding
        else:  # transformers leaves out a mask that is plain causal
            plain = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if plain:  # the attention mixkvq runs for such a chunk, on the 16-bit K/V
            out = attend_split(query, key, value, start, scaling or query.shape[-1] ** -0.5)
            return out.transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def register_baselines() -> None:
    """Register ``strong_attention`` as transformers' attention ``"strong_sdpa"``, with sdpa's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("strong_sdpa", strong_attention)
    AttentionMaskInterface.register("strong_sdpa", sdpa_mask)  # the mask sdpa gets (none without this)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.randn(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    return 2 * 2**31 / seconds


def prefill_in_chunks(model, ids, cache, chunk: int, copy_chunks: bool = False):
    """Write all prompt tokens but the last into ``cache`` (a reset StaticCache), ``chunk`` tokens per
    forward, as a serving engine's chunked prefill does (one forward over 8 x 32k tokens materializes a
    [8, 1, 32k, 32k] mask and runs out of memory in the fp16 baselines). The chunks are views of
    ``ids``; ``copy_chunks``: copies (storage offset 0), with which a compiled forward's second call
    traces no graph for its first chunk (``docs/performance.md``, session 15)."""
    cache.reset()
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, chunk):
            end = min(start + chunk, ids.shape[1] - 1)
            model(
                input_ids=ids[:, start:end].clone() if copy_chunks else ids[:, start:end],
                past_key_values=cache,
                cache_position=torch.arange(start, end, device=ids.device),
                use_cache=True,
                logits_to_keep=1,
            )


def timed_generate(
    model, ids, new_tokens: int, cache=None, chunk: int = 0, logits_processor=None, copy_chunks: bool = False
):
    """Seconds for a prefill plus ``new_tokens`` greedy tokens; the prompt goes in one forward inside
    generate(), or (``chunk`` > 0) in chunks into ``cache`` before generate() continues from it
    (``copy_chunks``: see ``prefill_in_chunks``)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    kwargs = {"cache_implementation": "static"}
    if chunk:
        prefill_in_chunks(model, ids, cache, chunk, copy_chunks)
        kwargs = {"past_key_values": cache}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        logits_processor=logits_processor,
        **kwargs,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - started, out


class StepClock:
    """A logits processor that synchronizes and records the time at every generated token, and the
    GPU's clocks and temperature (``gpu_state``) after the first one."""

    def __init__(self):
        self.times: list[float] = []
        self.first_state: dict | None = None

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == 1:  # the first step is not timed (step_intervals)
            self.first_state = gpu_state()
        return scores


def single_call(model, ids, new_tokens: int, cache, chunk: int) -> tuple[float, float, object, dict]:
    """One generate(): (seconds to the first token, median decode step seconds, output, the run's
    fastest and slowest timed step in ms and the GPU's state after its first and last token)."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    torch.cuda.synchronize()
    started = time.perf_counter()
    _, out = timed_generate(model, ids, new_tokens, cache, chunk, LogitsProcessorList([clock]))
    intervals = step_intervals(clock.times)
    run_info = {
        "step_ms_min": min(intervals) * 1e3,
        "step_ms_max": max(intervals) * 1e3,
        "gpu_first": clock.first_state,
        "gpu_last": gpu_state(),
    }
    return clock.times[0] - started, statistics.median(intervals), out, run_info


def step_intervals(times: list[float]) -> list[float]:
    """The intervals between consecutive times of the second half of ``times`` (one per generated
    token, in seconds): decode steps, after the steps that compile and capture the graphs."""
    if len(times) < 4:
        raise ValueError(f"{len(times)} generated tokens: time at least 4 (--new-tokens) to measure a step")
    half = times[len(times) // 2 :]
    return [b - a for a, b in zip(half, half[1:])]


def set_method(model, method: str):
    """Set up ``model`` for ``method`` (module docstring): its attention implementation and, for the
    mixkvq methods, ``model.forward`` compiled with ``backend="mixkvq"``; returns the eager forward."""
    torch._dynamo.reset()
    eager_forward = model.__class__.forward.__get__(model)
    model.forward = eager_forward
    model.config._attn_implementation = "strong_sdpa" if method == "strong" else "sdpa"
    if method in ("inductor", "inductor-nograph"):
        mode = "reduce-overhead" if method == "inductor" else None
        model.forward = torch.compile(eager_forward, mode=mode)
    elif method not in ("hf", "strong"):
        preset, _, variant = method.partition("-")
        options = {"preset": preset}
        if variant == "launch":  # the same kernels launched one by one (no CUDA graph)
            options["cuda_graphs"] = False
        elif variant in ("eager", "inductor"):  # who runs the prompt graphs
            options["prefill_compiler"] = variant
        elif variant:
            raise ValueError(f"unknown method {method!r}")
        model.forward = torch.compile(eager_forward, backend="mixkvq", options=options)
    return eager_forward


def kv_bytes(cache) -> tuple[int, int]:
    """(bytes the KV cache holds, bytes of a 16-bit cache of the same capacity: the window of a
    sliding-window layer, ``max_cache_len`` of a full one)."""
    import mixkvq_compile

    report = mixkvq_compile.memory_report(cache)
    return report.held_bytes, report.fp16_capacity_bytes


def run(
    model,
    method: str,
    batch: int,
    context: int,
    new_tokens: int,
    bandwidth: float,
    chunk: int,
    single: bool,
    repeats: int = 3,
) -> dict:
    import mixkvq_compile

    set_method(model, method)  # (each point runs in its own process: nothing to restore afterwards)
    # hf/strong: generate() itself compiles the decode step (Inductor, mode="reduce-overhead") when the
    # cache is static, and runs the prefill eagerly: what users run today.
    ids = torch.randint(0, 128256, (batch, context), device="cuda", generator=None)
    cache = None
    if chunk:  # one cache for every call (as generate() keeps its own): a new one would recompile
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens)
    steps, runs = [], []
    if single:
        torch.cuda.reset_peak_memory_stats()
        prefill, step, out, run_info = single_call(model, ids, new_tokens, cache, chunk)
        first, steps, runs = prefill, [step], [run_info]
    else:
        first, out = timed_generate(model, ids, new_tokens, cache, chunk)  # compiles prefill and decode
        del out
        # A second warm-up: in the smoke run of 2026-11-26 the 2nd call of the mixkvq methods took 2.4
        # to 8.7 s longer than the 3rd (more compiles for the graphs that take over once the cache exists).
        timed_generate(model, ids, new_tokens, cache, chunk)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        prefill, out = timed_generate(model, ids, 1, cache, chunk)
        for _ in range(repeats):
            del out
            _, step, out, run_info = single_call(model, ids, new_tokens, cache, chunk)
            steps.append(step)
            runs.append(run_info)
        step = statistics.median(steps)
    peak = torch.cuda.max_memory_allocated()
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    held, fp16_kv = kv_bytes(cache)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    roofline = (weights + held) / bandwidth
    result = {
        "method": method,
        "batch": batch,
        "context": context,
        "layers": model.config.num_hidden_layers,
        "step_ms": step * 1e3,
        "step_ms_runs": [t * 1e3 for t in steps],
        "runs": runs,
        "tokens_per_s": batch / step,
        "prefill_s": prefill,
        "first_call_s": first,
        "roofline_ms": roofline * 1e3,
        "roofline_fraction": roofline / step,
        "peak_gib": peak / 2**30,
        "kv_gib": held / 2**30,
        "kv_vs_fp16": held / fp16_kv,
        "rewritten": mixkvq_compile.counters["attention_rewritten"],
        "prefill_chunk": chunk,
        "single_call": single,
        "sliding_window": getattr(model.config, "sliding_window", None) or 0,
    }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="strong,hf,kivi2,mixkvq")
    parser.add_argument("--contexts", default="32768")
    parser.add_argument("--batches", default="8")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--prefill-chunk", type=int, default=0, help="prompt tokens per forward (0: one forward in generate)"
    )
    parser.add_argument(
        "--single-call", action="store_true", help="one generate() per point (largest-batch probes)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed generate() calls per point (the step is their median)"
    )
    parser.add_argument(
        "--sliding-window", type=int, default=0, help="> 0: every layer a sliding window of this many tokens"
    )
    parser.add_argument(
        "--child", action="store_true", help="run the one point given, in this process (what each child does)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 4:
        parser.error("--repeats must be at least 1 and --new-tokens at least 4 (a step is timed per token)")
    if args.child and len(points(args)) != 1:
        parser.error("--child runs one point: one method, one batch, one context")
    return args


def points(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The (method, batch, context) points of ``args``, in the order they run: per context, per batch,
    every method."""
    return [
        (method, batch, context)
        for context in args.contexts.split(",")
        for batch in args.batches.split(",")
        for method in args.methods.split(",")
    ]


def child_argv(args: argparse.Namespace, method: str, batch: str, context: str) -> list[str]:
    """The command line of the child process that measures one point with ``args``' settings."""
    from isolated import script_argv

    return script_argv(
        os.path.abspath(__file__),
        {
            "--methods": method,
            "--batches": batch,
            "--contexts": context,
            "--layers": args.layers,
            "--new-tokens": args.new_tokens,
            "--prefill-chunk": args.prefill_chunk,
            "--single-call": args.single_call,
            "--repeats": args.repeats,
            "--sliding-window": args.sliding_window,
            "--child": True,
        },
    )


def measure_point(args: argparse.Namespace) -> dict:
    """In a child: the one point of ``args`` (``--child``), measured in this process."""
    method, batch, context = args.methods, int(args.batches), int(args.contexts)
    register_baselines()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
    model = llama3_8b(args.layers, args.sliding_window)
    try:
        result = run(
            model,
            method,
            batch,
            context,
            args.new_tokens,
            bandwidth,
            args.prefill_chunk,
            args.single_call,
            args.repeats,
        )
    except torch.OutOfMemoryError:
        result = {"method": method, "batch": batch, "context": context, "error": "out of memory"}
    print(json.dumps(result), flush=True)
    for i, r in enumerate(result.get("runs", [])):
        print(
            f"  run {i}: step {result['step_ms_runs'][i]:.2f} ms (timed steps "
            f"{r['step_ms_min']:.2f}-{r['step_ms_max']:.2f}); GPU after the first token "
            f"{describe(r['gpu_first'])}, after the last {describe(r['gpu_last'])}",
            flush=True,
        )
    return result


def main() -> None:
    from isolated import emit, run_child

    args = parse_args()
    if args.child:
        emit(measure_point(args))
        return
    results = []
    out_path = os.path.join(os.environ["OUT"], "e2e.jsonl") if os.environ.get("OUT") else None
    for method, batch, context in points(args):
        print(f"== {method}, batch {batch}, context {context}: a fresh process", flush=True)
        try:
            point = run_child(child_argv(args, method, batch, context))
        except RuntimeError as error:
            point = [{"method": method, "batch": int(batch), "context": int(context), "error": str(error)}]
        results += point
        if out_path:
            with open(out_path, "a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in point)
    print(
        f"\n{'method':>7} {'B':>3} {'ctx':>6} {'step ms':>8} {'tok/s':>8} {'roofline':>8} {'frac':>5} "
        f"{'peak GiB':>8} {'KV GiB':>7} {'KV/fp16':>7} {'prefill s':>9} {'1st call s':>10}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['method']:>7} {r['batch']:>3} {r['context']:>6} {r['error']}")
            continue
        print(
            f"{r['method']:>7} {r['batch']:>3} {r['context']:>6} {r['step_ms']:>8.2f} "
            f"{r['tokens_per_s']:>8.1f} {r['roofline_ms']:>8.2f} {r['roofline_fraction']:>5.2f} "
            f"{r['peak_gib']:>8.1f} {r['kv_gib']:>7.2f} {r['kv_vs_fp16']:>7.3f} {r['prefill_s']:>9.2f} "
            f"{r['first_call_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()
