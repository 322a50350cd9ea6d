"""Fused attention of a few query tokens over a packed ``KVStore`` (flash-decoding, one pass over the bytes).

Grid ``(B * H_kv, num_splits + 1, query_blocks)``. Program ``(bh, s, qb)`` takes the query rows
``qb * BLOCK_M ...`` of KV head ``h``: row ``r`` is query head ``h * n_rep + r // Lq`` at query index
``r % Lq``, so all query heads of a KV head share one read of its keys and values (GQA without
copies). Splits ``s < num_splits`` walk a contiguous run of packed groups; split ``num_splits`` takes
the full-precision tokens (sinks, ring, and optional new tokens passed alongside). Each group is read
once as packed bytes, unpacked and dequantized in registers:

- keys, per tier: codes ``[c_t, G]`` (channels x tokens) times per-channel (scale, zero); the scores
  are ``sum_t q[:, order[tier channels]] @ k_t`` (the query is gathered by the group's channel order);
- values: codes ``[G, Dv]`` with (scale, zero) per token and ``value_group_size`` channels.

Scores go through an online softmax in float32 (base 2); each split writes ``(m, l, acc)`` and a
second kernel combines the splits and writes ``[B, Hq, Lq, Dv]`` in the query dtype. Dequantized keys
and values are rounded to the store dtype and then to the query dtype, like ``KVStore.read`` followed
by ``reference.attention``.

Planar stores launch the full-precision split first, then the packed groups (``planar_split_kernel``),
then the combine. Where ``_runtime.overlap_launches`` says so (compute capability 9.0 and up;
``MIXKVQ_PDL=0`` turns it off) the last two are programmatic dependent launches:
- the packed groups start while the full-precision launch runs (the two write different partials;
  the full-precision programs signal at their start), and each of their programs waits for that
  launch before it exits, so the end of the packed-group launch means both are done;
- the combine launches as the packed-group programs finish their walk and waits for that launch
  before it reads a partial; it then signals, so that a decode step's append (``append_token`` with
  ``overlap``, which writes the store this attention read) may launch.
"""

from __future__ import annotations

import functools
import math

import torch

from ..store import KVStore
from ._runtime import (
    check_kernel_device,
    gdc_launch_dependents,
    gdc_wait,
    interpreting,
    layout_constexprs,
    next_pow2,
    num_sms,
    overlap_launches,
    packed_groups_before,
    prefetch_steps,
    scores_mask,
    store_arguments,
    tl,
    triton,
    unpack_codes,
)
from .planar_attention import planar_split_kernel, tier_query_widths

__all__ = ["combine_partials", "decode_attention", "split_count"]

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """``a [M, K] @ b [K, N]`` in float32: ``tl.dot`` when every dimension is >= 16."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _cast(x, dtype_ptr, UPCAST: tl.constexpr):
    """Round ``x`` to the element type of ``dtype_ptr``; with UPCAST (interpreter, bf16) back to float32."""
    y = x.to(dtype_ptr.dtype.element_ty)
    if UPCAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def _softmax_step(
    s, v, m_i, l_i, acc, q_ptr, USE_DOT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr
):
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _mm(_cast(p, q_ptr, UPCAST), v, USE_DOT, PREC)
    return m_new, l_i, acc


@triton.jit
def _tier_scores(
    q_ptr,
    q_off,
    q_full,
    row_ok,
    sqd,
    order_ptr,
    order_base,
    data_ptr,
    qp_ptr,
    bh64,
    grp,
    kv_ptr,
    OFF: tl.constexpr,
    C: tl.constexpr,
    CP: tl.constexpr,
    BITS: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    NG: tl.constexpr,
    MIXED: tl.constexpr,
    USE_DOT: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    GATHER: tl.constexpr,
    DQ: tl.constexpr,
):
    """Scores ``[BLOCK_M, GP]`` of one key tier of group ``grp`` (unscaled; tokens >= G are padding)."""
    ch = tl.arange(0, CP)
    ch_ok = ch < C
    if MIXED:
        idx = tl.load(order_ptr + order_base + grp * D + OFF + ch, mask=ch_ok, other=0).to(tl.int32)
        qt = tl.load(
            q_ptr + q_off[:, None] + idx[None, :] * sqd, mask=row_ok[:, None] & ch_ok[None, :], other=0.0
        )
        if UPCAST:
            qt = qt.to(tl.float32)
    else:
        qt = q_full
    tok = tl.arange(0, GP)
    if BITS == 16:
        base = bh64 * (NG * C * G)
        kt = tl.load(
            data_ptr + base + (grp * C + ch[:, None]) * G + tok[None, :],
            mask=ch_ok[:, None] & (tok < G)[None, :],
            other=0.0,
        )
        kt = _cast(kt.to(tl.float32), q_ptr, UPCAST)
    else:
        NB: tl.constexpr = G * BITS // 8
        NBP: tl.constexpr = GP * BITS // 8
        base = bh64 * (NG * C * NB)
        if GATHER:  # one byte load per code (duplicate addresses hit L1), no reshape
            PER_BYTE: tl.constexpr = 8 // BITS
            byt = tl.load(
                data_ptr + base + (grp * C + ch[:, None]) * NB + (tok // PER_BYTE)[None, :],
                mask=ch_ok[:, None] & (tok < G)[None, :],
                other=0,
            )
            x = (byt.to(tl.int32) >> ((tok % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
            codes = (x | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            j = tl.arange(0, NBP)
            byt = tl.load(
                data_ptr + base + (grp * C + ch[:, None]) * NB + j[None, :],
                mask=ch_ok[:, None] & (j < NB)[None, :],
                other=0,
            )
            codes = unpack_codes(byt, CP, NBP, BITS, DQ)
        qp = qp_ptr + bh64 * (NG * C * 2) + (grp * C + ch) * 2
        pair = tl.arange(0, 2)
        sc, zr = tl.split(tl.load(qp[:, None] + pair[None, :], mask=ch_ok[:, None], other=0.0))  # one tile
        kt = codes * sc.to(codes.dtype)[:, None] + zr.to(codes.dtype)[:, None]
        if codes.dtype == tl.float32:
            kt = _cast(_cast(kt, kv_ptr, UPCAST), q_ptr, UPCAST)
    return _mm(qt, kt, USE_DOT, PREC)


@triton.jit
def _value_tile(
    vdata_ptr,
    vq_ptr,
    vq32_ptr,
    bh64,
    grp,
    kv_ptr,
    q_ptr,
    G: tl.constexpr,
    GP: tl.constexpr,
    DV: tl.constexpr,
    NG: tl.constexpr,
    VB: tl.constexpr,
    VGS: tl.constexpr,
    UPCAST: tl.constexpr,
    GATHER: tl.constexpr,
    DQ: tl.constexpr,
):
    """Dequantized values ``[GP, DV]`` of group ``grp`` in the query dtype (rows >= G are zero padding)."""
    if VB == 16:
        n = tl.arange(0, GP)
        v = tl.load(
            vdata_ptr + bh64 * (NG * G * DV) + (grp * G + n[:, None]) * DV + tl.arange(0, DV)[None, :],
            mask=(n < G)[:, None],
            other=0.0,
        )
        v = _cast(v.to(tl.float32), q_ptr, UPCAST)
    elif GATHER:  # per-element byte and (scale, zero) int32 loads (L1 hits), no reshape
        NVG: tl.constexpr = DV // VGS
        PER_BYTE: tl.constexpr = 8 // VB
        VNB: tl.constexpr = DV * VB // 8
        n = tl.arange(0, GP)
        c = tl.arange(0, DV)
        n_ok = (n < G)[:, None]
        byt = tl.load(
            vdata_ptr + bh64 * (NG * G * VNB) + (grp * G + n[:, None]) * VNB + (c // PER_BYTE)[None, :],
            mask=n_ok,
            other=0,
        )
        x = (byt.to(tl.int32) >> ((c % PER_BYTE) * VB)[None, :]) & ((1 << VB) - 1)
        codes = (x | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        w = tl.load(
            vq32_ptr + bh64 * (NG * G * NVG) + (grp * G + n[:, None]) * NVG + (c // VGS)[None, :],
            mask=n_ok,
            other=0,
        )
        sc = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        zr = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        v = _cast(_cast(codes * sc + zr, kv_ptr, UPCAST), q_ptr, UPCAST)
    else:
        NVG: tl.constexpr = DV // VGS
        VGB: tl.constexpr = VGS * VB // 8
        rows = tl.arange(0, GP * NVG)  # (token, channel group) pairs, contiguous in the store
        rows_ok = rows < G * NVG
        byt = tl.load(
            vdata_ptr
            + bh64 * (NG * G * NVG * VGB)
            + (grp * (G * NVG) + rows[:, None]) * VGB
            + tl.arange(0, VGB)[None, :],
            mask=rows_ok[:, None],
            other=0,
        )
        codes = unpack_codes(byt, GP * NVG, VGB, VB, DQ)
        qp = vq_ptr + bh64 * (NG * G * NVG * 2) + (grp * (G * NVG) + rows) * 2
        pair = tl.arange(0, 2)
        sc, zr = tl.split(tl.load(qp[:, None] + pair[None, :], mask=rows_ok[:, None], other=0.0))
        v = codes * sc.to(codes.dtype)[:, None] + zr.to(codes.dtype)[:, None]
        if codes.dtype == tl.float32:
            v = _cast(_cast(v, kv_ptr, UPCAST), q_ptr, UPCAST)
        v = tl.reshape(v, (GP, DV))
    return v


@triton.jit(do_not_specialize=["length", "packed", "new_len", "groups_per_split", "num_splits"])
def _attn_split_kernel(
    q_ptr,
    sqb,
    sqh,
    sql,
    sqd,
    nk_ptr,
    snkb,
    snkh,
    snkl,
    snkd,
    nv_ptr,
    snvb,
    snvh,
    snvl,
    snvd,
    ksink_ptr,
    kring_ptr,
    order_ptr,
    k0_ptr,
    kq0_ptr,
    k1_ptr,
    kq1_ptr,
    k2_ptr,
    kq2_ptr,
    vsink_ptr,
    vring_ptr,
    vdata_ptr,
    vq_ptr,
    vq32_ptr,
    mask_ptr,
    smb,
    smh,
    sml,
    smk,
    part_acc_ptr,
    part_ml_ptr,
    length_ptr,
    khdr_ptr,
    length,
    packed,
    new_len,
    qk_scale,
    groups_per_split,
    num_splits,
    H: tl.constexpr,
    N_REP: tl.constexpr,
    LQ: tl.constexpr,
    M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    G: tl.constexpr,
    S: tl.constexpr,
    W: tl.constexpr,
    NG: tl.constexpr,
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
    BLOCK_R: tl.constexpr,
    MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    LENGTH_FROM_PTR: tl.constexpr,
    HAS_NEW: tl.constexpr,
    GP: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FP_PART: tl.constexpr,
    GATHER: tl.constexpr,
    DQ: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next launch (the planar packed groups, which do not read our output) may start now
        gdc_launch_dependents()
    bh = tl.program_id(0)
    sp = num_splits if FP_PART else tl.program_id(1)
    qb = tl.program_id(2)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    if LENGTH_FROM_PTR:
        length = tl.load(length_ptr).to(tl.int32)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    head = h * N_REP + rows // LQ
    qi = rows % LQ
    q_off = b.to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sql
    qpos = length + new_len - LQ + qi
    mask_row = b.to(tl.int64) * smb + head.to(tl.int64) * smh + qi.to(tl.int64) * sml
    dk = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q_full = tl.load(q_ptr + q_off[:, None] + dk[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q_full = q_full.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    if LENGTH_FROM_PTR:  # noqa: SIM108  (constexpr branch) the header's packed groups
        fg = packed_groups_before(khdr_ptr, length, S, G)
    else:
        fg = packed
    if not FP_PART:
        # Packed groups [g0, g1).
        if LENGTH_FROM_PTR:  # the length is known only here: spread the filled groups over the splits
            groups_per_split = tl.cdiv(fg, num_splits)
        g0 = sp * groups_per_split
        g1 = tl.minimum(g0 + groups_per_split, fg)
        tok = tl.arange(0, GP)
        order_base = bh64 * (NG * D)
        for grp in range(g0, g1):
            s = tl.zeros([BLOCK_M, GP], tl.float32)
            if C0 > 0:
                s += _tier_scores(
                    q_ptr,
                    q_off,
                    q_full,
                    row_ok,
                    sqd,
                    order_ptr,
                    order_base,
                    k0_ptr,
                    kq0_ptr,
                    bh64,
                    grp,
                    kring_ptr,
                    0,
                    C0,
                    CP0,
                    B0,
                    D,
                    G,
                    GP,
                    NG,
                    MIXED,
                    True,
                    PREC,
                    UPCAST,
                    GATHER,
                    DQ,
                )
            if C1 > 0:
                s += _tier_scores(
                    q_ptr,
                    q_off,
                    q_full,
                    row_ok,
                    sqd,
                    order_ptr,
                    order_base,
                    k1_ptr,
                    kq1_ptr,
                    bh64,
                    grp,
                    kring_ptr,
                    C0,
                    C1,
                    CP1,
                    B1,
                    D,
                    G,
                    GP,
                    NG,
                    MIXED,
                    True,
                    PREC,
                    UPCAST,
                    GATHER,
                    DQ,
                )
            if C2 > 0:
                s += _tier_scores(
                    q_ptr,
                    q_off,
                    q_full,
                    row_ok,
                    sqd,
                    order_ptr,
                    order_base,
                    k2_ptr,
                    kq2_ptr,
                    bh64,
                    grp,
                    kring_ptr,
                    C0 + C1,
                    C2,
                    CP2,
                    B2,
                    D,
                    G,
                    GP,
                    NG,
                    MIXED,
                    True,
                    PREC,
                    UPCAST,
                    GATHER,
                    DQ,
                )
            pos = S + grp * G + tok
            s = scores_mask(
                s, pos, tok < G, row_ok, qpos, mask_ptr, mask_row, smk, qk_scale, MASK_KIND, IS_CAUSAL
            )
            v = _value_tile(
                vdata_ptr,
                vq_ptr,
                vq32_ptr,
                bh64,
                grp,
                vring_ptr,
                q_ptr,
                G,
                GP,
                DV,
                NG,
                VB,
                VGS,
                UPCAST,
                GATHER,
                DQ,
            )
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, q_ptr, True, PREC, UPCAST)
    else:
        # Full-precision tokens of the store: sinks [0, min(S, length)) and the ring after the groups.
        sinks = tl.minimum(length, S)
        ring_start = S + fg * G
        n_store = sinks + tl.maximum(length - ring_start, 0)
        r_idx = tl.arange(0, BLOCK_R)
        for t0 in range(0, n_store, BLOCK_R):
            i = t0 + r_idx
            ok = i < n_store
            is_sink = i < sinks
            pos = tl.where(is_sink, i, ring_start + i - sinks)
            sink_row = tl.where(is_sink, i, 0)
            slot = tl.where(is_sink, 0, (pos - S) % W)
            sink_off = bh64 * (S * D) + sink_row[:, None] * D + dk[None, :]
            ring_off = bh64 * (W * D) + slot[:, None] * D + dk[None, :]
            k = tl.where(
                is_sink[:, None],
                tl.load(ksink_ptr + sink_off, mask=(ok & is_sink)[:, None], other=0.0),
                tl.load(kring_ptr + ring_off, mask=(ok & ~is_sink)[:, None], other=0.0),
            )
            s = _mm(q_full, tl.trans(_cast(k.to(tl.float32), q_ptr, UPCAST)), True, PREC)
            s = scores_mask(s, pos, ok, row_ok, qpos, mask_ptr, mask_row, smk, qk_scale, MASK_KIND, IS_CAUSAL)
            vs_off = bh64 * (S * DV) + sink_row[:, None] * DV + dv[None, :]
            vr_off = bh64 * (W * DV) + slot[:, None] * DV + dv[None, :]
            v = tl.where(
                is_sink[:, None],
                tl.load(vsink_ptr + vs_off, mask=(ok & is_sink)[:, None], other=0.0),
                tl.load(vring_ptr + vr_off, mask=(ok & ~is_sink)[:, None], other=0.0),
            )
            v = _cast(v.to(tl.float32), q_ptr, UPCAST)
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, q_ptr, True, PREC, UPCAST)
        if HAS_NEW:
            # New full-precision tokens at positions [length, length + new_len), causal-limited.
            last = tl.max(tl.where(row_ok, qpos, 0), axis=0) - length + 1
            if not IS_CAUSAL:
                last = new_len
            n_new = tl.minimum(new_len, last)
            nk_base = b.to(tl.int64) * snkb + h.to(tl.int64) * snkh
            nv_base = b.to(tl.int64) * snvb + h.to(tl.int64) * snvh
            for t0 in range(0, n_new, BLOCK_R):
                j = t0 + r_idx
                ok = j < n_new
                jj = j.to(tl.int64)
                k = tl.load(
                    nk_ptr + nk_base + jj[:, None] * snkl + dk[None, :] * snkd, mask=ok[:, None], other=0.0
                )
                k = _cast(_cast(k.to(tl.float32), kring_ptr, UPCAST), q_ptr, UPCAST)
                s = _mm(q_full, tl.trans(k), True, PREC)
                s = scores_mask(
                    s, length + j, ok, row_ok, qpos, mask_ptr, mask_row, smk, qk_scale, MASK_KIND, IS_CAUSAL
                )
                v = tl.load(
                    nv_ptr + nv_base + jj[:, None] * snvl + dv[None, :] * snvd, mask=ok[:, None], other=0.0
                )
                v = _cast(_cast(v.to(tl.float32), vring_ptr, UPCAST), q_ptr, UPCAST)
                m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, q_ptr, True, PREC, UPCAST)
    part = (bh64 * (num_splits + 1) + sp) * M + rows
    tl.store(part_acc_ptr + part[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    sob,
    soh,
    sol,
    sod,
    num_parts,
    H: tl.constexpr,
    N_REP: tl.constexpr,
    LQ: tl.constexpr,
    M: tl.constexpr,
    DV: tl.constexpr,
    PARTS_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program ``(bh * M + r, c)``: output channels ``c * BLOCK_D ..`` of query row ``r`` of KV head
    ``bh`` (``combine_partials``), ``BLOCK_S`` partials per load."""
    if PDL:  # launched before the partials are done: wait for them; the attention's reads of the
        gdc_wait()  # store are then over, so a decode step's append (``append_token``) may launch
        gdc_launch_dependents()
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    bh = pid // M
    r = pid % M
    b = bh // H
    head = (bh % H) * N_REP + r // LQ
    qi = r % LQ
    bh64 = bh.to(tl.int64)
    sp = tl.arange(0, PARTS_P)
    idx = (bh64 * num_parts + sp) * M + r
    ms = tl.load(part_ml_ptr + idx * 2, mask=sp < num_parts, other=float("-inf"))
    ls = tl.load(part_ml_ptr + idx * 2 + 1, mask=sp < num_parts, other=0.0)
    m_max = tl.max(ms, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.sum(ls * tl.exp2(ms - m_safe), axis=0)
    dv = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, num_parts, BLOCK_S):
        sp2 = c0 + tl.arange(0, BLOCK_S)
        ok = sp2 < num_parts
        idx2 = (bh64 * num_parts + sp2) * M + r
        w = tl.exp2(tl.load(part_ml_ptr + idx2 * 2, mask=ok, other=float("-inf")) - m_safe)
        a = tl.load(part_acc_ptr + idx2[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(a * w[:, None], axis=0)
    out = tl.where(total > 0, acc / tl.where(total > 0, total, 1.0), 0.0)
    o = (
        out_ptr
        + b.to(tl.int64) * sob
        + head.to(tl.int64) * soh
        + qi.to(tl.int64) * sol
        + dv.to(tl.int64) * sod
    )
    tl.store(o, out.to(out_ptr.dtype.element_ty))


def combine_partials(
    part_acc: torch.Tensor,
    part_ml: torch.Tensor,
    out: torch.Tensor,
    heads: int,
    n_rep: int,
    overlap: bool = False,
) -> None:
    """Write ``out [B, heads * n_rep, Lq, Dv]`` from the split partials of ``decode_attention``.

    ``part_acc [B * heads, P, n_rep * Lq, Dv]`` float32 (unnormalized sums) and ``part_ml [B * heads,
    P, n_rep * Lq, 2]`` (base-2 running max and sum) of ``P`` partials per query row; a partial with
    max ``-inf`` is empty, and a row whose partials are all empty gets zeros. One program per row
    and 32-channel block, up to 256 partials per load. One program per row walking 16 partials a step
    took 8.8 us at 1 x 32k (133 partials per row; H200, session 8), a memory latency per step; this
    took the whole decode call at 1 x 32k from 0.0360 to 0.0296 ms (kivi2) and 1 x 128k from 0.0653 to
    0.0592 ms (H200, 2026-11-27, ``bench/decode_ab.py``), and left 8 x 32k unchanged.
    ``overlap``: launched while the launches that write the partials may still run (programmatic
    dependent launch); each program waits for them first."""
    bh, parts, rows, dv = part_acc.shape
    block_d = min(32, dv)
    _combine_kernel[(bh * rows, dv // block_d)](
        part_acc,
        part_ml,
        out,
        *out.stride(),
        parts,
        H=heads,
        N_REP=n_rep,
        LQ=rows // n_rep,
        M=rows,
        DV=dv,
        PARTS_P=next_pow2(parts),
        BLOCK_S=min(8192 // block_d, next_pow2(parts)),
        BLOCK_D=block_d,
        PDL=overlap,
        num_warps=4,
        launch_pdl=overlap,
    )


def _dequant_dtype(query_dtype: torch.dtype, store_dtype: torch.dtype):
    """Element type the packed codes are dequantized in.

    float16 when query and store are float16: ``code * scale + zero`` runs as paired half-precision
    fused multiply-adds. That is exact before its one rounding (a code below 16 times a float16 scale
    plus a float16 zero fits in float32's mantissa), so it equals the float32 path rounded to float16,
    bit for bit (checked on an H200: relative difference 0.0). Otherwise float32, rounded to the store
    type, then to the query type, like ``KVStore.read``. bfloat16 stays on float32: the scale and zero
    are float16 and rounding them to bfloat16 made the output error 4x larger (measured, H200)."""
    if query_dtype == torch.float16 and store_dtype == torch.float16 and not interpreting():
        return tl.float16
    return tl.float32


def _length_arg(length: int | torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, int, bool]:
    if isinstance(length, torch.Tensor):
        if length.numel() != 1 or length.dtype.is_floating_point or length.device != device:
            raise ValueError(
                f"decode_attention: a tensor length must be one integer element on {device}, got "
                f"shape {tuple(length.shape)}, dtype {length.dtype}, device {length.device}"
            )
        return length.reshape(1), 0, True
    length = int(length)
    if length < 0:
        raise ValueError(f"decode_attention: length={length} must be >= 0")
    return None, length, False


@functools.lru_cache(maxsize=1024)
def split_count(programs: int, slots: int, limit: int) -> int:
    """Splits over the packed groups for a grid of ``programs`` (KV heads x query blocks) on a device
    that keeps ``slots`` programs resident: the fewest, from ``slots // programs`` up to ``limit``, whose
    programs fill at least 95% of the waves they take; if none does, the one that fills the most (the
    most splits of those, so ``limit`` where all fill alike); at least 1.

    Each program's time is set by its groups, so a grid that leaves slots empty leaves SMs idle: at
    batch 112 (896 KV heads) on an H200 (8 x 132 slots) one split fills 85% of the device, 7 fill 99%.
    At batch 120 (960 KV heads) one split fills 91% and 11 fill 100%; the 90% threshold used before
    took one split there, and the MixKVQ default's decode step grew 19% from 112 to 120 rows
    (``docs/performance.md``, session 15).
    """
    lo = max(1, slots // programs)
    if lo >= limit:
        return max(1, min(lo, limit))
    best, best_fill = lo, 0.0
    for splits in range(lo, limit + 1):
        waves = -(-programs * splits // slots)
        fill = programs * splits / (waves * slots)
        if fill >= 0.95:
            return splits
        if fill >= best_fill:
            best, best_fill = splits, fill
    return best


def decode_attention(
    query: torch.Tensor,
    store: KVStore,
    length: int | torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    new_key: torch.Tensor | None = None,
    new_value: torch.Tensor | None = None,
    causal: bool = True,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fp_stages: int | None = None,
    gather: bool = False,
    packed: int | None = None,
    gather_first: bool | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over the first ``length`` stored tokens (plus optional new tokens).

    Args:
        query: ``[B, Hq, Lq, D]`` float16/bfloat16/float32, ``Hq`` a multiple of the store's KV heads.
        store: the layer's ``KVStore`` (views of the packed blobs), on the query's device.
        length: tokens of the store to attend to (positions ``0..length-1``): a Python int, or a
            one-element integer tensor on the device (read in the kernel; CUDA-graph friendly).
        attn_mask: optional bool (True = attend) or additive float mask broadcastable to
            ``[B, Hq, Lq, >= total]`` indexed by key position (``total = length + new tokens``).
        scale: softmax scale (default ``1 / sqrt(D)``).
        new_key, new_value: optional ``[B, H, Ln, D]`` / ``[B, H, Ln, Dv]`` full-precision tokens at
            positions ``length..length+Ln-1`` that are not in the store (rounded to the store dtype).
        causal: query ``i`` sits at position ``total - Lq + i`` and sees keys at positions <= its own.
        out: optional ``[B, Hq, Lq, Dv]`` output in the query dtype (any strides).
        num_splits, block_m, num_warps, num_stages, fp_stages: tuning (splits over the packed groups;
            query rows per program; warps per program (planar stores: of the packed-group launch
            only; default 1 per 16 query rows); software-pipelining depth of the packed-group
            loop (default 2 for planar stores of mixed tiers, else 3) and of the full-precision
            loop (default 2 for planar stores of one tier, or of mixed tiers without the overlap
            below, else 1); ``gather``
            unpacks codes with one byte load per code instead of a vector load plus an in-register
            reshape (default layout only; planar stores, ``StoreLayout.planar``, take
            ``planar_attention.planar_split_kernel`` for the packed groups).
        packed: the store's packed-group count when ``length`` is an int and the caller knows it
            (default: read from the store's header, a device sync on CUDA); with a tensor length the
            kernel reads it from the header.
        gather_first: planar stores of mixed key tiers: each program gathers the query at its groups'
            16- and 4-bit channels before its walk, into a scratch of ``(HP + MP) * 2`` bytes per query
            row and packed group (``planar_attention._gather_tier_queries``; faster), instead of per
            group inside the walk. Default: when the query rows per KV head are at most 8 (one decode
            query at up to 8 query heads per KV head). The scratch is freed after the call; at 8 rows
            it takes 512 bytes per group and KV head at MixKVQ's default tiers (the store: 3.5 KB),
            768 at 13 / 26 / 89 channels (4.2 KB).

    Returns:
        ``[B, Hq, Lq, Dv]`` in ``query.dtype``; equals ``reference.attention(query, *store.read(length)
        (concatenated with the new tokens), attn_mask, scale, total - Lq if causal else None)`` up to
        float rounding.
    """
    lay = store.layout
    if query.dim() != 4:
        raise ValueError(f"decode_attention: query must be [B, Hq, Lq, D], got {tuple(query.shape)}")
    bsz, hq, lq, d = query.shape
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"decode_attention: query dtype {query.dtype} not in float16/bfloat16/float32")
    if bsz != lay.batch or d != lay.head_dim or hq % lay.heads:
        raise ValueError(
            f"decode_attention: query {tuple(query.shape)} does not match the store (batch {lay.batch}, "
            f"{lay.heads} KV heads, head_dim {lay.head_dim})"
        )
    for name, dim in (("head_dim", d), ("value_dim", lay.value_dim), ("group_size", lay.group_size)):
        if dim < 8 or dim & (dim - 1):
            raise ValueError(f"decode_attention: {name}={dim} must be a power of two >= 8")
    device = query.device
    if store.keys["ring"].device != device:
        raise ValueError(f"decode_attention: store on {store.keys['ring'].device}, query on {device}")
    check_kernel_device(device, "decode_attention")
    length_ptr, length_val, from_ptr = _length_arg(length, device)
    has_new = new_key is not None
    if has_new != (new_value is not None):
        raise ValueError("decode_attention: pass both new_key and new_value or neither")
    new_len = 0
    if has_new:
        new_len = new_key.shape[2]
        if (
            new_key.dim() != 4
            or tuple(new_key.shape) != (bsz, lay.heads, new_len, d)
            or tuple(new_value.shape) != (bsz, lay.heads, new_len, lay.value_dim)
        ):
            raise ValueError(
                f"decode_attention: new_key {tuple(new_key.shape)} / new_value {tuple(new_value.shape)} must "
                f"be [B, H, Ln, D] / [B, H, Ln, Dv] with B={bsz}, H={lay.heads}, D={d}, Dv={lay.value_dim}"
            )
    if not from_ptr and length_val > lay.capacity:
        raise ValueError(f"decode_attention: length={length_val} exceeds the store capacity {lay.capacity}")
    if not from_ptr and length_val + new_len < lq:
        raise ValueError(f"decode_attention: {lq} queries but only {length_val + new_len} keys")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_rep = hq // lay.heads
    rows = n_rep * lq
    # Query rows per program: as few as there are (at least 4). Triton pads a product of fewer than 16
    # rows inside the tensor-core instruction; the smaller tiles cut registers and instructions (H200,
    # 8 x 32k, 4 rows per KV head: 1.15x planar, 1.2x default layout against 16-row blocks).
    block_m = block_m or max(4, min(64, next_pow2(rows)))
    q_blocks = triton.cdiv(rows, block_m)
    bh = bsz * lay.heads

    # Splits over the packed groups.
    if from_ptr:
        packed, max_groups = 0, lay.num_groups
    else:
        packed = store.packed_groups if packed is None else int(packed)
        if lay.sink_tokens + packed * lay.group_size > max(length_val, lay.sink_tokens):
            raise ValueError(
                f"decode_attention: length={length_val} ends inside the store's {packed} packed groups"
            )
        max_groups = packed
    if num_splits is None:
        if device.type == "cuda":
            # Planar groups: one-warp programs, about 8 of them resident per SM (measured best, H200).
            per_sm = 8 if lay.planar_words else 4
            target = per_sm * num_sms(
                device.index if device.index is not None else torch.cuda.current_device()
            )
        else:
            target = 2 * bh * q_blocks
        num_splits = split_count(bh * q_blocks, target, triton.cdiv(max_groups, 4))
    num_splits = max(0, min(int(num_splits), max_groups))
    groups_per_split = triton.cdiv(max_groups, num_splits) if num_splits else 0
    if lay.planar_words:  # the planar kernel takes two groups per step
        groups_per_split += groups_per_split % 2
    num_splits = triton.cdiv(max_groups, groups_per_split) if num_splits else 0

    # Mask.
    mask_kind, mask_t, mstrides = 0, query, (0, 0, 0, 0)
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[-1] < length_val + new_len and not from_ptr:
            raise ValueError(
                f"decode_attention: attn_mask covers {m.shape[-1]} keys, {length_val + new_len} needed"
            )
        m = m.expand(bsz, hq, lq, m.shape[-1])
        if m.dtype == torch.bool:
            mask_kind, m = 1, m.view(torch.uint8)
        else:
            mask_kind = 2
        if m.device != device:
            raise ValueError(f"decode_attention: attn_mask on {m.device}, query on {device}")
        mask_t, mstrides = m, tuple(m.stride())

    if out is None:
        out = torch.empty((bsz, hq, lq, lay.value_dim), dtype=query.dtype, device=device)
    elif tuple(out.shape) != (bsz, hq, lq, lay.value_dim) or out.dtype != query.dtype:
        raise ValueError(f"decode_attention: out must be {(bsz, hq, lq, lay.value_dim)} {query.dtype}")

    keys, values = store.keys, store.values
    tiers, vdata, vq = store_arguments(store)
    order = keys["order"] if lay.mixed_keys else keys["ring"]
    vq32 = vq.view(torch.int32) if lay.value_bits != 16 else vq

    parts = num_splits + 1
    part_acc = torch.empty((bh, parts, rows, lay.value_dim), dtype=torch.float32, device=device)
    part_ml = torch.empty((bh, parts, rows, 2), dtype=torch.float32, device=device)
    nk = new_key if has_new else query
    nv = new_value if has_new else query
    prec = "ieee" if query.dtype == torch.float32 else "tf32"
    # Measured on H200 (2026-11-26): 2 warps beat 4 by 1.4x on mixed tiers, 4 is best for one tier.
    warps = num_warps or (2 if lay.mixed_keys and block_m <= 16 else 4 if block_m <= 32 else 8)
    # Planar stores: ``num_warps`` tunes the packed-group kernel; the full-precision launch keeps its own.
    fp_warps = (4 if block_m <= 32 else 8) if lay.planar_words else warps
    overlap = overlap_launches(lay, device)
    # Two stages prefetch the next ring block (H200, kivi2, same output: 8 x 32k 0.097 -> 0.093 ms,
    # 1 x 32k 0.040 -> 0.036, 1 x 128k 0.068 -> 0.062); not measured on the default layout. Mixed tiers
    # overlapped with the packed groups: one stage, whose 18 KB of shared memory (83 KB with two) leave
    # the packed-group programs on the same SMs their L1 (H200, MixKVQ's default tiers, 8 x 32k
    # 0.1979 -> 0.1757 ms; 1 x 32k 0.0351 -> 0.0344).
    fp_stages = fp_stages or (2 if lay.planar_words and not (overlap and lay.planar_mixed) else 1)
    # Arguments the split kernel and the planar kernel share (see their signatures).
    common = [
        mask_t,
        *mstrides[:3],
        mstrides[3],
        part_acc,
        part_ml,
        length_ptr if from_ptr else part_ml,
        keys["header"],
        length_val,
        packed,
        new_len,
        scale * LOG2E,
        groups_per_split,
        num_splits,
    ]
    common_meta = dict(
        H=lay.heads,
        N_REP=n_rep,
        LQ=lq,
        M=rows,
        BLOCK_M=block_m,
        D=d,
        DV=lay.value_dim,
        G=lay.group_size,
        S=lay.sink_tokens,
        NG=lay.num_groups,
        MASK_KIND=mask_kind,
        IS_CAUSAL=bool(causal),
        LENGTH_FROM_PTR=from_ptr,
    )
    args = [
        query,
        *query.stride(),
        nk,
        *(nk.stride() if has_new else (0, 0, 0, 0)),
        nv,
        *(nv.stride() if has_new else (0, 0, 0, 0)),
        keys["sink"],
        keys["ring"],
        order,
        tiers[0][0],
        tiers[0][1],
        tiers[1][0],
        tiers[1][1],
        tiers[2][0],
        tiers[2][1],
        values["sink"],
        values["ring"],
        vdata,
        vq,
        vq32,
        *common,
    ]
    meta = dict(
        **common_meta,
        W=max(lay.window, 1),
        **layout_constexprs(lay, tiers),
        BLOCK_R=64 if d <= 128 else 32,
        HAS_NEW=has_new,
        GP=max(16, lay.group_size),
        PREC=prec,
        UPCAST=interpreting(),
        GATHER=gather,
        # float16 query and store: dequantize in float16 (paired HFMA2); otherwise float32.
        DQ=_dequant_dtype(query.dtype, lay.dtype),
    )
    # Planar stores: the full-precision launch first, so that on Hopper and later the planar launch can
    # start while it runs (programmatic dependent launch): the two write different partials.
    if lay.planar_words:
        _attn_split_kernel[(bh, 1, q_blocks)](
            *args, **meta, FP_PART=True, PDL=overlap, num_warps=fp_warps, num_stages=fp_stages
        )
    if num_splits and lay.planar_words:
        codes, qparams = tiers[lay.planar_key_tier][:2]
        high, mid = lay.key_channels[:2] if lay.planar_mixed else (0, 0)
        hp, mp = tier_query_widths(high, mid)
        # Mixed tiers: the query gathered at every group's tier channels, written by each program before
        # its walk (``planar_attention._gather_tier_queries``): (HP + MP) * 2 bytes per query row and
        # group, 0.25 MiB per 1024 groups of 4 query rows at MixKVQ's default tiers.
        first = (rows <= 8 if gather_first is None else gather_first) and hp + mp > 0
        tq_rows = q_blocks * block_m if first else 0
        tier_q = (
            torch.empty((bh * lay.num_groups, tq_rows, hp + mp), dtype=torch.int16, device=device)
            if first
            else part_ml
        )
        # With a mask, two launches: every range walked without reading the mask, then the ranges the
        # mask does not keep whole (none in a decode step over a static cache) walked with it, their
        # partials written over the first launch's. One kernel with both loops spilled more in the first
        # (MixKVQ's default tiers, Triton 3.6: 58 LDL per step against 34). H200, bfloat16, 64 x 32k,
        # all-true mask: MixKVQ default 1.305 -> 1.213 ms, kivi2 0.707 -> 0.677 (0.676 without a mask);
        # e2e step at 64 rows 51.95 -> 47.74 ms (session 18).
        prefetch = prefetch_steps(lay)  # each step asks the L2 for the next step's groups
        for masked_walk in (False, True) if mask_kind else (False,):
            planar_split_kernel[(bh, num_splits, q_blocks)](
                query,
                *query.stride(),
                codes,
                qparams,
                vdata,
                vq,
                order,
                tiers[0][0],
                tiers[1][0],
                tiers[1][1],
                tier_q,
                *common,
                **common_meta,
                VGS=lay.value_group_size,
                HIGH=high,
                MID=mid,
                HP=hp,
                MP=mp,
                ROWS=tq_rows,
                INTERP=interpreting(),
                MASKED_WALK=masked_walk,
                num_warps=num_warps or max(1, block_m // 16),
                # Mixed tiers: two stages (H200, 2026-11-27, 13/26/89 channels: 8 x 32k 0.216 -> 0.199
                # ms, 1 x 128k 0.125 -> 0.117; session 20, bfloat16 with a mask, three against two:
                # 0.1905 -> 0.2475 ms); three for one tier (kivi2: 0.101 -> 0.094 ms at 8 x 32k).
                num_stages=num_stages or (2 if lay.planar_mixed else 3),
                PDL=overlap,
                PREFETCH=prefetch,
                launch_pdl=overlap,
            )
    elif num_splits:
        _attn_split_kernel[(bh, num_splits, q_blocks)](
            *args, **meta, FP_PART=False, PDL=False, num_warps=warps, num_stages=num_stages or 3
        )
    if not lay.planar_words:
        _attn_split_kernel[(bh, 1, q_blocks)](
            *args, **meta, FP_PART=True, PDL=False, num_warps=fp_warps, num_stages=fp_stages
        )
    combine_partials(part_acc, part_ml, out, lay.heads, n_rep, overlap)
    return out
