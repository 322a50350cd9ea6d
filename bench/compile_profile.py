"""Where the first call's time goes: Dynamo, Inductor, the mixkvq passes and each Triton kernel's JIT.

    python3 bench/compile_profile.py --method kivi2            # one method per process (cold caches)
    for m in strong kivi2 mixkvq; do python3 bench/compile_profile.py --method $m; done
    python3 bench/compile_profile.py --method inductor --copy-chunks   # Inductor over the same flow

Builds ``bench/e2e.py``'s Llama-3-8B-shaped model and times one first ``generate()`` (chunked prefill
of ``--context`` tokens in ``--prefill-chunk`` chunks, then ``--new-tokens`` greedy tokens), as the
"first call" of ``e2e.py``, then a second one on the same cache (prefill and one token: the graphs a
later call still traces). Without ``--warm`` the Triton and Inductor caches of the process are fresh
temporary folders, as on a new machine. Prints:
- the first call's seconds and graphs; the second call's seconds, its new graphs and their tracing;
and of the first call:
- Dynamo's and Inductor's phases (``torch._dynamo.utils.compilation_time_metrics``, the
  ten longest); the recompiles of both calls are logged as they happen (a line each, with the guard
  that failed);
- seconds in ``PassManager`` (the mixkvq passes) and in ``compile_fx`` for the mixkvq methods, and
  the decode graph's first run waiting for its kernels' compile thread (``prewarm wait``);
- per Triton ``@triton.jit`` kernel run in this process, the variants compiled and their seconds
  (``JITFunction._do_compile``: a compile, or a load from the disk cache), and the seconds of each
  compile stage over them (``make_cubin`` runs ptxas), and of building their C launchers with the
  host compiler (at a kernel's first launch, not in ``_do_compile``). Inductor's own generated kernels
  compile in its worker processes and are not listed; their time is inside ``compile_fx``.
Each line is timed on its own and some nest (Dynamo's phases contain ``compile_fx``, whose Inductor may
run mixkvq code), so they need not add up to the first call, which also holds the prefill and the
decode steps. With ``$OUT`` set, the numbers also go to ``$OUT/compile_<method>.json``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import json
import os
import sys
import tempfile
import threading
import time


def _timed(owner, name: str, totals: dict, key_of) -> None:
    """Replace ``owner.name`` (a function, method or static method) by a wrapper that adds each call's
    seconds to ``totals[key_of(*args)]`` (``[count, seconds]``); nested calls of the same wrapper in
    one thread count once."""
    original = getattr(owner, name)
    local = threading.local()  # the nesting depth, per thread (a compile may run in another thread)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        local.depth = getattr(local, "depth", 0) + 1
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            local.depth -= 1
            if local.depth == 0:
                entry = totals.setdefault(key_of(*args, **kwargs), [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - started

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def time_triton_stages(totals: dict) -> None:
    """Time each compile stage of Triton's CUDA backend (``make_ttir`` .. ``make_cubin``, which runs
    ptxas) into ``totals``, keyed by the stage's name (``_timed``)."""
    from triton.backends.nvidia.compiler import CUDABackend

    for stage in ("make_ttir", "make_ttgir", "make_llir", "make_ptx", "make_cubin"):
        _timed(CUDABackend, stage, totals, lambda *a, _stage=stage, **k: _stage)


def time_prewarm_wait(totals: dict) -> None:
    """Add to ``totals["prewarm wait"]`` the seconds each compiled graph's first run waits for the thread
    that compiles its decode kernels (``mixkvq_compile.prewarm``): the part of that compile Inductor's
    own did not cover."""
    from mixkvq_compile import prewarm

    original = prewarm.join_before_first_call

    def join_before_first_call(compiled, thread):
        join = thread.join

        def timed_join(*args, **kwargs):
            started = time.perf_counter()
            join(*args, **kwargs)
            entry = totals.setdefault("prewarm wait", [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - started

        thread.join = timed_join
        return original(compiled, thread)

    prewarm.join_before_first_call = join_before_first_call


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--method", required=True, help="strong, hf, inductor, kivi2, mixkvq (bench/e2e.py's methods)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--warm", action="store_true", help="keep the machine's Triton and Inductor caches")
    parser.add_argument(
        "--copy-chunks",
        action="store_true",
        help="prompt chunks as copies, not views (e2e.prefill_in_chunks)",
    )
    args = parser.parse_args()
    if not args.warm:  # before torch and triton read them
        root = tempfile.mkdtemp(prefix="mixkvq-compile-")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")

    import torch
    import triton.runtime.jit as triton_jit
    from torch._inductor import compile_fx

    sys.path.insert(0, os.path.dirname(__file__))
    import e2e

    from mixkvq_compile.passes import PassManager

    if not torch.cuda.is_available():
        raise SystemExit("bench/compile_profile.py needs a CUDA GPU")
    torch._logging.set_logs(recompiles=True)
    jit: dict = {}
    _timed(triton_jit.JITFunction, "_do_compile", jit, lambda self, *a, **k: self.fn.__name__)
    # Triton's compile stages (main process: our kernels; Inductor compiles its own in worker processes).
    stages: dict = {}
    time_triton_stages(stages)
    # Each kernel signature's C launcher, built with the host compiler at the first launch, outside
    # _do_compile (Triton 3.6: driver.CudaLauncher; 0.2 s for the planar kernel's on this CPU machine).
    from triton.backends.nvidia import driver as cuda_driver

    _timed(cuda_driver.CudaLauncher, "__init__", stages, lambda *a, **k: "C launchers (cc)")
    phases: dict = {}
    _timed(PassManager, "__call__", phases, lambda *a, **k: "mixkvq passes")
    # The mixkvq backend and Dynamo's Inductor backend import compile_fx from its module at each call.
    _timed(compile_fx, "compile_fx", phases, lambda *a, **k: "compile_fx (Inductor)")
    time_prewarm_wait(phases)

    e2e.register_baselines()
    torch.manual_seed(0)
    model = e2e.llama3_8b(args.layers)
    e2e.set_method(model, args.method)
    ids = torch.randint(0, 128256, (args.batch, args.context), device="cuda")
    cache = None
    if args.prefill_chunk:
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=args.context + args.new_tokens)
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds, _ = e2e.timed_generate(
        model, ids, args.new_tokens, cache, args.prefill_chunk, copy_chunks=args.copy_chunks
    )
    graphs = counters["stats"]["unique_graphs"]
    # Everything below the two call times is the first call's; the second call is timed as a whole.
    report = {
        "method": args.method,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
        "context": args.context,
        "cold_caches": not args.warm,
        "copy_chunks": args.copy_chunks,
        "first_call_s": seconds,
        "first_call_graphs": graphs,
        "first_call_dynamo_phases_s": {k: float(sum(v)) for k, v in compilation_time_metrics.items()},
        "first_call_phases": {k: {"calls": n, "s": s} for k, (n, s) in phases.items()},
        "first_call_triton_stages": {k: {"calls": n, "s": s} for k, (n, s) in stages.items()},
        "first_call_triton_jit": {
            k: {"variants": n, "s": s} for k, (n, s) in sorted(jit.items(), key=lambda kv: -kv[1][1])
        },
    }
    # A second generate() on the same cache (prefill and one token): what is still traced or compiled.
    report["second_call_s"], _ = e2e.timed_generate(
        model, ids, 1, cache, args.prefill_chunk, copy_chunks=args.copy_chunks
    )
    report["second_call_new_graphs"] = counters["stats"]["unique_graphs"] - graphs
    report["second_call_tracing_s"] = float(sum(compilation_time_metrics.get("bytecode_tracing", []))) - (
        report["first_call_dynamo_phases_s"].get("bytecode_tracing", 0.0)
    )
    print(
        f"\n{args.method}: first call {seconds:.1f} s, {graphs} graphs; second call "
        f"{report['second_call_s']:.1f} s, {report['second_call_new_graphs']} more graphs "
        f"({report['second_call_tracing_s']:.1f} s of tracing); {report['device']}, torch {report['torch']}"
    )
    print("the first call's:")
    for name, value in sorted(report["first_call_dynamo_phases_s"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"  dynamo/inductor {name:<48} {value:8.2f} s")
    for name, entry in report["first_call_phases"].items():
        print(f"  {name:<64} {entry['s']:8.2f} s ({entry['calls']} calls)")
    total = collections.Counter()
    for name, entry in report["first_call_triton_jit"].items():
        total["s"] += entry["s"]
        print(f"  triton jit {name:<53} {entry['s']:8.2f} s ({entry['variants']} variants)")
    print(f"  triton jit, all kernels (first call){'':<28} {total['s']:8.2f} s")
    for name, entry in report["first_call_triton_stages"].items():  # make_cubin runs ptxas
        print(f"  triton stage {name:<51} {entry['s']:8.2f} s ({entry['calls']} calls)")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"compile_{args.method}.json"), "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
