"""``prewarm``: the decode graph's attention kernels compiled ahead of its first run, over the real store
(only read) and stand-ins for the step's other tensors. On the CPU the kernels run in Triton's
interpreter; the background thread and the first-call join are the ones the backend uses on a GPU."""

import importlib
import threading

import pytest
import torch

from mixkvq_compile import prewarm
from mixkvq_compile.kernels.decode_attention import decode_attention
from tests.models import left_padded_batch, tiny_llama

OPTIONS = {"preset": "kivi2", "residual_length": 16, "group_size": 16}


@pytest.fixture
def decode_graph(monkeypatch):
    """(gm, example_inputs) of the one-token decode graph of a 2-layer GQA Llama after 40 prompt
    tokens (two packed groups per layer), rewritten by the mixkvq passes."""
    graphs = []
    backend = importlib.import_module("mixkvq_compile.backend")  # the package exports a function so named
    compile_graph = backend._compile

    def keep_graph(gm, example_inputs, config, mode):
        compiled = compile_graph(gm, example_inputs, config, mode)  # rewrites gm in place
        graphs.append((gm, list(example_inputs)))
        return compiled

    monkeypatch.setattr(backend, "_compile", keep_graph)
    model = tiny_llama(4, 2, 32, layers=2)
    ids, mask = left_padded_batch(256, 1, 40, pads=[0])
    model.forward = torch.compile(model.forward, backend="mixkvq", options=OPTIONS)
    model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        cache_implementation="static",
    )
    for gm, example_inputs in graphs:
        if prewarm.decode_calls(gm, example_inputs):
            return gm, example_inputs
    pytest.fail("no one-token decode graph with store handles among its inputs was compiled")


def test_decode_calls_read_the_real_store_and_leave_it_unchanged(decode_graph):
    gm, example_inputs = decode_graph
    calls = prewarm.decode_calls(gm, example_inputs)
    assert len(calls) == 1  # both layers share one specialization
    call = calls[0]
    ring = call["store"].keys["ring"].untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == ring for t in example_inputs)  # the graph's own store
    assert call["query"].shape == (1, 4, 1, 32) and call["new_key"].shape == (1, 2, 1, 32)
    assert call["length"].dtype == torch.int64 and int(call["length"][0]) == 0

    def snapshot():
        return [torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone() for t in example_inputs]

    before = snapshot()
    out = decode_attention(**call)
    assert torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(), before, strict=True))


def test_start_runs_the_calls_in_a_thread_and_the_first_call_joins(decode_graph, monkeypatch):
    gm, example_inputs = decode_graph
    ran = []
    release = threading.Event()

    def slow_decode(**call):
        release.wait(timeout=30)
        ran.append(call["query"].shape)

    monkeypatch.setattr("mixkvq_compile.kernels.decode_attention.decode_attention", slow_decode)
    thread = prewarm.start(gm, example_inputs)
    assert thread is not None and thread.is_alive()

    def compiled(args):
        assert ran, "the compiled graph ran before the prewarm thread ended"
        return args

    compiled._boxed_call = True
    joined = prewarm.join_before_first_call(compiled, thread)
    assert joined._boxed_call is True  # Inductor's calling convention kept
    threading.Timer(0.3, release.set).start()  # the thread ends only after the first call began
    assert joined([1, 2]) == [1, 2]
    assert ran == [(1, 4, 1, 32)]


def test_a_failing_prewarm_is_logged_and_changes_nothing(decode_graph, monkeypatch, caplog):
    gm, example_inputs = decode_graph

    def broken(**call):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr("mixkvq_compile.kernels.decode_attention.decode_attention", broken)
    thread = prewarm.start(gm, example_inputs)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "no compiler today" in caplog.text


def test_a_graph_it_cannot_read_starts_nothing_and_fails_nothing(decode_graph, caplog):
    gm, example_inputs = decode_graph
    assert prewarm.start(gm, example_inputs[:1]) is None  # the handles' inputs are missing
    assert "no ahead-of-time compile" in caplog.text


@pytest.mark.parametrize(("flag", "expected"), [("", True), ("1", True), ("0", False)])
def test_prewarm_switch(flag, expected, monkeypatch):
    monkeypatch.setenv("MIXKVQ_PREWARM", flag)
    assert prewarm.enabled() is expected
    monkeypatch.setenv("MIXKVQ_PREWARM", "yes")
    with pytest.raises(ValueError, match="MIXKVQ_PREWARM"):
        prewarm.enabled()
