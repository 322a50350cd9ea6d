"""``bench/e2e_profile.py``'s bookkeeping on synthetic profiler records (CPU): kernel kinds by name,
the union of overlapping intervals, and the per-step sums it reports."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

profile = pytest.importorskip("e2e_profile")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("planar_split_kernel", "attention (mixkvq)"),
        ("_combine_kernel", "attention (mixkvq)"),
        ("_write_tokens_kernel", "kv write (mixkvq)"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention (sdpa)"),
        ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>", "attention (sdpa)"),
        ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "matmul"),
        ("triton_tem_fused_mm_0", "matmul"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "inductor fused"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ],
)
def test_category_of_real_kernel_names(name, kind):
    assert profile.category(name) == kind


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)), max_size=12))
def test_union_length_matches_a_count_of_covered_unit_cells(spans):
    intervals = [(float(start), float(start + length)) for start, length in spans]
    covered = {cell for start, length in spans for cell in range(start, start + length)}
    assert profile.union_length(intervals) == pytest.approx(len(covered))


def test_per_step_sums_by_category_and_kernel():
    steps = 4
    kernels = []
    for i in range(steps):  # per step: a GEMM, then the attention overlapping the fused kernel
        t0 = 1000.0 * i
        kernels += [
            ("nvjet_tst_64x8", t0, t0 + 300.0),
            ("planar_split_kernel", t0 + 300.0, t0 + 400.0),
            ("triton_poi_fused_add_0", t0 + 350.0, t0 + 450.0),
        ]
    result = profile.per_step(kernels, steps)
    assert result["category_us"] == pytest.approx(
        {"matmul": 300.0, "attention (mixkvq)": 100.0, "inductor fused": 100.0}
    )
    assert result["busy_us"] == pytest.approx(450.0)  # the 50 us overlap counted once
    assert result["kernels"]["planar_split_kernel"] == (
        pytest.approx(1.0),
        pytest.approx(100.0),
        "attention (mixkvq)",
    )
    long_name = (
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<flash_attention_mask>>"
    )
    keyed = profile.per_step([(long_name, 0.0, 4.0)], 2)["kernels"]
    assert keyed == {long_name[:60]: (0.5, 2.0, "attention (sdpa)")}  # the full name's category
    with pytest.raises(ValueError, match="steps must be positive"):
        profile.per_step(kernels, 0)


def test_host_per_step_sums_events_by_name_ranks_by_inclusive_time_and_divides_by_steps():
    events = [("aten::copy_", float(t), 10.0, 20.0) for t in range(40)]
    events += [("Torch-Compiled Region", float(t), 10.0, 500.0) for t in range(8)]
    events += [("x", 0.0, 1.0, 1.0)] * 8
    assert profile.host_per_step(events, 8, 2) == [
        ("Torch-Compiled Region", 1.0, 10.0, 500.0),
        ("aten::copy_", 5.0, 50.0, 100.0),
    ]


def test_after_first_token_leaves_out_the_first_forward():
    kernels = [("eager_mm", 5.0, 9.0), ("graph_mm", 12.0, 14.0), ("graph_mm", 22.0, 24.0)]
    marks = [20.0, 10.0, 30.0]  # the end of each token's mark, in any order
    assert profile.after_first_token(kernels, marks) == kernels[1:]
    with pytest.raises(RuntimeError, match="1 token marks"):
        profile.after_first_token(kernels, [10.0])


def test_idle_gaps_splits_short_and_long_gaps_and_names_the_kernel_after_a_short_one():
    kernels = [
        ("nvjet_tst_64x8", 0.0, 100.0),
        ("planar_split_kernel", 90.0, 150.0),  # overlaps: no gap
        ("_combine_kernel", 155.0, 160.0),  # 5 us after the reach of 150
        ("triton_poi_fused_add_0", 200.0, 210.0),  # 40 us: the host
        ("nvjet_tst_64x8", 213.0, 300.0),  # 3 us
    ]
    gaps = profile.idle_gaps(kernels[::-1], steps=2)  # any order
    assert gaps["short_us"] == pytest.approx(4.0) and gaps["long_us"] == pytest.approx(20.0)
    assert gaps["long_count"] == pytest.approx(0.5)
    assert gaps["short_before_us"] == pytest.approx({"attention (mixkvq)": 2.5, "matmul": 1.5})
    assert profile.per_step(kernels, 2)["gaps"] == gaps


def test_child_command_line_carries_every_setting_for_one_method():
    args = profile.parse_args(
        ["--methods", "strong,mixkvq", "--batch", "2", "--context", "4096", "--layers", "3"]
    )
    args_more = profile.parse_args(["--new-tokens", "6", "--prefill-chunk", "512", "--host", "7"])
    for parent in (args, args_more):
        child = profile.parse_args(profile.child_argv(parent, "kivi2")[2:])
        assert child.child and child.methods == "kivi2"
        for name in ("batch", "context", "layers", "new_tokens", "prefill_chunk", "host"):
            assert getattr(child, name) == getattr(parent, name)
    with pytest.raises(SystemExit):
        profile.parse_args(["--methods", "strong,kivi2", "--child"])
