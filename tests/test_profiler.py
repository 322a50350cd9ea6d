"""The KVmix profiler (gradient norms -> layer plan) and the threshold calibration, on tiny models."""

import json

import pytest
import torch

from mixkvq_compile import MixKVQConfig
from mixkvq_compile.profiler import (
    calibrate_thresholds,
    find_kv_projections,
    kvmix_plan_from_scores,
    main,
    profile_layers,
    write_plan,
)
from tests.models import tiny_llama

PROMPTS = [torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def ranking(scores):
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def test_scaled_up_key_path_ranks_its_layer_first():
    """||dL/dW_k|| = ||sum_t dL/dk_t h_t^T||: it grows with the queries that read the keys (dL/dk is
    linear in q) and with the projection's input h. (Scaling W_k itself does not raise it: with
    near-uniform attention dL/dk does not depend on W_k.)"""
    model = tiny_llama(4, 2, 16, layers=4)
    base = profile_layers(model, PROMPTS, progress=False)
    assert ranking(base["key"])[0] != 2
    with torch.no_grad():
        model.model.layers[2].self_attn.q_proj.weight.mul_(4)
    scaled = profile_layers(model, PROMPTS, progress=False)
    assert ranking(scaled["key"])[0] == 2
    assert scaled["key"][2] == pytest.approx(4 * base["key"][2], rel=0.05)
    with torch.no_grad():
        model.model.layers[2].self_attn.q_proj.weight.div_(4)
        model.model.layers[1].input_layernorm.weight.mul_(4)
    scaled = profile_layers(model, PROMPTS, progress=False)
    assert ranking(scaled["key"])[0] == 1 and ranking(scaled["value"])[0] == 1


def test_profiler_leaves_the_model_as_it_was_and_label_shift_matters():
    model = tiny_llama(4, 2, 16, layers=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    one = profile_layers(model, PROMPTS[:1], progress=False)
    two = profile_layers(model, PROMPTS[:1], label_shift=2, progress=False)
    assert one != two and len(one["key"]) == len(one["value"]) == 2
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].self_attn.k_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_plan_meets_the_budget_with_the_top_layers_and_loads_into_the_config(tmp_path):
    scores = {"key": [0.1, 0.5, 0.2, 0.9, 0.3], "value": [0.9, 0.1, 0.2, 0.3, 0.4]}
    plan = kvmix_plan_from_scores(scores, key_bits=2.8, value_bits=2.4, key_levels=(4.0, 2.0))
    assert plan["budget"]["high_key_layers"] == [1, 3] and plan["budget"]["high_value_layers"] == [0]
    assert plan["budget"]["mean_key_bits"] == pytest.approx(2.8)
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    config = MixKVQConfig(
        key_tiering="uniform", key_tier_fractions=(0, 0), value_bits=2, layer_plan=str(path)
    )
    assert config.for_layer(3).tier_channels(64) == (0, 64, 0)  # 4-bit keys
    assert config.for_layer(0).tier_channels(64) == (0, 0, 64) and config.for_layer(0).value_bits == 4
    combined = kvmix_plan_from_scores(scores, 2.5, 2.0, key_levels=(3.0, 2.25), residual_levels=(128, 64))
    write_plan(combined, path)
    config = MixKVQConfig(layer_plan=str(path))
    assert config.for_layer(3).key_bits_nominal(64) == 3.0 and config.for_layer(3).residual_length == 128
    assert config.for_layer(0).key_bits_nominal(64) == 2.25 and config.for_layer(0).residual_length == 64
    assert json.loads(path.read_text())["format"] == "mixkvq-layer-plan"
    # KVmix's RPC ratios: high where the key (layers 1, 3) or the value width (layer 0) is high.
    rpc = kvmix_plan_from_scores(scores, 2.8, 2.4, key_levels=(4.0, 2.0), rpc_levels=(0.2, 0.1))
    write_plan(rpc, path)
    config = MixKVQConfig(
        key_tiering="uniform", key_tier_fractions=(0, 0), residual_length=0, layer_plan=str(path)
    )
    assert [config.for_layer(i).rpc_ratio for i in range(5)] == [0.2, 0.2, 0.1, 0.2, 0.1]


def test_missing_projections_name_what_was_searched():
    with pytest.raises(ValueError, match="k_proj/v_proj.*wk/wv.*fused"):
        find_kv_projections(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert len(find_kv_projections(tiny_llama(4, 2, 16, layers=3))) == 3


def test_threshold_calibration_gives_tier_fractions_per_layer():
    model = tiny_llama(4, 2, 16, layers=2)
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(3))
    everything = calibrate_thresholds(model, [ids], (0.0, 0.0))
    nothing = calibrate_thresholds(model, [ids], (1e9, 1e9))
    assert [o["key_tier_fractions"] for o in everything["layer_overrides"].values()] == [[1.0, 0.0]] * 2
    assert [o["key_tier_fractions"] for o in nothing["layer_overrides"].values()] == [[0.0, 0.0]] * 2
    middle = calibrate_thresholds(model, [ids], (0.05, 0.01))
    fractions = [o["key_tier_fractions"] for o in middle["layer_overrides"].values()]
    assert all(0 <= h <= 1 and 0 <= m <= 1 - h for h, m in fractions)
    assert model.config._attn_implementation != "mixkvq_calibrate"


def test_console_script_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--key-bits" in capsys.readouterr().out
