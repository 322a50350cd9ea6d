"""A/B of the planar decode kernel: one packed group per loop step against two (GPU).

    python3 bench/planar_pair.py                 # 8x32768,1x131072,1x32768,32x8192, float16
    MIXKVQ_BENCH_DTYPE=bfloat16 python3 bench/planar_pair.py 8x32768

Times ``decode_attention`` on kivi2 stores filled with random codes (``bench/kernels.py``'s
``random_store``) with ``decode_attention.PLANAR_PAIR`` off and on, alternating, three repeats each,
and cuDNN SDPA (float16/bfloat16 K/V of the same shape, ``enable_gqa``) in the same process, so every
ratio is against a baseline timed in the same call. Prints registers and spills of each kernel variant.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402

from mixkvq_compile.kernels import decode_attention as da  # noqa: E402
from mixkvq_compile.kernels import planar_attention as pa  # noqa: E402


def cudnn_ms(batch: int, ctx: int, dtype: torch.dtype) -> float:
    """cuDNN SDPA over full-precision K/V ``[batch, 8, ctx, 128]`` for one query token of 32 heads."""
    q = torch.randn(batch, kb.HQ, 1, kb.D, dtype=dtype, device="cuda")
    k = torch.randn(batch, kb.HKV, ctx, kb.D, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return kb.bench_graph(functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True))


def main() -> None:
    shapes = sys.argv[1] if len(sys.argv) > 1 else "8x32768,1x131072,1x32768,32x8192"
    dtype = kb.DTYPE
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}")
    print(
        "shape | cuDNN ms | one group ms (3 runs) | two groups ms (3 runs) | one x cuDNN | two x cuDNN | diff"
    )
    for spec in shapes.split(","):
        batch, ctx = (int(x) for x in spec.split("x"))
        base = cudnn_ms(batch, ctx, dtype)
        torch.cuda.empty_cache()
        store = kb.random_store(kb.CONFIGS["kivi2"], batch, ctx)
        assert store.layout.planar
        q = torch.randn(batch, kb.HQ, 1, kb.D, dtype=dtype, device="cuda")
        packed = store.layout.flushed_groups(ctx)
        times = {False: [], True: []}
        outs = {}
        for _ in range(3):
            for pair in (False, True):
                da.PLANAR_PAIR = pair
                step = functools.partial(da.decode_attention, q, store, ctx, packed=packed)
                outs[pair] = step().float()
                times[pair].append(kb.bench_graph(step))
        diff = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
        one, two = min(times[False]), min(times[True])
        print(
            f"{spec} | {base:.4f} | {' '.join(f'{t:.4f}' for t in times[False])} | "
            f"{' '.join(f'{t:.4f}' for t in times[True])} | {base / one:.2f} | {base / two:.2f} | {diff:.1e}",
            flush=True,
        )
    for cache in pa.planar_split_kernel.device_caches.values():
        for kernel in cache[0].values():
            meta = kernel.metadata
            print(f"planar_split_kernel: regs {kernel.n_regs} spills {kernel.n_spills} shared {meta.shared}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/planar_pair.py needs a CUDA GPU")
    main()
