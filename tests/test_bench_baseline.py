"""The strong fp16 baseline of ``bench/e2e.py`` computes the model's attention: chunked prompts and a
decode step against transformers' own sdpa path (a benchmark baseline that attends to the wrong keys
measures something else than it says). Its decode step attends the whole static buffer without a mask
(as documented in ``strong_attention``), so the decode check fills the buffer exactly."""

from __future__ import annotations

import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

e2e = pytest.importorskip("e2e")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def registered():
    e2e.register_baselines()


def _chunked_logits(model, ids, chunks):
    """Logits of ``ids`` written into a StaticCache of exactly their length, ``chunks`` at a time
    ([start, end) pairs)."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1])
    out = []
    with torch.no_grad():
        for start, end in chunks:
            out.append(
                model(
                    ids[:, start:end],
                    past_key_values=cache,
                    cache_position=torch.arange(start, end),
                    attention_mask=torch.ones(ids.shape[0], end, dtype=torch.long),
                ).logits
            )
    return torch.cat(out, dim=1)


def test_strong_baseline_matches_sdpa_in_chunks_and_decode(registered):
    """Two prompt chunks (the second over a stored prefix: the split attention) and a one-token step,
    with 4 query heads over 2 KV heads: the same logits as transformers' sdpa over the whole prompt."""
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        want = model(ids).logits
    model.config._attn_implementation = "strong_sdpa"
    got = _chunked_logits(model, ids, ((0, 5), (5, 12), (12, 13)))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_step_intervals_skip_the_compiling_steps():
    """``bench/e2e.py``'s decode step: the median interval of the second half of the per-token times,
    so neither the first steps (compiles, graph capture) nor one slow step (a group flush) move it;
    the run's slowest and fastest timed steps come from the same intervals."""
    times = [0.0]
    for step in [5.0, 4.0, 1.0, 0.5, 0.2, 0.1, 0.05] + [0.010] * 4 + [0.030] + [0.010] * 4:
        times.append(times[-1] + step)  # seven compiling steps, then steady ones and a slow one
    intervals = e2e.step_intervals(times)
    assert statistics.median(intervals) == pytest.approx(0.010)
    assert max(intervals) == pytest.approx(0.030)
    assert min(intervals) == pytest.approx(0.010)
    with pytest.raises(ValueError, match="at least 4"):
        e2e.step_intervals([0.0, 1.0, 2.0])


def test_gpu_state_names_the_clock_limits():
    """``bench/gpu_state.py``: NVML's clock event bits by name (unknown bits in hex), and the report line."""
    from gpu_state import describe, reason_names

    assert reason_names(0) == []
    assert reason_names(0x4 | 0x40) == ["power_cap", "hw_thermal"]
    assert reason_names(0x1 | 0x1000) == ["idle", "0x1000"]
    state = {"sm_mhz": 1755, "mem_mhz": 3201, "temp_c": 61, "power_w": 612.4, "limits": ["power_cap"]}
    assert describe(state) == "1755 MHz, 61 C, 612 W [power_cap]"
    assert describe(None) == "no NVML"


def test_compile_profile_timer_counts_outer_calls_once():
    """``bench/compile_profile.py``'s timer adds each outermost call's seconds to its key; a nested call
    of the same wrapped function (``compile_fx`` calls itself) is not counted twice; a static method
    (Triton's ``make_ttir``) stays one; a
    call in another thread counts on its own."""
    import compile_profile

    class Compiler:
        def run(self, name, depth):
            if depth:
                self.run(name, depth - 1)
            return name

        @staticmethod
        def stage(name):
            return name * 2

    totals = {}
    compile_profile._timed(Compiler, "run", totals, lambda self, name, depth: name)
    compiler = Compiler()
    assert compiler.run("a", 3) == "a"
    compiler.run("a", 0)
    compiler.run("b", 1)
    compile_profile._timed(Compiler, "stage", totals, lambda name: "stage")
    assert compiler.stage("c") == Compiler.stage("c") == "cc"  # still a static method
    assert {name: count for name, (count, _) in totals.items()} == {"a": 2, "b": 1, "stage": 2}
    # A call in another thread while one is open in this thread counts on its own.
    import threading

    class Pool:
        def run(self, name):
            if name == "outer":
                worker = threading.Thread(target=self.run, args=("inner",))
                worker.start()
                worker.join()

    compile_profile._timed(Pool, "run", totals, lambda self, name: name)
    Pool().run("outer")
    assert totals["outer"][0] == totals["inner"][0] == 1
    assert all(seconds > 0 for _, seconds in totals.values())


@pytest.mark.parametrize("block", [1, 4])
def test_channel_blocks_reuse_each_block_s_first_order(block):
    """``bench/channel_blocks_eval.py``'s patch: with blocks of 4 groups, a block's later groups store
    the order of its first group, also when they are flushed by a later call through a fresh view of
    the store (as the custom op opens one per call); block 1 leaves the per-group choice. Random keys
    make equal orders of consecutive groups unlikely without the patch (checked by block 1)."""
    from channel_blocks_eval import channel_blocks

    from mixkvq_compile.config import PRESETS
    from mixkvq_compile.store import KVStore, StoreLayout, allocate

    torch.manual_seed(0)
    layout = StoreLayout.create(PRESETS["mixkvq"], 1, 2, 1024, 64, 64, torch.float32)
    handles = allocate(layout, "cpu")
    with channel_blocks(block):
        for start in range(0, 1024, 64):  # two groups flush per chunk once the window is full
            KVStore.open(layout, *handles).append(torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64), start)
    store = KVStore.open(layout, *handles)
    order = store.keys["order"][:, :, : store.packed_groups]
    assert order.shape[2] == 28
    for group in range(1, order.shape[2]):
        same = torch.equal(order[:, :, group], order[:, :, group - 1])
        assert same == (block > 1 and group % block != 0), group


@pytest.mark.parametrize("copy_chunks", [False, True])
def test_copied_prompt_chunks_trace_no_graph_in_a_second_call(copy_chunks):
    """``e2e.prefill_in_chunks(copy_chunks=True)``: a second chunked prefill through the mixkvq-compiled
    forward traces no new graph (``docs/performance.md``, session 15; README). With views of the prompt
    it traces one more (the first chunk again: its storage offset 0 fails the later chunk's guard,
    offset >= 2; seen with torch 2.11 on an H200 and 2.13 here). If Dynamo stops doing that, this test
    fails and the README's advice can go."""
    from torch._dynamo.utils import counters

    from tests import families

    torch._dynamo.reset()
    model = families.llama(layers=2)
    model.forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "kivi2"})
    ids = torch.randint(3, families.VOCAB, (1, 512))  # chunks of 256 and 255 tokens, as e2e's 4096 + 4095
    cache = transformers.StaticCache(config=model.config, max_cache_len=512)
    graphs = counters["stats"]["unique_graphs"]
    e2e.prefill_in_chunks(model, ids, cache, 256, copy_chunks=copy_chunks)
    first = counters["stats"]["unique_graphs"] - graphs
    e2e.prefill_in_chunks(model, ids, cache, 256, copy_chunks=copy_chunks)
    again = counters["stats"]["unique_graphs"] - graphs - first
    assert first == 2  # the chunk that allocates the store, and the later one
    assert again == (0 if copy_chunks else 1)


def test_ncu_stall_summary_shares_and_predicated_opcodes(tmp_path):
    """``bench/ncu_stalls.py`` on a small table in ncu's CSV shape: shares per reason and opcode, the
    predicate stripped from the opcode, instructions by samples; a table without samples is refused."""
    import ncu_stalls

    header = ["Address", "Source", ncu_stalls.SAMPLES, "Instructions Executed", "stall_long_sb", "stall_wait"]
    header += ["stall_long_sb (Not Issued)"]
    rows = [
        ["0x10", "BAR.SYNC.DEFER_BLOCKING 0x0", "60", "9", "55", "5", "55"],
        ["0x20", "@!P4  LDG.E.U16 R55, desc[UR22][R82.64]", "30", "9", "3", "27", "3"],
        ["0x30", "HMMA.16816.F32 R84, R200, R28, R84", "10", "9", "0", "10", "0"],
    ]
    path = tmp_path / "sass.csv"
    path.write_text(
        '"Kernel Name","planar_split_kernel",\n'
        + "\n".join(",".join(f'"{c}"' for c in r) for r in [header, *rows])
    )
    report = ncu_stalls.read_report(str(path))
    assert report.total == 100
    assert report.reasons == {"long_sb": 58, "wait": 42}
    assert report.opcodes == {"BAR": 60, "LDG": 30, "HMMA": 10}
    assert [i[1] for i in report.instructions] == ["0x10", "0x20", "0x30"]
    assert report.instructions[1][3] == {"wait": 27}  # long_sb's 3 of 30 is under a fifth
    lines = ncu_stalls.describe(report, top=2)
    assert lines[1] == "reasons: long_sb 58.0%, wait 42.0%" and len(lines) == 5
    bad = tmp_path / "bad.csv"
    bad.write_text('"Address","Source","Instructions Executed"\n"0x10","NOP","1"\n')
    with pytest.raises(ValueError, match="SourceCounters"):
        ncu_stalls.read_report(str(bad))
