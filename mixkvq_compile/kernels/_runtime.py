"""Shared launcher helpers of the Triton kernels (imports Triton; import it only from kernel modules)."""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():  # Triton can only interpret on a CPU-only machine.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

__all__ = [
    "check_kernel_device",
    "gdc_launch_dependents",
    "gdc_wait",
    "interpreting",
    "layout_constexprs",
    "next_pow2",
    "num_sms",
    "overlap_launches",
    "packed_groups_before",
    "prefetch_steps",
    "scores_mask",
    "store_arguments",
    "tl",
    "triton",
    "unpack_codes",
]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def overlap_launches(layout, device: torch.device) -> bool:
    """Whether ``decode_attention`` over a store of ``layout`` (a ``StoreLayout``) on ``device`` overlaps
    its launches (programmatic dependent launch: compute capability 9.0 and up, compiled kernels,
    planar stores only). ``MIXKVQ_PDL=0`` turns it off, ``1`` or unset leaves it on.

    On an H200 (2026-11-27, ``bench/decode_ab.py``) the overlap made kivi2 faster at every shape
    measured (8 x 32k 0.0990 -> 0.0942 ms, 1 x 32k 0.0298 -> 0.0227). Mixed key tiers gain with it
    when the full-precision launch runs one stage (``decode_attention``'s default then): MixKVQ's
    default tiers 8 x 32k 0.1798 -> 0.1757 ms, 1 x 32k 0.0419 -> 0.0344; 13 / 26 / 89 channels
    0.2173 -> 0.2160 and 0.0474 -> 0.0405. With that launch's two stages (83 KB of shared memory per
    program against 18 KB) they lost 4-10% at 8 x 32k."""
    flag = os.environ.get("MIXKVQ_PDL", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"MIXKVQ_PDL must be 0, 1 or unset, got {flag!r}")
    if flag == "0" or not layout.planar_words:
        return False
    if device.type != "cuda" or interpreting():
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def prefetch_steps(layout) -> int:
    """How many steps of two packed groups ahead the planar decode kernel asks the L2 for their bytes
    (``planar_attention._prefetch_pair``) over a store of ``layout`` (a ``StoreLayout``): 1 for mixed key
    tiers whose 4-bit tier takes more than one product (``layout.planar_mixed`` with more than 16 4-bit
    channels), 0 for the others; ``MIXKVQ_PREFETCH=1`` or ``0`` sets it for every store (A/B runs).

    What decides it is whether the loop spills more with it or without it (Triton 3.6, sm_90, 255
    registers; counted by ``bench/sass.py``): with the query gathered before the walk
    (``_gather_tier_queries``, session 23) MixKVQ's default tiers (4 / 16 / 108 channels) spill 12
    registers per step with it and none without it, 13 / 26 / 89 channels 9 with it and 21-25 without.
    H200, bfloat16, all-true mask, 2026-11-28, on against off: MixKVQ's default 8 x 32k 0.1420 / 0.1354
    ms, 1 x 128k 0.0741 / 0.0708; 13 / 26 / 89 0.1626 / 0.1743 and 0.0995 / 0.1029 (session 23 in
    ``docs/performance.md``).

    Earlier (H200, ``bench/decode_ab.py``): one step ahead made MixKVQ's default tiers 1.12-1.17x faster
    when the walk still gathered the query itself (2026-11-27, float16, 8 x 32k 0.1758 -> 0.1568 ms:
    the gathers and copies waited on their bytes). For kivi2 it gained 1-3% without a mask and cost 15%
    with one (64 x 32k, 0.684 -> 0.789 ms: the loop spilled ten registers with it), 9-10% of the whole
    step end to end (``bench/e2e.py``, 64 and 112 rows x 32k), and 3-4% on the kernel of session 19
    (bfloat16, all-true mask, 8 x 32k 0.0916 -> 0.0946 ms, session 20)."""
    flag = os.environ.get("MIXKVQ_PREFETCH", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"MIXKVQ_PREFETCH must be 0, 1 or unset, got {flag!r}")
    if flag:
        return int(flag)
    return 1 if layout.planar_mixed and layout.key_channels[1] > 16 else 0


def check_kernel_device(device: torch.device, caller: str) -> None:
    """``ValueError`` unless Triton can run on ``device`` (CUDA, or any device under the interpreter)."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{caller}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def store_arguments(store) -> tuple[list[tuple], torch.Tensor, torch.Tensor]:
    """Kernel arguments of a ``KVStore``: per key tier (data, qparams, channels, bits, padded channels),
    then the value data and qparams. An empty tier, or the qparams of a 16-bit part, point at the
    ring as a never-read placeholder."""
    lay, keys, values = store.layout, store.keys, store.values
    if lay.planar_mixed:  # (16-bit values; 4-bit low bits, s4; 2-bit planar words, qparams)
        high, mid, low = lay.key_channels
        ring = keys["ring"]
        tiers = [
            (keys["tier0_values"] if high else ring, ring, high, 16, max(16, next_pow2(high))),
            (
                keys["tier1_codes"] if mid else ring,
                keys["tier1_scales"] if mid else ring,
                mid,
                4,
                max(16, next_pow2(mid)),
            ),
            (keys["tier2_codes"], keys["tier2_qparams"], low, 2, max(16, next_pow2(low))),
        ]
        return tiers, values["codes"], values["qparams"]
    tiers = []
    for t, (channels, bits) in enumerate(zip(lay.key_channels, lay.key_bits, strict=True)):
        if channels == 0:
            tiers.append((keys["ring"], keys["ring"], 0, 16, 16))
        elif bits == 16:
            tiers.append((keys[f"tier{t}_values"], keys["ring"], channels, 16, max(16, next_pow2(channels))))
        else:
            padded = max(16, next_pow2(channels))
            tiers.append((keys[f"tier{t}_codes"], keys[f"tier{t}_qparams"], channels, bits, padded))
    if lay.value_bits == 16:
        return tiers, values["values"], values["ring"]
    return tiers, values["codes"], values["qparams"]


def layout_constexprs(layout, tiers: list[tuple]) -> dict:
    """The store-shape compile-time arguments shared by the kernels: per key tier its channels
    (``C``), bits (``B``) and padded channels (``CP``), then the value bits and value group size."""
    meta = {"MIXED": layout.mixed_keys, "VB": layout.value_bits, "VGS": layout.value_group_size}
    for t, (_, _, channels, bits, padded) in enumerate(tiers):
        meta.update({f"C{t}": channels, f"B{t}": bits, f"CP{t}": padded})
    return meta


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def unpack_codes(byt, ROWS: tl.constexpr, NBYTES: tl.constexpr, BITS: tl.constexpr, dtype: tl.constexpr):
    """uint8 ``[ROWS, NBYTES]`` packed codes -> codes ``[ROWS, NBYTES * 8 // BITS]`` in ``dtype``
    (float32 or float16).

    Element ``i`` of a byte sits at bit ``(i % per_byte) * BITS`` (``reference.pack``).

    2-bit tiles of at least 64 rows x 8 bytes (keys of a tier of >= 33 channels with groups of 32,
    values with head_dim >= 64): the four bit fields are extracted and joined (``tl.join`` keeps each
    element in its thread; the reshape of a broadcast shift goes through shared memory with byte-wide
    accesses). On an H200 this made the 8 x 32k kivi2 decode 1.27x faster (0.506 -> 0.398 ms).
    Other tiles keep the broadcast shift: joined, they gave wrong attention outputs under Triton 3.6
    (a [16, 8] 2-bit tile, a [16, 16] 4-bit tile, groups of 8), although the same unpack in a kernel
    of its own was right (tests/test_kernels.py has both cases).

    The integer becomes a float with a magic exponent (an OR and a subtraction, no conversion): 2**23
    for float32, 1024 for float16 (codes are below 16, so exact in both).
    """
    if BITS == 2 and ROWS >= 64 and NBYTES >= 8:  # the innermost join pairs i with i + 2, the outer i + 1
        x = byt.to(tl.int32)
        x = tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, (x >> 6) & 3))
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        shifts = tl.arange(0, PER_BYTE) * BITS
        x = (byt.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    x = tl.reshape(x, (ROWS, NBYTES * (8 // BITS)))
    if dtype == tl.float16:
        codes = (x | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:
        codes = (x | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return codes


@triton.jit
def scores_mask(
    s,
    pos,
    ok,
    row_ok,
    qpos,
    mask_ptr,
    mask_row,
    smk,
    qk_scale,
    MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    """Scaled base-2 scores with invalid, causal and attention-mask entries set to -inf."""
    s = s * qk_scale
    keep = ok[None, :] & row_ok[:, None]
    if IS_CAUSAL:
        keep = keep & (pos[None, :] <= qpos[:, None])
    if MASK_KIND == 1:
        mv = tl.load(mask_ptr + mask_row[:, None] + pos[None, :].to(tl.int64) * smk, mask=keep, other=0)
        keep = keep & (mv != 0)
    elif MASK_KIND == 2:
        mv = tl.load(mask_ptr + mask_row[:, None] + pos[None, :].to(tl.int64) * smk, mask=keep, other=0.0)
        s = s + mv.to(tl.float32) * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def packed_groups_before(khdr_ptr, position, S: tl.constexpr, G: tl.constexpr):
    """The key header's packed-group count (field 4), none past ``position``: a new sequence written
    at position 0 leaves the old count in the header until its own writes pack groups."""
    return tl.minimum(tl.load(khdr_ptr + 4).to(tl.int32), tl.maximum(position - S, 0) // G)
