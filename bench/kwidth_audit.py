"""Look for the small-K upcast dots that Triton 3.6 compiles wrong, in every decode kernel we launch.

    python3 bench/kwidth_audit.py            # every preset, head_dim 64 and 128, both key-tier layouts
    python3 bench/kwidth_audit.py --arch 90  # the target (compute capability x 10)

Triton before triton-lang/triton#11691 (merged 2026-09-10) could give a tensor-core operand that
comes from narrower data (e.g. codes loaded as bytes, then converted to float16) a register layout
with ``kWidth = 8`` even when the product's K is 16, and the kernel then computed wrong results. The
mixed-tier decode kernel hit it on an H200 with Triton 3.6 (a 16-row tile of low bits read as bytes:
relative error 0.24; see ``planar_attention._low_bits``). This script compiles the decode kernels
ahead of time for a GPU on a machine without one (as ``bench/sass.py`` does), for every preset in
both store layouts of mixed key tiers, head_dim 64 and 128, float16 and bfloat16, a decode step and
a 16-token query chunk, and prints each kernel whose Triton GPU IR has a dot operand with K = 16 and
``kWidth >= 8``. Run it with the Triton the GPU machine uses; it exits with status 1 when it finds
one. A static check of one known hazard, not a proof of correctness.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU even where none is present
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from sass import TargetOnlyDriver, compiled_decode_kernels  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from mixkvq_compile.config import PRESETS  # noqa: E402
from mixkvq_compile.store import StoreLayout  # noqa: E402

# A dot operand in the Triton GPU IR: tensor<RxCxT, #ttg.dot_op<{opIdx = i, parent = #mma.., kWidth = w}>>
OPERAND = re.compile(
    r"tensor<(\d+)x(\d+)x(\w+), #ttg\.dot_op<\{opIdx = (\d), parent = #mma\d*, kWidth = (\d+)\}>>"
)


def small_k_wide_operands(ttgir: str) -> set[tuple[str, int, int]]:
    """``(shape, opIdx, kWidth)`` of the dot operands with K = 16 and ``kWidth >= 8``."""
    found = set()
    for m in OPERAND.finditer(ttgir):
        rows, cols, dtype, op, width = int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5])
        k = cols if op == 0 else rows
        if k == 16 and width >= 8:
            found.add((f"{rows}x{cols}x{dtype}", op, width))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    args = parser.parse_args()
    driver.set_active(TargetOnlyDriver(args.arch))
    print(f"triton {triton.__version__}, sm_{args.arch}")
    suspects = 0
    for name, config in PRESETS.items():
        for head_dim in (64, 128):
            for planar_tiers in (True, False):
                for dtype, query_len in itertools.product((torch.float16, torch.bfloat16), (1, 16)):
                    layout = StoreLayout.create(config, 1, 8, 1088, head_dim, head_dim, dtype)
                    layout = dataclasses.replace(layout, planar_tiers=planar_tiers)
                    found = {
                        (kernel_name, *operand)
                        for kernel_name, _, kernel in compiled_decode_kernels(
                            layout, dtype, query_len, causal=query_len > 1
                        )
                        for operand in small_k_wide_operands(kernel.asm["ttgir"])
                    }
                    suspects += bool(found)
                    tag = (
                        f"{name} D={head_dim} planar_tiers={planar_tiers} "
                        f"{str(dtype).removeprefix('torch.')} Lq={query_len}"
                    )
                    print(
                        f"{'SUSPECT' if found else 'ok':>7}  {tag}  {sorted(found) if found else ''}",
                        flush=True,
                    )
    print(f"{suspects} suspect configuration(s)")
    sys.exit(1 if suspects else 0)


if __name__ == "__main__":
    main()
