"""Tiny random-weight models and generation helpers for the end-to-end tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tiny_llama(
    heads: int,
    kv_heads: int,
    head_dim: int,
    layers: int = 2,
    vocab: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def left_padded_batch(vocab: int, batch: int, length: int, pads: list[int], seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def generate(model, ids, mask, new_tokens: int, forced: torch.Tensor | None = None):
    """Greedy static-cache generation; returns (tokens [B, P + new], step logits [B, new, V]).

    ``forced [B, P + new]``: feed these tokens instead of the greedy ones (the logits returned are still
    the model's own), so that two runs are compared step by step on the same prefixes."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceTokens(LogitsProcessor):
        def __call__(self, input_ids, scores):
            chosen = forced[:, input_ids.shape[1]].to(scores.device)
            return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)

    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
        logits_processor=LogitsProcessorList([ForceTokens()]) if forced is not None else None,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def teacher_forced_logits(eager_forward, sequences, mask, prompt_len: int) -> torch.Tensor:
    """Eager 16-bit-cache logits for the prefixes the compiled run saw: ``[B, new, V]``."""
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, prompt_len:])], dim=1)
    with torch.no_grad():
        logits = eager_forward(input_ids=sequences, attention_mask=full_mask).logits
    return logits[:, prompt_len - 1 : -1].float()


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over steps and rows of KL(reference || candidate) of next-token distributions."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    cand = F.log_softmax(logits.float(), dim=-1)
    return float((ref.exp() * (ref - cand)).sum(-1).mean())
