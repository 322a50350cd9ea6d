"""Decode-attention and quantization kernels vs PyTorch SDPA on one GPU.

    python3 bench/kernels.py            # all shapes; writes $OUT/kernels.json when $OUT is set
    python3 bench/kernels.py 8x32768,1x131072   # only these batch x context shapes
    MIXKVQ_BENCH_DTYPE=bfloat16 python3 bench/kernels.py 8x32768   # bfloat16 queries and stores

For each batch x context and each quantization setting: the fused Triton decode kernel, cuDNN SDPA fp16,
flash SDPA fp16 (both on full-precision K/V of the same size, no K/V copied for GQA: the faster of
``enable_gqa=True`` and the query heads of a KV head folded into query rows) and dequantize-then-SDPA
(``store.read`` + SDPA). The fused kernel also runs with two attention masks (column "masks"): the
one transformers passes to a decode step over a static cache (keep the positions up to the query) and
one that also drops a token in every 1024 (so that no program can skip reading it). Also a one-token
append (with and without a group flush), alone in a CUDA graph and as its share of a graph that also
holds the attention (how a compiled decode step runs it), and the bulk quantization of a 32k-token
prompt.

Stores are filled by quantizing random keys and values (``KVStore.append``, see ``random_store``).
Times are medians of ``triton.testing.do_bench`` (L2 flushed before every run).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402

from mixkvq_compile.config import PRESETS, MixKVQConfig  # noqa: E402
from mixkvq_compile.kernels import quantize as qkern  # noqa: E402
from mixkvq_compile.kernels._runtime import overlap_launches  # noqa: E402
from mixkvq_compile.kernels.decode_attention import decode_attention, split_count  # noqa: E402
from mixkvq_compile.store import KVStore, StoreLayout, allocate  # noqa: E402

SHAPES = [(1, 32768), (1, 131072), (8, 8192), (8, 32768), (32, 8192)]
HQ, HKV, D = 32, 8, 128
DTYPE = getattr(torch, os.environ.get("MIXKVQ_BENCH_DTYPE", "float16"))
CONFIGS = {
    "kivi2": PRESETS["kivi2"],
    "mixkvq": MixKVQConfig(key_tier_fractions=(0.1, 0.2), key_bits=(16, 4, 2), value_bits=2),
}


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """``fn`` run once on a side stream (compiles and warms up), then captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_graph(fn, rep=200):
    """Median ms of ``fn`` replayed from a CUDA graph (no Python launch overhead); eager if capture fails."""
    try:
        return bench(capture_graph(fn).replay, rep)
    except Exception as error:  # noqa: BLE001
        print(f"graph capture failed ({type(error).__name__}: {str(error).splitlines()[0][:80]}); eager")
        return bench(fn, rep)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3)


def random_store(config, batch: int, ctx: int, dtype: torch.dtype = DTYPE) -> KVStore:
    """A store of ``ctx`` tokens of ``dtype``: random keys and values quantized by ``KVStore.append``.

    Quantized values, not random bytes: the value zero point of a quantized token sits near its
    smallest value, so the kernel's field sums and zero-point sum nearly cancel under wide attention,
    which is what exposes rounding in the walk's running sums (random scales and zero points hide it:
    session 12 in ``docs/performance.md``). Mixed key tiers need it anyway: their planar layout holds
    parts of one 4-bit code in two places, so random bytes would not be a store that ``read`` and the
    kernel agree on."""
    lay = StoreLayout.create(config, batch, HKV, ctx + 64, D, D, dtype)
    store = KVStore.open(lay, *allocate(lay, "cuda"))
    if lay.salience:
        store.keys["query_abs_sum"].uniform_(0, 1)
        store.keys["query_count"].fill_(1.0)
    for start in range(0, ctx, 8192):  # 8192 tokens at a time: the input stays small
        n = min(8192, ctx - start)
        k = torch.randn(batch, HKV, n, D, dtype=dtype, device="cuda")
        store.append(k, torch.randn_like(k), start)
    return store


def decode_splits(batch: int, packed: int, per_sm: int = 8) -> int:
    """The split count ``decode_attention`` picks for a one-token query with ``per_sm`` programs resident
    per SM (its default for planar stores: 8)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return split_count(batch * HKV, per_sm * sms, triton.cdiv(packed, 4))


def bytes_read(store: KVStore, length: int) -> int:
    """Bytes the fused kernel must read: packed groups in use, live full-precision tokens, query."""
    lay = store.layout
    groups = lay.flushed_groups(length)
    total = 0
    for side in (store.keys, store.values):
        for name, t in side.items():
            if name in ("header", "sink", "ring", "query_abs_sum", "query_count"):
                continue
            total += t.numel() * t.element_size() * groups // max(lay.num_groups, 1)
    fp_tokens = min(length, lay.sink_tokens) + max(0, length - lay.sink_tokens - groups * lay.group_size)
    total += fp_tokens * lay.batch * lay.heads * (lay.head_dim + lay.value_dim) * lay.dtype.itemsize
    total += lay.batch * HQ * (D + lay.value_dim) * 2  # query in, output out
    return total


def main() -> None:
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(
        f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; {DTYPE}; "
        f"date {time.strftime('%Y-%m-%d')}"
    )
    print(f"copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")
    print("stores: random keys and values quantized by KVStore.append")
    results, table = [], []
    shapes = SHAPES
    if len(sys.argv) > 1:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in sys.argv[1].split(",")]
    for batch, ctx in shapes:
        q = torch.randn(batch, HQ, 1, D, dtype=DTYPE, device="cuda")
        q_rows = q.view(batch, HKV, HQ // HKV, D)  # the query heads of a KV head as query rows
        fp_bytes = batch * HKV * ctx * D * 2 * 2
        try:
            k = torch.randn(batch, HKV, ctx, D, dtype=DTYPE, device="cuda")
            v = torch.randn(batch, HKV, ctx, D, dtype=DTYPE, device="cuda")
        except torch.OutOfMemoryError:
            print(f"{batch}x{ctx}: skipped (fp16 K/V do not fit)")
            continue
        base = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            # Two ways to run GQA without copies: the query heads of a KV head folded into query rows,
            # or enable_gqa=True. Either can be faster (cuDNN at 8 x 32k on an H200: 0.25 ms with
            # enable_gqa against 0.38 ms folded), so the baseline is the faster of the two.
            modes = {}
            for mode in ("fold", "gqa"):
                try:

                    def sdpa(backend=backend, mode=mode):
                        with sdpa_kernel(backend):
                            if mode == "fold":
                                return F.scaled_dot_product_attention(q_rows, k, v)  # noqa: B023
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: B023

                    sdpa()
                    modes[mode] = bench_graph(sdpa)
                except RuntimeError as error:
                    print(f"{batch}x{ctx} {name} {mode}: unavailable ({str(error).splitlines()[0][:80]})")
                    modes[mode] = float("nan")
            base[name] = min((t for t in modes.values() if not math.isnan(t)), default=float("nan"))
            base[f"{name}_modes"] = modes
        del k, v
        torch.cuda.empty_cache()
        ref_ms = base["cudnn"] if not math.isnan(base["cudnn"]) else base["flash"]
        for cname, config in CONFIGS.items():
            try:
                store = random_store(config, batch, ctx)
            except torch.OutOfMemoryError:
                print(f"{batch}x{ctx} {cname}: skipped (store does not fit)")
                continue
            packed = store.layout.flushed_groups(ctx)  # passed, so that no call reads the header (a sync)
            out = decode_attention(q, store, ctx, packed=packed)
            ours_eager = bench(lambda: decode_attention(q, store, ctx, packed=packed))  # noqa: B023
            ours = bench_graph(lambda: decode_attention(q, store, ctx, packed=packed))  # noqa: B023
            ours_gather = bench_graph(lambda: decode_attention(q, store, ctx, gather=True, packed=packed))  # noqa: B023
            # With the attention mask a transformers decode step passes over a static cache (keep the
            # positions up to the query), and with one that also drops a token in every 1024 (every
            # program of the packed loop then reads the mask).
            positions = torch.arange(store.layout.capacity, device="cuda")
            step_mask = (positions <= ctx).expand(batch, 1, 1, -1)
            sparse_mask = step_mask & (positions % 1024 != 7)
            ours_masks = {
                name: bench_graph(lambda m=m: decode_attention(q, store, ctx, m, packed=packed))  # noqa: B023
                for name, m in (("step", step_mask.contiguous()), ("sparse", sparse_mask.contiguous()))
            }
            nbytes = bytes_read(store, ctx)
            try:
                kd, vd = store.read(ctx)
                kd, vd = kd.contiguous(), vd.contiguous()
                ref = F.scaled_dot_product_attention(q_rows, kd, vd).view_as(out)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                del kd, vd
                deq = bench(lambda: F.scaled_dot_product_attention(q_rows, *store.read(ctx)), rep=50)  # noqa: B023
            except torch.OutOfMemoryError:
                err, deq = float("nan"), float("nan")
                print(f"{batch}x{ctx} {cname}: dequantize-then-SDPA skipped (out of memory)")
            torch.cuda.empty_cache()
            # Tuning sweep (same run): warps and splits.
            sweep = {}
            if (batch, ctx) in ((8, 32768), (1, 131072)):
                # Planar stores: one-warp programs, splits around 8 per SM; default layout: warps, gather.
                planar = store.layout.planar_words
                for warps in (1, 2) if planar else (2, 4):
                    for stages in (2, 3, 4) if planar else (2, 3):
                        for third in (0.5, 1.0, 2.0) if planar else (False, True):
                            kw = dict(num_warps=warps, num_stages=stages)
                            if planar:
                                default = decode_splits(batch, packed)
                                kw["num_splits"] = max(1, int(default * third))
                                key = f"w{warps}_st{stages}_splits{kw['num_splits']}"
                            else:
                                kw["gather"] = third
                                key = f"w{warps}_st{stages}_g{int(third)}"

                            def variant(kw=kw, q=q, store=store, ctx=ctx, packed=packed):
                                return decode_attention(q, store, ctx, packed=packed, **kw)

                            sweep[key] = bench_graph(variant)
            # One-token append: no flush, and a step that flushes a group.
            lay = store.layout
            tk = torch.randn(batch, HKV, 1, D, dtype=DTYPE, device="cuda")
            tv = torch.randn(batch, HKV, 1, D, dtype=DTYPE, device="cuda")
            flush_at = next(
                p for p in range(ctx, ctx + 64) if lay.flushed_groups(p + 1) > lay.flushed_groups(p)
            )
            before_flush = lay.flushed_groups(flush_at)
            app = bench_graph(lambda: qkern.append(store, tk, tv, ctx, length=ctx, packed=packed))  # noqa: B023
            app_flush = bench_graph(
                lambda: qkern.append(store, tk, tv, flush_at, length=flush_at, packed=before_flush)  # noqa: B023
            )
            app_flush_eager = bench(
                lambda: qkern.append(store, tk, tv, flush_at, length=flush_at, packed=before_flush)  # noqa: B023
            )
            # The decode step's device-side append (position in a tensor, predicated flush). A flush
            # advances the headers' packed-group count, so each replay first restores the headers as
            # they were before the flushing step (two 64-byte copies, timed alone and subtracted).
            pos = torch.tensor([ctx], device="cuda")
            app_token = bench_graph(lambda: qkern.append_token(store, tk, tv, pos))  # noqa: B023
            pos_flush = torch.tensor([flush_at], device="cuda")
            store.set_length(flush_at)
            saved = [store.keys["header"].clone(), store.values["header"].clone()]

            def restore_headers(store=store, saved=saved):
                store.keys["header"].copy_(saved[0])
                store.values["header"].copy_(saved[1])

            def token_flush(store=store, tk=tk, tv=tv, pos=pos_flush):
                restore_headers()
                qkern.append_token(store, tk, tv, pos)

            app_token_flush = bench_graph(token_flush) - bench_graph(restore_headers)

            # The append's share of a decode step, as a compiled model runs it: attention and
            # append_token in one CUDA graph, minus the attention alone in the same way. A graph of the
            # append alone (above) also times the graph's launch, which a real step pays once for all
            # of its kernels. The attention reads ``ctx`` tokens and ``packed`` groups whatever the
            # headers say, so the append changes nothing it reads.
            def attend(store=store, q=q, ctx=ctx, packed=packed):
                return decode_attention(q, store, ctx, packed=packed)

            # As ops.decode_step: the append overlaps the attention's end where the attention overlaps.
            overlap = overlap_launches(lay, q.device)

            def attend_append(store=store, tk=tk, tv=tv, pos=pos, overlap=overlap):
                attend()
                qkern.append_token(store, tk, tv, pos, overlap=overlap)

            def attend_restore():
                attend()
                restore_headers()

            def attend_append_flush(store=store, tk=tk, tv=tv, pos=pos_flush, overlap=overlap):
                attend()
                restore_headers()
                qkern.append_token(store, tk, tv, pos, overlap=overlap)

            in_step = bench_graph(attend_append) - bench_graph(attend)
            in_step_flush = bench_graph(attend_append_flush) - bench_graph(attend_restore)
            in_step_amortized = ((lay.group_size - 1) * in_step + in_step_flush) / lay.group_size

            def torch_append(p=flush_at, store=store, tk=tk, tv=tv):
                store.set_length(p)
                store.append(tk, tv, p)

            app_torch = bench(torch_append, rep=50)
            store.set_length(ctx)
            amortized = ((lay.group_size - 1) * app + app_flush) / lay.group_size
            row = dict(
                shape=f"{batch}x{ctx // 1024}k",
                config=cname,
                fused_ms=ours,
                fused_gather_ms=ours_gather,
                fused_eager_ms=ours_eager,
                fused_step_mask_ms=ours_masks["step"],
                fused_sparse_mask_ms=ours_masks["sparse"],
                cudnn_ms=base["cudnn"],
                flash_ms=base["flash"],
                cudnn_modes_ms=base["cudnn_modes"],
                flash_modes_ms=base["flash_modes"],
                dequant_sdpa_ms=deq,
                speedup_vs_cudnn=ref_ms / ours,
                bytes_read=nbytes,
                fp16_bytes=fp_bytes,
                gbps=nbytes / (ours * 1e-3) / 1e9,
                floor_ms=nbytes / bw * 1e3,
                cudnn_floor_ms=fp_bytes / bw * 1e3,
                rel_err_vs_dequant_sdpa=err,
                append_ms=app,
                append_flush_ms=app_flush,
                append_flush_eager_ms=app_flush_eager,
                append_token_ms=app_token,
                append_token_flush_ms=app_token_flush,
                append_torch_flush_ms=app_torch,
                append_amortized_pct=100 * amortized / ours,
                append_in_step_ms=in_step,
                append_flush_in_step_ms=in_step_flush,
                append_in_step_amortized_pct=100 * in_step_amortized / ours,
                sweep=sweep,
            )
            results.append(row)
            print(json.dumps(row))
            table.append(row)
            del store
            torch.cuda.empty_cache()
    # Bulk quantization of a 32k prompt (batch 1, 8 KV heads).
    prompt = {}
    for cname, config in CONFIGS.items():
        lay = StoreLayout.create(config, 1, HKV, 32768 + 64, D, D, DTYPE)
        store = KVStore.open(lay, *allocate(lay, "cuda"))
        if lay.salience:
            store.keys["query_abs_sum"].uniform_(0, 1)
            store.keys["query_count"].fill_(1.0)
        k = torch.randn(1, HKV, 32768, D, dtype=DTYPE, device="cuda")
        v = torch.randn(1, HKV, 32768, D, dtype=DTYPE, device="cuda")
        tri = bench(lambda: qkern.append(store, k, v, 0, length=0), rep=100)  # noqa: B023
        t0 = time.perf_counter()
        store.reset()
        store.append(k, v, 0)
        torch.cuda.synchronize()
        ref_store = time.perf_counter() - t0

        def torch_prompt(store=store, k=k, v=v):
            store.set_length(0)
            store.append(k, v, 0)

        pt = bench(torch_prompt, rep=100)
        prompt[cname] = dict(triton_ms=tri, torch_ms=pt, torch_first_call_s=ref_store)
        print(f"bulk 32k prompt {cname}: triton {tri:.3f} ms, torch {pt:.3f} ms")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump(dict(device=dev, dtype=str(DTYPE), bw=bw, rows=results, prompt=prompt), f, indent=1)
    print(
        f"\n{dev}, {time.strftime('%Y-%m-%d')}, {DTYPE}, Hq={HQ}, Hkv={HKV}, D={D}; "
        f"copy bw {bw / 1e9:.0f} GB/s"
    )
    hdr = (
        "shape",
        "config",
        "fused",
        "gather",
        "masks",
        "cudnn",
        "flash",
        "deq+sdpa",
        "x cudnn",
        "GB/s",
        "floor",
        "cudnn floor",
        "app/flush",
        "app%",
        "err",
    )
    print(
        "{:>8} {:>7} {:>7} {:>6} {:>13} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>11} {:>11} {:>5} {:>7}".format(
            *hdr
        )
    )
    for r in table:
        print(
            f"{r['shape']:>8} {r['config']:>7} {r['fused_ms']:7.3f} {r['fused_gather_ms']:6.3f} "
            f"{r['fused_step_mask_ms']:6.3f}/{r['fused_sparse_mask_ms']:6.3f} "
            f"{r['cudnn_ms']:7.3f} "
            f"{r['flash_ms']:7.3f} "
            f"{r['dequant_sdpa_ms']:8.3f} {r['speedup_vs_cudnn']:7.2f} {r['gbps']:6.0f} {r['floor_ms']:6.3f} "
            f"{r['cudnn_floor_ms']:11.3f} {r['append_ms']:5.3f}/{r['append_flush_ms']:5.3f} "
            f"{r['append_amortized_pct']:5.1f} {r['rel_err_vs_dequant_sdpa']:7.1e}"
        )
    for r in table:
        if r["sweep"]:
            print(r["shape"], r["config"], {k: round(v, 4) for k, v in r["sweep"].items()})
    for cname, p in prompt.items():
        print(f"bulk 32k prompt {cname}: triton {p['triton_ms']:.3f} ms, torch {p['torch_ms']:.3f} ms")
    for r in table:
        print(
            f"append_token {r['shape']} {r['config']}: {r['append_token_ms'] * 1e3:.1f} us, with flush "
            f"{r['append_token_flush_ms'] * 1e3:.1f} us; in a graph with the attention "
            f"{r['append_in_step_ms'] * 1e3:.1f} us, with flush {r['append_flush_in_step_ms'] * 1e3:.1f} us, "
            f"amortized {r['append_in_step_amortized_pct']:.1f}% of the attention"
        )
    compiler_report()


def compiler_report() -> None:
    """Registers, spills and shared memory of every compiled decode/quantize kernel variant."""
    from mixkvq_compile.kernels import decode_attention as da
    from mixkvq_compile.kernels import planar_attention as pa
    from mixkvq_compile.kernels import quantize as qz

    for fn in (da._attn_split_kernel, pa.planar_split_kernel, da._combine_kernel, qz._store_groups_kernel):
        try:
            for cache in fn.device_caches.values():
                for kernel in cache[0].values():
                    meta = kernel.metadata
                    print(
                        f"{fn.__name__}: regs {kernel.n_regs} spills {kernel.n_spills} "
                        f"shared {meta.shared} warps {meta.num_warps}"
                    )
        except Exception as error:  # noqa: BLE001
            print(f"{fn.__name__}: no compiler report ({type(error).__name__})")
    out_dir = os.environ.get("OUT")
    if out_dir:  # assembly of the decode kernel variants, for reading off the device
        try:
            for cache in pa.planar_split_kernel.device_caches.values():
                for n, kernel in enumerate(
                    list(cache[0].values())[:2]
                ):  # few files: $OUT returns a limited count
                    for kind in ("ptx", "sass"):
                        if kind in kernel.asm:
                            with open(os.path.join(out_dir, f"planar_{n}.{kind}"), "w") as f:
                                f.write(str(kernel.asm[kind]))
        except Exception as error:  # noqa: BLE001
            print(f"no assembly dump ({type(error).__name__}: {error})")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    main()
