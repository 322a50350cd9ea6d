"""Where a chunked prefill's time goes: the strong fp16 baseline against mixkvq, op by op (GPU).

    python3 bench/prefill_profile.py                      # 4 layers, B = 8, 32k tokens, chunks of 4096
    python3 bench/prefill_profile.py --layers 32 --rows 25

The Llama-3-8B-shaped model of ``bench/e2e.py`` (random bf16 weights, ``--layers`` of its 32 layers)
writes a ``context``-token prompt into a StaticCache ``chunk`` tokens per forward, as
``bench/e2e.py --prefill-chunk`` does, once to warm up (compiles) and once under ``torch.profiler``.
For each method it prints the wall time of the profiled prefill and the operators with the most GPU
time (self time of the kernels they launched), so the two tables show where mixkvq spends more.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import e2e  # noqa: E402


def prefill_profile(model, method: str, batch: int, context: int, chunk: int, rows: int) -> float:
    """Seconds of one chunked prefill (after a warm-up one); prints the top GPU operators."""
    from transformers import StaticCache

    eager_forward = e2e.set_method(model, method)
    ids = torch.randint(0, 128256, (batch, context), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=context + 8)
    e2e.prefill_in_chunks(model, ids, cache, chunk)  # compiles
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        e2e.prefill_in_chunks(model, ids, cache, chunk)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    print(f"\n=== {method}: prefill {seconds:.3f} s (profiled) ===", flush=True)
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60
    )
    print(table, flush=True)
    model.forward = eager_forward
    del cache
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="strong,kivi2-eager", help="as bench/e2e.py's --methods")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    from transformers import AttentionInterface

    AttentionInterface.register("strong_sdpa", e2e.strong_attention)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    model = e2e.llama3_8b(args.layers)
    times = {
        m: prefill_profile(model, m, args.batch, args.context, args.chunk, args.rows)
        for m in args.methods.split(",")
    }
    print("prefill seconds:", {m: round(t, 3) for m, t in times.items()})


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/prefill_profile.py needs a CUDA GPU")
    main()
