"""Query rows per program and programs per SM for the planar decode kernel (GPU).

    python3 bench/planar_block.py            # writes $OUT/planar_block.json when $OUT is set

A one-token decode step of 32 query heads over 8 KV heads has 4 query rows per KV head, and until
093b845 the planar kernel padded them to ``BLOCK_M = 16`` rows: the tensor-core products are 16 rows
tall, so 12 of the 16 rows of every score, probability and accumulator tile are padding. Triton
also compiles dots with fewer rows (it pads inside the product), which shrinks the tiles, the
registers (254 -> ~162 per thread at 4 rows, offline ``cuobjdump --dump-resource-usage``) and so
raises the programs that fit an SM (8 -> 12), at the price of register moves and shuffles that
rebuild the 16-row operands (766 -> 845 SASS instructions per group, ``bench/sass.py``-style count).

This times ``decode_attention`` on kivi2 stores (float16, head_dim 128) for ``block_m`` in 16, 8, 4
and split counts for 8, 12 and 16 programs per SM, with cuDNN SDPA (``enable_gqa``) on float16 K/V of
the same shape in the same run, and the relative difference of each variant's output to the default
launch (a different split count or row block only changes the summation order).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402

from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402

SHAPES = ((8, 32768), (1, 131072), (1, 32768), (32, 8192))
VARIANTS = ((16, 8, 3), (8, 12, 3), (4, 8, 3), (4, 12, 3), (4, 16, 3), (4, 12, 2), (4, 12, 4))
"""(block_m, programs per SM, pipeline stages); the first is the default launch."""


def main() -> None:
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"{dev}; {time.strftime('%Y-%m-%d')}; ms of decode_attention (CUDA-graph replay), kivi2 fp16")
    rows = []
    for batch, ctx in SHAPES:
        q = torch.randn(batch, kb.HQ, 1, kb.D, dtype=torch.float16, device="cuda")
        k = torch.randn(batch, kb.HKV, ctx, kb.D, dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)

        def sdpa(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        cudnn = kb.bench_graph(sdpa)
        del k, v
        torch.cuda.empty_cache()
        store = kb.random_store(kb.CONFIGS["kivi2"], batch, ctx)
        packed = store.layout.flushed_groups(ctx)
        ref = decode_attention(q, store, ctx, packed=packed).float()
        for block_m, per_sm, stages in VARIANTS:
            splits = kb.decode_splits(batch, packed, per_sm)
            kw = dict(packed=packed, block_m=block_m, num_splits=splits, num_stages=stages)
            out = decode_attention(q, store, ctx, **kw).float()
            diff = ((out - ref).norm() / ref.norm()).item()

            def step(q=q, store=store, ctx=ctx, kw=kw):
                return decode_attention(q, store, ctx, **kw)

            times = [kb.bench_graph(step) for _ in range(2)]
            row = dict(
                shape=f"{batch}x{ctx}",
                block_m=block_m,
                per_sm=per_sm,
                stages=stages,
                splits=splits,
                ms=min(times),
                repeat_ms=times,
                cudnn_ms=cudnn,
                x_cudnn=cudnn / min(times),
                diff=diff,
            )
            rows.append(row)
            print(
                f"{row['shape']:>9} bm{block_m:<2} {per_sm:>2}/SM st{stages} splits {splits:>3}: "
                f"{times[0]:.4f} {times[1]:.4f} ms; cuDNN {cudnn:.4f} x{row['x_cudnn']:.2f} diff {diff:.1e}",
                flush=True,
            )
        del store
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "planar_block.json"), "w") as f:
            json.dump(dict(device=dev, date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
