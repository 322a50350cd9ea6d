"""Dequantize the packed groups of a store into dense keys and values (``KVStore.read`` on the GPU).

A long prompt chunk attends to its prefix with cuDNN/flash SDPA after dequantizing the prefix once
(``ops._attend_with_kernels``). In PyTorch that dequantization makes int32 and float32 intermediates
of the whole prefix (about 10 ms per layer at 8 x 32k tokens, measured on an H200); these kernels read
the packed bytes once and write the store-dtype tensors, with the same float32 arithmetic as
``KVStore._dequantize_key_groups`` / ``_dequantize_value_groups`` (bit for bit: ``code * scale`` is
exact in float32, so a fused multiply-add rounds like the separate multiply and add). One kernel per
layout: planar stores (``StoreLayout.planar``), and the default layout (key tiers of any bits with a
channel order per group, values per token).
"""

from __future__ import annotations

import torch

from ..store import KVStore
from ._runtime import (
    check_kernel_device,
    interpreting,
    layout_constexprs,
    store_arguments,
    tl,
    triton,
    unpack_codes,
)

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


@triton.jit
def _key_tier(
    data_ptr,
    qp_ptr,
    order_ptr,
    k_out,
    skt,
    gi,
    grp,
    OFF: tl.constexpr,
    C: tl.constexpr,
    BITS: tl.constexpr,
    CP: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    MIXED: tl.constexpr,
    INTERP: tl.constexpr,
):
    """The ``C`` channels of one key tier of group ``gi`` (sorted positions ``OFF ..``; channel
    ``order[OFF + i]`` with mixed tiers, else ``OFF + i``) into ``k_out`` at tokens ``grp * G ..``."""
    i = tl.arange(0, CP)
    ok = i < C
    t = tl.arange(0, G)
    row = gi * C + i
    if BITS == 16:
        k = tl.load(data_ptr + row[:, None] * G + t[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        NB: tl.constexpr = G * BITS // 8
        byt = tl.load(data_ptr + row[:, None] * NB + tl.arange(0, NB)[None, :], mask=ok[:, None], other=0)
        codes = unpack_codes(byt, CP, NB, BITS, tl.float32)  # [CP, G]
        scale = tl.load(qp_ptr + row * 2, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(qp_ptr + row * 2 + 1, mask=ok, other=0.0).to(tl.float32)
        k = codes * scale[:, None] + zero[:, None]
    if MIXED:
        ch = tl.load(order_ptr + gi * D + OFF + i, mask=ok, other=0).to(tl.int64)
    else:
        ch = (OFF + i).to(tl.int64)
    dst = k_out + (grp * G + t[None, :]).to(tl.int64) * skt + ch[:, None]
    tl.store(dst, _round_to(k, k_out, INTERP), mask=ok[:, None])


@triton.jit
def _dequantize_default_kernel(
    t0_ptr,
    q0_ptr,
    t1_ptr,
    q1_ptr,
    t2_ptr,
    q2_ptr,
    order_ptr,
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
    MIXED: tl.constexpr,
    C0: tl.constexpr,
    B0: tl.constexpr,
    CP0: tl.constexpr,
    C1: tl.constexpr,
    B1: tl.constexpr,
    CP1: tl.constexpr,
    C2: tl.constexpr,
    B2: tl.constexpr,
    CP2: tl.constexpr,
    VB: tl.constexpr,
    VGS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Program ``(bh, grp)`` as ``_dequantize_planar_kernel``'s, for a store of the default layout: key
    tiers ``[.., C_t, G * B_t / 8]`` uint8 with (scale, zero) per channel (or ``[.., C_t, G]`` at 16
    bits), the channel order ``[.., D]`` uint8 when ``MIXED``; packed values ``[.., G, DV * VB / 8]``
    uint8 with (scale, zero) ``[.., G, DV / VGS, 2]``, or none at ``VB = 16`` (copied by the caller)."""
    bh = tl.program_id(0)
    grp = tl.program_id(1)
    gi = ((row0 + bh // H) * H + bh % H).to(tl.int64) * NG + grp
    k_out = k_out_ptr + (bh // H).to(tl.int64) * skb + (bh % H).to(tl.int64) * skh
    if C0 > 0:
        _key_tier(t0_ptr, q0_ptr, order_ptr, k_out, skt, gi, grp, 0, C0, B0, CP0, D, G, MIXED, INTERP)
    if C1 > 0:
        _key_tier(t1_ptr, q1_ptr, order_ptr, k_out, skt, gi, grp, C0, C1, B1, CP1, D, G, MIXED, INTERP)
    if C2 > 0:
        _key_tier(t2_ptr, q2_ptr, order_ptr, k_out, skt, gi, grp, C0 + C1, C2, B2, CP2, D, G, MIXED, INTERP)
    if VB != 16:
        NBV: tl.constexpr = DV * VB // 8
        NVG: tl.constexpr = DV // VGS
        t = tl.arange(0, G)
        c = tl.arange(0, DV)
        tok = gi * G + t
        byt = tl.load(vc_ptr + tok[:, None] * NBV + tl.arange(0, NBV)[None, :])
        codes = unpack_codes(byt, G, NBV, VB, tl.float32)  # [G, DV]
        qp = vqp_ptr + (tok[:, None] * NVG + (c // VGS)[None, :]) * 2
        v = codes * tl.load(qp).to(tl.float32) + tl.load(qp + 1).to(tl.float32)
        v_out = v_out_ptr + (bh // H).to(tl.int64) * svb + (bh % H).to(tl.int64) * svh
        tl.store(v_out + (grp * G + t[:, None]).to(tl.int64) * svt + c[None, :], _round_to(v, v_out, INTERP))


def dequantize_groups(
    store: KVStore,
    count: int,
    rows: slice = slice(None),
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, count * G, D]`` and values ``[B, H, count * G, Dv]`` (store dtype) of the first
    ``count`` packed groups of batch ``rows`` (a slice with step 1), equal bit for bit to
    ``store._dequantize_key_groups(count, rows).to(dtype)`` and the value counterpart; written into
    ``out`` (two views of those shapes with unit channel stride) when given. Any layout (a sliding
    store's group slots in slot order); ``store.read_into`` / ``read_window`` take it as
    ``dequantize_groups``."""
    lay = store.layout
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
    if not (batch and count):
        return keys, values
    grid = (batch * lay.heads, count)
    shared = dict(H=lay.heads, NG=lay.num_groups, D=lay.head_dim, DV=lay.value_dim, G=lay.group_size)
    if lay.planar_words:
        tier = lay.planar_key_tier
        _dequantize_planar_kernel[grid](
            store.keys[f"tier{tier}_codes"],
            store.keys[f"tier{tier}_qparams"],
            store.values["codes"],
            store.values["qparams"],
            keys,
            *keys.stride()[:3],
            values,
            *values.stride()[:3],
            start,
            **shared,
            VGS=lay.value_group_size,
            INTERP=interpreting(),
            num_warps=4,
        )
        if lay.planar_mixed:  # the 16-bit and 4-bit channels, in PyTorch
            index, selected = store.planar_mixed_selected(count, rows)
            keys.unflatten(2, (count, lay.group_size)).scatter_(4, index, selected.to(lay.dtype))
        return keys, values
    tiers, vdata, vq = store_arguments(store)
    meta = layout_constexprs(lay, tiers)
    _dequantize_default_kernel[grid](
        *(arg for tier in tiers for arg in tier[:2]),
        store.keys["order"] if lay.mixed_keys else store.keys["ring"],
        vdata,
        vq,
        keys,
        *keys.stride()[:3],
        values,
        *values.stride()[:3],
        start,
        **shared,
        **meta,
        INTERP=interpreting(),
        num_warps=4,
    )
    if lay.value_bits == 16:
        values.copy_(store.values["values"][rows, :, :count].flatten(2, 3))
    return keys, values
