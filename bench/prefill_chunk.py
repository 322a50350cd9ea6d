"""Attention of one prompt chunk over a quantized prefix (GPU): where a chunked prefill's time goes.

    python3 bench/prefill_chunk.py                       # B = 8, 32k context, chunks 16 .. 4096
    python3 bench/prefill_chunk.py --batch 1 --context 131072 --chunks 64,4096

The last chunk of a ``context``-token prompt: ``Lq`` new tokens after ``context - Lq`` stored tokens,
B x 32 query heads over 8 KV heads, head_dim 128, bfloat16 (the e2e model's type), the bool causal
mask ``[B, 1, Lq, context]`` that transformers builds. Per chunk length, in one run (ms, median of
``triton.testing.do_bench``):

- ``strong``: what ``bench/e2e.py``'s strong fp16 baseline runs: SDPA with ``enable_gqa=True`` over the
  full-precision K/V of all ``context`` tokens, same mask;
- ``mixkvq``: ``ops._attend_with_kernels`` on a kivi2 store holding the prefix, as the CUDA path calls
  it: the fused Triton kernel for ``Lq <= FUSED_MAX_QUERY``, otherwise ``store.read`` (dequantize the
  prefix once into the buffer that also takes the chunk; the store is planar, so with
  ``kernels.dequantize``) and one SDPA with ``enable_gqa`` (no K/V copies);
- ``repeat``: the previous long-chunk code: ``store.read``, then SDPA over K/V repeated per query head;
- ``float-mask``: as ``mixkvq`` with the bool mask turned into an additive one once (SDPA converts a
  bool mask on every call);
- ``per-offset``: ``mixkvq`` with one SDPA call per query-head offset (``ops.ONE_GQA_CALL = False``)
  instead of one call with ``enable_gqa``;
- ``fused``: the fused Triton kernel (``decode_attention`` with the chunk as new tokens) at every
  ``Lq``, to see where dequantizing inside the kernel for every block of query rows stops paying;
- ``read``: ``store.read`` alone in PyTorch (dequantization of the prefix); ``read-triton``: the same
  with the Triton dequantization (``kernels.dequantize.dequantize_groups``), as ``mixkvq`` runs it.

The store holds quantized random keys and values (``bench/kernels.py``'s ``random_store``). Results go
to stdout and, when ``$OUT`` is set, to ``$OUT/prefill_chunk.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("MIXKVQ_BENCH_DTYPE", "bfloat16")

import kernels as kbench  # noqa: E402  (bench/kernels.py: timing and random-store helpers)

from mixkvq_compile import ops  # noqa: E402
from mixkvq_compile.config import PRESETS  # noqa: E402
from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402
from mixkvq_compile.kernels.dequantize import dequantize_groups  # noqa: E402

HQ, HKV, D = 32, 8, 128


def repeat_path(q, k, v, store, start, packed, mask, scale):
    """The long-chunk path before 2026-11-26: K/V of the query heads repeated (n_rep copies)."""
    past_k, past_v = store.read(start, packed)
    keys = torch.cat([past_k, k], dim=2).repeat_interleave(HQ // HKV, 1)
    values = torch.cat([past_v, v], dim=2).repeat_interleave(HQ // HKV, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def float_mask_path(q, k, v, store, start, packed, mask, scale):
    """``mixkvq`` with the bool mask made additive once, before the per-offset SDPA calls."""
    additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return ops._attend_with_kernels(q, k, v, store, start, packed, additive, scale, True)


def per_offset(q, k, v, store, start, packed, mask, scale):
    """``mixkvq`` with one SDPA call per query-head offset (``ops.ONE_GQA_CALL = False``)."""
    default, ops.ONE_GQA_CALL = ops.ONE_GQA_CALL, False
    try:
        return ops._attend_with_kernels(q, k, v, store, start, packed, mask, scale, True)
    finally:
        ops.ONE_GQA_CALL = default


def measure_chunk(b: int, ctx: int, lq: int, dtype: torch.dtype) -> dict:
    """Times (ms), extra memory (GiB) and errors against ``mixkvq`` of every variant for one chunk."""
    scale = D**-0.5
    start = ctx - lq
    store = kbench.random_store(PRESETS["kivi2"], b, ctx)
    store.set_length(start)
    packed = store.layout.flushed_groups(start)
    q = torch.randn(b, HQ, lq, D, dtype=dtype, device="cuda")
    k = torch.randn(b, HKV, lq, D, dtype=dtype, device="cuda")
    v = torch.randn(b, HKV, lq, D, dtype=dtype, device="cuda")
    pos = torch.arange(ctx, device="cuda")
    mask = (pos[None, :] <= (start + torch.arange(lq, device="cuda"))[:, None]).expand(b, 1, lq, ctx)
    mask = mask.contiguous()
    full_k = torch.randn(b, HKV, ctx, D, dtype=dtype, device="cuda")
    full_v = torch.randn(b, HKV, ctx, D, dtype=dtype, device="cuda")
    variants = {
        "strong": lambda: F.scaled_dot_product_attention(
            q, full_k, full_v, attn_mask=mask, scale=scale, enable_gqa=True
        ),
        "mixkvq": lambda: ops._attend_with_kernels(q, k, v, store, start, packed, mask, scale, True),
        "per-offset": lambda: per_offset(q, k, v, store, start, packed, mask, scale),
        "repeat": lambda: repeat_path(q, k, v, store, start, packed, mask, scale),
        "float-mask": lambda: float_mask_path(q, k, v, store, start, packed, mask, scale),
        "fused": lambda: decode_attention(
            q, store, start, mask, scale, new_key=k, new_value=v, packed=packed
        ),
        "read": lambda: store.read(start, packed),
        "read-triton": lambda: store.read(start, packed, dequantize_groups=dequantize_groups),
    }
    row = {"batch": b, "context": ctx, "chunk": lq}
    reference = None
    for name, fn in variants.items():
        try:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            row[f"{name}_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            if name in ("mixkvq", "per-offset", "repeat", "float-mask", "fused"):
                reference = out.float() if reference is None else reference
                row[f"{name}_rel_err"] = ((out.float() - reference).norm() / reference.norm()).item()
            del out
            row[f"{name}_ms"] = kbench.bench(fn, rep=100)
        except torch.OutOfMemoryError:
            row[f"{name}_ms"] = float("nan")
            print(f"chunk {lq} {name}: out of memory", flush=True)
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--chunks", default="16,64,256,1024,4096")
    args = parser.parse_args()
    dtype = kbench.DTYPE
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}, "
        f"{time.strftime('%Y-%m-%d')}, batch {args.batch}, context {args.context}",
        flush=True,
    )
    rows = []
    for lq in map(int, args.chunks.split(",")):
        row = measure_chunk(args.batch, args.context, lq, dtype)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    names = ("strong", "mixkvq", "per-offset", "repeat", "float-mask", "fused", "read", "read-triton")
    print(f"\n{'chunk':>6} " + " ".join(f"{n:>10}" for n in names) + "  (ms; mixkvq / strong)")
    for r in rows:
        cells = " ".join(f"{r.get(n + '_ms', float('nan')):>10.3f}" for n in names)
        print(f"{r['chunk']:>6} {cells}  {r['mixkvq_ms'] / r['strong_ms']:.2f}x")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prefill_chunk.json"), "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": str(dtype), "rows": rows}, handle)


if __name__ == "__main__":
    main()
