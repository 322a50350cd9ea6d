"""Sliding-window layers: a store that keeps (and quantizes) only the last W tokens.

- The store against a full store fed the same tokens: the window it returns is bit-identical.
- Its bytes depend on the window, not on the sequence length, and are below the dense window's.
- Tiny Mistral (every layer a 48-token window) end to end: prompts shorter and longer than the window,
  decode that rolls the window, chunked prefill through both concatenated graphs; passthrough equals
  eager, mixkvq stays within a KL bound and really quantizes.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixkvq_compile
from mixkvq_compile import PRESETS
from mixkvq_compile.passes import manager
from mixkvq_compile.store import KVStore, StoreLayout, allocate
from tests import families
from tests.models import left_padded_batch, mean_kl, teacher_forced_logits

SMALL_RING = {"residual_length": 16, "group_size": 16}
KL_BOUND = 2e-2  # measured 2e-4 on these runs; a wrong window or mask gives > 0.1


def make_store(config, capacity, sliding, head_dim, dtype):
    layout = StoreLayout.create(config, 2, 2, capacity, head_dim, head_dim, dtype, sliding=sliding)
    return KVStore.open(layout, *allocate(layout, "cpu"))


@settings(deadline=None, max_examples=20)
@given(
    chunks=st.lists(st.integers(1, 90), min_size=1, max_size=8),
    window=st.sampled_from([33, 48, 64, 100]),
    preset=st.sampled_from(["mixkvq", "kivi2"]),
    seed=st.integers(0, 2**31),
)
def test_window_matches_a_full_store(chunks, window, preset, seed):
    """After every append, ``read_window`` returns every position the next write's queries can see,
    each token bit-identical to what a full store fed the same tokens holds at that position."""
    config = dataclasses.replace(PRESETS[preset], **SMALL_RING)
    head_dim, dtype = (32, torch.float32) if preset == "mixkvq" else (128, torch.float16)  # planar
    total = sum(chunks)
    sliding = make_store(config, window, True, head_dim, dtype)
    full = make_store(config, total, False, head_dim, dtype)
    assert sliding.layout.planar == (preset == "kivi2")
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, total, head_dim, generator=generator).to(dtype)
    values = torch.randn(2, 2, total, head_dim, generator=generator).to(dtype)
    start = 0
    for size in chunks:
        for store in (sliding, full):
            store.append(keys[:, :, start : start + size], values[:, :, start : start + size], start)
        start += size
        got_k, got_v, positions = sliding.read_window(start, sliding.packed_groups)
        want_k, want_v = full.read(start)
        assert set(range(max(0, start - window + 1), start)) <= set(positions.tolist())
        assert len(set(positions.tolist())) == positions.numel()
        assert torch.equal(got_k, want_k[:, :, positions]) and torch.equal(got_v, want_v[:, :, positions])
        assert sliding.packed_groups == full.packed_groups


def test_a_sliding_store_holds_its_window_only():
    """Bytes of a 4096-token window in a 32k-token run, fp16, 8 KV heads, head_dim 128."""
    dense = 8 * 4096 * 2 * 128 * 2  # one batch row, keys and values
    for preset in ("kivi2", "mixkvq"):
        sliding = StoreLayout.create(PRESETS[preset], 1, 8, 4096, 128, 128, torch.float16, sliding=True)
        held = sliding.blob_bytes(sliding.key_regions()) + sliding.blob_bytes(sliding.value_regions())
        assert held < 0.3 * dense, (preset, held / dense)
        assert sliding.num_groups == -(-(4095 - 128) // 32)  # the groups of the window past the ring
        # A full store of the 32k-token run: 8x the window, less the full-precision ring both have.
        full = StoreLayout.create(PRESETS[preset], 1, 8, 32768, 128, 128, torch.float16)
        assert full.blob_bytes(full.key_regions()) > 6 * sliding.blob_bytes(sliding.key_regions())


def test_sliding_store_refuses_a_rewind():
    store = make_store(dataclasses.replace(PRESETS["kivi2"], **SMALL_RING), 48, True, 32, torch.float32)
    tokens = torch.randn(2, 2, 40, 32)
    store.append(tokens, tokens, 0)
    with pytest.raises(ValueError, match="only appends"):
        store.append(tokens[:, :, :1], tokens[:, :, :1], 39)


def _generate(model, ids, mask, new):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1), out.past_key_values


def _compiled_generate(model, ids, mask, new, options):
    """``_generate`` through ``torch.compile(backend="mixkvq", options=options)``, from a clean Dynamo
    and fresh counters; the model's eager forward is restored afterwards."""
    eager = model.forward
    torch._dynamo.reset()
    mixkvq_compile.reset_counters()
    model.forward = torch.compile(eager, backend="mixkvq", options=options)
    try:
        return _generate(model, ids, mask, new)
    finally:
        model.forward = eager


@pytest.mark.parametrize("prompt", [40, 60], ids=["prompt-in-window", "prompt-longer-than-window"])
def test_mistral_generate(prompt):
    """40 tokens: written with index_copy_, then rolled; 60 tokens: the fresh graph, then rolled."""
    model = families.mistral()
    eager = model.forward
    ids, mask = left_padded_batch(families.VOCAB, 2, prompt, pads=[5, 0])
    eager_tokens, _, _ = _generate(model, ids, mask, 24)
    for options in ({"preset": "passthrough", **SMALL_RING}, {"preset": "mixkvq", **SMALL_RING}):
        tokens, logits, cache = _compiled_generate(model, ids, mask, 24, options)
        assert manager.site_reports and all(r.rewritten for r in manager.site_reports)
        if options["preset"] == "passthrough":
            assert torch.equal(tokens, eager_tokens)
            continue
        reference = teacher_forced_logits(eager, tokens, mask, prompt)
        assert mean_kl(reference, logits) < KL_BOUND
        assert not torch.allclose(logits, reference, atol=1e-6)
        report = mixkvq_compile.memory_report(cache)
        assert report.layers[0].quantized and report.held_bytes < report.dense_capacity_bytes
        assert report.fp16_token_bytes == report.fp16_capacity_bytes  # the window, not all tokens


@pytest.mark.parametrize("chunk", [16, 20], ids=["full-then-concatenated", "becoming-full"])
def test_mistral_chunked_prefill(chunk):
    """A 60-token prompt in chunks: 16 -> three index_copy_ chunks, then one over a full window;
    20 -> two index_copy_ chunks, then one that fills the window. Logits of every chunk against the
    eager forward over the whole prompt."""
    from transformers import StaticCache

    model = families.mistral()
    ids = torch.randint(3, families.VOCAB, (2, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    for preset in ("passthrough", "mixkvq"):
        torch._dynamo.reset()
        mixkvq_compile.reset_counters()
        forward = torch.compile(model.forward, backend="mixkvq", options={"preset": preset, **SMALL_RING})
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1])
        logits = []
        with torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                end = min(start + chunk, ids.shape[1])
                out = forward(
                    input_ids=ids[:, start:end],
                    past_key_values=cache,
                    cache_position=torch.arange(start, end),
                    use_cache=True,
                )
                logits.append(out.logits)
        logits = torch.cat(logits, dim=1)
        assert manager.site_reports and all(r.rewritten for r in manager.site_reports)
        if preset == "passthrough":
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
        else:
            assert mean_kl(reference[:, 48:], logits[:, 48:]) < KL_BOUND
            assert not torch.allclose(logits[:, 48:], reference[:, 48:], atol=1e-6)


def test_second_generate_starts_clean():
    """A second generate() on the same compiled model gives the tokens of a fresh compiled run."""
    model = families.mistral()
    eager = model.forward
    first = left_padded_batch(families.VOCAB, 2, 60, pads=[0, 3], seed=2)
    second = left_padded_batch(families.VOCAB, 2, 30, pads=[4, 0], seed=3)
    options = {"preset": "mixkvq", **SMALL_RING}
    torch._dynamo.reset()
    model.forward = torch.compile(eager, backend="mixkvq", options=options)
    try:
        expected, _, _ = _generate(model, *second, 30)
        torch._dynamo.reset()
        model.forward = torch.compile(eager, backend="mixkvq", options=options)
        _generate(model, *first, 30)
        tokens, _, _ = _generate(model, *second, 30)
    finally:
        model.forward = eager
    assert torch.equal(tokens, expected)


def test_a_sliced_window_read():
    """One unpadded row: the prompt's attention has no mask, ``is_causal`` and reads the first 20 slots
    of the 23-token buffer (``kv_limit``, here the prompt itself); passthrough gives the eager tokens."""
    model = families.qwen2_mixed_window()
    ids, mask = left_padded_batch(families.VOCAB, 1, 20, pads=[0])
    eager_tokens, _, _ = _generate(model, ids, mask, 3)
    options = {"preset": "passthrough", "residual_length": 8, "group_size": 8}
    tokens, _, _ = _compiled_generate(model, ids, mask, 3, options)
    assert torch.equal(tokens, eager_tokens)
    assert manager.site_reports and all(r.rewritten for r in manager.site_reports)


def test_sliding_windows_can_be_kept_unquantized():
    """``quantize_sliding_windows=False``: the sliding layer of a mixed model stays in the model's dtype in
    every graph (fresh prompt, rolled decode), the full layer is still rewritten, results are exact."""
    model = families.qwen2_mixed_window()
    ids, mask = left_padded_batch(families.VOCAB, 2, 60, pads=[5, 0])
    eager_tokens, _, _ = _generate(model, ids, mask, 16)
    options = {"preset": "passthrough", "quantize_sliding_windows": False}
    tokens, _, cache = _compiled_generate(model, ids, mask, 16, options)
    assert torch.equal(tokens, eager_tokens)
    reports = manager.site_reports
    assert {r.layer for r in reports if r.rewritten} == {1}
    assert all(
        r.kind == "sliding_window" and "quantize_sliding_windows" in r.reason for r in reports if r.layer == 0
    )
    assert [layer.quantized for layer in mixkvq_compile.memory_report(cache).layers] == [False, True]


@settings(deadline=None, max_examples=30)
@given(
    start=st.integers(1, 120),
    queries=st.integers(1, 5),
    window=st.sampled_from([8, 33, 48]),
    additive=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_window_mask_against_a_dense_rule(start, queries, window, additive, seed):
    """``window_mask`` over shuffled key positions equals, key by key, the rule: inside the window,
    causal, and the model's mask column ``position - max(0, end - M)`` (hidden before column 0);
    a one-column mask broadcasts."""
    from mixkvq_compile.sliding import window_mask

    end = start + queries
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(end, generator=generator)[: max(1, end // 2)]
    width = min(end, window + queries - 1)
    model = torch.rand(2, 1, queries, width, generator=generator) > 0.2
    for mask in (model, model[..., :1]):
        given_mask = torch.where(mask, 0.0, float("-inf")) if additive else mask
        got = window_mask(given_mask, positions, start, end, window, True)
        got = torch.isfinite(got) if additive else got
        origin = 0 if mask.shape[-1] == 1 else max(0, end - mask.shape[-1])
        for qi in range(queries):
            q = start + qi
            for ki, p in enumerate(positions.tolist()):
                column = 0 if mask.shape[-1] == 1 else p - origin
                expected = (q - window < p <= q) & (column >= 0)
                expected = expected & mask[:, 0, qi, max(column, 0)]
                assert torch.equal(got[:, 0, qi, ki], expected), (qi, p)
