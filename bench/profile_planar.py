"""One planar decode launch at 8 x 32k (kivi2, bfloat16) for a profiler (GPU).

    ncu --kernel-name planar_split_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        python3 bench/profile_planar.py

Runs ``decode_attention`` three times on a store of quantized random keys and values (bench/kernels.py's
``random_store``), so the profiled launch is compiled and warm.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402

from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402

if __name__ == "__main__":
    store = kb.random_store(kb.CONFIGS["kivi2"], 8, 32768)
    q = torch.randn(8, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        decode_attention(q, store, 32768, packed=store.layout.flushed_groups(32768))
    torch.cuda.synchronize()
