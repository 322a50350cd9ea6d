"""One planar decode launch at 8 x 32k (kivi2, bfloat16 by default) for a profiler (GPU).

    ncu --kernel-name planar_split_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        python3 bench/profile_planar.py
    ncu ... python3 bench/profile_planar.py --config mixkvq-default --dtype float16

For where the warps wait, per instruction: ``bench/ncu_stalls.py`` (its docstring has the commands).

Runs ``decode_attention`` three times on a store of quantized random keys and values (bench/kernels.py's
``random_store``), so the profiled launch is compiled and warm. ``--dtype`` is the query's and the
store's, as in ``bench/e2e.py``'s model (until 2026-11-27 the store was float16 whatever the query).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402

from mixkvq_compile.config import PRESETS  # noqa: E402
from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402

CONFIGS = {**kb.CONFIGS, "mixkvq-default": PRESETS["mixkvq"]}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="kivi2", choices=sorted(CONFIGS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    store = kb.random_store(CONFIGS[args.config], 8, 32768, dtype)
    q = torch.randn(8, 32, 1, 128, dtype=dtype, device="cuda")
    for _ in range(3):
        decode_attention(q, store, 32768, packed=store.layout.flushed_groups(32768))
    torch.cuda.synchronize()
