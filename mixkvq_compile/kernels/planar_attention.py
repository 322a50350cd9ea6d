"""Attention over the packed groups of a *planar* store (``StoreLayout.planar``) on the tensor cores.

One program per (batch * KV head, split, query block) walks a run of packed groups with a base-2 online
softmax and writes ``(m, l, acc)`` partials in the layout of ``decode_attention._attn_split_kernel``,
whose full-precision launch and combine kernel finish the attention.

Stores of mixed key tiers (``StoreLayout.planar_mixed``) keep a 2-bit field for every channel in the
same words (0 for the 16-bit channels, the high 2 bits of the 4-bit codes), so the loop below is the
same; ``_group_scores`` adds, per group, the query gathered at the 16-bit channels times those channels
and the query gathered at the 4-bit channels times ``s4`` times the codes' low 2 bits. For up to 8
query rows per KV head (``decode_attention``'s ``gather_first``) each program gathers these query tiles
for all of its groups before its walk, into a scratch the walk reads as contiguous tiles
(``_gather_tier_queries``); for more rows the walk gathers them per group (``_tier_query``).

Why the planar layout is fast: each int16 word holds 8 two-bit codes, one per bit field ``f``, and
field ``f`` of a row of words is a run of ``D / 8`` consecutive channels (keys) or ``Dv / 8`` channels
(values). ``word & (3 << 2f)`` read as a float16 is the code times ``4**f * 2**-24`` (a subnormal;
fields 5 to 7 are first shifted right by 10, so their weight is ``4**(f - 5)``). One AND per two codes
gives a tensor-core operand; no integer-to-float conversion, no offset, no data movement between
registers (an int16 tile has the operand layout of a float16 tile). The scale and weight of each
channel are folded into the other operand and the zero points are small matrix products:

- scores: ``sum_f (q_f * s_f * 4**-e_f) @ B_f * 2**24 + q . z`` per group, ``q_f`` the query channels
  of field ``f`` and ``B_f`` the unpacked field, ``[D / 8, G]``; ``q . z`` (one number per query row)
  is the first column of ``q_f @ broadcast(z_f)`` over 16 columns, the smallest tensor-core product;
- values, transposed: ``acc_f += B_f^T @ (p * vs)^T`` per field (``p`` scaled by the value scale of
  the field's value group; ``acc_f [DV / 8, rows]``) and ``acc_f * 4**e_f * 2**24 + VZ @ p^T`` at the
  end, ``VZ [NVG, G]`` the value zeros.

Each group's scales and zero points are loaded at the top of its iteration as ``[D / 8, 8]`` tiles
(column f for field f, split in registers) and a ``[G, min(NVG, 8)]`` value-scale tile (column g for
value group g; ``_group_qparams``). Loaded inside the field loop they were
one 2-byte load per thread each, whose layout conversion waited a full memory round trip (Nsight
Compute: 31% of the stall samples on four such stores to shared memory); as tiles they go through the
pipelined asynchronous copy with the codes (1.39x faster at 8 x 32k, H100).

The loop is bound by instruction issue (Nsight Compute, H200: 59% of issue slots busy, the top stall
reasons "selected" and "wait"), so it is written for few instructions per group:
- two groups per step: one online-softmax rescale of the 8 accumulators per 64 tokens, two
  independent product chains;
- as few query rows per program as there are (``decode_attention`` picks 4 for 4 query heads per KV
  head): Triton pads the products to 16 rows inside the instruction;
- ``p * vs`` in paired float16 products, the softmax scale folded into the one multiply-add that
  rescales the scores, and no causal test over packed tokens for one query (they all precede it).
Static SASS of the loop, per group (Triton 3.6, sm_90, 4 query rows): 769 -> 586 instructions
against the one-group, 16-row loop; H200 at 8 x 32k: 0.133 -> 0.097 ms.
On the kernel with transposed value sums (below), Nsight Compute (H200, kivi2, 8 x 32k) counts 0.55
instructions issued per cycle and scheduler with two resident one-warp programs each (255 registers),
stalls mostly "selected" and "wait" (fixed latencies), 3% on global memory. Capping the registers
for more resident programs (``maxnreg`` 200, 184, 168) made it 1.1-1.5x slower, even at 200 where
the loop does not spill (``docs/performance.md``, session 20).

Why the value sums are transposed: the tensor-core product is 16 rows by 8 columns, so ``p @ B_f`` with
4 query rows as its rows computes 16 rows, 12 of them padding, and each thread holds 8 float32 sums per
field of which 6 are padding; ``B_f^T @ p^T`` has the 16 value channels of a field as rows and the query
rows as columns (padded to 8): half the products and half the sums, so half the multiply-adds that
rescale them each step. Taken once per group, before the value scales, the transposition of ``p``
compiles without shared memory (Triton 3.6: no ``STSM`` in the loop; the score product's result layout,
rows ``t / 4`` and columns ``2 (t % 4)`` of thread ``t``, is its transpose's operand layout); taken
after each value group's scaling, it went through shared memory (``STSM``, 20 barriers per step). The
scores stay untransposed: transposed as well, ``p^T`` comes out of that product in a layout that must be
shuffled into the operand one (offline, kivi2: 1050 instructions per step against 1000). Offline, per
step of two groups, against the untransposed sums (Triton 3.6, sm_90, bfloat16, the launch that does not
read the mask): kivi2 1196 -> 1000 instructions, MixKVQ's default tiers 1793 -> 1624 with 49 -> 24 spill
loads, 13 / 26 / 89 channels 2089 -> 1916 with 57 -> 27. Measured (H100, bfloat16, all-true mask,
``bench/decode_ab.py``, session 19 in ``docs/performance.md``): kivi2 3-5% faster, MixKVQ's default
tiers 16-19%, 13 / 26 / 89 12-14%.

For stores of mixed key tiers with more than 16 4-bit channels (``PREFETCH``, ``_runtime.prefetch_steps``,
which says when it pays: when the loop spills less with it), each step of two groups first
asks the L2 for the next step's bytes (``_prefetch_pair``: one ``prefetch.global.L2`` per 128-byte line,
4 to 8 per thread). The pipelined copies of a step are issued late in the step before it, and with the
two stages that mixed tiers afford (255 registers) the step's first barrier waited for them (Nsight
Compute, H200, MixKVQ's default tiers at 8 x 32k: 10.5% of the stall samples on that barrier, long
scoreboard 27.7% of all against 2.7% for kivi2's three stages); the gathers of the query at the tier
channels waited on the channel order the same way. With the prefetch the copies and gathers find their
bytes in the L2: 8 x 32k 0.1758 -> 0.1568 ms, 1 x 128k 0.0948 -> 0.0810 ms (``bench/decode_ab.py``,
session 16 in ``docs/performance.md``). kivi2 gained 1-3%, but in the kernel that reads a mask its loop
then spilled and was 15% slower (session 17). Since the walk no longer gathers (session 23), the
default tiers are faster without it.

Operands are float16 whatever the query dtype (except the 16-bit key tier's product over a bfloat16
store, whose channels and gathered query enter as bfloat16, as stored: converting them cost MixKVQ's
default tiers 83 of 1589 instructions per step, Triton 3.6, sm_90); the query is scaled by
``QSCALE = 1/16`` first so that ``|q * s|`` up to ``16 * 65504`` stays finite. The result differs
from dequantize-then-attend by float16 rounding of ``q * s``, ``p`` and ``p * vs`` (relative error
about 1e-3, checked against a float32 reference in the tests).

Each step's value products are summed from zero on the tensor cores and added to the running sums in
float32 multiply-adds (``_rescale_add``). With the running sums as the products' accumulator, as
Triton folds ``a + dot(x, y)``, the error grew with the length of a program's walk (H200, 8 x 32k,
stores of quantized random values, 13 / 26 / 89 tiers: 2.1e-3 at the default splits, 1.4e-2 with
two, 2.4e-2 with one; 0.11 at 1 x 128k with one): the field sums ``acc_f`` and ``p @ VZ^T`` are each
about the size of the values, while their sum, the output, can be a hundred times smaller (wide
attention over zero-mean values), so a rounding bias in the running sums shows a hundredfold. Summed
in float32 the error stays 7.5e-4 to 9.4e-4 at any split count; the cost is 6% of the step (kivi2,
the default tiers) to 11% (13 / 26 / 89), in the multiply-adds and in register copies (the step's
sums live beside the running ones) (``bench/decode_ab.py``, session 12 in ``docs/performance.md``).
"""

from __future__ import annotations

from ._runtime import gdc_launch_dependents, gdc_wait, packed_groups_before, scores_mask, tl, triton

__all__ = ["planar_split_kernel", "tier_query_widths"]

QSCALE = 1.0 / 16.0


@triton.jit
def _bits16(x, S: tl.constexpr):
    return tl.inline_asm_elementwise(S, "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _field(x, F_: tl.constexpr, INTERP: tl.constexpr):
    """float16 ``code * 4**e * 2**-24`` of bit field ``F_`` of every int16 of ``x`` (``e = F_`` for
    fields 0 to 4, ``F_ - 5`` for fields 5 to 7)."""
    if INTERP:
        if F_ < 5:  # noqa: SIM108
            y = x & (3 << (2 * F_))
        else:
            y = (x >> 10) & (3 << (2 * (F_ - 5)))
        r = y.to(tl.float16, bitcast=True)
    else:
        if F_ == 0:
            r = _bits16(x, "and.b32 $0, $1, 0x00030003;")
        elif F_ == 1:
            r = _bits16(x, "and.b32 $0, $1, 0x000c000c;")
        elif F_ == 2:
            r = _bits16(x, "and.b32 $0, $1, 0x00300030;")
        elif F_ == 3:
            r = _bits16(x, "and.b32 $0, $1, 0x00c000c0;")
        elif F_ == 4:
            r = _bits16(x, "and.b32 $0, $1, 0x03000300;")
        elif F_ == 5:
            r = _bits16(x, "{.reg .b32 t; shr.b32 t, $1, 10; and.b32 $0, t, 0x00030003;}")
        elif F_ == 6:
            r = _bits16(x, "{.reg .b32 t; shr.b32 t, $1, 10; and.b32 $0, t, 0x000c000c;}")
        else:
            r = _bits16(x, "{.reg .b32 t; shr.b32 t, $1, 10; and.b32 $0, t, 0x00300030;}")
    return r


@triton.jit
def _inv_weight(F_: tl.constexpr):
    """``4**-e`` of field ``F_``."""
    if F_ < 5:
        w: tl.constexpr = 1.0 / (4**F_)
    else:
        w: tl.constexpr = 1.0 / (4 ** (F_ - 5))
    return w


@triton.jit
def _pick(x0, x1, x2, x3, x4, x5, x6, x7, F_: tl.constexpr):
    if F_ == 0:
        r = x0
    elif F_ == 1:
        r = x1
    elif F_ == 2:
        r = x2
    elif F_ == 3:
        r = x3
    elif F_ == 4:
        r = x4
    elif F_ == 5:
        r = x5
    elif F_ == 6:
        r = x6
    else:
        r = x7
    return r


@triton.jit
def _split8(x):
    """The 8 columns ``[N]`` of ``x [N, 8]``, in order (three halvings of the last dimension)."""
    a, b = tl.split(tl.reshape(x, [x.shape[0], 4, 2]))  # columns 0, 2, 4, 6 and 1, 3, 5, 7
    a0, a1 = tl.split(tl.reshape(a, [x.shape[0], 2, 2]))  # 0, 4 and 2, 6
    b0, b1 = tl.split(tl.reshape(b, [x.shape[0], 2, 2]))  # 1, 5 and 3, 7
    c0, c4 = tl.split(a0)
    c2, c6 = tl.split(a1)
    c1, c5 = tl.split(b0)
    c3, c7 = tl.split(b1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _split_groups(x, FPG: tl.constexpr):
    """The value scales of the 8 fields from ``x [N, 8 / FPG]`` (column g: value group g, ``FPG``
    fields per group): field f's column is f // FPG."""
    if FPG == 1:
        r0, r1, r2, r3, r4, r5, r6, r7 = _split8(x)
    elif FPG == 2:
        a, b = tl.split(tl.reshape(x, [x.shape[0], 2, 2]))  # 0, 2 and 1, 3
        g0, g2 = tl.split(a)
        g1, g3 = tl.split(b)
        r0, r1, r2, r3, r4, r5, r6, r7 = g0, g0, g1, g1, g2, g2, g3, g3
    elif FPG == 4:
        g0, g1 = tl.split(x)
        r0, r1, r2, r3, r4, r5, r6, r7 = g0, g0, g0, g0, g1, g1, g1, g1
    else:
        g0 = tl.reshape(x, [x.shape[0]])
        r0, r1, r2, r3, r4, r5, r6, r7 = g0, g0, g0, g0, g0, g0, g0, g0
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _load_query_field(q_ptr, q_off, row_ok, sqd, F_: tl.constexpr, FW: tl.constexpr):
    """Channels ``F_ * FW ..`` of the query rows, ``[BLOCK_M, FW]`` float16, times QSCALE."""
    j = tl.arange(0, FW)
    q = tl.load(
        q_ptr + q_off[:, None] + (F_ * FW + j)[None, :].to(tl.int64) * sqd, mask=row_ok[:, None], other=0.0
    )
    return (q.to(tl.float32) * 0.0625).to(tl.float16)  # QSCALE


@triton.jit
def _group_scores(
    qs,
    kc_ptr,
    kscale,
    kzero,
    gi,
    score_scale,
    tiers,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    HP: tl.constexpr,
    MP: tl.constexpr,
    ROWS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Base-2 scores ``[BLOCK_M, G]`` of group ``gi`` (flat index over batch * heads * groups): ``q . k_hat``
    for every token of the group times ``score_scale`` (the softmax scale times log2(e), over QSCALE).
    ``kscale``, ``kzero``: the group's key scales and zero points ``[D / 8, 8]`` (column f: the channels
    of field f), loaded by the caller. ``qs``: the query fields ``(q0, .., q7)`` (``_load_query_field``).
    Stores of mixed key tiers add their ``HIGH`` 16-bit channels and the low bits of their ``MID`` 4-bit
    codes (``_high_tier_scores``, ``_low_bits_scores``), from ``tiers`` (``planar_split_kernel``'s:
    ``(q_ptr, q_off, row_ok, sqd, order_ptr, s4_ptr, tq_ptr, tq_rows, hi_ptr, lo_ptr)``), the query
    at their channels read from the tier-query scratch (``ROWS > 0``: ``_gather_tier_queries``, ``ROWS``
    rows of ``HP + MP`` per group, this program's at offsets ``tq_rows [BLOCK_M]``) or gathered here."""
    q0, q1, q2, q3, q4, q5, q6, q7 = qs
    _q, _qo, _ok, _sqd, _order, _s4, tq_ptr, _tq_rows, hi_ptr, lo_ptr = tiers
    tq_grp = tq_ptr + gi * (ROWS * (HP + MP))  # the group's block of the tier-query scratch (ROWS > 0)
    FW: tl.constexpr = D // 8
    j = tl.arange(0, FW)
    t = tl.arange(0, G)
    words = tl.trans(tl.load(kc_ptr + (gi * G + t[:, None]) * FW + j[None, :]))  # [FW, G] int16
    ks0, ks1, ks2, ks3, ks4, ks5, ks6, ks7 = _split8(kscale)
    kz0, kz1, kz2, kz3, kz4, kz5, kz6, kz7 = _split8(kzero)
    if MID > 0:
        s = _low_bits_scores(tiers, tq_grp, lo_ptr, gi, BLOCK_M, G, HIGH, MID, HP, MP, ROWS)
    else:
        s = tl.zeros([BLOCK_M, G], tl.float32)
    sz = tl.zeros([BLOCK_M, 16], tl.float32)  # q . z, the same in every column
    for f in tl.static_range(8):
        qf = _pick(q0, q1, q2, q3, q4, q5, q6, q7, f)
        ks = _pick(ks0, ks1, ks2, ks3, ks4, ks5, ks6, ks7, f)
        kz = _pick(kz0, kz1, kz2, kz3, kz4, kz5, kz6, kz7, f)
        s = tl.dot(
            qf * (ks.to(tl.float32) * _inv_weight(f)).to(tl.float16)[None, :], _field(words, f, INTERP), s
        )
        sz = tl.dot(qf, tl.broadcast_to(kz[:, None], (FW, 16)), sz)
    s = s * (16777216.0 * score_scale) + (tl.max(sz, 1) * score_scale)[:, None]  # one FFMA each
    if HIGH > 0:
        s += score_scale * _high_tier_scores(tiers, tq_grp, hi_ptr, gi, G, HIGH, MID, HP, ROWS, INTERP)
    return s


@triton.jit
def _group_values(
    p,
    vc_ptr,
    vscale,
    vz,
    gi,
    a0,
    a1,
    a2,
    a3,
    a4,
    a5,
    a6,
    a7,
    za,
    DV: tl.constexpr,
    G: tl.constexpr,
    VGS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """``acc_f += B_f^T @ (p * vs)^T`` for the 8 value fields of group ``gi`` and ``za += VZ @ p^T``:
    the sums transposed, ``[DV / 8, BLOCK_M]`` and ``[16, BLOCK_M]``. ``vscale [G, min(NVG, 8)]``:
    column g the value scales of value group g; ``vz [16, G]``: the value zero points of the group's value
    groups (rows past them 0); both loaded by the caller."""
    FW: tl.constexpr = DV // 8
    FPG: tl.constexpr = VGS // FW  # fields per value group
    j = tl.arange(0, FW)
    t = tl.arange(0, G)
    words = tl.load(vc_ptr + (gi * FW + j[:, None]) * G + t[None, :])  # [FW, G] int16
    vs0, vs1, vs2, vs3, vs4, vs5, vs6, vs7 = _split_groups(vscale, FPG)
    pt = tl.trans(p.to(tl.float16))  # [G, BLOCK_M]
    za = tl.dot(vz, pt, za)
    pf = pt
    for f in tl.static_range(8):
        if f % FPG == 0:  # one operand p * vs per value group, in float16 (paired multiplies)
            vs = _pick(vs0, vs1, vs2, vs3, vs4, vs5, vs6, vs7, f)
            pf = pt * vs[:, None].to(tl.float16)
        d = tl.dot(_field(words, f, INTERP), pf)
        if f == 0:
            a0 = a0 + d
        elif f == 1:
            a1 = a1 + d
        elif f == 2:
            a2 = a2 + d
        elif f == 3:
            a3 = a3 + d
        elif f == 4:
            a4 = a4 + d
        elif f == 5:
            a5 = a5 + d
        elif f == 6:
            a6 = a6 + d
        else:
            a7 = a7 + d
    return a0, a1, a2, a3, a4, a5, a6, a7, za


@triton.jit
def _group_values_from_zero(
    p,
    vc_ptr,
    vscale,
    vz,
    gi,
    BLOCK_M: tl.constexpr,
    DV: tl.constexpr,
    G: tl.constexpr,
    VGS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """``_group_values`` of group ``gi`` into sums that start at zero: a step's products, which
    ``_rescale_add`` then adds to the walk's running sums in float32."""
    zero = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    za = tl.zeros([16, BLOCK_M], tl.float32)
    return _group_values(
        p, vc_ptr, vscale, vz, gi, zero, zero, zero, zero, zero, zero, zero, zero, za, DV, G, VGS, INTERP
    )


@triton.jit
def _group_qparams(
    kqp_ptr, vqp_ptr, gi, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, VGS: tl.constexpr
):
    """The scales and zero points of packed group ``gi`` as tiles (see the module docstring): key scales
    and zeros ``[D / 8, 8]`` (column f: the channels of field f), value scales ``[G, min(NVG, 8)]``
    (column g: value group g's scale per token, ``NVG = DV / VGS``; ``_split_groups`` gives each field
    its group's) and value zeros ``[16, G]`` (row g: value group g; rows past the groups 0).

    One column per value group, not per field: with a column per field (two fields per group at
    ``DV`` 128 and groups of 32) the tile copied each scale twice through the pipeline's shared memory,
    and MixKVQ's default tiers spilled 24 registers per step against 5 (Triton 3.6, sm_90, bfloat16,
    the first masked launch: 1624 -> 1590 instructions; kivi2 1000 -> 991; 13 / 26 / 89 channels 1916
    / 27 -> 1889 / 18). H200, bfloat16, all-true mask, 8 x 32k: MixKVQ default 0.1491 -> 0.1439 ms,
    13 / 26 / 89 0.1921 -> 0.1895, kivi2 0.0920 -> 0.0912; with the mask scanned only by the second
    launch and the 16-bit tier in bfloat16 as well, 0.1423, 0.1859 and 0.0863 (session 21 in
    ``docs/performance.md``)."""
    FW: tl.constexpr = D // 8
    NVG: tl.constexpr = DV // VGS
    fi = tl.arange(0, 8)
    jk = tl.arange(0, FW)
    tok = tl.arange(0, G)
    vcol = tl.arange(0, 16)
    kq = kqp_ptr + gi * (2 * D)
    kscale = tl.load(kq + fi[None, :] * FW + jk[:, None])
    kzero = tl.load(kq + D + fi[None, :] * FW + jk[:, None])
    vq = vqp_ptr + gi * (2 * NVG * G)
    NVGP: tl.constexpr = NVG if NVG < 8 else 8
    gcol = tl.arange(0, NVGP)
    vscale = tl.load(vq + gcol[None, :] * G + tok[:, None])
    vz = tl.load(vq + NVG * G + vcol[:, None] * G + tok[None, :], mask=(vcol < NVG)[:, None], other=0.0)
    return kscale, kzero, vscale, vz


@triton.jit
def _masked(s, pos, row_ok, qpos, mask_ptr, mask_row, smk, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Scaled base-2 scores ``s [BLOCK_M, G]`` of a group at key positions ``pos [G]``, with the causal
    rule and the attention mask applied when there are any."""
    if MASK_KIND != 0 or IS_CAUSAL:
        # Scale 1.0: the caller scaled the scores (folded away by the compiler).
        s = scores_mask(s, pos, pos >= 0, row_ok, qpos, mask_ptr, mask_row, smk, 1.0, MASK_KIND, IS_CAUSAL)
    return s


@triton.jit
def _rescale_add(alpha, a0, a1, a2, a3, a4, a5, a6, a7, za, b0, b1, b2, b3, b4, b5, b6, b7, zb):
    """``a * alpha + b`` for the 9 accumulators: one step's products ``b`` join the running sums ``a``
    in float32 multiply-adds, not as the accumulator of the tensor-core products (where Triton would put
    ``a + dot(x, y)``, the running sum then taking every product of the walk inside the tensor cores)."""
    c = alpha[None, :]
    return (
        a0 * c + b0,
        a1 * c + b1,
        a2 * c + b2,
        a3 * c + b3,
        a4 * c + b4,
        a5 * c + b5,
        a6 * c + b6,
        a7 * c + b7,
        za * c + zb,
    )


@triton.jit
def _store_field(
    part_acc_ptr, part, row_ok, a, za, F_: tl.constexpr, FW: tl.constexpr, DV: tl.constexpr, VGS: tl.constexpr
):
    """Write value channels ``F_ * FW ..`` of the partial accumulator: field sum times its weight, plus
    the zero term of its value group."""
    c = tl.arange(0, FW)
    g: tl.constexpr = (F_ * FW) // VGS
    zc = tl.sum(tl.where((tl.arange(0, 16) == g)[:, None], za, 0.0), 0)
    a = a * (_inv_weight(F_) * 16777216.0) + zc[None, :]
    tl.store(part_acc_ptr + part[None, :] * DV + F_ * FW + c[:, None], a, mask=row_ok[None, :])


def tier_query_widths(high: int, mid: int) -> tuple[int, int]:
    """Columns ``(HP, MP)`` of a row of the tier-query scratch (``_gather_tier_queries``) for ``high``
    16-bit and ``mid`` 4-bit key channels: the 16-bit channels padded to a power of two of at least 16
    (one tensor-core K step; 0 without them), the 4-bit ones to a multiple of 16 (one product each)."""
    hp = max(16, triton.next_power_of_2(high)) if high else 0
    return hp, 16 * triton.cdiv(mid, 16)


@triton.jit
def _gather_tier(
    q_ptr,
    q_off,
    sqd,
    order_ptr,
    s4_ptr,
    dst_ptr,
    gi,
    g_ok,
    live,
    row_at,
    FIRST: tl.constexpr,
    COUNT: tl.constexpr,
    PADDED: tl.constexpr,
    COL0: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    SCALED: tl.constexpr,
):
    """One tier of ``_gather_tier_queries`` for groups ``gi [PG]``: the query at channels ``order[FIRST ..
    FIRST + COUNT)`` of each group times QSCALE (and ``s4`` where ``SCALED``), written at columns ``COL0 ..
    COL0 + PADDED`` of the rows ``row_at [PG, BLOCK_M]`` (offsets in elements; rows not ``live`` and the
    columns past ``COUNT`` get 0)."""
    WIDTH: tl.constexpr = triton.next_power_of_2(PADDED)
    c = tl.arange(0, WIDTH)
    ok = c < COUNT
    at = g_ok[:, None] & ok[None, :]
    channel = tl.load(order_ptr + gi[:, None] * (HIGH + MID) + FIRST + c[None, :], mask=at, other=0)
    q = tl.load(
        q_ptr + q_off[None, :, None] + channel.to(tl.int64)[:, None, :] * sqd,
        mask=live[:, :, None] & ok[None, None, :],
        other=0.0,
    )
    q = q.to(tl.float32) * 0.0625  # QSCALE
    if SCALED:
        s4 = tl.load(s4_ptr + gi[:, None] * MID + c[None, :], mask=at, other=0.0)
        q = q * s4.to(tl.float32)[:, None, :]
    tl.store(
        dst_ptr + row_at[:, :, None] + COL0 + c[None, None, :],
        q.to(dst_ptr.dtype.element_ty),
        mask=g_ok[:, None, None] & (c < PADDED)[None, None, :],
    )


@triton.jit
def _gather_tier_queries(
    q_ptr,
    q_off,
    row_ok,
    sqd,
    order_ptr,
    s4_ptr,
    tq_ptr,
    hi_ptr,
    rows,
    base,
    g0,
    g1,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    HP: tl.constexpr,
    MP: tl.constexpr,
):
    """Mixed-tier stores: the query rows gathered at the tier channels of packed groups ``g0 .. g1 - 1``
    (flat index ``base + grp``), written to the scratch ``tq_ptr`` (int16 words, ``[groups, ROWS, HP +
    MP]``, this program's rows ``rows [BLOCK_M]``) for ``_high_tier_scores`` and ``_low_bits_scores``:
    columns ``0 .. HP`` the query at the 16-bit channels times QSCALE in the store's dtype (the 16-bit
    tier's operand type), columns ``HP .. HP + MP`` the query at the 4-bit channels times QSCALE times
    ``s4`` in float16 (``tier_query_widths``); padding columns and invalid rows 0.

    Why before the walk: gathered inside it, group by group, the query tile reached the tensor-core
    operand through shared memory with barriers of its own (Triton's layout passes; Triton 3.6, sm_90,
    bfloat16, MixKVQ's default tiers: 1460 instructions and 18 barriers per step of two groups against
    kivi2's 982 and 4, session 22 in ``docs/performance.md``). From the scratch, the walk reads
    contiguous tiles that go through its pipelined copies with the codes: 1324 instructions and 8
    barriers per step (13 / 26 / 89 channels: 1784 -> 1517). Here ``PG`` groups per iteration (32 query
    rows): loads, a multiply and a store per element, no product, no layout change. H200, 2026-11-28,
    8 x 32k, against the walk's own gathers: 13 / 26 / 89 channels 0.1845 -> 0.1628 ms (bfloat16,
    all-true mask) and 0.1802 -> 0.1531 (float16); MixKVQ's default tiers 0.1369 -> 0.1268 (float16),
    and in bfloat16 with the mask 0.1416 -> 0.1354 once the L2 prefetch is left out for them
    (``_runtime.prefetch_steps``; two machines, cuDNN 0.2558 and 0.2559 ms on them; session 23 in
    ``docs/performance.md``)."""
    PG: tl.constexpr = max(1, 32 // BLOCK_M)
    TQ: tl.constexpr = HP + MP
    pg = tl.arange(0, PG)
    for start in range(g0, g1, PG):
        grp = start + pg
        g_ok = grp < g1
        gi = base + grp
        live = g_ok[:, None] & row_ok[None, :]
        row_at = (gi[:, None] * ROWS + rows[None, :]) * TQ  # [PG, BLOCK_M]
        if HIGH > 0:
            hi_dst = tq_ptr.to(tl.pointer_type(hi_ptr.dtype.element_ty))
            _gather_tier(
                q_ptr, q_off, sqd, order_ptr, s4_ptr, hi_dst, gi, g_ok, live, row_at,
                0, HIGH, HP, 0, HIGH, MID, False,
            )  # fmt: skip
        if MID > 0:
            mid_dst = tq_ptr.to(tl.pointer_type(tl.float16))
            _gather_tier(
                q_ptr, q_off, sqd, order_ptr, s4_ptr, mid_dst, gi, g_ok, live, row_at,
                HIGH, MID, MP, HP, HIGH, MID, True,
            )  # fmt: skip


@triton.jit
def _tier_query(
    tiers,
    tq_grp,
    gi,
    FIRST: tl.constexpr,
    COUNT: tl.constexpr,
    WIDTH: tl.constexpr,
    COL0: tl.constexpr,
    SCALED: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    ROWS: tl.constexpr,
    dtype: tl.constexpr,
):
    """The query rows at channels ``order[FIRST + c]`` of group ``gi`` (``c < WIDTH``; 0 from ``COUNT``
    on) times QSCALE, and times the 4-bit scale ``s4[FIRST - HIGH + c]`` where ``SCALED``: ``[BLOCK_M,
    WIDTH]`` in ``dtype``. Read from the tier-query scratch (``ROWS > 0``: the group's block at
    ``tq_grp``, columns ``COL0 ..``; ``_gather_tier_queries`` wrote the same numbers) or gathered from
    the query here (``ROWS == 0``, for many query rows; ``tiers`` as in ``_group_scores``)."""
    q_ptr, q_off, row_ok, sqd, order_ptr, s4_ptr, _tq_ptr, tq_rows, _hi_ptr, _lo_ptr = tiers
    c = tl.arange(0, WIDTH)
    if ROWS > 0:
        q = tl.load(tq_grp.to(tl.pointer_type(dtype)) + tq_rows[:, None] + COL0 + c[None, :])
    else:
        ok = c < COUNT
        channel = tl.load(order_ptr + gi * (HIGH + MID) + FIRST + c, mask=ok, other=0).to(tl.int32)
        q = tl.load(
            q_ptr + q_off[:, None] + channel[None, :] * sqd, mask=row_ok[:, None] & ok[None, :], other=0.0
        )
        q = q.to(tl.float32) * 0.0625  # QSCALE
        if SCALED:
            s4 = tl.load(s4_ptr + gi * MID + (FIRST - HIGH) + c, mask=ok, other=0.0)
            q = q * s4.to(tl.float32)[None, :]
        q = q.to(dtype)
    return q


@triton.jit
def _high_tier_scores(
    tiers,
    tq_grp,
    hi_ptr,
    gi,
    G: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    HP: tl.constexpr,
    ROWS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Mixed-tier stores (``StoreLayout.planar_mixed``): the scores of group ``gi`` over its 16-bit
    channels (the planar words hold 0 there), ``[BLOCK_M, G]`` float32 times QSCALE: one tensor-core
    product of the query at those channels (``_tier_query``) and their values, both in the store's
    dtype."""
    t = tl.arange(0, G)
    j = tl.arange(0, HP)
    q = _tier_query(tiers, tq_grp, gi, 0, HIGH, HP, 0, False, HIGH, MID, ROWS, hi_ptr.dtype.element_ty)
    k = tl.load(hi_ptr + (gi * HIGH + j)[:, None] * G + t[None, :], mask=(j < HIGH)[:, None], other=0.0)
    if INTERP:  # (the interpreter does no bfloat16 arithmetic)
        return tl.dot(q.to(tl.float32), k.to(tl.float32))
    return tl.dot(q, k)


@triton.jit
def _low_bits(lo_ptr, gi, j, ok, G: tl.constexpr, MID: tl.constexpr):
    """The low 2 bits of group ``gi``'s 4-bit codes at rows ``j`` (16 of them; those not ``ok`` read as 0),
    int16 ``[16, G]``. Stored as ``MID`` rows of ``G / 4`` bytes, byte b holding tokens 4b .. 4b + 3 at
    bits 0, 2, 4, 6; read as int16 words (word w: tokens 8w .. 8w + 7, token 8w + k at bits 2k).

    Why words, 16 rows at a time: read as bytes, a 16-row tile compiled wrong for an H200 (Triton 3.6:
    relative error 0.24 at MixKVQ's default tiers, 4 / 16 / 108 channels; right in the interpreter).
    Triton 3.6 gives a product's operand that comes from bytes ``kWidth = 8`` even when K is 16, the
    case triton-lang/triton#11691 (2026-09-10) fixes as "incorrect results for small-K dots with upcast
    operands"; from words it gets 4. Triton 3.9 gives the byte tile 4 as well (``bench/kwidth_audit.py``
    lists such operands in every decode kernel). A tile of 32 or more rows converted to the product's
    operand through shared memory one 16-bit element at a time (Triton 3.6, sm_90, 13 / 26 / 89
    channels: 64 ``STS`` per pair of groups in the loop, against 4 for a 16-row word tile), so
    ``_low_bits_scores`` takes 16 rows per product."""
    w8 = tl.arange(0, G // 8)
    word = tl.load(
        lo_ptr.to(tl.pointer_type(tl.int16)) + (gi * MID + j)[:, None] * (G // 8) + w8[None, :],
        mask=ok[:, None],
        other=0,
    )
    f0 = tl.join(word & 3, (word >> 8) & 3)  # tokens 8w + 0 and 8w + 4: [16, G/8, 2]
    f1 = tl.join((word >> 4) & 3, (word >> 12) & 3)  # 8w + 2, 8w + 6
    f2 = tl.join((word >> 2) & 3, (word >> 10) & 3)  # 8w + 1, 8w + 5
    f3 = tl.join((word >> 6) & 3, (word >> 14) & 3)  # 8w + 3, 8w + 7
    low = tl.join(tl.join(f0, f1), tl.join(f2, f3))  # token 8w + 4a + 2b + c at [w, a, b, c]
    return tl.reshape(low, [16, G])


@triton.jit
def _low_bits_scores(
    tiers,
    tq_grp,
    lo_ptr,
    gi,
    BLOCK_M: tl.constexpr,
    G: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    HP: tl.constexpr,
    MP: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Mixed-tier stores: the query at the group's 4-bit channels times ``s4`` (``_tier_query``) times
    the low 2 bits of their codes (the planar words hold the high 2 bits), ``[BLOCK_M, G]`` float32 in
    the units of ``_group_scores``' products (the codes enter as float16 subnormals, ``code * 2**-24``),
    so that it starts that accumulator. One product per 16 of the channels (``_low_bits``)."""
    s = tl.zeros([BLOCK_M, G], tl.float32)
    for c in tl.static_range(MP // 16):
        j = c * 16 + tl.arange(0, 16)
        q = _tier_query(
            tiers, tq_grp, gi, HIGH + c * 16, MID - c * 16, 16, HP + c * 16, True, HIGH, MID, ROWS, tl.float16
        )
        low = _low_bits(lo_ptr, gi, j, j < MID, G, MID)
        s = tl.dot(q, low.to(tl.float16, bitcast=True), s)
    return s


@triton.jit
def _prefetch_lines(ptr, first, NBYTES: tl.constexpr):
    """Ask the L2 for packed groups ``first`` and ``first + 1`` (flat index) of a
    region of ``NBYTES`` per group at ``ptr``: one ``prefetch.global.L2`` per 128-byte step from their
    first byte, and one for their last byte where they span 128 bytes or more (a span under 128 bytes
    that crosses a line gets its first line only). At head_dim 128 at most 17 lines: one instruction per
    thread of one warp."""
    SPAN: tl.constexpr = 2 * NBYTES
    LP: tl.constexpr = triton.next_power_of_2(SPAN // 128 + 1)
    i = tl.arange(0, LP)
    addr = ptr.to(tl.pointer_type(tl.int8)) + first * NBYTES + tl.minimum(i * 128, SPAN - 1)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _prefetch_pair(
    kc_ptr,
    kqp_ptr,
    vc_ptr,
    vqp_ptr,
    tiers,
    first,
    D: tl.constexpr,
    DV: tl.constexpr,
    G: tl.constexpr,
    VGS: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
):
    """Prefetch into the L2 every byte of packed groups ``first`` and ``first + 1`` (flat index) that
    ``_packed_groups`` reads: codes, scales and zero points, and for mixed tiers the channel order,
    the 16-bit values and the 4-bit tier's low bits (``tiers`` as in ``_group_scores``; the tier-query
    scratch was just written and is in the L2)."""
    _q, _qo, _ok, _sqd, _order, _s4, _tq_ptr, _tq_rows, hi_ptr, lo_ptr = tiers
    _prefetch_lines(kc_ptr, first, G * D // 4)
    _prefetch_lines(kqp_ptr, first, 4 * D)
    _prefetch_lines(vc_ptr, first, G * DV // 4)
    _prefetch_lines(vqp_ptr, first, 4 * (DV // VGS) * G)
    if HIGH > 0:
        _prefetch_lines(hi_ptr, first, HIGH * G * 2)  # float16 or bfloat16
    if MID > 0:
        _prefetch_lines(lo_ptr, first, MID * G // 4)


@triton.jit
def _walk_step(
    qs, kc_ptr, kqp_ptr, vc_ptr, vqp_ptr, base, grp, score_scale, row_ok, qpos, mask_ptr, mask_row, smk,
    tiers, m_i, l_i, a0, a1, a2, a3, a4, a5, a6, a7, za,
    N: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
    S: tl.constexpr, VGS: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL_PACKED: tl.constexpr,
    HIGH: tl.constexpr, MID: tl.constexpr, HP: tl.constexpr, MP: tl.constexpr, ROWS: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over ``N`` (1 or 2) consecutive packed groups from ``grp`` (flat
    index ``base + grp``): the running state ``(m_i, l_i, a0 .. a7, za)`` of ``_packed_groups`` updated
    with one rescale for all ``N`` groups."""
    tok = tl.arange(0, G)
    gi = base + grp
    ks_a, kz_a, vs_a, vz_a = _group_qparams(kqp_ptr, vqp_ptr, gi, D, DV, G, VGS)
    if N >= 2:
        ks_b, kz_b, vs_b, vz_b = _group_qparams(kqp_ptr, vqp_ptr, gi + 1, D, DV, G, VGS)
    # (in the order of the loop of two groups before the step was a function: the same code for two)
    s_a = _group_scores(
        qs, kc_ptr, ks_a, kz_a, gi, score_scale, tiers, BLOCK_M, D, G, HIGH, MID, HP, MP, ROWS, INTERP
    )
    if N >= 2:
        s_b = _group_scores(
            qs, kc_ptr, ks_b, kz_b, gi + 1, score_scale, tiers, BLOCK_M, D, G, HIGH, MID, HP, MP, ROWS, INTERP
        )
    s_a = _masked(s_a, S + grp * G + tok, row_ok, qpos, mask_ptr, mask_row, smk, MASK_KIND, CAUSAL_PACKED)
    m_top = tl.max(s_a, 1)
    if N >= 2:
        s_b = _masked(
            s_b, S + (grp + 1) * G + tok, row_ok, qpos, mask_ptr, mask_row, smk, MASK_KIND, CAUSAL_PACKED
        )
        m_top = tl.maximum(m_top, tl.max(s_b, 1))
    m_new = tl.maximum(m_i, m_top)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p_a = tl.exp2(s_a - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p_a, 1)
    if N >= 2:
        p_b = tl.exp2(s_b - m_safe[:, None])
        l_new += tl.sum(p_b, 1)
    b0, b1, b2, b3, b4, b5, b6, b7, zb = _group_values_from_zero(
        p_a, vc_ptr, vs_a, vz_a, gi, BLOCK_M, DV, G, VGS, INTERP
    )
    if N >= 2:
        b0, b1, b2, b3, b4, b5, b6, b7, zb = _group_values(
            p_b, vc_ptr, vs_b, vz_b, gi + 1, b0, b1, b2, b3, b4, b5, b6, b7, zb, DV, G, VGS, INTERP
        )
    a0, a1, a2, a3, a4, a5, a6, a7, za = _rescale_add(
        alpha, a0, a1, a2, a3, a4, a5, a6, a7, za, b0, b1, b2, b3, b4, b5, b6, b7, zb
    )
    return m_new, l_new, a0, a1, a2, a3, a4, a5, a6, a7, za


@triton.jit
def _packed_groups(
    qs,
    kc_ptr,
    kqp_ptr,
    vc_ptr,
    vqp_ptr,
    base,
    g0,
    g1,
    score_scale,
    row_ok,
    qpos,
    mask_ptr,
    mask_row,
    smk,
    tiers,
    BLOCK_M: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    G: tl.constexpr,
    S: tl.constexpr,
    VGS: tl.constexpr,
    MASK_KIND: tl.constexpr,
    CAUSAL_PACKED: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    HP: tl.constexpr,
    MP: tl.constexpr,
    ROWS: tl.constexpr,
    INTERP: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Online softmax over packed groups ``g0 .. g1 - 1`` (flat index ``base + grp``) of query rows
    ``qs`` (the 8 query fields, ``_load_query_field``; ``tiers`` as in ``_group_scores``): the running
    max ``m [BLOCK_M]`` and sum ``l [BLOCK_M]`` of the base-2 scores, the 8 field accumulators
    ``[DV / 8, BLOCK_M]`` and the value-zero accumulator ``[16, BLOCK_M]`` (``_group_values``)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    a1 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    a2 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    a3 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    a4 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    a5 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    a6 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    a7 = tl.zeros([DV // 8, BLOCK_M], tl.float32)
    za = tl.zeros([16, BLOCK_M], tl.float32)
    # Two packed groups per step: one online-softmax rescale of the accumulators for 64 tokens, and two
    # independent chains of tensor-core products for the scheduler to interleave. Three groups per step
    # were measured slower (H200, 2026-11-28, kivi2 8 x 32k bfloat16 with a mask: 0.0863 -> 0.0917 ms),
    # so the walk takes two. A last group the steps leave over comes after.
    last_step = base + g1 - 2
    for grp in range(g0, g1 - 1, 2):
        gi = base + grp
        if PREFETCH > 0 and not INTERP:  # the pair PREFETCH steps ahead, to the L2
            ahead = tl.maximum(tl.minimum(gi + 2 * PREFETCH, last_step), 0)
            _prefetch_pair(kc_ptr, kqp_ptr, vc_ptr, vqp_ptr, tiers, ahead, D, DV, G, VGS, HIGH, MID)
        m_i, l_i, a0, a1, a2, a3, a4, a5, a6, a7, za = _walk_step(
            qs, kc_ptr, kqp_ptr, vc_ptr, vqp_ptr, base, grp, score_scale, row_ok, qpos, mask_ptr, mask_row,
            smk, tiers, m_i, l_i, a0, a1, a2, a3, a4, a5, a6, a7, za, 2, BLOCK_M, D, DV, G, S,
            VGS, MASK_KIND, CAUSAL_PACKED, HIGH, MID, HP, MP, ROWS, INTERP,
        )  # fmt: skip
    if g1 > g0 and (g1 - g0) % 2 == 1:  # a last group alone (in the last split)
        m_i, l_i, a0, a1, a2, a3, a4, a5, a6, a7, za = _walk_step(
            qs, kc_ptr, kqp_ptr, vc_ptr, vqp_ptr, base, g1 - 1, score_scale, row_ok, qpos, mask_ptr, mask_row,
            smk, tiers, m_i, l_i, a0, a1, a2, a3, a4, a5, a6, a7, za, 1, BLOCK_M, D, DV, G, S,
            VGS, MASK_KIND, CAUSAL_PACKED, HIGH, MID, HP, MP, ROWS, INTERP,
        )  # fmt: skip
    return m_i, l_i, a0, a1, a2, a3, a4, a5, a6, a7, za


@triton.jit
def _mask_keeps_all(
    mask_ptr,
    mask_row,
    smh,
    sml,
    smk,
    row_ok,
    start,
    end,
    BLOCK_M: tl.constexpr,
    LQ: tl.constexpr,
    MASK_KIND: tl.constexpr,
):
    """True when the attention mask leaves key positions ``start .. end - 1`` as they are for every
    valid query row (a bool mask all true there, an additive mask all zero): one pass over the mask,
    one byte (bool) per token against 64 packed bytes per token and KV head (``MASK_KIND`` 1 or 2).

    Where every query row of the program reads one mask row (a mask broadcast over heads, ``smh == 0``,
    as a decode step's, for one query or ``sml == 0``), that row is read once, 1024 positions per
    iteration, and the positions are reduced once after the loop: 256 positions of every row per
    iteration and a reduction in each cost 171 instructions and a memory round trip per 256 tokens
    (Triton 3.6, sm_90), about 5% of the kernel at 64 x 32k in two splits (H200, bfloat16, kivi2:
    0.684 ms with an all-true mask against 0.653 without, session 17 in ``docs/performance.md``)."""
    if smh == 0 and (LQ == 1 or sml == 0):
        WIDE: tl.constexpr = 1024
        row = tl.max(tl.where(row_ok, mask_row, 0), 0)  # the same for every valid row
        bad_at = tl.zeros([WIDE], tl.int8)
        for c in range(start, end, WIDE):
            at = c + tl.arange(0, WIDE)
            inside = at < end
            mv = tl.load(mask_ptr + row + at.to(tl.int64) * smk, mask=inside, other=0)
            changed = (mv == 0) if MASK_KIND == 1 else (mv != 0)
            bad_at = bad_at | (changed & inside).to(tl.int8)
        keeps = tl.max(bad_at, 0) == 0
    else:
        CHUNK: tl.constexpr = 256
        bad = tl.zeros([BLOCK_M], tl.int32)
        for c in range(start, end, CHUNK):
            pos = c + tl.arange(0, CHUNK)
            ok = row_ok[:, None] & (pos < end)[None, :]
            mv = tl.load(mask_ptr + mask_row[:, None] + pos[None, :].to(tl.int64) * smk, mask=ok, other=0)
            changed = (mv == 0) if MASK_KIND == 1 else (mv != 0)
            bad += tl.sum((changed & ok).to(tl.int32), 1)
        keeps = tl.max(bad, 0) == 0
    return keeps


@triton.jit(do_not_specialize=["length", "packed", "new_len", "groups_per_split", "num_splits"])
def planar_split_kernel(
    q_ptr,
    sqb,
    sqh,
    sql,
    sqd,
    kc_ptr,
    kqp_ptr,
    vc_ptr,
    vqp_ptr,
    order_ptr,
    hi_ptr,
    lo_ptr,
    s4_ptr,
    tq_ptr,
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
    NG: tl.constexpr,
    VGS: tl.constexpr,
    MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    LENGTH_FROM_PTR: tl.constexpr,
    HIGH: tl.constexpr,
    MID: tl.constexpr,
    HP: tl.constexpr,
    MP: tl.constexpr,
    ROWS: tl.constexpr,
    INTERP: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    MASKED_WALK: tl.constexpr,
):
    """Program ``(bh, sp, qb)``: packed groups ``[sp * gps, min((sp + 1) * gps, packed))`` of KV head
    ``bh`` for query rows ``qb * BLOCK_M ..`` (row ``r``: query head ``h * N_REP + r // LQ``, query
    ``r % LQ``). Arguments as ``_attn_split_kernel``'s; ``qk_scale`` is the softmax scale times log2(e).
    Mixed tiers: ``tq_ptr`` the tier-query scratch, int16 ``[B * H * NG, ROWS, HP + MP]``
    (``_gather_tier_queries``; ``ROWS`` the query rows of all query blocks), or ``ROWS == 0`` where the
    walk gathers the query itself (``decode_attention``'s ``gather_first``)."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    qb = tl.program_id(2)
    b = bh // H
    h = bh % H
    FW: tl.constexpr = D // 8
    FWV: tl.constexpr = DV // 8
    if LENGTH_FROM_PTR:
        length = tl.load(length_ptr).to(tl.int32)
        packed = packed_groups_before(khdr_ptr, length, S, G)
        groups_per_split = tl.cdiv(packed, num_splits)
        groups_per_split += groups_per_split % 2  # whole steps of two groups
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    head = h * N_REP + rows // LQ
    qi = rows % LQ
    q_off = b.to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sql
    qpos = length + new_len - LQ + qi
    mask_row = b.to(tl.int64) * smb + head.to(tl.int64) * smh + qi.to(tl.int64) * sml
    q0 = _load_query_field(q_ptr, q_off, row_ok, sqd, 0, FW)
    q1 = _load_query_field(q_ptr, q_off, row_ok, sqd, 1, FW)
    q2 = _load_query_field(q_ptr, q_off, row_ok, sqd, 2, FW)
    q3 = _load_query_field(q_ptr, q_off, row_ok, sqd, 3, FW)
    q4 = _load_query_field(q_ptr, q_off, row_ok, sqd, 4, FW)
    q5 = _load_query_field(q_ptr, q_off, row_ok, sqd, 5, FW)
    q6 = _load_query_field(q_ptr, q_off, row_ok, sqd, 6, FW)
    q7 = _load_query_field(q_ptr, q_off, row_ok, sqd, 7, FW)
    qs = (q0, q1, q2, q3, q4, q5, q6, q7)
    tiers = (q_ptr, q_off, row_ok, sqd, order_ptr, s4_ptr, tq_ptr, rows * (HP + MP), hi_ptr, lo_ptr)
    g0 = sp * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, packed)
    base = bh.to(tl.int64) * NG
    score_scale = qk_scale * 16.0  # undoes QSCALE
    # Packed tokens sit before position ``length``, and a single query (at ``length + new_len - 1``)
    # sees them all: only a query chunk needs the causal rule here.
    CAUSAL_PACKED: tl.constexpr = IS_CAUSAL and LQ > 1
    # With a mask, ``decode_attention`` launches this kernel twice over the same programs: first
    # (``MASKED_WALK`` false) every program walks its range without reading the mask (595 instead of
    # 699 instructions per group, Triton 3.6, sm_90) and writes its partials; then (``MASKED_WALK``)
    # the programs whose range the mask does not keep whole (none in a decode step over a static cache)
    # walk it with the mask and write theirs over the first launch's. Only the second launch reads the
    # mask: the first one's scan cost 4.2 us of a 76.7 us launch (kivi2, 8 x 32k, session 20). One launch
    # with both loops spilled more in the first (MixKVQ's default tiers: 58 LDL per step against 34; in
    # session 20, kivi2's first loop took 1107 instructions per step against 1000). Without a mask the
    # first launch is the only one.
    WALK_MASK: tl.constexpr = MASK_KIND if MASKED_WALK else 0
    g1_walk = g1
    walked = row_ok  # the rows whose partials this launch writes
    if MASK_KIND > 0 and MASKED_WALK:
        keeps = _mask_keeps_all(
            mask_ptr, mask_row, smh, sml, smk, row_ok, S + g0 * G, S + g1 * G, BLOCK_M, LQ, MASK_KIND
        )
        g1_walk = tl.where(keeps, g0, g1)
        walked = tl.where(keeps, False, row_ok)  # (row_ok & ~keeps fails in the interpreter, Triton 3.9)
    if ROWS > 0:  # mixed tiers, the tier queries gathered before the walk
        _gather_tier_queries(
            q_ptr, q_off, row_ok, sqd, order_ptr, s4_ptr, tq_ptr, hi_ptr, rows, base, g0, g1_walk,
            BLOCK_M, ROWS, HIGH, MID, HP, MP,
        )  # fmt: skip
        tl.debug_barrier()  # every thread's scratch rows written before the walk's copies read them
    m_i, l_i, a0, a1, a2, a3, a4, a5, a6, a7, za = _packed_groups(
        qs,
        kc_ptr,
        kqp_ptr,
        vc_ptr,
        vqp_ptr,
        base,
        g0,
        g1_walk,
        score_scale,
        row_ok,
        qpos,
        mask_ptr,
        mask_row,
        smk,
        tiers,
        BLOCK_M,
        D,
        DV,
        G,
        S,
        VGS,
        WALK_MASK,
        CAUSAL_PACKED,
        HIGH,
        MID,
        HP,
        MP,
        ROWS,
        INTERP,
        PREFETCH,
    )
    if PDL:  # the walk is over: the combine may launch (it waits for this launch to end)
        gdc_launch_dependents()
        if MASKED_WALK:  # overlapped with the first launch: write after all of its partials
            gdc_wait()
    part = (bh.to(tl.int64) * (num_splits + 1) + sp) * M + rows
    _store_field(part_acc_ptr, part, walked, a0, za, 0, FWV, DV, VGS)
    _store_field(part_acc_ptr, part, walked, a1, za, 1, FWV, DV, VGS)
    _store_field(part_acc_ptr, part, walked, a2, za, 2, FWV, DV, VGS)
    _store_field(part_acc_ptr, part, walked, a3, za, 3, FWV, DV, VGS)
    _store_field(part_acc_ptr, part, walked, a4, za, 4, FWV, DV, VGS)
    _store_field(part_acc_ptr, part, walked, a5, za, 5, FWV, DV, VGS)
    _store_field(part_acc_ptr, part, walked, a6, za, 6, FWV, DV, VGS)
    _store_field(part_acc_ptr, part, walked, a7, za, 7, FWV, DV, VGS)
    tl.store(part_ml_ptr + part * 2, m_i, mask=walked)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=walked)
    if PDL and not MASKED_WALK:  # launched while the full-precision launch may still run: end after
        gdc_wait()  # it, so that the combine, which waits for this launch only, reads both launches' partials
