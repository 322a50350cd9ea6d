"""Dequantize the packed groups of a planar store into dense keys and values (``KVStore.read`` on the GPU).

A long prompt chunk attends to its prefix with cuDNN/flash SDPA after dequantizing the prefix once
(``ops._attend_with_kernels``). In PyTorch that dequantization makes int32 and float32 intermediates
of the whole prefix (about 10 ms per layer at 8 x 32k tokens, measured on an H200); this kernel reads
the packed bytes once and writes the store-dtype tensors, with the same float32 arithmetic as
``KVStore._dequantize_key_groups`` / ``_dequantize_value_groups`` (bit for bit: ``code * scale`` is
exact in float32, so a fused multiply-add rounds like the separate multiply and add).
"""

from __future__ import annotations

import torch

from ..store import KVStore
from ._runtime import check_kernel_device, interpreting, tl, triton

__all__ = ["dequantize_groups"]


@triton.jit
def _round_to(x, out_ptr, INTERP: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in the element type of ``out_ptr``. The interpreter's own
    float32 -> bfloat16 cast truncates, so there the rounding is done on the bits (finite values)."""
    if INTERP and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(out_ptr.dtype.element_ty)
    return y


@triton.jit
def _dequantize_planar_kernel(
    kc_ptr,
    kqp_ptr,
    vc_ptr,
    vqp_ptr,
    k_out_ptr,
    skb,
    skh,
    skt,
    v_out_ptr,
    svb,
    svh,
    svt,
    row0,
    H: tl.constexpr,
    NG: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    G: tl.constexpr,
    VGS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Program ``(bh, grp)``: group ``grp`` of batch row ``row0 + bh // H``, KV head ``bh % H``, into
    ``k_out [rows, H, count * G, D]`` and ``v_out [rows, H, count * G, DV]`` (strides given, the
    channel stride 1)."""
    bh = tl.program_id(0)
    grp = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    gi = ((row0 + bh // H) * H + bh % H).to(tl.int64) * NG + grp
    FW: tl.constexpr = D // 8
    FWV: tl.constexpr = DV // 8
    NVG: tl.constexpr = DV // VGS
    t = tl.arange(0, G)
    j = tl.arange(0, FW)
    words = tl.load(kc_ptr + (gi * G + t[:, None]) * FW + j[None, :]).to(tl.int32)  # [G, FW]
    for f in tl.static_range(8):
        ch = f * FW + j
        scale = tl.load(kqp_ptr + gi * (2 * D) + ch).to(tl.float32)
        zero = tl.load(kqp_ptr + gi * (2 * D) + D + ch).to(tl.float32)
        codes = ((words >> (2 * f)) & 3).to(tl.float32)
        k = codes * scale[None, :] + zero[None, :]
        dst = k_out_ptr + b * skb + h * skh + (grp * G + t[:, None]).to(tl.int64) * skt + ch[None, :]
        tl.store(dst, _round_to(k, k_out_ptr, INTERP))
    jv = tl.arange(0, FWV)
    vwords = tl.load(vc_ptr + (gi * FWV + jv[:, None]) * G + t[None, :]).to(tl.int32)  # [FWV, G]
    vq = vqp_ptr + gi * (2 * NVG * G)
    for f in tl.static_range(8):
        ch = f * FWV + jv
        scale = tl.load(vq + (ch // VGS)[:, None] * G + t[None, :]).to(tl.float32)
        zero = tl.load(vq + NVG * G + (ch // VGS)[:, None] * G + t[None, :]).to(tl.float32)
        v = ((vwords >> (2 * f)) & 3).to(tl.float32) * scale + zero
        dst = v_out_ptr + b * svb + h * svh + (grp * G + t[None, :]).to(tl.int64) * svt + ch[:, None]
        tl.store(dst, _round_to(v, v_out_ptr, INTERP))


def dequantize_groups(
    store: KVStore,
    count: int,
    rows: slice = slice(None),
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, count * G, D]`` and values ``[B, H, count * G, Dv]`` (store dtype) of the first
    ``count`` packed groups of batch ``rows`` (a slice with step 1), equal bit for bit to
    ``store._dequantize_key_groups(count, rows).to(dtype)`` and the value counterpart; written into
    ``out`` (two views of those shapes with unit channel stride) when given. Planar stores only
    (``StoreLayout.planar``); ``store.read(..., dequantize_groups=dequantize_groups)`` uses it."""
    lay = store.layout
    if not lay.planar:
        raise ValueError("dequantize_groups: the store does not use the planar layout (StoreLayout.planar)")
    start, stop, step = rows.indices(lay.batch)
    if step != 1:
        raise ValueError(f"dequantize_groups: rows must be a contiguous slice, got {rows}")
    if not 0 <= count <= lay.num_groups:
        raise ValueError(f"dequantize_groups: count={count} outside 0..{lay.num_groups}")
    device = store.keys["ring"].device
    check_kernel_device(device, "dequantize_groups")
    batch = max(0, stop - start)
    shapes = (
        (batch, lay.heads, count * lay.group_size, lay.head_dim),
        (batch, lay.heads, count * lay.group_size, lay.value_dim),
    )
    if out is None:
        out = tuple(torch.empty(shape, dtype=lay.dtype, device=device) for shape in shapes)
    for tensor, shape in zip(out, shapes, strict=True):
        if tuple(tensor.shape) != shape or tensor.dtype != lay.dtype or tensor.stride(3) != 1:
            raise ValueError(
                f"dequantize_groups: out must be {shape} {lay.dtype} with unit channel stride, got "
                f"{tuple(tensor.shape)} {tensor.dtype} strides {tensor.stride()}"
            )
    keys, values = out
    if batch and count:
        tier = lay.key_tier
        _dequantize_planar_kernel[(batch * lay.heads, count)](
            store.keys[f"tier{tier}_codes"],
            store.keys[f"tier{tier}_qparams"],
            store.values["codes"],
            store.values["qparams"],
            keys,
            *keys.stride()[:3],
            values,
            *values.stride()[:3],
            start,
            H=lay.heads,
            NG=lay.num_groups,
            D=lay.head_dim,
            DV=lay.value_dim,
            G=lay.group_size,
            VGS=lay.value_group_size,
            INTERP=interpreting(),
            num_warps=4,
        )
    return keys, values
