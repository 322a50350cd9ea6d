"""State hygiene: separate models share nothing, a second generate starts clean, beam search is refused
clearly, and a dynamic cache is left untouched with one warning."""

import logging

import pytest
import torch
import torch._inductor.config

import mixkvq_compile
from mixkvq_compile.passes import manager, sites
from tests import families
from tests.models import left_padded_batch

MIXKVQ = {"preset": "mixkvq", "residual_length": 32}
NEW = 24


def generate(model, ids, mask, **kwargs):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **{"cache_implementation": "static", **kwargs},
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def test_two_models_and_repeated_generates_share_no_state():
    """Two compiled models interleaved; each model's repeated generate (with another prompt in
    between) gives bit-identical logits: no stale tokens, no stale query statistics (mixkvq preset)."""
    first, second = families.llama(seed=0), families.llama(seed=1, heads=2, kv_heads=1)
    for model in (first, second):
        model.forward = torch.compile(model.forward, backend="mixkvq", options=MIXKVQ)
    ids_a, mask_a = left_padded_batch(families.VOCAB, 2, 48, pads=[4, 0], seed=1)
    ids_b, mask_b = left_padded_batch(families.VOCAB, 2, 40, pads=[0, 9], seed=2)
    runs = [
        generate(first, ids_a, mask_a),
        generate(second, ids_a, mask_a),
        generate(first, ids_b, mask_b),
        generate(first, ids_a, mask_a),
        generate(second, ids_a, mask_a),
    ]
    for earlier, later in ((0, 3), (1, 4)):
        assert torch.equal(runs[earlier][0], runs[later][0])
        assert torch.equal(runs[earlier][1], runs[later][1])
    assert not torch.equal(runs[0][1], runs[1][1])
    assert mixkvq_compile.counters["attention_skipped"] == 0


def test_beam_search_is_refused_clearly():
    """transformers reorders the cache with ``keys.index_select(0, beam_idx)``, which turns a store
    handle into a plain tensor without the quantized tokens: mixkvq raises instead of reading it."""
    model = families.llama()
    model.forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "passthrough"})
    ids, mask = left_padded_batch(families.VOCAB, 1, 20, pads=[0])
    with pytest.raises(Exception, match="num_beams=1"):
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=4,
            num_beams=2,
            do_sample=False,
            cache_implementation="static",
        )


def test_dynamic_cache_is_untouched_with_one_warning(caplog):
    model = families.llama(layers=2)
    ids, mask = left_padded_batch(families.VOCAB, 2, 20, pads=[3, 0])
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    expected = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, backend="mixkvq")
    # torch 2.11's CPU codegen references an undeclared variable in the bounds check of this graph's
    # indirect indexing (pytorch/pytorch#178244, fixed by #180212); the graph is transformers' own
    # (nothing is rewritten), so the check is switched off rather than the test skipped.
    with (
        caplog.at_level(logging.WARNING, logger="mixkvq_compile"),
        torch._inductor.config.patch(assert_indirect_indexing=False),
    ):
        tokens = model.generate(ids, **kwargs)
    assert torch.equal(tokens, expected)
    assert mixkvq_compile.counters["attention_rewritten"] == 0
    assert any(report.kind == sites.DYNAMIC_CACHE for report in manager.site_reports)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cache_implementation='static'" in warnings[0]


def test_explain_lists_every_site():
    model = families.qwen2_mixed_window()
    ids, mask = left_padded_batch(families.VOCAB, 1, 20, pads=[0])
    model.forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "passthrough"})
    report = mixkvq_compile.explain(
        model.generate,
        ids,
        attention_mask=mask,
        max_new_tokens=3,
        do_sample=False,
        cache_implementation="static",
    )
    assert {(s.layer, s.rewritten) for s in report.sites} == {(0, False), (1, True)}
    # The sliding layer keeps min(48, max_cache_len) = 22 tokens, fewer than passthrough's 160-token
    # full-precision ring.
    assert all("sliding-window layer of 22 tokens" in s.reason for s in report.skipped)
    assert len(report.sites) == mixkvq_compile.counters["attention_found"]
    assert str(report).count("\n") == len(report.sites)
