"""The accuracy harness on a tiny random model: streaming through the compiled forward, metrics, output."""

import dataclasses

import pytest
import torch

import mixkvq_compile.evaluate as evaluate_module
from mixkvq_compile import PRESETS, MixKVQConfig
from mixkvq_compile.evaluate import EvalCase, bits_per_element, evaluate, format_table, plot
from tests.models import tiny_llama

IDS = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(0))
SETTINGS = {"chunk": 64, "new_tokens": 16, "prompt_tokens": 192, "score_from": 160, "progress": False}


def test_harness_measures_fp16_exactly_and_a_quantized_cache_through_the_compiled_graph(tmp_path):
    model = tiny_llama(4, 2, 64, layers=2)
    config = dataclasses.replace(PRESETS["mixkvq"], key_bits_budget=2.5, residual_length=32)
    cases = [EvalCase("fp16", "fp16", None), EvalCase("budget", "mixkvq budget", config)]
    fp16, quantized = evaluate(model, IDS, cases, **SETTINGS)
    assert (fp16.kl, fp16.top1_agreement, fp16.greedy_agreement, fp16.greedy_prefix) == (0.0, 1.0, 1.0, 16)
    assert fp16.bytes_per_token == 2 * 2 * 64 * 2 * 4  # layers * (K + V) * head_dim * kv heads * fp32
    assert quantized.kl > 0 and quantized.bytes_per_token < fp16.bytes_per_token / 2
    assert quantized.perplexity == pytest.approx(fp16.perplexity, rel=0.05)
    # Keys: (2, 2, 60) channels of (16, 4, 2) bits, fp16 scale + zero per 32 tokens, uint8 order.
    key_bits = (2 * 16 + 2 * (4 + 1) + 60 * (2 + 1)) / 64 + 8 / 32
    assert (quantized.nominal_bits, quantized.bits_with_metadata) == (2.25, pytest.approx((key_bits + 3) / 2))
    table = format_table([fp16, quantized])
    assert table.count("\n") == 3 and "| budget | mixkvq budget | 2.25 |" in table
    plot([fp16, quantized], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_harness_fails_loudly_when_nothing_was_quantized(monkeypatch):
    model = tiny_llama(4, 2, 64, layers=1)
    monkeypatch.setattr(
        evaluate_module,
        "compile_forward",
        lambda model, config, compiler: torch.compile(model.forward, backend="eager"),
    )
    cases = [EvalCase("fp16", "fp16", None), EvalCase("kivi2", "kivi", PRESETS["kivi2"])]
    with pytest.raises(RuntimeError, match="rewrote no attention"):
        evaluate(model, IDS[:128], cases, **{**SETTINGS, "prompt_tokens": 64, "score_from": 64})


def test_first_case_must_be_the_baseline_and_arguments_are_checked():
    model = tiny_llama(4, 2, 64, layers=1)
    with pytest.raises(ValueError, match="prompt_tokens"):
        evaluate(model, IDS[:64], [EvalCase("fp16", "fp16", None)], **SETTINGS)


def test_bits_per_element_counts_scales_zeros_and_channel_order():
    config = tiny_llama(4, 2, 64, layers=2).config
    assert bits_per_element(PRESETS["kivi2"], config) == (2.0, 3.0)
    assert bits_per_element(PRESETS["kivi4"], config) == (4.0, 5.0)
    # Keys (2, 18, 44) channels of (16, 4, 2) bits + uint8 order per channel per 32 tokens; values 2-bit.
    nominal, meta = bits_per_element(MixKVQConfig(key_bits_budget=3.0), config)
    assert nominal == 2.5 and meta == pytest.approx(((2 * 16 + 18 * 5 + 44 * 3) / 64 + 0.25 + 3) / 2)
    plan = MixKVQConfig(key_bits_budget=3.0, layer_overrides={1: {"value_bits": 4}})
    assert bits_per_element(plan, config)[0] == pytest.approx((2.5 + 3.5) / 2)


def test_a_case_measured_against_a_handed_over_reference_equals_the_sequential_run():
    """The parallel table (``mixkvq-eval --jobs``) measures each case in another process against the
    baseline's ``Reference``: the numbers equal those of one sequential call."""
    model = tiny_llama(4, 2, 64, layers=1)
    config = dataclasses.replace(PRESETS["kivi2"], residual_length=32)
    cases = [EvalCase("fp16", "fp16", None), EvalCase("kivi2", "kivi", config)]
    _, sequential = evaluate(model, IDS, cases, **SETTINGS)
    (baseline,), reference = evaluate(model, IDS, cases[:1], return_reference=True, **SETTINGS)
    (handed,) = evaluate(model, IDS, cases[1:], reference=reference, **SETTINGS)
    assert reference.logp.shape == (IDS.numel() - 1 - SETTINGS["score_from"], 256)
    assert reference.tokens.shape == (SETTINGS["new_tokens"],)
    fields = ("perplexity", "kl", "top1_agreement", "greedy_agreement", "greedy_prefix", "bytes_per_token")
    assert [getattr(handed, f) for f in fields] == [getattr(sequential, f) for f in fields]
    assert sequential.kl > 0 and baseline.kl == 0.0
