"""Coverage matrix: tiny random-weight models of many families under backend="mixkvq".

For each family: preset passthrough generates exactly the eager tokens (32 new tokens, static cache),
and preset mixkvq (``residual_length=32`` so that groups really leave the window) rewrites every
attention layer, sliding-window layers included, and stays within a KL bound of eager.
"""

import pytest
import torch

import mixkvq_compile
from mixkvq_compile.passes import manager, sites
from tests import families
from tests.models import left_padded_batch, mean_kl, teacher_forced_logits

PROMPT, NEW, PADS = 40, 32, [5, 0]
MIXKVQ = {"preset": "mixkvq", "residual_length": 32}
KL_BOUND = 2e-2  # measured < 2e-3 on these models; a wrong dequantization gives > 0.05
# Families with 48-token sliding windows: a full-precision ring of 16 + 16 tokens, so that the window
# is longer than the ring (else the layer stays unquantized) and groups leave it. The 40-token prompt
# plus 32 new tokens fill the window and then roll it (``passes/window.py``).
SMALL_RING = {"residual_length": 16, "group_size": 16}
FAMILY_OPTIONS = {"mistral": SMALL_RING, "qwen2_mixed_window": SMALL_RING}
FAMILIES = list(families.FAMILIES)


def generate(model, ids, mask):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def compiled_run(model, eager_forward, options, ids, mask):
    torch._dynamo.reset()
    mixkvq_compile.reset_counters()
    model.forward = torch.compile(eager_forward, backend="mixkvq", options=options)
    try:
        return generate(model, ids, mask)
    finally:
        model.forward = eager_forward


def assert_layers(model_layers: int):
    """Every attention site of every graph is rewritten, and every layer has one."""
    reports = manager.site_reports
    assert reports, "no attention found"
    for report in reports:
        assert report.layer < model_layers
        assert report.rewritten, str(mixkvq_compile.explain())
    assert {r.layer for r in reports} == set(range(model_layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    model = families.FAMILIES[family]()
    layers = model.config.num_hidden_layers
    ids, mask = left_padded_batch(families.VOCAB, 2, PROMPT, pads=PADS)
    eager_forward = model.forward
    eager_tokens, _ = generate(model, ids, mask)

    extra = FAMILY_OPTIONS.get(family, {})
    tokens, _ = compiled_run(model, eager_forward, {"preset": "passthrough", **extra}, ids, mask)
    assert torch.equal(tokens, eager_tokens)
    assert_layers(layers)

    tokens, logits = compiled_run(model, eager_forward, {**MIXKVQ, **extra}, ids, mask)
    assert_layers(layers)
    reference = teacher_forced_logits(eager_forward, tokens, mask, PROMPT)
    assert mean_kl(reference, logits) < KL_BOUND
    assert not torch.allclose(logits, reference, atol=1e-6)  # groups were really quantized


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "mistral"])
def test_eager_attention_is_recognised(family):
    """attn_implementation="eager" (matmul, scale, mask add, softmax, cast, dropout, matmul); Mistral's
    sliding window also in its rolled graph."""
    model = families.FAMILIES[family](attn="eager")
    ids, mask = left_padded_batch(families.VOCAB, 2, PROMPT, pads=PADS)
    eager_forward = model.forward
    eager_tokens, _ = generate(model, ids, mask)
    options = {"preset": "passthrough", **FAMILY_OPTIONS.get(family, {})}
    tokens, _ = compiled_run(model, eager_forward, options, ids, mask)
    assert torch.equal(tokens, eager_tokens)
    assert_layers(model.config.num_hidden_layers)
    assert all(report.pattern == "eager" for report in manager.site_reports)


def test_eager_attention_with_softcapping_is_not_matched():
    """A variant outside the matcher (tanh softcapping between scale and softmax) is left alone."""
    graph = torch.fx.symbolic_trace(_SoftcappedAttention()).graph
    assert sites.find_sites(graph) == []


class _SoftcappedAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.125
        scores = torch.tanh(scores / 50.0) * 50.0 + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("lazy", [False, True], ids=["module-buffers", "allocated-in-graph"])
def test_gpt_fast_style_model(lazy):
    """Registered cache buffers written with ``k_cache[:, :, input_pos] = k``.

    Buffers allocated by ``setup_caches()`` outside the compiled graph are plain fp16 memory that
    mixkvq does not own: the attention stays unquantized (with a reason) and exact. Allocated lazily
    inside the compiled forward, the cache becomes a mixkvq store and every layer is quantized."""
    model = families.gpt_fast(layers=2)
    prompt = torch.randint(0, families.VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    eager_tokens, eager_logits = families.gpt_fast_generate(model, model.forward, prompt, NEW, lazy=lazy)

    forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "passthrough"})
    tokens, _ = families.gpt_fast_generate(model, forward, prompt, NEW, lazy=lazy)
    assert torch.equal(tokens, eager_tokens)
    counters = mixkvq_compile.counters
    if lazy:
        assert counters["attention_rewritten"] == 2 * 2 and counters["attention_skipped"] == 0
        torch._dynamo.reset()
        forward = torch.compile(model.forward, backend="mixkvq", options=MIXKVQ)
        _, logits = families.gpt_fast_generate(model, forward, prompt, NEW, lazy=True)
        assert mean_kl(eager_logits, logits) < KL_BOUND
        assert not torch.allclose(logits, eager_logits, atol=1e-6)
    else:
        assert counters["attention_rewritten"] == 0 and counters["attention_skipped"] == 2 * 2
        assert all("allocated outside the compiled graph" in reason for _, _, reason in manager.skipped_sites)
