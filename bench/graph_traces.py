"""Which graphs a chunked prefill and ``generate()`` make Dynamo trace, and how long each trace takes.

    python3 bench/graph_traces.py                        # mixkvq (kivi2) and Dynamo's eager backend
    python3 bench/graph_traces.py --backends mixkvq --layers 32 --context 4096 --chunk 1024

Runs on the CPU (no GPU needed): a small random Llama (``--layers`` layers, hidden 256) compiled with
each backend in a process of its own (Dynamo's first use in a process costs the first trace up to
0.5 s more), the flow of ``bench/e2e.py`` (the prompt, all but its last
token, written into a StaticCache ``--chunk`` tokens per forward as copies, then ``generate()`` of 4
tokens from that cache), and per backend the graphs Dynamo compiled with each one's seconds of
bytecode tracing, guard building and backend compile (``torch._dynamo.utils.compilation_time_metrics``,
one entry per graph, in the order traced). Comparing ``mixkvq`` with ``eager`` tells what a first
call's tracing owes to the flow (the chunk that initializes the cache, the later chunks, the one-token
steps) and what to the mixkvq backend (``docs/performance.md``, session 19: the same three graphs in
about the same time). Times on the CPU, not the GPU machine's host; compare backends within one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from e2e import prefill_in_chunks  # noqa: E402  (imports mixkvq_compile: the "mixkvq" backend)


def trace(backend: str, layers: int, context: int, chunk: int) -> dict:
    """Compile a fresh small Llama with ``backend`` and run the flow; the per-graph compile metrics."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    torch._dynamo.reset()
    compilation_time_metrics.clear()
    counters.clear()
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2 * context,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    eager_forward = model.__class__.forward.__get__(model)
    options = {"options": {"preset": "kivi2"}} if backend == "mixkvq" else {}
    model.forward = torch.compile(eager_forward, backend=backend, **options)
    ids = torch.randint(0, config.vocab_size, (1, context))
    cache = StaticCache(config=model.config, max_cache_len=context + 8)
    started = time.perf_counter()
    prefill_in_chunks(model, ids, cache, chunk, copy_chunks=True)
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            past_key_values=cache,
        )
    return {
        "seconds": time.perf_counter() - started,
        "graphs": counters["stats"]["unique_graphs"],
        "tracing": list(compilation_time_metrics.get("bytecode_tracing", [])),
        "guards": list(compilation_time_metrics.get("build_guards", [])),
        "backend": list(compilation_time_metrics.get("OutputGraph.call_user_compiler", [])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="mixkvq,eager", help="comma-separated torch.compile backends")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--context", type=int, default=2048, help="prompt tokens (the last one goes to generate)"
    )
    parser.add_argument("--chunk", type=int, default=1024, help="prompt tokens per forward")
    args = parser.parse_args()
    if args.layers < 1 or args.chunk < 1 or args.context < 2:
        parser.error("--layers and --chunk must be at least 1, --context at least 2")
    backends = args.backends.split(",")
    if len(backends) > 1:  # one process per backend
        print(f"torch {torch.__version__}; {args.layers} layers; prompt {args.context}, chunks {args.chunk}")
        for backend in backends:
            command = [sys.executable, __file__, "--backends", backend, "--layers", str(args.layers)]
            command += ["--context", str(args.context), "--chunk", str(args.chunk)]
            subprocess.run(command, check=True)
        return
    r = trace(backends[0], args.layers, args.context, args.chunk)
    print(
        f"{backends[0]:>8}: {r['graphs']} graphs, {r['seconds']:.1f} s in all; per graph, s: tracing "
        f"{_seconds(r['tracing'])}; guards {_seconds(r['guards'])}; backend {_seconds(r['backend'])}",
        flush=True,
    )


def _seconds(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) or "-"


if __name__ == "__main__":
    main()
