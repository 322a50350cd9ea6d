"""Instruction counts of the decode kernel's packed-group loop, compiled for a GPU on a machine without one.

    python3 bench/sass.py                         # kivi2 and both mixes, float16, default warps, sm_90
    python3 bench/sass.py --configs mixkvq --warps 2,4 --dtype bfloat16
    python3 bench/sass.py --configs kivi2 --top 40      # every opcode of the loop, not the 8 most frequent
    python3 bench/sass.py --compile-times               # seconds of each Triton compile stage instead
    python3 bench/sass.py --mask --top 40               # both launches of a decode step with a mask
    python3 bench/sass.py --query-len 4 --maxnreg default,200   # a query chunk; registers capped

Triton compiles ahead of time with the ptxas and nvdisasm that ship in its wheel; a stand-in driver
answers the only question the compiler asks (the target). The kernel is compiled exactly as
``decode_attention`` would launch it on a GPU (same constexprs, 16-byte alignment of every pointer),
for 32 query heads over 8 KV heads, head_dim 128, groups of 32. For each configuration it prints
the SASS instructions of the largest loop (two packed groups per iteration in the planar kernel),
per warp and summed over the warps, the spill loads and stores in it (``LDL``, ``STL``) and the
most frequent opcodes: a cheap check of a kernel change before spending GPU time (fewer shared-memory
round trips, fewer conversions, fewer spills). With ``--mask`` the call passes an all-true bool mask
``[1, 1, 1, tokens]``, as a model's decode step does, and each of the planar kernel's two launches is
listed (``walk 1``: every range, without reading the mask; ``walk 2``: the ranges it does not keep
whole). ``--query-len`` compiles for a query chunk of that many tokens (4 query heads per KV head:
``4 * query_len`` rows), ``--maxnreg`` with the planar kernel's registers capped (Triton's ``maxnreg``,
as ``bench/decode_ab.py --maxnreg`` launches it); the ``regs`` column is each kernel's register count
(``cuobjdump --dump-resource-usage``) and ``smem`` its shared memory in bytes (with the registers, what
limits the programs resident per SM: 228 KB per SM on sm_90); ``--stages`` sets the packed-group
launch's pipeline depth, and ``MIXKVQ_PREFETCH`` is read as by ``decode_attention``. Counts are static,
not a timing. ``--compile-times`` prints instead how long the kernel takes to compile from an empty
Triton cache, per compile stage (``make_cubin`` runs ptxas): the JIT cost of a first call on this CPU.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU even where none is present
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

import mixkvq_compile.kernels.decode_attention as decode  # noqa: E402
from mixkvq_compile.config import PRESETS, MixKVQConfig  # noqa: E402
from mixkvq_compile.store import KVStore, StoreLayout, allocate  # noqa: E402

CONFIGS = {
    "kivi2": PRESETS["kivi2"],
    "mixkvq": MixKVQConfig(key_tier_fractions=(0.1, 0.2), key_bits=(16, 4, 2), value_bits=2),
    "mixkvq-default": PRESETS["mixkvq"],  # 4 / 16 / 108 channels at head_dim 128
}
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class TargetOnlyDriver:
    """The part of a Triton driver that compilation needs: the target, a device and a stream id."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def compiled_decode_kernels(
    layout: StoreLayout,
    dtype: torch.dtype,
    query_len: int = 1,
    causal: bool = True,
    num_warps: int | None = None,
    mask: bool = False,
    maxnreg: int | None = None,
    num_stages: int | None = None,
) -> list[tuple[str, dict, object]]:
    """``(kernel name, launch keywords, compiled kernel)`` of every launch of one ``decode_attention``
    call over 1000 tokens of a store of ``layout``, 32 query heads of ``query_len`` tokens (with
    ``mask``, an all-true bool mask ``[1, 1, query_len, 1000 + query_len]``), compiled for the active
    driver's target and not launched (CPU tensors stand in for CUDA ones); ``maxnreg`` caps the planar
    kernel's registers, ``num_stages`` is ``decode_attention``'s (None: its default)."""
    kernels = []
    run = triton_jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        if maxnreg is not None and self.fn.__name__ == "planar_split_kernel":
            kwargs["maxnreg"] = maxnreg
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        kernels.append((self.fn.__name__, kwargs, kernel))
        return kernel

    store = KVStore.open(layout, *allocate(layout, "cpu"))
    query = torch.zeros(1, 32, query_len, layout.head_dim, dtype=dtype)
    attn_mask = torch.ones(1, 1, query_len, 1000 + query_len, dtype=torch.bool) if mask else None
    triton_jit.JITFunction.run = compile_only
    decode.check_kernel_device, check = (lambda device, caller: None), decode.check_kernel_device
    try:
        packed = layout.flushed_groups(1000)
        decode.decode_attention(
            query,
            store,
            1000,
            attn_mask,
            num_splits=4,
            num_warps=num_warps,
            num_stages=num_stages,
            packed=packed,
            causal=causal,
        )
    finally:
        triton_jit.JITFunction.run = run
        decode.check_kernel_device = check
    return kernels


def compile_packed_loops(
    config,
    dtype: torch.dtype,
    warps: int | None,
    mask: bool = False,
    query_len: int = 1,
    maxnreg: int | None = None,
    num_stages: int | None = None,
) -> list:
    """The compiled packed-group kernels of a decode step, as ``decode_attention`` launches them (the
    planar kernel for planar stores, such as kivi2 here; twice with ``mask``), in launch order."""
    layout = StoreLayout.create(config, 1, 8, 1024 + 64, 128, 128, dtype)
    launches = compiled_decode_kernels(
        layout, dtype, query_len=query_len, num_warps=warps, mask=mask, maxnreg=maxnreg, num_stages=num_stages
    )
    kernels = [
        kernel
        for name, kwargs, kernel in launches
        if name == "planar_split_kernel" or (name == "_attn_split_kernel" and not kwargs.get("FP_PART"))
    ]
    if not kernels:
        raise RuntimeError(f"no packed-group kernel among the launches for {config}")
    return kernels


def disassemble(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run(
            [os.path.join(NVIDIA_BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout


def registers(kernel) -> int:
    """Registers per thread of a compiled kernel (``cuobjdump --dump-resource-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(NVIDIA_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def largest_loop(sass: str) -> collections.Counter:
    """Opcode counts between a label and the furthest backward branch to it."""
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"\s*\.L\w+:$", line)}
    best = (0, -1)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L\w+)\)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    counts = collections.Counter()
    for line in lines[best[0] : best[1] + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] += 1
    return counts


def print_compile_times(configs: list[str], dtype: torch.dtype, warps: list, arch: int) -> None:
    """Each configuration's packed-group kernel compiled from an empty Triton cache (a new folder per
    compile): the seconds of the whole compile and of each stage."""
    from compile_profile import time_triton_stages

    stages: dict = {}
    time_triton_stages(stages)
    print(f"triton {triton.__version__}, sm_{arch}, {dtype}; seconds to compile the packed-group kernel")
    for name in configs:
        for w in warps:
            stages.clear()
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TRITON_CACHE_DIR"] = cache  # read at each compile (Triton 3.6 and 3.9)
                started = time.perf_counter()
                compile_packed_loops(CONFIGS[name], dtype, w)
                total = time.perf_counter() - started
            parts = ", ".join(f"{stage} {seconds:.2f}" for stage, (_, seconds) in stages.items())
            print(f"{name:>14} warps {w or 'default'}: {total:.2f} s ({parts})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--warps", default="default", help="comma-separated warp counts, or 'default'")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    parser.add_argument("--top", type=int, default=8, help="how many of the most frequent opcodes to print")
    parser.add_argument(
        "--compile-times", action="store_true", help="seconds per compile stage (empty cache), not SASS"
    )
    parser.add_argument("--mask", action="store_true", help="with an all-true bool mask: both launches")
    parser.add_argument("--query-len", type=int, default=1, help="query tokens per KV head's query heads")
    parser.add_argument("--maxnreg", default="default", help="comma-separated register caps, or 'default'")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages of the packed-group launch")
    args = parser.parse_args()
    if args.query_len < 1:
        parser.error("--query-len must be at least 1")
    driver.set_active(TargetOnlyDriver(args.arch))
    warps = [None] if args.warps == "default" else [int(w) for w in args.warps.split(",")]
    caps = [None if c == "default" else int(c) for c in args.maxnreg.split(",")]
    if args.compile_times:
        print_compile_times(args.configs.split(","), getattr(torch, args.dtype), warps, args.arch)
        return
    print(
        f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}; "
        f"SASS instructions per iteration of the packed-group loop; query length {args.query_len}"
    )
    print(
        f"{'config':>14} {'launch':>7} {'warps':>5} {'maxnreg':>7} {'regs':>4} {'smem':>6} {'per warp':>8} "
        f"{'all warps':>9} {'LDL':>4} {'STL':>4}  top opcodes"
    )
    for name, w, cap in itertools.product(args.configs.split(","), warps, caps):
        kernels = compile_packed_loops(
            CONFIGS[name], getattr(torch, args.dtype), w, args.mask, args.query_len, cap, args.stages
        )
        for i, kernel in enumerate(kernels):
            loop = largest_loop(disassemble(kernel))
            per_warp = sum(loop.values())
            top = ", ".join(f"{op} {n}" for op, n in loop.most_common(args.top))
            nw = kernel.metadata.num_warps
            launch = f"walk {i + 1}" if args.mask else "-"
            smem = kernel.metadata.shared
            print(
                f"{name:>14} {launch:>7} {nw:>5} {cap or 'default':>7} {registers(kernel):>4} {smem:>6} "
                f"{per_warp:>8} {per_warp * nw:>9} {loop['LDL']:>4} {loop['STL']:>4}  {top}"
            )


if __name__ == "__main__":
    main()
