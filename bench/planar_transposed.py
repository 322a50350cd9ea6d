"""Prototype (not wired in): the planar packed-group loop with tokens as the product rows (GPU).

    python3 bench/planar_transposed.py

The production loop (``kernels/planar_attention.py``) computes scores ``[query rows, tokens]``: 4 real
query rows padded to 16 inside every tensor-core product. This prototype computes the transpose,
``[tokens, query rows]`` (tokens fill the 16 rows; the 4 query rows are padded to 8 columns), with the
same bytes and the same per-group work: key fields ``[G, D / 8] @ (q_f * s_f)^T``, probabilities
as the right operand of the value products, two groups per step, one-warp programs. It has no masks,
no partial outputs in the production layout and no correctness check: it answers one question, whether
the transposed orientation makes the loop faster, before building it for real.

Offline (Triton 3.6 SASS, sm_90): 540 instructions per group against the production loop's 586, 160
registers against 226. The probabilities' conversion to the right-operand layout (PRMT and SHFL, 48
per group) takes back most of what the smaller fp32 tiles save.

It prints the production ``decode_attention`` at 8 x 32k (kivi2, fp16; its packed loop plus the
full-precision launch and the combine, about 0.017 ms) and the prototype's loop alone over as many
random packed groups (65536), at 8, 12 and 16 programs per SM.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mixkvq_compile.kernels.planar_attention import _field, _inv_weight, _pick, _split8  # noqa: E402


@triton.jit
def _rescale8(alpha, a0, a1, a2, a3, a4, a5, a6, a7, za):
    c = alpha[None, :]
    return a0 * c, a1 * c, a2 * c, a3 * c, a4 * c, a5 * c, a6 * c, a7 * c, za * c


@triton.jit
def _scoresT(
    q0,
    q1,
    q2,
    q3,
    q4,
    q5,
    q6,
    q7,
    kc_ptr,
    kscale,
    kzero,
    gi,
    score_scale,
    BM: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
):
    FW: tl.constexpr = D // 8
    j = tl.arange(0, FW)
    t = tl.arange(0, G)
    words = tl.load(kc_ptr + (gi * G + t[:, None]) * FW + j[None, :])  # [G, FW]
    ks0, ks1, ks2, ks3, ks4, ks5, ks6, ks7 = _split8(kscale)
    kz0, kz1, kz2, kz3, kz4, kz5, kz6, kz7 = _split8(kzero)
    s = tl.zeros([G, BM], tl.float32)
    sz = tl.zeros([16, BM], tl.float32)
    for f in tl.static_range(8):
        qf = _pick(q0, q1, q2, q3, q4, q5, q6, q7, f)  # [FW, BM]
        ks = _pick(ks0, ks1, ks2, ks3, ks4, ks5, ks6, ks7, f)
        kz = _pick(kz0, kz1, kz2, kz3, kz4, kz5, kz6, kz7, f)
        s = tl.dot(
            _field(words, f, False), qf * (ks.to(tl.float32) * _inv_weight(f)).to(tl.float16)[:, None], s
        )
        sz = tl.dot(tl.broadcast_to(kz[None, :], (16, FW)), qf, sz)
    return s * (16777216.0 * score_scale) + (tl.max(sz, 0) * score_scale)[None, :]


@triton.jit
def _valuesT(
    p,
    vc_ptr,
    vscale,
    vzr,
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
):
    FW: tl.constexpr = DV // 8
    FPG: tl.constexpr = VGS // FW
    j = tl.arange(0, FW)
    t = tl.arange(0, G)
    words = tl.load(vc_ptr + (gi * FW + j[:, None]) * G + t[None, :])  # [FW, G]
    vs0, vs1, vs2, vs3, vs4, vs5, vs6, vs7 = _split8(vscale)
    p16 = p.to(tl.float16)  # [G, BM]
    za = tl.dot(vzr, p16, za)  # [16, G] @ [G, BM]
    pf = p16
    for f in tl.static_range(8):
        if f % FPG == 0:
            vs = _pick(vs0, vs1, vs2, vs3, vs4, vs5, vs6, vs7, f)
            pf = p16 * vs[:, None].to(tl.float16)
        d = tl.dot(_field(words, f, False), pf)
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
def _qp(kqp_ptr, vqp_ptr, gi, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, VGS: tl.constexpr):
    FW: tl.constexpr = D // 8
    FWV: tl.constexpr = DV // 8
    NVG: tl.constexpr = DV // VGS
    fi = tl.arange(0, 8)
    jk = tl.arange(0, FW)
    tok = tl.arange(0, G)
    vrow = tl.arange(0, 16)
    kq = kqp_ptr + gi * (2 * D)
    kscale = tl.load(kq + fi[None, :] * FW + jk[:, None])
    kzero = tl.load(kq + D + fi[None, :] * FW + jk[:, None])
    vq = vqp_ptr + gi * (2 * NVG * G)
    vscale = tl.load(vq + ((fi * FWV) // VGS)[None, :] * G + tok[:, None])
    vzr = tl.load(
        vq + NVG * G + vrow[:, None] * G + tok[None, :], mask=(vrow < NVG)[:, None], other=0.0
    )  # [16, G]
    return kscale, kzero, vscale, vzr


@triton.jit
def trk(
    q_ptr,
    kc_ptr,
    kqp_ptr,
    vc_ptr,
    vqp_ptr,
    out_ptr,
    ml_ptr,
    n_groups,
    score_scale,
    BM: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    VGS: tl.constexpr,
    NG: tl.constexpr,
):
    bh = tl.program_id(0)
    FW: tl.constexpr = D // 8
    r = tl.arange(0, BM)
    j = tl.arange(0, FW)
    qb = q_ptr + (bh * BM + r[None, :]) * D + j[:, None]
    q0 = (tl.load(qb + 0 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    q1 = (tl.load(qb + 1 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    q2 = (tl.load(qb + 2 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    q3 = (tl.load(qb + 3 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    q4 = (tl.load(qb + 4 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    q5 = (tl.load(qb + 5 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    q6 = (tl.load(qb + 6 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    q7 = (tl.load(qb + 7 * FW).to(tl.float32) * 0.0625).to(tl.float16)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    a0 = tl.zeros([FW, BM], tl.float32)
    a1 = tl.zeros([FW, BM], tl.float32)
    a2 = tl.zeros([FW, BM], tl.float32)
    a3 = tl.zeros([FW, BM], tl.float32)
    a4 = tl.zeros([FW, BM], tl.float32)
    a5 = tl.zeros([FW, BM], tl.float32)
    a6 = tl.zeros([FW, BM], tl.float32)
    a7 = tl.zeros([FW, BM], tl.float32)
    za = tl.zeros([16, BM], tl.float32)
    base = bh.to(tl.int64) * NG
    for grp in range(0, n_groups - 1, 2):
        gi = base + grp
        ks_a, kz_a, vs_a, vz_a = _qp(kqp_ptr, vqp_ptr, gi, D, D, G, VGS)
        ks_b, kz_b, vs_b, vz_b = _qp(kqp_ptr, vqp_ptr, gi + 1, D, D, G, VGS)
        s_a = _scoresT(q0, q1, q2, q3, q4, q5, q6, q7, kc_ptr, ks_a, kz_a, gi, score_scale, BM, D, G)
        s_b = _scoresT(q0, q1, q2, q3, q4, q5, q6, q7, kc_ptr, ks_b, kz_b, gi + 1, score_scale, BM, D, G)
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s_a, 0), tl.max(s_b, 0)))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_a = tl.exp2(s_a - m_safe[None, :])
        p_b = tl.exp2(s_b - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(p_a, 0) + tl.sum(p_b, 0)
        m_i = m_new
        a0, a1, a2, a3, a4, a5, a6, a7, za = _rescale8(alpha, a0, a1, a2, a3, a4, a5, a6, a7, za)
        a0, a1, a2, a3, a4, a5, a6, a7, za = _valuesT(
            p_a, vc_ptr, vs_a, vz_a, gi, a0, a1, a2, a3, a4, a5, a6, a7, za, D, G, VGS
        )
        a0, a1, a2, a3, a4, a5, a6, a7, za = _valuesT(
            p_b, vc_ptr, vs_b, vz_b, gi + 1, a0, a1, a2, a3, a4, a5, a6, a7, za, D, G, VGS
        )
    o = out_ptr + (bh * BM + r[None, :]) * D + j[:, None]
    tl.store(o + 0 * FW, a0 + tl.sum(za, 0)[None, :])
    tl.store(o + 1 * FW, a1)
    tl.store(o + 2 * FW, a2)
    tl.store(o + 3 * FW, a3)
    tl.store(o + 4 * FW, a4)
    tl.store(o + 5 * FW, a5)
    tl.store(o + 6 * FW, a6)
    tl.store(o + 7 * FW, a7)
    tl.store(ml_ptr + bh * BM + r, m_i)
    tl.store(ml_ptr + bh * BM + r + 64, l_i)


import kernels as kb  # noqa: E402

from mixkvq_compile.kernels.decode_attention import decode_attention  # noqa: E402


def main():
    torch.manual_seed(0)
    BM, D, G, VGS = 4, 128, 32, 32
    st = kb.random_store(kb.CONFIGS["kivi2"], 8, 32768)
    q = torch.randn(8, 32, 1, 128, dtype=torch.float16, device="cuda")
    p = st.layout.flushed_groups(32768)
    for s in (None, 24, 32):
        t = [
            kb.bench_graph(lambda s=s: decode_attention(q, st, 32768, packed=p, num_splits=s))
            for _ in range(2)
        ]
        print("production decode_attention 8x32k splits", s, " ".join(f"{x:.4f}" for x in t), flush=True)
    # the transposed loop alone on the same amount of random packed data (65536 groups)
    total = 65536
    kc = torch.randint(-32768, 32767, (total * G * D // 8,), dtype=torch.int16, device="cuda")
    vc = torch.randint(-32768, 32767, (total * G * D // 8,), dtype=torch.int16, device="cuda")
    kqp = (torch.rand(total * 2 * D, device="cuda") * 0.05).half()
    vqp = (torch.rand(total * 2 * 4 * G, device="cuda") * 0.05).half()
    for programs in (1024, 1536, 2048):
        ng = total // programs
        qq = torch.randn(programs * BM * D, device="cuda").half()
        out = torch.empty(programs * BM * D, device="cuda")
        ml = torch.empty(programs * BM + 64 + 8, device="cuda")

        def fn(programs=programs, qq=qq, out=out, ml=ml, ng=ng):
            return trk[(programs,)](
                qq,
                kc,
                kqp,
                vc,
                vqp,
                out,
                ml,
                ng,
                0.1,
                BM=BM,
                D=D,
                G=G,
                VGS=VGS,
                NG=ng,
                num_warps=1,
                num_stages=3,
            )

        fn()
        t = [kb.bench_graph(fn) for _ in range(2)]
        print(
            "transposed loop only, programs",
            programs,
            "groups each",
            ng,
            " ".join(f"{x:.4f}" for x in t),
            flush=True,
        )


if __name__ == "__main__":
    main()
