"""The attention call of one prefill chunk, four ways (GPU): what a mask costs.

    python3 bench/prefill_attention.py                  # B = 8, chunk 4096, prefixes 0 .. 28672
    python3 bench/prefill_attention.py --prefixes 12288 --batch 1

A chunk of ``chunk`` query tokens at positions ``P .. P + chunk - 1`` attends to the ``P + chunk`` keys
before and at it (B x 32 query heads over 8 KV heads, head_dim 128, bfloat16, K/V contiguous as the
long-chunk path builds them). Per prefix P (ms, median of ``triton.testing.do_bench``):

- ``bool-mask``: SDPA with ``enable_gqa`` and the bool causal mask transformers passes
  (``[B, 1, chunk, capacity]``, sliced to the ``P + chunk`` keys), what ``ops._attend_with_kernels``
  runs today;
- ``buffer``: what ``bench/e2e.py``'s strong baseline ran in a chunked prefill before 2026-11-27: SDPA
  over the whole static buffer (``capacity`` keys) without a mask (transformers passed it none);
- ``lower-right``: SDPA with ``torch.nn.attention.bias.causal_lower_right`` (no mask tensor) over the
  ``P + chunk`` keys, what the strong baseline runs since;
- ``split``: cuDNN over the prefix without a mask and cuDNN causal over the chunk, both with their
  log-sum-exp, merged (``ops.merge_partial_attention``); relative difference to ``bool-mask`` printed.

Also the TFLOP/s of ``bool-mask`` and ``split`` on the FLOPs the causal rule keeps.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402

from mixkvq_compile.chunk_attention import attend_split  # noqa: E402

HQ, HKV, D = 32, 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--capacity", type=int, default=32768 + 8)
    parser.add_argument("--prefixes", default="0,4096,12288,20480,28672")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={args.batch}, chunk={args.chunk}")
    b, lq, cap = args.batch, args.chunk, args.capacity
    dt = torch.bfloat16
    q = torch.randn(b, HQ, lq, D, dtype=dt, device="cuda")
    big_k = torch.randn(b, HKV, cap, D, dtype=dt, device="cuda")
    big_v = torch.randn_like(big_k)
    scale = D**-0.5
    print(
        "prefix | bool-mask | buffer | lower-right | split | split diff | TFLOP/s bool-mask | TFLOP/s split"
    )
    for prefix in (int(x) for x in args.prefixes.split(",")):
        total = prefix + lq
        pos = torch.arange(cap, device="cuda")
        qpos = prefix + torch.arange(lq, device="cuda")
        mask = (pos[None, :] <= qpos[:, None]).expand(b, 1, lq, cap)
        k = big_k[:, :, :total].contiguous()
        v = big_v[:, :, :total].contiguous()
        bool_mask = functools.partial(
            F.scaled_dot_product_attention, q, k, v, attn_mask=mask[..., :total], scale=scale, enable_gqa=True
        )
        buffer = functools.partial(
            F.scaled_dot_product_attention, q, big_k, big_v, scale=scale, enable_gqa=True
        )
        lower = functools.partial(
            F.scaled_dot_product_attention,
            q,
            k,
            v,
            attn_mask=causal_lower_right(lq, total),
            scale=scale,
            enable_gqa=True,
        )
        split = functools.partial(attend_split, q, k, v, prefix, scale)
        ref = bool_mask()
        row = []
        for fn in (bool_mask, buffer, lower, split):
            try:
                row.append(f"{kb.bench(fn):.2f}")
            except Exception as error:  # noqa: BLE001
                row.append(f"failed ({type(error).__name__}: {str(error).splitlines()[0][:60]})")
        try:
            diff = ((split().float() - ref.float()).norm() / ref.float().norm()).item()
        except Exception:  # noqa: BLE001
            diff = float("nan")
        flops = 4 * b * HQ * D * (lq * prefix + lq * (lq + 1) / 2)
        tflops = [flops / (float(t) * 1e9) if t[0].isdigit() else float("nan") for t in (row[0], row[3])]
        print(
            f"{prefix} | {' | '.join(row)} | {diff:.1e} | {tflops[0]:.0f} | {tflops[1]:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/prefill_attention.py needs a CUDA GPU")
    main()
