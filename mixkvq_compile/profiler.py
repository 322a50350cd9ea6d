"""KVmix layer profiler: gradient norms of the key/value projections -> a per-layer bit plan (JSON).

KVmix (arXiv 2506.08018, Eq. 10-11) scores layer i by s_k(i) = ||dL/dW_k(i)||_F and
s_v(i) = ||dL/dW_v(i)||_F, the Frobenius norms of the loss gradient with respect to the key and value
projection weights, averaged over calibration prompts; the highest-scoring layers get the high bit
widths. The loss here is the model's own next-token cross-entropy on each prompt with the standard
one-token label shift (position t predicts token t + 1). The official code (``myprofileKV.py``)
builds labels already shifted left by one and passes them to a Hugging Face model, which shifts
them again, so its loss predicts token t + 2; ``label_shift=2`` reproduces that (without its other
quirk, padded positions counted in the loss). One forward and one backward per prompt collect
every layer's gradients at once (the official code runs one pass per layer; the result is the same).

The plan (``write_plan``) is a JSON file that ``MixKVQConfig(layer_plan=path)`` loads::

    {"format": "mixkvq-layer-plan", "version": 1, "method": "kvmix-gradient-norm",
     "scores": {"key": [...], "value": [...]}, "budget": {...},
     "layer_overrides": {"0": {"key_bits_budget": 4.0, "value_bits": 4}, "1": {...}, ...}}

Bit widths: KVmix gives its high layers 3-bit keys and 4-bit values. The store has 2/4/16-bit key
tiers (no 3-bit packing; KVmix's 3-bit "11-in-32" packing costs 5.8 bits per element with its
metadata anyway), so a layer's key width is a ``key_bits_budget``: 4.0 (all channels 4-bit) or 2.0 for
KIVI-style uniform keys, or any mean (e.g. 3.0 / 2.3) for MixKVQ's query-aware tiers inside the
layer. KVmix's recent pivotal context (RPC): ``rpc_levels`` gives each layer an ``rpc_ratio`` (the
paper: 0.2 for layers with a high key or value width, 0.1 for the others; one ratio per layer for
keys and values alike, where KVmix has one each); ``residual_levels`` a fixed full-precision window
(``residual_length``) by the key ranking ("higher importance, larger window").

``calibrate_thresholds`` turns MixKVQ's absolute thresholds into per-layer tier sizes (the static
layout's reading of the threshold rule, see ``KeyTiering.THRESHOLDS``).

Command line::

    mixkvq-profile --out kvmix_plan.json --key-bits 2.4 --value-bits 2.4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import PLAN_FORMAT

#: (key, value) child-module names searched in every module, in this order.
PROJECTION_NAMES = (
    ("k_proj", "v_proj"),
    ("key_proj", "value_proj"),
    ("key", "value"),
    ("wk", "wv"),
    ("k", "v"),
)


def find_kv_projections(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """``[(attention module name, W_k, W_v)]`` in module order (= the model's layer order).

    A module qualifies when it has two children named as in ``PROJECTION_NAMES`` that own a
    ``weight`` parameter. ``ValueError`` naming what was searched when none is found (fused QKV
    projections such as ``qkv_proj``, ``c_attn`` or ``query_key_value`` are not split).
    """
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        for key_name, value_name in PROJECTION_NAMES:
            key, value = children.get(key_name), children.get(value_name)
            key_w = getattr(key, "weight", None)
            value_w = getattr(value, "weight", None)
            if isinstance(key_w, torch.nn.Parameter) and isinstance(value_w, torch.nn.Parameter):
                found.append((name, key_w, value_w))
                break
    if not found:
        searched = ", ".join(f"{k}/{v}" for k, v in PROJECTION_NAMES)
        raise ValueError(
            f"no key/value projections found in {type(model).__name__}: looked for a module with child "
            f"modules named {searched} (each with a .weight parameter); fused QKV projections (qkv_proj, "
            "c_attn, query_key_value) are not supported"
        )
    return found


def profile_layers(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    label_shift: int = 1,
    max_length: int = 1024,
    progress: bool = True,
) -> dict[str, list[float]]:
    """KVmix scores ``{"key": [s_k per layer], "value": [s_v per layer]}`` averaged over ``prompts``.

    Args:
        model: a causal LM returning ``.logits``; its parameters are left as they were (only the key
            and value projection weights require grad during the passes).
        prompts: token-id tensors ``[T]`` or ``[1, T]`` (each truncated to ``max_length``).
        label_shift: tokens ahead predicted by the loss; 1 is the standard shift, 2 the official code's.
    """
    if label_shift < 1:
        raise ValueError(f"label_shift={label_shift}: expected 1 (standard) or more")
    projections = find_kv_projections(model)
    saved = {id(p): p.requires_grad for p in model.parameters()}
    weights = [w for _, k, v in projections for w in (k, v)]
    sums = torch.zeros(len(projections), 2, dtype=torch.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="mixkvq-profile", unit="prompt", file=sys.stderr)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        device = weights[0].device
        for ids in prompts:
            ids = ids.reshape(1, -1)[:, :max_length].to(device)
            if ids.shape[1] <= label_shift:
                raise ValueError(f"a calibration prompt has {ids.shape[1]} tokens; need > {label_shift}")
            for w in weights:
                w.grad = None
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(
                    logits[0, :-label_shift].float(), ids[0, label_shift:], reduction="mean"
                )
                loss.backward()
            for layer, (_, k, v) in enumerate(projections):
                sums[layer, 0] += k.grad.double().norm()
                sums[layer, 1] += v.grad.double().norm()
            if bar is not None:
                bar.update(1)
    finally:
        for w in weights:
            w.grad = None
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        if bar is not None:
            bar.close()
    means = sums / max(len(prompts), 1)
    return {"key": means[:, 0].tolist(), "value": means[:, 1].tolist()}


def _high_layers(scores: Sequence[float], target: float, levels: tuple[float, float]) -> list[int]:
    """Indices of the layers that get ``levels[0]``: the most, by score, that keep the mean <= target."""
    high, low = levels
    count = len(scores)
    if high == low:
        return []
    n_high = max(0, min(count, math.floor((target - low) * count / (high - low) + 1e-9)))
    ranked = sorted(range(count), key=lambda i: -scores[i])
    return sorted(ranked[:n_high])


def kvmix_plan_from_scores(
    scores: dict[str, list[float]],
    key_bits: float,
    value_bits: float,
    key_levels: tuple[float, float] = (4.0, 2.0),
    value_levels: tuple[int, int] = (4, 2),
    residual_levels: tuple[int, int] | None = None,
    rpc_levels: tuple[float, float] | None = None,
) -> dict:
    """A layer plan meeting mean key/value widths: the top layers by score get the high level.

    ``key_levels`` are per-layer ``key_bits_budget`` values (4.0/2.0: uniform 4-bit or 2-bit keys, for
    a ``uniform`` base config; e.g. 3.0/2.3 for MixKVQ tiers inside each layer); ``value_levels``
    per-layer ``value_bits``. KVmix's code makes the top 10% + 10% of layers high (paper: "top 20%");
    here the number follows from the budget: ``floor((target - low) * L / (high - low))`` layers.
    ``residual_levels`` (high, low): per-layer ``residual_length`` by the key ranking (optional).
    ``rpc_levels`` (high, low): per-layer ``rpc_ratio``, high where the key or the value width is high
    (optional; KVmix's paper: (0.2, 0.1)).
    """
    layers = len(scores["key"])
    key_high = set(_high_layers(scores["key"], key_bits, key_levels))
    value_high = set(_high_layers(scores["value"], value_bits, value_levels))
    overrides = {}
    for layer in range(layers):
        fields = {
            "key_bits_budget": float(key_levels[0] if layer in key_high else key_levels[1]),
            "value_bits": int(value_levels[0] if layer in value_high else value_levels[1]),
        }
        if residual_levels is not None:
            fields["residual_length"] = int(residual_levels[0] if layer in key_high else residual_levels[1])
        if rpc_levels is not None:
            high = layer in key_high or layer in value_high
            fields["rpc_ratio"] = float(rpc_levels[0] if high else rpc_levels[1])
        overrides[str(layer)] = fields
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "method": "kvmix-gradient-norm",
        "budget": {
            "key_bits": key_bits,
            "value_bits": value_bits,
            "key_levels": list(key_levels),
            "value_levels": list(value_levels),
            "mean_key_bits": sum(o["key_bits_budget"] for o in overrides.values()) / max(layers, 1),
            "mean_value_bits": sum(o["value_bits"] for o in overrides.values()) / max(layers, 1),
            "high_key_layers": sorted(key_high),
            "high_value_layers": sorted(value_high),
        },
        "scores": scores,
        "layer_overrides": overrides,
    }


def write_plan(plan: dict, path: str | os.PathLike) -> None:
    """Write a plan as JSON (readable by ``MixKVQConfig(layer_plan=path)``)."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(plan, file, indent=1)
        file.write("\n")


# -- MixKVQ thresholds -> per-layer tier sizes -----------------------------------------------------


@torch.no_grad()
def calibrate_thresholds(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    thresholds: tuple[float, float],
    group_size: int = 32,
) -> dict:
    """Per-layer tier sizes for MixKVQ's absolute thresholds ``(tau_high, tau_mid)``: a layer plan.

    Runs the prompts through ``model`` with an attention function that sees the post-RoPE queries and
    keys (registered through transformers' ``AttentionInterface``; the model must use it). For every
    layer, KV head and block of ``group_size`` tokens: I_d = mean |q_d| over the query heads of the KV
    head and over every token of the prompt (the store's running mean at the end of the prompt),
    S_d = (max - min) / 3 of k_d over the block, A_d = I_d * S_d. The plan's ``key_tier_fractions`` per
    layer are the mean shares of channels with A_d > tau_high and tau_mid < A_d <= tau_high.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    counts: dict[int, list[torch.Tensor]] = {}
    tau_high, tau_mid = thresholds

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        b, hq, t, d = query.shape
        h = key.shape[1]
        importance = query.float().abs().reshape(b, h, hq // h, t, d).mean(dim=(2, 3))  # [B, H, D]
        blocks = t // group_size
        if blocks:
            k = key.float()[:, :, : blocks * group_size].reshape(b, h, blocks, group_size, d)
            step = (k.amax(3) - k.amin(3)) / 3.0
            salience = importance[:, :, None] * step
            high = (salience > tau_high).float().mean()
            mid = ((salience > tau_mid) & (salience <= tau_high)).float().mean()
            counts.setdefault(layer, []).append(torch.stack([high, mid]))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mixkvq_calibrate", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("mixkvq_calibrate")
    try:
        for ids in prompts:
            model(input_ids=ids.reshape(1, -1), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    if not counts:
        raise ValueError(
            "calibrate_thresholds: no attention call was captured (prompts shorter than a group?)"
        )
    layers = sorted(k for k in counts if k is not None)
    overrides = {}
    for index, layer in enumerate(layers):
        high, mid = torch.stack(counts[layer]).mean(0).tolist()
        overrides[str(index)] = {"key_tier_fractions": [high, min(mid, 1.0 - high)]}
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "method": "mixkvq-threshold-calibration",
        "thresholds": list(thresholds),
        "layer_overrides": overrides,
    }


# -- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``mixkvq-profile``: profile SmolLM2-135M (or ``--model`` folder) and write a KVmix plan."""
    parser = argparse.ArgumentParser(prog="mixkvq-profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON plan to write")
    parser.add_argument("--model", default=None, help="a transformers model folder (default: SmolLM2-135M)")
    parser.add_argument("--text", default=None, help="calibration text file (default: Python's LICENSE.txt)")
    parser.add_argument("--prompts", type=int, default=4, help="calibration prompts cut from the text")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per prompt (KVmix: 1024)")
    parser.add_argument("--key-bits", type=float, default=2.4, help="mean key bits over layers")
    parser.add_argument("--value-bits", type=float, default=2.4, help="mean value bits over layers")
    parser.add_argument("--key-levels", type=float, nargs=2, default=(4.0, 2.0), metavar=("HIGH", "LOW"))
    parser.add_argument("--value-levels", type=int, nargs=2, default=(4, 2), metavar=("HIGH", "LOW"))
    parser.add_argument("--residual-levels", type=int, nargs=2, default=None, metavar=("HIGH", "LOW"))
    parser.add_argument(
        "--rpc-levels",
        type=float,
        nargs=2,
        default=None,
        metavar=("HIGH", "LOW"),
        help="per-layer rpc_ratio (KVmix's recent pivotal context; paper: 0.2 0.1)",
    )
    parser.add_argument("--label-shift", type=int, default=1, help="2 reproduces the official code")
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs=2,
        default=None,
        metavar=("TAU_HIGH", "TAU_MID"),
        help="instead of KVmix: calibrate MixKVQ threshold tier sizes per layer",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from .evaluate import license_text

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    else:
        from .models import load_smollm2

        model, tokenizer = load_smollm2()
    text = pathlib.Path(args.text).read_text(encoding="utf-8") if args.text else license_text()[:8000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    prompts = [ids[i * args.max_length : (i + 1) * args.max_length] for i in range(args.prompts)]
    prompts = [p for p in prompts if p.numel() > args.label_shift]
    if args.thresholds:
        plan = calibrate_thresholds(model, prompts, tuple(args.thresholds))
    else:
        scores = profile_layers(
            model,
            prompts,
            label_shift=args.label_shift,
            max_length=args.max_length,
            progress=not args.no_progress,
        )
        plan = kvmix_plan_from_scores(
            scores,
            args.key_bits,
            args.value_bits,
            tuple(args.key_levels),
            tuple(args.value_levels),
            tuple(args.residual_levels) if args.residual_levels else None,
            tuple(args.rpc_levels) if args.rpc_levels else None,
        )
    write_plan(plan, args.out)
    print(json.dumps(plan.get("budget", plan.get("thresholds")), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
