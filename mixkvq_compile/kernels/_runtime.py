"""Shared launcher helpers of the Triton kernels (imports Triton; import it only from kernel modules)."""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():  # Triton can only interpret on a CPU-only machine.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = [
    "interpreting",
    "layout_constexprs",
    "next_pow2",
    "num_sms",
    "store_arguments",
    "tl",
    "triton",
    "unpack_codes",
]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def store_arguments(store) -> tuple[list[tuple], torch.Tensor, torch.Tensor]:
    """Kernel arguments of a ``KVStore``: per key tier (data, qparams, channels, bits, padded channels),
    then the value data and qparams. An empty tier, or the qparams of a 16-bit part, point at the
    ring as a never-read placeholder."""
    lay, keys, values = store.layout, store.keys, store.values
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
def unpack_codes(byt, ROWS: tl.constexpr, NBYTES: tl.constexpr, BITS: tl.constexpr):
    """uint8 ``[ROWS, NBYTES]`` packed codes -> float32 codes ``[ROWS, NBYTES * 8 // BITS]``.

    Element ``i`` of a byte sits at bit ``(i % per_byte) * BITS`` (``reference.pack``). The integer is
    turned into a float with the 2**23 magic number (an OR and a subtraction instead of a conversion).
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER_BYTE) * BITS
    x = (byt.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    x = tl.reshape(x, (ROWS, NBYTES * PER_BYTE))
    return (x | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
