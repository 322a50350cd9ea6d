"""Quantize-and-pack kernels: flush whole groups of tokens into a ``KVStore`` (bit-exact with the store).

- ``store_groups``: one program per (batch row, KV head, group); any number of groups per launch (a
  one-group flush during decoding and the bulk path of a long prompt are the same kernel). Keys are
  quantized per channel over the group's ``G`` tokens in the group's channel order (tier by tier),
  values per token over ``value_group_size`` channels. The channel order itself (salience ranking)
  is chosen in PyTorch by ``KVStore._choose_key_order`` unless the caller passes one.
- ``write_tokens``: full-precision sink/ring writes of new tokens.
- ``append``: ``KVStore.append`` on these kernels.

Bit-exactness with ``reference.quantize_groups``: the same float32 operations in the same order, with
IEEE division (``div_rn``), round-half-to-even through the 1.5 * 2**23 magic number, and the float16
``zero`` moved one step down (``nextafter``) when rounding pushed it above the group minimum.
"""

from __future__ import annotations

import torch

from ..store import KVStore
from ._runtime import (
    check_kernel_device,
    gdc_launch_dependents,
    gdc_wait,
    layout_constexprs,
    next_pow2,
    packed_groups_before,
    store_arguments,
    tl,
    triton,
)

__all__ = ["append", "append_token", "store_groups", "write_tokens"]


@triton.jit
def _qparams(xmin, xmax, BITS: tl.constexpr):
    """float16 (scale, zero) like ``reference.choose_qparams``."""
    z16 = xmin.to(tl.float16)
    zf = z16.to(tl.float32)
    zb = z16.to(tl.int16, bitcast=True).to(tl.int32)
    down = tl.where(zf > 0, zb - 1, tl.where(zf < 0, zb + 1, -32767))
    z16 = tl.where(zf > xmin, down.to(tl.int16).to(tl.float16, bitcast=True), z16)
    scale = tl.math.div_rn(xmax - z16.to(tl.float32), tl.full(xmax.shape, (1 << BITS) - 1, tl.float32))
    return scale.to(tl.float16), z16


@triton.jit
def _quantize_codes(x, sc16, z16, BITS: tl.constexpr):
    """int32 codes of float32 ``x [ROWS, N]`` with per-row float16 (scale, zero) ``[ROWS]``."""
    MAXC: tl.constexpr = (1 << BITS) - 1
    sc = sc16.to(tl.float32)
    inv = tl.where(sc > 0, tl.math.div_rn(tl.full(sc.shape, 1.0, tl.float32), tl.where(sc > 0, sc, 1.0)), 0.0)
    y = (x - z16.to(tl.float32)[:, None]) * inv[:, None]
    y = tl.minimum(tl.maximum(y, 0.0), MAXC * 1.0)
    return ((y + 12582912.0) - 12582912.0).to(tl.int32)  # round half to even


@triton.jit
def _quantize_pack(x, sc16, z16, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """float32 ``x [ROWS, N]``, per-row float16 (scale, zero) -> packed uint8 ``[ROWS, N * BITS // 8]``."""
    PER_BYTE: tl.constexpr = 8 // BITS
    codes = tl.reshape(_quantize_codes(x, sc16, z16, BITS), (ROWS, N // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * BITS
    return tl.sum(codes << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _pack_planar(codes, ROWS: tl.constexpr, N: tl.constexpr):
    """int32 2-bit codes ``[ROWS, N]`` -> int16 words ``[ROWS, N // 8]`` (``reference.pack_planar``)."""
    FW: tl.constexpr = N // 8
    fields = tl.reshape(codes, (ROWS, 8, FW))
    shifts = tl.arange(0, 8) * 2
    return tl.sum(fields << shifts[None, :, None], axis=1).to(tl.int16)


@triton.jit
def _store_key_tier(
    k_ptr,
    k_base,
    skl,
    skd,
    tok,
    idx,
    data_ptr,
    qp_ptr,
    bh64,
    grp,
    kv_ptr,
    C: tl.constexpr,
    CP: tl.constexpr,
    BITS: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    PLANAR: tl.constexpr,
):
    """Quantize the tier's channels ``idx [CP]`` (``C`` valid) of one group and write codes/qparams
    (PLANAR: the tier is all ``C = CP`` channels of a planar store)."""
    ch = tl.arange(0, CP)
    ch_ok = ch < C
    x = tl.load(k_ptr + k_base + tok[None, :] * skl + idx[:, None] * skd, mask=ch_ok[:, None], other=0.0)
    x = x.to(kv_ptr.dtype.element_ty).to(tl.float32)
    g = tl.arange(0, G)
    if BITS == 16:
        dst = data_ptr + bh64 * (NG * C * G) + (grp * C + ch[:, None]) * G + g[None, :]
        tl.store(dst, x.to(data_ptr.dtype.element_ty), mask=ch_ok[:, None])
    elif PLANAR:
        FW: tl.constexpr = C // 8
        sc16, z16 = _qparams(tl.min(x, axis=1), tl.max(x, axis=1), BITS)
        words = _pack_planar(tl.trans(_quantize_codes(x, sc16, z16, BITS)), G, C)  # [G, FW]
        j = tl.arange(0, FW)
        tl.store(data_ptr + bh64 * (NG * G * FW) + (grp * G + g[:, None]) * FW + j[None, :], words)
        qp = qp_ptr + bh64 * (NG * 2 * C) + grp * (2 * C) + ch
        tl.store(qp, sc16)
        tl.store(qp + C, z16)
    else:
        NB: tl.constexpr = G * BITS // 8
        xmin = tl.min(x, axis=1)
        xmax = tl.max(x, axis=1)
        sc16, z16 = _qparams(xmin, xmax, BITS)
        packed = _quantize_pack(x, sc16, z16, CP, G, BITS)
        dst = data_ptr + bh64 * (NG * C * NB) + (grp * C + ch[:, None]) * NB + tl.arange(0, NB)[None, :]
        tl.store(dst, packed, mask=ch_ok[:, None])
        qp = qp_ptr + bh64 * (NG * C * 2) + (grp * C + ch) * 2
        tl.store(qp, sc16, mask=ch_ok)
        tl.store(qp + 1, z16, mask=ch_ok)


@triton.jit
def _store_planar_mixed_keys(
    k_ptr,
    k_base,
    skl,
    skd,
    tok,
    position,
    k0_ptr,
    k1_ptr,
    s4_ptr,
    k2_ptr,
    qp_ptr,
    bh64,
    grp,
    kv_ptr,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
):
    """One group's keys in the planar layout of mixed tiers (``StoreLayout.planar_mixed``), channel
    ``d`` at ``position[d]`` of the group's order (high tier first): the planar words and their (scale,
    zero) over every channel, the 16-bit channels and the low 2 bits of the 4-bit codes with ``s4``;
    like ``KVStore._store_planar_mixed_keys``, bit for bit."""
    dd = tl.arange(0, D)
    g = tl.arange(0, G)
    x = tl.load(k_ptr + k_base + tok[None, :] * skl + dd[:, None].to(tl.int64) * skd)
    x = x.to(kv_ptr.dtype.element_ty).to(tl.float32)  # [D, G]
    xmin = tl.min(x, axis=1)
    xmax = tl.max(x, axis=1)
    s4, z4 = _qparams(xmin, xmax, 4)
    s2, z2 = _qparams(xmin, xmax, 2)
    c4 = _quantize_codes(x, s4, z4, 4)
    high = position < C0
    mid = (position >= C0) & (position < C0 + C1)
    codes = tl.where(high[:, None], 0, tl.where(mid[:, None], c4 >> 2, _quantize_codes(x, s2, z2, 2)))
    scale = tl.where(high, 0.0, tl.where(mid, s4.to(tl.float32) * 4.0, s2.to(tl.float32))).to(tl.float16)
    zero = tl.where(high, 0.0, tl.where(mid, z4.to(tl.float32), z2.to(tl.float32))).to(tl.float16)
    FW: tl.constexpr = D // 8
    words = _pack_planar(tl.trans(codes), G, D)  # [G, FW]
    j = tl.arange(0, FW)
    tl.store(k2_ptr + bh64 * (NG * G * FW) + (grp * G + g[:, None]) * FW + j[None, :], words)
    qp = qp_ptr + bh64 * (NG * 2 * D) + grp * (2 * D) + dd
    tl.store(qp, scale)
    tl.store(qp + D, zero)
    if C0 > 0:
        row = tl.where(high, position, 0)
        dst = k0_ptr + bh64 * (NG * C0 * G) + (grp * C0 + row[:, None]) * G + g[None, :]
        tl.store(dst, x.to(k0_ptr.dtype.element_ty), mask=high[:, None])
    if C1 > 0:
        NB: tl.constexpr = G // 4
        row = tl.where(mid, position - C0, 0)
        lower = tl.reshape(c4 & 3, (D, NB, 4))
        packed = tl.sum(lower << (tl.arange(0, 4) * 2)[None, None, :], axis=2).to(tl.uint8)  # [D, G / 4]
        dst = k1_ptr + bh64 * (NG * C1 * NB) + (grp * C1 + row[:, None]) * NB + tl.arange(0, NB)[None, :]
        tl.store(dst, packed, mask=mid[:, None])
        tl.store(s4_ptr + bh64 * (NG * C1) + grp * C1 + row, s4, mask=mid)


@triton.jit
def _rank_channels(
    k_ptr,
    k_base,
    skl,
    skd,
    tok,
    qsum_ptr,
    qcount_ptr,
    bh,
    kv_ptr,
    D: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    SALIENCE: tl.constexpr,
):
    """Position of each channel in the group's order ``[D]`` (int32), like ``KVStore._choose_key_order``.

    Score per channel: S_d = (max - min) / 3 over the group (keys rounded to the store dtype), times
    I_d = query_abs_sum / max(query_count, 1) when SALIENCE. Channel j ranks after every channel i with
    a higher score, or an equal score and a higher S_d, or both equal and i < j (the stable descending
    sorts of the reference). Ranks < C0 go to the high tier, < C0 + C1 to the mid tier, the rest low;
    each tier lists its channels in ascending index order.
    """
    dd = tl.arange(0, D)
    x = tl.load(k_ptr + k_base + tok[None, :] * skl + dd[:, None].to(tl.int64) * skd)
    x = x.to(kv_ptr.dtype.element_ty).to(tl.float32)
    step = tl.math.div_rn(tl.max(x, axis=1) - tl.min(x, axis=1), tl.full([D], 3.0, tl.float32))
    score = step
    if SALIENCE:
        count = tl.maximum(tl.load(qcount_ptr + bh + 0 * dd), 1.0)
        score = tl.load(qsum_ptr + bh.to(tl.int64) * D + dd)
        score = tl.math.div_rn(score, count) * step
    si = score[:, None]
    sj = score[None, :]
    ti = step[:, None]
    tj = step[None, :]
    before = (si > sj) | ((si == sj) & ((ti > tj) | ((ti == tj) & (dd[:, None] < dd[None, :]))))
    rank = tl.sum(before.to(tl.int32), axis=0)
    tier = (rank >= C0).to(tl.int32) + (rank >= C0 + C1).to(tl.int32)
    same_before = (tier[:, None] == tier[None, :]) & (dd[:, None] < dd[None, :])
    within = tl.sum(same_before.to(tl.int32), axis=0)
    return tl.where(tier == 0, 0, tl.where(tier == 1, C0, C0 + C1)) + within


@triton.jit
def _tier_index(
    ord_ptr,
    ord_base,
    sod,
    position,
    OFF: tl.constexpr,
    C: tl.constexpr,
    CP: tl.constexpr,
    D: tl.constexpr,
    MIXED: tl.constexpr,
    RANK: tl.constexpr,
):
    """Channel indices ``[CP]`` (int64) of the tier at order offsets ``OFF .. OFF + C - 1``."""
    ch = tl.arange(0, CP)
    if RANK:
        dd = tl.arange(0, D)
        hit = position[None, :] == (OFF + ch)[:, None]
        return tl.sum(tl.where(hit, dd[None, :], 0), axis=1).to(tl.int64)
    elif MIXED:
        return tl.load(ord_ptr + ord_base + (OFF + ch).to(tl.int64) * sod, mask=ch < C, other=0).to(tl.int64)
    else:
        return (OFF + ch).to(tl.int64)


@triton.jit(do_not_specialize=["first", "offset", "wrap"])
def _store_groups_kernel(
    k_ptr,
    skb,
    skh,
    skl,
    skd,
    v_ptr,
    svb,
    svh,
    svl,
    svd,
    ord_ptr,
    sob,
    soh,
    son,
    sod,
    order_out_ptr,
    k0_ptr,
    kq0_ptr,
    k1_ptr,
    kq1_ptr,
    k2_ptr,
    kq2_ptr,
    vdata_ptr,
    vq_ptr,
    kv_ptr,
    qsum_ptr,
    qcount_ptr,
    khdr_ptr,
    first,
    offset,
    wrap,
    H: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    S: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    CP0: tl.constexpr,
    CP1: tl.constexpr,
    CP2: tl.constexpr,
    MIXED: tl.constexpr,
    VB: tl.constexpr,
    VGS: tl.constexpr,
    RANK: tl.constexpr,
    SALIENCE: tl.constexpr,
    FROM_PTR: tl.constexpr,
    PLANAR: tl.constexpr,
    PLANAR_MIXED: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # launched while the step's write runs: wait for its ring slot and header
        gdc_wait()
    bh = tl.program_id(0)
    n = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    if FROM_PTR:
        # A decode step that wrote one token into the ring (``wrap`` = W slots): pack the group that
        # the step's ring write chose (key header field 5, -1 for none).
        chosen = tl.load(khdr_ptr + 5).to(tl.int32)
        active = (chosen >= 0).to(tl.int32)
        grp = tl.maximum(chosen, 0)
        offset = (grp * G) % wrap
    else:
        active = (n >= 0).to(tl.int32)
        grp = first + n
    if active != 0:  # a decode step's flush kernel does nothing unless the token completed a group
        g = tl.arange(0, G)
        tok = ((offset + n * G + g) % wrap).to(tl.int64)
        k_base = b.to(tl.int64) * skb + h.to(tl.int64) * skh
        ord_base = b.to(tl.int64) * sob + h.to(tl.int64) * soh + n.to(tl.int64) * son
        dd = tl.arange(0, D)
        position = dd
        if RANK:
            position = _rank_channels(
                k_ptr, k_base, skl, skd, tok, qsum_ptr, qcount_ptr, bh, kv_ptr, D, C0, C1, SALIENCE
            )
        if PLANAR_MIXED:
            SEL: tl.constexpr = C0 + C1
            if not RANK:  # the position of each channel in the given order
                o = tl.load(ord_ptr + ord_base + dd.to(tl.int64) * sod).to(tl.int32)
                position = tl.sum(tl.where(o[None, :] == dd[:, None], dd[None, :], 0), axis=1)
            sel = order_out_ptr + bh64 * (NG * SEL) + grp * SEL + position
            tl.store(sel, dd.to(tl.uint8), mask=position < SEL)
            _store_planar_mixed_keys(
                k_ptr,
                k_base,
                skl,
                skd,
                tok,
                position,
                k0_ptr,
                k1_ptr,
                kq1_ptr,
                k2_ptr,
                kq2_ptr,
                bh64,
                grp,
                kv_ptr,
                D,
                G,
                NG,
                C0,
                C1,
            )
        else:
            if RANK:
                tl.store(order_out_ptr + bh64 * (NG * D) + grp * D + position, dd.to(tl.uint8))
            elif MIXED:
                o = tl.load(ord_ptr + ord_base + dd.to(tl.int64) * sod)
                tl.store(order_out_ptr + bh64 * (NG * D) + grp * D + dd, o.to(tl.uint8))
            if C0 > 0:
                idx = _tier_index(ord_ptr, ord_base, sod, position, 0, C0, CP0, D, MIXED, RANK)
                _store_key_tier(
                    k_ptr,
                    k_base,
                    skl,
                    skd,
                    tok,
                    idx,
                    k0_ptr,
                    kq0_ptr,
                    bh64,
                    grp,
                    kv_ptr,
                    C0,
                    CP0,
                    B0,
                    G,
                    NG,
                    PLANAR,
                )
            if C1 > 0:
                idx = _tier_index(ord_ptr, ord_base, sod, position, C0, C1, CP1, D, MIXED, RANK)
                _store_key_tier(
                    k_ptr,
                    k_base,
                    skl,
                    skd,
                    tok,
                    idx,
                    k1_ptr,
                    kq1_ptr,
                    bh64,
                    grp,
                    kv_ptr,
                    C1,
                    CP1,
                    B1,
                    G,
                    NG,
                    PLANAR,
                )
            if C2 > 0:
                idx = _tier_index(ord_ptr, ord_base, sod, position, C0 + C1, C2, CP2, D, MIXED, RANK)
                _store_key_tier(
                    k_ptr,
                    k_base,
                    skl,
                    skd,
                    tok,
                    idx,
                    k2_ptr,
                    kq2_ptr,
                    bh64,
                    grp,
                    kv_ptr,
                    C2,
                    CP2,
                    B2,
                    G,
                    NG,
                    PLANAR,
                )
        v_base = b.to(tl.int64) * svb + h.to(tl.int64) * svh
        if VB == 16:
            c = tl.arange(0, DV)
            x = tl.load(v_ptr + v_base + tok[:, None] * svl + c[None, :].to(tl.int64) * svd)
            dst = vdata_ptr + bh64 * (NG * G * DV) + (grp * G + g[:, None]) * DV + c[None, :]
            tl.store(dst, x.to(vdata_ptr.dtype.element_ty))
        else:
            NVG: tl.constexpr = DV // VGS
            VGB: tl.constexpr = VGS * VB // 8
            rows = tl.arange(0, G * NVG)  # (token, channel group)
            rtok = ((offset + n * G + rows // NVG) % wrap).to(tl.int64)
            c = (rows % NVG)[:, None] * VGS + tl.arange(0, VGS)[None, :]
            x = tl.load(v_ptr + v_base + rtok[:, None] * svl + c.to(tl.int64) * svd)
            x = x.to(kv_ptr.dtype.element_ty).to(tl.float32)
            sc16, z16 = _qparams(tl.min(x, axis=1), tl.max(x, axis=1), VB)
            if PLANAR:
                FWV: tl.constexpr = DV // 8
                codes = tl.reshape(_quantize_codes(x, sc16, z16, VB), (G, DV))
                words = _pack_planar(codes, G, DV)  # [G, FWV]
                j = tl.arange(0, FWV)
                tl.store(vdata_ptr + bh64 * (NG * FWV * G) + (grp * FWV + j[None, :]) * G + g[:, None], words)
                vg = tl.arange(0, NVG)
                qp = vq_ptr + bh64 * (NG * 2 * NVG * G) + grp * (2 * NVG * G) + vg[None, :] * G + g[:, None]
                tl.store(qp, tl.reshape(sc16, (G, NVG)))
                tl.store(qp + NVG * G, tl.reshape(z16, (G, NVG)))
            else:
                packed = _quantize_pack(x, sc16, z16, G * NVG, VGS, VB)
                dst = vdata_ptr + bh64 * (NG * G * NVG * VGB) + (grp * (G * NVG) + rows[:, None]) * VGB
                tl.store(dst + tl.arange(0, VGB)[None, :], packed)
                qp = vq_ptr + bh64 * (NG * G * NVG * 2) + (grp * (G * NVG) + rows) * 2
                tl.store(qp, sc16)
                tl.store(qp + 1, z16)


def _check_device(store: KVStore, *tensors: torch.Tensor) -> torch.device:
    device = store.keys["ring"].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"mixkvq kernels: tensor on {t.device}, store on {device}")
    check_kernel_device(device, "mixkvq kernels")
    return device


def store_groups(
    store: KVStore,
    first: int,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    count: int | None = None,
    order: torch.Tensor | None = None,
    offset: int = 0,
    wrap: int | None = None,
) -> None:
    """Quantize and pack ``count`` groups into packed groups ``first .. first + count - 1``.

    Args:
        store: the layer's ``KVStore``.
        first: index of the first packed group to write.
        key, value: ``[B, H, T, D]`` / ``[B, H, T, Dv]`` source tokens (any strides, any float dtype;
            rounded to the store dtype first, as ``KVStore.append`` does). Token ``t`` of group ``n`` is
            source row ``(offset + n * G + t) % wrap`` (``wrap=None``: no wrap), so the ring buffer can
            be the source.
        count: groups to write (default ``(T - offset) // G``).
        order: ``[B, H, count, D]`` integer channel permutation per group (high tier first, each tier
            ascending); default: ranked in the kernel from the source keys and the store's query
            statistics, exactly as ``KVStore._choose_key_order`` does. Ignored when the layout has a
            single key tier.

    Equivalent to ``KVStore._store_groups(first, keys, values)`` on the same tokens, bit for bit.
    """
    lay = store.layout
    device = _check_device(store, key, value)
    if key.dim() != 4 or key.shape[:2] != (lay.batch, lay.heads) or key.shape[3] != lay.head_dim:
        raise ValueError(
            f"store_groups: key must be [{lay.batch}, {lay.heads}, T, {lay.head_dim}], got {tuple(key.shape)}"
        )
    if value.dim() != 4 or value.shape[:3] != key.shape[:3] or value.shape[3] != lay.value_dim:
        raise ValueError(
            f"store_groups: value must be [{lay.batch}, {lay.heads}, T, {lay.value_dim}], got "
            f"{tuple(value.shape)}"
        )
    g = lay.group_size
    if count is None:
        count = (key.shape[2] - offset) // g
    if count <= 0:
        return
    if first < 0 or first + count > lay.num_groups:
        raise ValueError(f"store_groups: groups {first}..{first + count - 1} outside 0..{lay.num_groups - 1}")
    if wrap is None and offset + count * g > key.shape[2]:
        raise ValueError(
            f"store_groups: {count} groups from offset {offset} need more than {key.shape[2]} tokens"
        )
    if lay.mixed_keys and order is not None:
        if tuple(order.shape) != (lay.batch, lay.heads, count, lay.head_dim) or order.dtype.is_floating_point:
            raise ValueError(
                f"store_groups: order must be integer [{lay.batch}, {lay.heads}, {count}, "
                f"{lay.head_dim}], got {order.dtype} {tuple(order.shape)}"
            )
        order = order.to(device)
    _launch_store_groups(store, key, value, count, order, first, offset, wrap)


def _launch_store_groups(
    store, key, value, count, order, first, offset, wrap, predicated=False, overlap=False
) -> None:
    """One launch of ``_store_groups_kernel`` (``predicated``: a decode step's one-group flush from the
    ring, of the group its ring write chose, if any; ``overlap``: launched while that write runs, see
    ``append_token``)."""
    lay = store.layout
    keys = store.keys
    rank = lay.mixed_keys and order is None
    given = order if order is not None else keys["ring"]
    tiers, vdata, vq = store_arguments(store)
    stats = (keys["query_abs_sum"], keys["query_count"]) if lay.salience else (keys["ring"], keys["ring"])
    _store_groups_kernel[(lay.batch * lay.heads, count)](
        key,
        *key.stride(),
        value,
        *value.stride(),
        given,
        *(given.stride() if order is not None else (0, 0, 0, 0)),
        keys["order"] if lay.mixed_keys else keys["ring"],
        tiers[0][0],
        tiers[0][1],
        tiers[1][0],
        tiers[1][1],
        tiers[2][0],
        tiers[2][1],
        vdata,
        vq,
        keys["ring"],
        *stats,
        keys["header"],
        int(first),
        int(offset),
        int(wrap) if wrap is not None else 1 << 30,
        H=lay.heads,
        D=lay.head_dim,
        DV=lay.value_dim,
        G=lay.group_size,
        NG=max(lay.num_groups, 1),
        S=lay.sink_tokens,
        **layout_constexprs(lay, tiers),
        RANK=rank,
        SALIENCE=rank and lay.salience,
        FROM_PTR=predicated,
        PLANAR=lay.planar_words,
        PLANAR_MIXED=lay.planar_mixed,
        PDL=overlap,
        num_warps=4,
        launch_pdl=overlap,
    )


@triton.jit
def _accumulate_query(
    q_ptr,
    sqb,
    sqh,
    sqd,
    qsum_ptr,
    qcount_ptr,
    bh,
    start,
    H: tl.constexpr,
    D: tl.constexpr,
    N_REP: tl.constexpr,
):
    """``KVStore.accumulate_queries`` of one query token ``[B, H * N_REP, 1, D]`` for KV head ``bh``, after
    the reset of a new sequence (``start == 0``), bit for bit: ``|q|`` in float32 summed over the query
    heads in order, then added to the running sum; the count grows by ``N_REP``."""
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    row = q_ptr + b.to(tl.int64) * sqb + (h * N_REP).to(tl.int64) * sqh + d * sqd
    acc = tl.abs(tl.load(row).to(tl.float32))
    for r in tl.static_range(1, N_REP):
        acc = acc + tl.abs(tl.load(row + r * sqh).to(tl.float32))
    keep = (start != 0).to(tl.float32)
    total = tl.load(qsum_ptr + bh * D + d)
    tl.store(qsum_ptr + bh * D + d, total * keep + acc)
    count = tl.load(qcount_ptr + bh)
    tl.store(qcount_ptr + bh, count * keep + N_REP)


@triton.jit(do_not_specialize=["start", "ring_from", "new_length", "new_packed"])
def _write_tokens_kernel(
    k_ptr,
    skb,
    skh,
    skl,
    skd,
    v_ptr,
    svb,
    svh,
    svl,
    svd,
    ksink_ptr,
    kring_ptr,
    vsink_ptr,
    vring_ptr,
    khdr_ptr,
    vhdr_ptr,
    pos_ptr,
    q_ptr,
    sqb,
    sqh,
    sqd,
    qsum_ptr,
    qcount_ptr,
    start,
    ring_from,
    new_length,
    new_packed,
    H: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    R: tl.constexpr,
    RPC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    LQ: tl.constexpr,
    SET_LENGTH: tl.constexpr,
    START_FROM_PTR: tl.constexpr,
    N_REP: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # a decode step's write, launched while the combine runs: the flush may launch now
        gdc_launch_dependents()
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    if START_FROM_PTR:  # a decode step: append at the position held on the device
        start = tl.load(pos_ptr).to(tl.int32)
        ring_from = start
        new_length = start + LQ
    if N_REP > 0:  # the decode step's query into the channel statistics (``KVStore.accumulate_queries``)
        _accumulate_query(q_ptr, sqb, sqh, sqd, qsum_ptr, qcount_ptr, bh, start, H, D, N_REP)
    if SET_LENGTH:  # the headers' token and packed-group counts (fields 2 and 4), CUDA-graph friendly
        first = (bh == 0) & (tb == 0)
        if START_FROM_PTR:
            # One token: it makes at most one group leave the window (``StoreLayout.groups_after``);
            # field 5 tells the step's predicated flush which one. Packed groups past the position (a
            # new sequence at 0) do not count.
            old = packed_groups_before(khdr_ptr, start, S, G)
            fp = new_length - S - old * G
            keep = tl.maximum(RPC * fp // 1000, R)
            grow = (fp - keep >= G) & (old < NG)
            new_packed = old + grow.to(tl.int32)
            tl.store(khdr_ptr + 5, tl.where(grow, old, -1).to(tl.int64), mask=first)
        tl.store(khdr_ptr + 2, new_length.to(tl.int64), mask=first)
        tl.store(vhdr_ptr + 2, new_length.to(tl.int64), mask=first)
        tl.store(khdr_ptr + 4, new_packed.to(tl.int64), mask=first)
        tl.store(vhdr_ptr + 4, new_packed.to(tl.int64), mask=first)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    j = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = j < LQ
    pos = start + j
    is_sink = pos < S
    to_ring = (pos >= ring_from) & (pos >= S) & ok
    slot = tl.where(pos >= S, (pos - S) % W, 0)
    srow = tl.where(is_sink, pos, 0)
    dk = tl.arange(0, D)
    dv = tl.arange(0, DV)
    jj = j.to(tl.int64)
    k = tl.load(
        k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh + jj[:, None] * skl + dk[None, :] * skd,
        mask=ok[:, None],
        other=0.0,
    ).to(kring_ptr.dtype.element_ty)
    v = tl.load(
        v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh + jj[:, None] * svl + dv[None, :] * svd,
        mask=ok[:, None],
        other=0.0,
    ).to(vring_ptr.dtype.element_ty)
    tl.store(kring_ptr + bh64 * (W * D) + slot[:, None] * D + dk[None, :], k, mask=to_ring[:, None])
    tl.store(vring_ptr + bh64 * (W * DV) + slot[:, None] * DV + dv[None, :], v, mask=to_ring[:, None])
    if S > 0:
        sink_ok = (is_sink & ok)[:, None]
        tl.store(ksink_ptr + bh64 * (S * D) + srow[:, None] * D + dk[None, :], k, mask=sink_ok)
        tl.store(vsink_ptr + bh64 * (S * DV) + srow[:, None] * DV + dv[None, :], v, mask=sink_ok)
    if PDL:  # end after the combine launched before us, whose output the next kernels read
        gdc_wait()


def write_tokens(
    store: KVStore,
    key: torch.Tensor,
    value: torch.Tensor,
    start: int | torch.Tensor,
    *,
    ring_from: int | None = None,
    set_length: int | None = None,
    set_packed: int | None = None,
    query: torch.Tensor | None = None,
    overlap: bool = False,
) -> None:
    """Write ``key``/``value`` ``[B, H, Lq, D]`` at positions ``start..`` in full precision.

    Positions below ``sink_tokens`` go to the sinks; positions ``>= max(sink_tokens, ring_from)`` go to
    ring slot ``(p - S) % W`` (``ring_from`` defaults to ``start``); nothing else is written. With
    ``set_length`` the same launch also stores the token count and the packed-group count
    (``set_packed``, default ``flushed_groups(set_length)``) in both headers (no host copy).
    ``start`` may be a one-element integer tensor on the device (a decode step under a CUDA graph):
    then ``ring_from = start``, the headers get ``start + Lq`` tokens and the packed groups after it
    (at most one more group, whose index goes to header field 5 for ``append_token``'s flush; so
    ``Lq`` must be 1); ``ring_from``/``set_length``/``set_packed`` must be None. With a tensor
    ``start``, ``query`` ``[B, Hq, 1, D]`` (the step's query) is also added to the channel statistics of
    a query-aware store, as ``KVStore.accumulate_queries`` does after restarting them at position 0: no
    launch of its own. ``overlap``: see ``append_token``.
    """
    from_ptr = isinstance(start, torch.Tensor)
    if from_ptr and (
        ring_from is not None or set_length is not None or set_packed is not None or start.numel() != 1
    ):
        raise ValueError(
            "write_tokens: a tensor start must have one element and no ring_from/set_length/set_packed"
        )
    if from_ptr and key.shape[2] != 1:
        raise ValueError(f"write_tokens: a tensor start writes one token, got {key.shape[2]}")
    if set_packed is not None and set_length is None:
        raise ValueError("write_tokens: set_packed needs set_length")
    lay = store.layout
    if overlap and not from_ptr:
        raise ValueError("write_tokens: overlap is for a decode step's write (a tensor start)")
    if query is not None:
        if not from_ptr or not lay.salience:
            raise ValueError("write_tokens: a query needs a tensor start and a query-aware store")
        if (
            query.dim() != 4
            or query.shape[0] != lay.batch
            or query.shape[2] != 1
            or query.shape[3] != lay.head_dim
        ):
            raise ValueError(f"write_tokens: query {tuple(query.shape)} does not match the store")
        if query.shape[1] % lay.heads:
            raise ValueError(f"write_tokens: {query.shape[1]} query heads over {lay.heads} KV heads")
        _check_device(store, query)
    _check_device(store, key, value)
    lq = key.shape[2]
    if tuple(key.shape) != (lay.batch, lay.heads, lq, lay.head_dim) or tuple(value.shape) != (
        lay.batch,
        lay.heads,
        lq,
        lay.value_dim,
    ):
        raise ValueError(
            f"write_tokens: key {tuple(key.shape)} / value {tuple(value.shape)} do not match the store"
        )
    if set_length is not None and set_packed is None:
        set_packed = lay.flushed_groups(set_length)
    if lq == 0 and not from_ptr:
        if set_length is not None:
            store.set_length(set_length, set_packed)
        return
    block_t = min(16, next_pow2(lq))
    # The query, its (batch, head, channel) strides and the statistics it adds to; without a query the
    # kernel reads none of them (N_REP = 0), so ``key`` stands in for the pointers.
    if query is None:
        query_args = (key, 0, 0, 0, key, key)
    else:
        sqb, sqh, _, sqd = query.stride()
        query_args = (query, sqb, sqh, sqd, store.keys["query_abs_sum"], store.keys["query_count"])
    _write_tokens_kernel[(lay.batch * lay.heads, triton.cdiv(lq, block_t))](
        key,
        *key.stride(),
        value,
        *value.stride(),
        store.keys["sink"],
        store.keys["ring"],
        store.values["sink"],
        store.values["ring"],
        store.keys["header"],
        store.values["header"],
        start if from_ptr else store.keys["header"],
        *query_args,
        0 if from_ptr else int(start),
        0 if from_ptr else int(start if ring_from is None else ring_from),
        int(set_length or 0),
        int(set_packed or 0),
        H=lay.heads,
        D=lay.head_dim,
        DV=lay.value_dim,
        S=lay.sink_tokens,
        W=max(lay.window, 1),
        G=lay.group_size,
        NG=lay.num_groups,
        R=lay.residual_length,
        RPC=lay.rpc_permille,
        BLOCK_T=block_t,
        LQ=lq,
        SET_LENGTH=from_ptr or set_length is not None,
        START_FROM_PTR=from_ptr,
        N_REP=0 if query is None else query.shape[1] // lay.heads,
        PDL=overlap,
        num_warps=4,
        launch_pdl=overlap,
    )


def append(
    store: KVStore,
    key: torch.Tensor,
    value: torch.Tensor,
    start: int,
    *,
    length: int | None = None,
    packed: int | None = None,
) -> None:
    """``KVStore.append`` on the Triton kernels (same checks, same resulting store, bit for bit).

    ``length`` and ``packed`` are the store's current token and packed-group counts; pass them when
    known to skip reading the header (a sync).
    """
    lay = store.layout
    length = store.length if length is None else int(length)
    packed = store.packed_groups if packed is None else int(packed)
    plan = lay.plan_write(length, packed, start, key.shape[2])
    end, old_groups, new_groups, pending_start = (
        plan.end,
        plan.old_groups,
        plan.new_groups,
        plan.pending_start,
    )
    s, g, w = lay.sink_tokens, lay.group_size, max(lay.window, 1)
    flush = new_groups - old_groups
    remain_start = pending_start + flush * g
    if end - pending_start <= w:
        # Every pending token fits the ring: write the new ones there, then flush from the ring.
        write_tokens(store, key, value, start, ring_from=start, set_length=end, set_packed=new_groups)
        if flush:
            store_groups(
                store,
                old_groups,
                store.keys["ring"],
                store.values["ring"],
                count=flush,
                offset=(pending_start - s) % w,
                wrap=w,
            )
    else:
        if flush:
            if pending_start >= start:
                store_groups(store, old_groups, key, value, count=flush, offset=pending_start - start)
            else:  # old ring tokens followed by new ones: gather them (rare: a long chunk after a short one)
                old = (torch.arange(pending_start, start, device=key.device) - s) % w
                src_k = torch.cat([store.keys["ring"][:, :, old], key.to(lay.dtype)], dim=2)
                src_v = torch.cat([store.values["ring"][:, :, old], value.to(lay.dtype)], dim=2)
                store_groups(store, old_groups, src_k, src_v, count=flush)
        write_tokens(store, key, value, start, ring_from=remain_start, set_length=end, set_packed=new_groups)


def append_token(
    store: KVStore,
    key: torch.Tensor,
    value: torch.Tensor,
    position: torch.Tensor,
    query: torch.Tensor | None = None,
    overlap: bool = False,
) -> None:
    """Append one decode token at the position held in ``position`` (one integer element on the
    device) without any host read: the write into the ring (which also decides whether a group leaves
    the full-precision window, ``StoreLayout.groups_after``) and a predicated flush of that group
    (channel ranking included) are two launches, so the step can be captured in a CUDA graph.

    Args:
        key, value: ``[B, H, 1, D]`` / ``[B, H, 1, Dv]`` the token's key (post-RoPE) and value.
        position: its cache position; the store must hold exactly ``position`` tokens (an append) or
            more, within the full-precision window (a rewind). Not checked on the host: the caller
            guarantees it (``mixkvq::kv_attention`` asserts ``position < capacity`` on the device).
        query: ``[B, Hq, 1, D]``, for a query-aware store: added to the channel statistics (restarted at
            position 0) in the write's launch, before the flush ranks the channels (``write_tokens``).
        overlap: the launch before this call is ``decode_attention``'s combine with ``overlap`` (a
            decode step on compute capability 9.0+, ``ops.decode_step``): the write is launched while
            the combine runs (programmatic dependent launch; the combine signals once the attention's
            reads of the store are over) and ends after it, and the flush is launched while the write
            runs and waits for it before reading anything.

    Leaves the store equal, bit for bit, to ``KVStore.append(key, value, position)``.
    """
    lay = store.layout
    if key.dim() != 4 or key.shape[2] != 1:
        raise ValueError(f"append_token: expected one token [B, H, 1, D], got {tuple(key.shape)}")
    write_tokens(store, key, value, position, query=query, overlap=overlap)
    if lay.num_groups:
        ring_k, ring_v = store.keys["ring"], store.values["ring"]
        _launch_store_groups(
            store, ring_k, ring_v, 1, None, 0, 0, max(lay.window, 1), predicated=True, overlap=overlap
        )
