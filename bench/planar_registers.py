"""Does occupancy limit the planar decode kernel? Register caps (``maxnreg``) x split counts (GPU).

    python3 bench/planar_registers.py

The planar packed-group kernel compiles to ~250 registers per thread at one warp, so 8 programs fit
an SM. This times ``decode_attention`` on kivi2 stores (bfloat16, 32 query heads over 8 KV heads,
head_dim 128) with the kernel's registers capped at 168 (12 warps per SM fit) and 128 (16 per SM;
ptxas then spills, counted offline with ``bench/sass.py``-style tooling) and the split count scaled to
fill those slots, two repeats each, with the relative difference of the output to the default launch
(a different split count changes the summation order). The cap is passed by wrapping Triton's
launcher for this one kernel: ``decode_attention`` has no such option.
"""

from __future__ import annotations

import os
import sys

import torch
from triton.runtime import jit as triton_jit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402

from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402

LAUNCH = triton_jit.JITFunction.run
SHAPES = ((8, 32768), (1, 131072), (1, 32768), (32, 8192))
VARIANTS = ((None, 8), (168, 8), (168, 12), (168, 16), (128, 16), (128, 24))  # (maxnreg, programs per SM)


def launch_with_cap(cap):
    """Triton's launcher with ``maxnreg=cap`` added for the planar kernel only (None: unchanged)."""

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__name__ == "planar_split_kernel" and cap:
            kwargs["maxnreg"] = cap
        return LAUNCH(self, *args, grid=grid, warmup=warmup, **kwargs)

    return run


def time_variant(q, store, length, packed, splits) -> list[float]:
    return [
        kb.bench_graph(lambda: decode_attention(q, store, length, packed=packed, num_splits=splits))
        for _ in range(2)
    ]


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}; ms of decode_attention (CUDA-graph replay), two repeats")
    for batch, ctx in SHAPES:
        store = kb.random_store(kb.CONFIGS["kivi2"], batch, ctx)
        q = torch.randn(batch, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
        packed = store.layout.flushed_groups(ctx)
        ref = decode_attention(q, store, ctx, packed=packed).float()
        for cap, per_sm in VARIANTS:
            triton_jit.JITFunction.run = launch_with_cap(cap)
            try:
                splits = max(1, min(per_sm * sms // (batch * 8), -(-packed // 4)))
                out = decode_attention(q, store, ctx, packed=packed, num_splits=splits)
                diff = ((out.float() - ref).norm() / ref.norm()).item()
                times = " ".join(f"{t:.4f}" for t in time_variant(q, store, ctx, packed, splits))
            finally:
                triton_jit.JITFunction.run = LAUNCH
            print(f"{batch}x{ctx} maxnreg={cap} splits={splits} {times} diff={diff:.1e}", flush=True)
        del store
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
