"""How much MixKVQ's per-group choice of 16- and 4-bit key channels varies, on a real model (CPU).

    python3 bench/channel_stability.py                  # SmolLM2-135M, 2048 prompt tokens of real text
    python3 bench/channel_stability.py --tokens 1024 --first 256

The question behind it: the decode kernel gathers the query at each packed group's own 16- and 4-bit
channels, which costs it about a third more instructions per group than kivi2 (``docs/performance.md``).
A set of channels fixed per KV head would let it gather once per program. This measures what that
would cost in accuracy, before anyone builds it.

The prompt's post-RoPE keys and queries are recorded per layer (an attention function registered
through transformers' ``AttentionInterface``) and split into groups of 32 tokens. Per group, channels
are ranked as ``KVStore._choose_key_order`` ranks them: ``A_d = I_d * S_d``, ``I_d`` the mean ``|q_d|`` of
the queries up to the group's end, ``S_d`` the 2-bit step of channel d over the group; the first
channels go to the 16-bit tier, the next to the 4-bit tier, the rest to 2 bits (MixKVQ's default
fractions). Against that, fixed choices per KV head: the channels of highest mean ``A_d`` over the
whole prompt; over its first ``--first`` tokens only (what a store could fix after a prefill); and per
block of ``--block`` tokens, each block's from the mean ``A_d`` of the block before it (the first block
keeps the per-group choice), which a kernel could gather once per block.

Printed per layer, averaged over KV heads:
- ``hi in fixed``: the fraction of each group's 16-bit channels that the fixed set (whole prompt)
  also holds as 16-bit; ``hi+mid in fixed``: the same for the 16- and 4-bit channels together;
- ``score err``: ``||Q (K - K_hat)|| / ||Q K||`` over all the head's queries and keys (causal pairs
  or not: all), ``K_hat`` the keys quantized per group with each choice of tiers (16-bit channels
  kept, 4- and 2-bit channels asymmetric per channel over the group, ``reference.choose_qparams``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mixkvq_compile import reference  # noqa: E402
from mixkvq_compile.config import PRESETS  # noqa: E402
from mixkvq_compile.models import load_smollm2  # noqa: E402
from mixkvq_compile.store import StoreLayout  # noqa: E402

G = 32


def record_prompt(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (queries ``[Hq, N, D]``, keys ``[Hkv, N, D]``) float32 of a prompt of real text."""
    import pydoc_data.topics

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorded = []

    def record(module, query, key, value, attention_mask, **kwargs):
        recorded.append((query[0].detach().float(), key[0].detach().float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("record_sdpa", record)
    model, tokenizer = load_smollm2(torch.float32, "cpu")
    model.config._attn_implementation = "record_sdpa"
    text = " ".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"only {ids.shape[1]} tokens of text available, asked for {tokens}")
    with torch.no_grad():
        model(ids, use_cache=False)
    return recorded


def group_salience(q: torch.Tensor, k: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``A [Hkv, n, D]`` per group: mean |q_d| of the KV head's queries up to the group's end times the
    group's 2-bit step of channel d."""
    hkv, n_tok, d = k.shape
    n = n_tok // G
    q_abs = q.abs().reshape(hkv, n_rep, n_tok, d).sum(dim=1)  # [Hkv, N, D]
    seen = q_abs.cumsum(dim=1)[:, G - 1 :: G] / (n_rep * torch.arange(1, n + 1)[None, :, None] * G)
    groups = k[:, : n * G].reshape(hkv, n, G, d)
    step = (groups.amax(dim=2) - groups.amin(dim=2)) / 3.0
    return seen * step


def tiers_per_group(salience: torch.Tensor, high: int, mid: int) -> torch.Tensor:
    """Bits ``[Hkv, n, D]`` of every channel: 16 for the ``high`` most salient, 4 for the next ``mid``."""
    order = torch.argsort(salience, dim=-1, descending=True, stable=True)
    bits = torch.full_like(salience, 2.0)
    bits.scatter_(-1, order[..., :high], 16.0)
    bits.scatter_(-1, order[..., high : high + mid], 4.0)
    return bits


def quantize_keys(k: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keys ``[Hkv, n * G, D]`` quantized per group and channel at ``bits [Hkv, n, D]``."""
    hkv, n_tok, d = k.shape
    groups = k.reshape(hkv, n_tok // G, G, d)
    lo, hi = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)
    out = groups.clone()
    for b in (2, 4):
        scale, zero = reference.choose_qparams(lo, hi, b)
        deq = reference.dequantize(reference.quantize(groups, scale, zero, b), scale, zero)
        out = torch.where((bits == b)[:, :, None, :], deq, out)
    return out.reshape(hkv, n_tok, d)


def score_error(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor, n_rep: int) -> float:
    hkv = k.shape[0]
    qh = q.reshape(hkv, n_rep * q.shape[1], q.shape[2])
    exact = qh @ k.transpose(1, 2)
    return ((qh @ k_hat.transpose(1, 2) - exact).norm() / exact.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (a multiple of 32)")
    parser.add_argument("--first", type=int, default=512, help="tokens the early fixed choice sees")
    parser.add_argument("--block", type=int, default=512, help="tokens per block of the per-block choice")
    args = parser.parse_args()
    if args.tokens % G or args.first % G or args.block % G or not 0 < args.first <= args.tokens:
        parser.error(f"--tokens, --first and --block must be multiples of {G}, 0 < first <= tokens")
    layers = record_prompt(args.tokens)
    d = layers[0][1].shape[-1]
    lay = StoreLayout.create(PRESETS["mixkvq"], 1, 1, args.tokens + 64, d, d, torch.float16)
    high, mid = lay.key_channels[:2]
    print(
        f"SmolLM2-135M, {args.tokens} prompt tokens, groups of {G}, head_dim {d}: {high} 16-bit and {mid} "
        f"4-bit key channels per group (MixKVQ default); fixed choices from the whole prompt and its first "
        f"{args.first} tokens, and per {args.block}-token block from the block before"
    )
    print(
        f"{'layer':>5} {'hi in fixed':>11} {'hi+mid in fixed':>15} "
        f"{'score err: per group':>20} {'fixed (all)':>11} {'fixed (first)':>13} {'per block':>9} "
        f"{'all 2-bit':>9}"
    )
    totals = torch.zeros(7)
    for index, (q, k) in enumerate(layers):
        n_rep = q.shape[0] // k.shape[0]
        salience = group_salience(q, k, n_rep)  # [Hkv, n, D]
        per_group = tiers_per_group(salience, high, mid)
        fixed_all = tiers_per_group(salience.mean(dim=1, keepdim=True), high, mid).expand_as(per_group)
        early = salience[:, : args.first // G].mean(dim=1, keepdim=True)
        fixed_first = tiers_per_group(early, high, mid).expand_as(per_group)
        per_block = per_group.clone()
        nb = args.block // G
        for start in range(nb, per_group.shape[1], nb):
            previous = salience[:, start - nb : start].mean(dim=1, keepdim=True)
            per_block[:, start : start + nb] = tiers_per_group(previous, high, mid)
        hi_kept = ((per_group == 16) & (fixed_all == 16)).sum() / (per_group == 16).sum()
        both_kept = ((per_group > 2) & (fixed_all > 2)).sum() / (per_group > 2).sum()
        errors = [
            score_error(q, k, quantize_keys(k, bits), n_rep)
            for bits in (per_group, fixed_all, fixed_first, per_block, torch.full_like(per_group, 2.0))
        ]
        row = torch.tensor([hi_kept.item(), both_kept.item(), *errors])
        totals += row
        print(
            f"{index:>5} {row[0]:>11.2f} {row[1]:>15.2f} {row[2]:>20.4f} {row[3]:>11.4f} {row[4]:>13.4f} "
            f"{row[5]:>9.4f} {row[6]:>9.4f}"
        )
    mean = totals / len(layers)
    print(
        f"{'mean':>5} {mean[0]:>11.2f} {mean[1]:>15.2f} {mean[2]:>20.4f} {mean[3]:>11.4f} {mean[4]:>13.4f} "
        f"{mean[5]:>9.4f} {mean[6]:>9.4f}"
    )


if __name__ == "__main__":
    main()
