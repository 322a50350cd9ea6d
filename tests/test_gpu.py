"""The CUDA path end to end (Triton kernels inside mixkvq::kv_attention). Needs a GPU; on CPU the
kernels are covered by tests/test_kernels.py in the interpreter and the op by tests/test_store.py."""

import pytest
import torch

import mixkvq_compile
from tests.models import generate, left_padded_batch, mean_kl, teacher_forced_logits, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT, NEW = 200, 64


def run(preset, dtype, monkeypatch, kernels: bool, forced=None):
    if not kernels:
        monkeypatch.setenv("MIXKVQ_DISABLE_KERNELS", "1")
    torch._dynamo.reset()
    model = tiny_llama(4, 2, 128, dtype=dtype).cuda()
    ids, mask = left_padded_batch(256, 2, PROMPT, pads=[7, 0])
    ids, mask = ids.cuda(), mask.cuda()
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="mixkvq", options={"preset": preset})
    tokens, logits = generate(model, ids, mask, NEW, forced)
    monkeypatch.delenv("MIXKVQ_DISABLE_KERNELS", raising=False)
    return eager_forward, tokens, logits, mask


def compiled_generate(options: dict):
    """Tokens and logits of ``generate()`` on a fresh bfloat16 tiny Llama whose forward is compiled by
    mixkvq with ``options``, after resetting Dynamo and the CUDA graph trees."""
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    cudagraph_trees.reset_cudagraph_trees()
    model = tiny_llama(4, 2, 128, dtype=torch.bfloat16).cuda()
    ids, mask = left_padded_batch(256, 2, PROMPT, pads=[7, 0])
    model.forward = torch.compile(model.forward, backend="mixkvq", options=options)
    return generate(model, ids.cuda(), mask.cuda(), NEW)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", ["kivi2", "mixkvq"])
def test_kernel_path_matches_reference_path(preset, dtype, monkeypatch):
    eager_forward, tokens, logits, mask = run(preset, dtype, monkeypatch, kernels=True)
    assert mixkvq_compile.counters["attention_rewritten"] == 4
    reference = teacher_forced_logits(eager_forward, tokens, mask, PROMPT)
    assert mean_kl(reference, logits) < 2e-2
    # The PyTorch path fed the kernels' tokens: every step sees the same prefix, so a near tie between
    # two tokens cannot end the comparison (free-running greedy runs of mixkvq in float16 parted after 7
    # of 64 steps on an H200, in both key layouts, with KLs of 5e-8 and 3e-5 over those 7 steps).
    _, ref_tokens, ref_logits, _ = run(preset, dtype, monkeypatch, kernels=False, forced=tokens)
    assert torch.equal(ref_tokens, tokens)
    assert mean_kl(ref_logits, logits) < 1e-3


def test_passthrough_on_gpu_is_close_to_eager(monkeypatch):
    eager_forward, tokens, logits, mask = run("passthrough", torch.float32, monkeypatch, kernels=True)
    reference = teacher_forced_logits(eager_forward, tokens, mask, PROMPT)
    assert mean_kl(reference, logits) < 1e-5


@pytest.mark.parametrize("preset", ["kivi2", "mixkvq"])
def test_decode_under_cuda_graphs_equals_launches(preset):
    """Default ``cuda_graphs=True``: the one-token decode graph is recorded and replayed (the prefill is
    not), and the tokens and logits equal, bit for bit, those of the same kernels launched one by one."""
    from torch._inductor import cudagraph_trees

    results = []
    for graphs in (True, False):
        results.append(compiled_generate({"preset": preset, "cuda_graphs": graphs}))
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        recorded = 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())
        assert (recorded > 0) == graphs, f"cuda_graphs={graphs}: {recorded} recorded graphs"
    (tokens, logits), (ref_tokens, ref_logits) = results
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("preset", ["kivi2", "mixkvq"])
def test_overlapped_launches_equal_sequential_ones(preset, monkeypatch):
    """On compute capability 9.0+ with ``MIXKVQ_PDL=1`` a decode step's attention overlaps its launches
    (programmatic dependent launch: the packed groups with the full-precision tokens, the combine with
    the packed groups). Tokens and logits under CUDA graphs equal, bit for bit, those with
    ``MIXKVQ_PDL=0``."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MIXKVQ_PDL", flag)
        results.append(compiled_generate({"preset": preset}))
    (tokens, logits), (ref_tokens, ref_logits) = results
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)


def test_sliding_window_layer_next_to_a_full_layer():
    """Qwen2 with a 48-token sliding layer and a full layer, bfloat16 on the GPU: the sliding layer
    runs the PyTorch path (its graphs are not captured), the full layer the kernels; both quantized."""
    from tests import families

    torch._dynamo.reset()
    mixkvq_compile.reset_counters()
    model = families.qwen2_mixed_window(dtype=torch.bfloat16).cuda()
    ids, mask = left_padded_batch(families.VOCAB, 2, 60, pads=[5, 0])
    ids, mask = ids.cuda(), mask.cuda()
    eager_forward = model.forward
    options = {"preset": "mixkvq", "residual_length": 16, "group_size": 16}
    model.forward = torch.compile(eager_forward, backend="mixkvq", options=options)
    tokens, logits = generate(model, ids, mask, 24)
    counters = mixkvq_compile.counters
    assert counters["attention_rewritten"] == counters["attention_found"] == 4
    reference = teacher_forced_logits(eager_forward, tokens, mask, 60)
    assert mean_kl(reference, logits) < 2e-2
    assert not torch.allclose(logits, reference, atol=1e-6)


@pytest.mark.parametrize("preset", ["kivi2", "mixkvq"])
def test_prewarm_runs_on_the_gpu_and_changes_no_token(preset, monkeypatch, caplog):
    """The decode kernels are run once in the prewarm thread while Inductor compiles the decode graph
    (``prewarm``), without a logged failure, and the tokens and logits of a compiled generate() under
    CUDA graphs equal, bit for bit, those with ``MIXKVQ_PREWARM=0``."""
    import threading

    from mixkvq_compile.kernels import decode_attention as module

    attend = module.decode_attention
    threads = []

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return attend(*args, **kwargs)

    monkeypatch.setattr(module, "decode_attention", spy)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MIXKVQ_PREWARM", flag)
        threads.clear()
        results.append(compiled_generate({"preset": preset}))
        assert ("mixkvq-prewarm" in threads) == (flag == "1"), threads[:4]
    assert "decode kernels" not in caplog.text and "ahead-of-time" not in caplog.text
    (tokens, logits), (ref_tokens, ref_logits) = results
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)
