"""Offline probe (no GPU): the 4-bit key tier's per-group product written in Triton and in Gluon,
compiled for sm_90, and the SASS of each loop counted.

    /tmp/t36/bin/python bench/gluon_probe.py      # Triton 3.6 (see bench/sass.py for the venv)

The product is the one ``planar_attention._low_bits_scores`` computes per packed group: the query rows
gathered at the group's 16 channels (``order``), times those channels' scales (``s4``), times a
``[16, G]`` float16 tile (here one tile for all groups, loaded before the loop, so that the loops differ
only in the gather), accumulated on the tensor cores. In Triton the gathered tile and the scale
vector reach the product's operand layout through shared memory (Triton's layout passes choose; see
``docs/performance.md``, session 22); Gluon (``triton.experimental.gluon``) loads them in that layout
directly. Printed per variant: instructions in the loop, barriers, shared-memory stores and loads,
global loads and tensor-core instructions. Measured offline only; the probe runs no kernel.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from sass import TargetOnlyDriver, disassemble, largest_loop  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: E402
from triton.runtime import driver  # noqa: E402

#: query rows, head_dim, tokens per packed group
M, D, G = 4, 128, 32
OPCODES = ("BAR", "STS", "LDS", "LDSM", "LDG", "LDGSTS", "HMMA")


@triton.jit
def tier_product_triton(
    q_ptr, order_ptr, s4_ptr, k_ptr, out_ptr, groups, M: tl.constexpr, D: tl.constexpr, G: tl.constexpr
):
    rows = tl.arange(0, 16)
    j = tl.arange(0, 16)
    t = tl.arange(0, G)
    acc = tl.zeros([16, G], tl.float32)
    k = tl.load(k_ptr + j[:, None] * G + t[None, :])  # one tile for all groups: the gather alone differs
    for g in range(groups):
        channel = tl.load(order_ptr + g * 16 + j).to(tl.int32)
        s4 = tl.load(s4_ptr + g * 16 + j).to(tl.float32)
        q = tl.load(q_ptr + rows[:, None] * D + channel[None, :], mask=rows[:, None] < M, other=0.0)
        qs = (q.to(tl.float32) * (0.0625 * s4)[None, :]).to(tl.float16)
        acc = tl.dot(qs, k, acc)
    tl.store(out_ptr + rows[:, None] * G + t[None, :], acc)


@gluon.jit
def tier_product_gluon(
    q_ptr, order_ptr, s4_ptr, k_ptr, out_ptr, groups, M: gl.constexpr, D: gl.constexpr, G: gl.constexpr
):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, a))
    j = gl.arange(0, 16, layout=gl.SliceLayout(0, a))
    kr = gl.arange(0, 16, layout=gl.SliceLayout(1, b))
    kt = gl.arange(0, G, layout=gl.SliceLayout(0, b))
    acc = gl.zeros([16, G], gl.float32, mma)
    k = gl.load(k_ptr + kr[:, None] * G + kt[None, :])
    for g in range(groups):
        channel = gl.load(order_ptr + g * 16 + j).to(gl.int32)
        s4 = gl.load(s4_ptr + g * 16 + j).to(gl.float32)
        q = gl.load(q_ptr + rows[:, None] * D + channel[None, :], mask=rows[:, None] < M, other=0.0)
        qs = (q.to(gl.float32) * (0.0625 * s4)[None, :]).to(gl.float16)
        acc = mma_v2(qs, k, acc)
    orow = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    ocol = gl.arange(0, G, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + orow[:, None] * G + ocol[None, :], acc)


def main() -> None:
    driver.set_active(TargetOnlyDriver(90))
    args = (
        torch.zeros(M, D, dtype=torch.bfloat16),  # the query rows
        torch.zeros(64, dtype=torch.uint8),  # channel order of 4 groups
        torch.zeros(64, dtype=torch.float16),  # their scales
        torch.zeros(16, G, dtype=torch.float16),  # the tile
        torch.zeros(16, G, dtype=torch.float32),
        4,
    )
    print(f"triton {triton.__version__}, sm_90, one warp; SASS of the loop over groups")
    print(f"{'variant':>18} {'instructions':>12} " + " ".join(f"{op:>6}" for op in OPCODES))
    variants = [
        (f"triton, {stages} stage{'s' if stages > 1 else ''}", tier_product_triton, {"num_stages": stages})
        for stages in (1, 2)
    ]
    variants.append(("gluon", tier_product_gluon, {}))
    for label, kernel, options in variants:
        compiled = kernel.warmup(*args, M=M, D=D, G=G, grid=(1,), num_warps=1, **options)
        loop = largest_loop(disassemble(compiled))
        print(f"{label:>18} {sum(loop.values()):>12} " + " ".join(f"{loop[op]:>6}" for op in OPCODES))


if __name__ == "__main__":
    main()
