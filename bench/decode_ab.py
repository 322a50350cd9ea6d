"""Time and check the fused decode kernel for a few stores; run it once per package version to compare.

    python3 bench/decode_ab.py                                  # 8 x 32k and 1 x 128k, three settings
    PYTHONPATH=ab/old python3 bench/decode_ab.py --label old    # the same with an older copy of the package
    python3 bench/decode_ab.py --shapes 8x32768 --configs mixkvq-default
    python3 bench/decode_ab.py --splits default,1,2,4   # also fewer splits: longer walks per program
    python3 bench/decode_ab.py --pdl 0,1 --fp-stages default,1   # overlapped launches, on and off
    python3 bench/decode_ab.py --stages default,2,3     # software-pipelining depth of the packed groups
    python3 bench/decode_ab.py --dtype bfloat16         # query and store in bfloat16, as in bench/e2e.py
    python3 bench/decode_ab.py --mask bool              # an all-true mask, as in bench/e2e.py
    python3 bench/decode_ab.py --maxnreg default,168    # the planar kernel's registers capped (occupancy)

For each batch x context (32 query heads over 8 KV heads, head_dim 128, float16 unless ``--dtype``) and
each quantization setting it prints the decode step's time (median of ``triton.testing.do_bench`` over a
CUDA graph, L2 flushed), cuDNN SDPA on full-precision K/V of the same size and dtype in the same
process, their ratio, and the relative error of the fused kernel against float32 attention over the
store's own dequantized keys and values (``store.read``): a kernel change that is faster but wrong shows
here. Stores are filled as in ``bench/kernels.py`` (``random_store``). To compare two versions of the
kernel, run the script twice in one device call, with the older package first on ``PYTHONPATH`` the
first time: the cuDNN time printed by each run tells whether the card's speed moved between them. With
``--splits`` each store is also run with the given split counts (``default``: ``decode_attention``'s
choice), since the error of a program's walk over many groups may grow with its length (it did until
session 12: 2.4e-2 at 8 x 32k with one split against 2.1e-3 with the default; with the walk's value sums
in float32, 7.7e-4 and 7.4e-4). ``--stages`` and ``--fp-stages`` do the same for the stage counts of the
packed-group and the full-precision launches, and ``--pdl`` for ``MIXKVQ_PDL`` (the overlapped launches
of ``kernels._runtime.overlap_launches``; an older package copy may ignore it). ``--maxnreg`` caps the
registers of the planar packed-group kernel (Triton's ``maxnreg``, passed by wrapping its launcher for
that one kernel: ``decode_attention`` has no such option): at one warp per program, 255 registers let 8
programs share an SM, 168 let 12 and 128 let 16 (ptxas may then spill). With a cap, the ``default``
split count is the one ``decode_attention`` would pick for that many resident programs per SM.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.runtime import jit as triton_jit

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # last: a package copy on PYTHONPATH wins

# Imported before bench/kernels.py, which puts this tree first on sys.path.
mixkvq_compile = importlib.import_module("mixkvq_compile")

from gpu_state import describe, gpu_state  # noqa: E402
from kernels import HKV, HQ, D, bench_graph, decode_splits, random_store  # noqa: E402

from mixkvq_compile.config import PRESETS, MixKVQConfig  # noqa: E402
from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402

CONFIGS = {
    "kivi2": PRESETS["kivi2"],
    "mix-13-26-89": MixKVQConfig(key_tier_fractions=(0.1, 0.2), key_bits=(16, 4, 2), value_bits=2),
    "mixkvq-default": PRESETS["mixkvq"],
}


def decode_inputs(batch: int, ctx: int, dtype: torch.dtype, with_mask: bool):
    """A one-token step's query ``[batch, 32, 1, 128]``, 16-bit keys and values ``[batch, 8, ctx, 128]``
    for the cuDNN baseline, and (``with_mask``) an all-true bool mask ``[batch, 1, 1, ctx]``, as a
    model's decode step passes (None without)."""
    q = torch.randn(batch, HQ, 1, D, dtype=dtype, device="cuda")
    k = torch.randn(batch, HKV, ctx, D, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    mask = torch.ones(batch, 1, 1, ctx, dtype=torch.bool, device="cuda") if with_mask else None
    return q, k, v, mask


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The baseline: cuDNN SDPA with grouped-query attention over 16-bit keys and values, no mask."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def relative_error(out: torch.Tensor, q: torch.Tensor, store, ctx: int, rows: int = 8) -> float:
    """Relative L2 error of ``out [B, HQ, 1, D]`` against float32 SDPA over ``store.read(ctx)``, computed
    ``rows`` batch rows at a time (the float32 copies of 120 x 32k keys and values would be 60 GiB)."""
    k, v = store.read(ctx)
    err2 = ref2 = 0.0
    for b in range(0, q.shape[0], rows):
        s = slice(b, b + rows)
        ref = F.scaled_dot_product_attention(q[s].float(), k[s].float(), v[s].float(), enable_gqa=True)
        err2 += (out[s].float() - ref).square().sum().item()
        ref2 += ref.square().sum().item()
    return (err2 / ref2) ** 0.5


def counts(parser: argparse.ArgumentParser, option: str, text: str) -> list[int | None]:
    """``"default,1,2"`` -> ``[None, 1, 2]`` (None: ``decode_attention``'s own choice); positive only."""
    try:
        values = [None if n == "default" else int(n) for n in text.split(",")]
    except ValueError:
        parser.error(f"{option} takes integers or 'default', got {text!r}")
    if any(n is not None and n < 1 for n in values):
        parser.error(f"{option}: counts must be at least 1")
    return values


def set_pdl(flag: str) -> None:
    """``MIXKVQ_PDL`` for the next calls (read at every ``decode_attention`` call): unset for default."""
    if flag == "default":
        os.environ.pop("MIXKVQ_PDL", None)
    else:
        os.environ["MIXKVQ_PDL"] = flag


LAUNCH = triton_jit.JITFunction.run


def cap_planar_registers(cap: int | None) -> None:
    """Launch the planar packed-group kernel with ``maxnreg=cap`` from now on (None: uncapped)."""

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__name__ == "planar_split_kernel":
            kwargs["maxnreg"] = cap
        return LAUNCH(self, *args, grid=grid, warmup=warmup, **kwargs)

    triton_jit.JITFunction.run = LAUNCH if cap is None else run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="8x32768,1x131072")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument(
        "--mask",
        default="none",
        choices=["none", "bool"],
        help="bool: pass our kernel an all-true mask [B, 1, 1, ctx], as a model's decode step does (the "
        "kernel that reads masks, in two launches: ranges the mask keeps whole, then the others); cuDNN "
        "runs without one",
    )
    parser.add_argument("--splits", default="default", help="comma-separated split counts or 'default'")
    parser.add_argument(
        "--stages", default="default", help="comma-separated stage counts of the packed-group launch"
    )
    parser.add_argument(
        "--fp-stages", default="default", help="comma-separated stage counts of the full-precision launch"
    )
    parser.add_argument(
        "--pdl", default="default", help="comma-separated MIXKVQ_PDL settings: default (unset), 0, 1"
    )
    parser.add_argument(
        "--maxnreg", default="default", help="comma-separated register caps of the planar kernel, or default"
    )
    args = parser.parse_args()
    splits = counts(parser, "--splits", args.splits)
    caps = counts(parser, "--maxnreg", args.maxnreg)
    loop_stages = counts(parser, "--stages", args.stages)
    fp_stages = counts(parser, "--fp-stages", args.fp_stages)
    pdl = args.pdl.split(",")
    if set(pdl) - {"default", "0", "1"}:
        parser.error(f"--pdl takes default, 0 and 1, got {args.pdl!r}")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {sorted(CONFIGS)}")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(
        f"{args.label}: {os.path.dirname(mixkvq_compile.__file__)}; {args.dtype}; mask {args.mask}; "
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"GPU {describe(gpu_state())}"
    )
    columns = ("shape", 9), ("config", 15), ("maxnreg", 7), ("splits", 7), ("stages", 7), ("fp st", 7)
    columns += (("pdl", 7),)
    columns += ("ours ms", 8), ("cudnn ms", 8), ("x cudnn", 7)
    print(" ".join(f"{name:>{width}}" for name, width in columns), f"{'rel err':>8}")
    for shape in args.shapes.split(","):
        batch, ctx = (int(n) for n in shape.split("x"))
        q, k, v, mask = decode_inputs(batch, ctx, dtype, args.mask == "bool")
        cudnn = functools.partial(cudnn_attention, q, k, v)
        base = bench_graph(cudnn)
        del k, v, cudnn  # (the baseline holds them)
        for name in args.configs.split(","):
            store = random_store(CONFIGS[name], batch, ctx, dtype)
            packed = store.layout.flushed_groups(ctx)
            for cap, n_splits, stages, fp, flag in itertools.product(
                caps, splits, loop_stages, fp_stages, pdl
            ):
                set_pdl(flag)
                cap_planar_registers(cap)
                kw = {"packed": packed, "num_splits": n_splits, "num_stages": stages, "fp_stages": fp}
                if n_splits is None and cap is not None:  # one-warp programs per SM under the cap
                    kw["num_splits"] = decode_splits(batch, packed, per_sm=65536 // (32 * cap))
                err = relative_error(decode_attention(q, store, ctx, mask, **kw), q, store, ctx)
                ours = bench_graph(
                    lambda s=store, q=q, n=ctx, m=mask, kw=kw: decode_attention(q, s, n, m, **kw)
                )
                labels = ["default" if n is None else str(n) for n in (cap, n_splits, stages, fp)]
                if n_splits is None:  # the count decode_attention picks (for the cap's programs per SM)
                    labels[1] = f"d={kw['num_splits']}" if cap else f"d={decode_splits(batch, packed)}"
                print(
                    f"{shape:>9} {name:>15} {' '.join(f'{x:>7}' for x in labels)} {flag:>7} {ours:8.4f} "
                    f"{base:8.4f} {base / ours:7.2f} {err:8.1e}",
                    flush=True,
                )
            set_pdl("default")
            cap_planar_registers(None)
            del store
            torch.cuda.empty_cache()
    print(f"GPU at the end: {describe(gpu_state())}")


if __name__ == "__main__":
    main()
