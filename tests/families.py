"""Tiny random-weight models of many transformers families (and a gpt-fast-style model) for the
coverage matrix, the state tests and the bad-input tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 128


def _build(config_cls, model_cls, seed: int, dtype: torch.dtype, attn: str, **fields):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, **fields)
    config._attn_implementation = attn
    return model_cls(config).to(dtype).eval()


def llama(seed=0, dtype=torch.float32, attn="sdpa", layers=1, heads=4, kv_heads=2, head_dim=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(
        LlamaConfig,
        LlamaForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
    )


def mistral(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import MistralConfig, MistralForCausalLM

    return _build(
        MistralConfig,
        MistralForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=48,
        max_position_embeddings=512,
    )


def qwen2(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(
        Qwen2Config,
        Qwen2ForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def qwen3(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(
        Qwen3Config,
        Qwen3ForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )


def phi3(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import Phi3Config, Phi3ForCausalLM

    return _build(
        Phi3Config,
        Phi3ForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )


def gpt_neox(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return _build(
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=512,
    )


def gpt2(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    return _build(
        GPT2Config, GPT2LMHeadModel, seed, dtype, attn, n_embd=128, n_layer=1, n_head=4, n_positions=512
    )


def falcon(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import FalconConfig, FalconForCausalLM

    return _build(
        FalconConfig,
        FalconForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        bias=False,
        alibi=False,
        max_position_embeddings=512,
    )


def opt(seed=0, dtype=torch.float32, attn="sdpa"):
    from transformers import OPTConfig, OPTForCausalLM

    return _build(
        OPTConfig,
        OPTForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        word_embed_proj_dim=128,
        max_position_embeddings=512,
        pad_token_id=0,
    )


def llama_d256(seed=0, dtype=torch.float32, attn="sdpa"):
    return llama(seed, dtype, attn, heads=2, kv_heads=1, head_dim=256)


def qwen2_mixed_window(seed=0, dtype=torch.float32, attn="sdpa"):
    """Qwen2 with one sliding-window layer and one full-attention layer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(
        Qwen2Config,
        Qwen2ForCausalLM,
        seed,
        dtype,
        attn,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_sliding_window=True,
        sliding_window=48,
        layer_types=["sliding_attention", "full_attention"],
    )


FAMILIES = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "phi3": phi3,
    "gpt_neox": gpt_neox,
    "gpt2": gpt2,
    "falcon": falcon,
    "opt": opt,
    "llama_d256": llama_d256,
    "qwen2_mixed_window": qwen2_mixed_window,
}


# -- a hand-written gpt-fast-style model ---------------------------------------------------------


class KVCache(nn.Module):
    """gpt-fast's cache: registered buffers written with ``k_cache[:, :, input_pos] = k``.

    ``lazy=True`` leaves the buffers empty until the first forward allocates them (inside the compiled
    graph when the forward is compiled): the supported way to give mixkvq the cache memory.
    """

    def __init__(self, batch, heads, length, head_dim, dtype, lazy=False):
        super().__init__()
        self.shape, self.dtype = (batch, heads, length, head_dim), dtype
        self.register_buffer("k_cache", None if lazy else torch.zeros(self.shape, dtype=dtype))
        self.register_buffer("v_cache", None if lazy else torch.zeros(self.shape, dtype=dtype))

    def update(self, input_pos, k, v):
        if self.k_cache is None:
            self.k_cache = torch.zeros(self.shape, dtype=self.dtype, device=k.device)
            self.v_cache = torch.zeros(self.shape, dtype=self.dtype, device=k.device)
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k
        v_out[:, :, input_pos] = v
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache = None

    def forward(self, x, freqs, mask, input_pos):
        b, t, _ = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * self.head_dim, kv, kv], dim=-1)
        q = apply_rotary(q.view(b, t, self.heads, self.head_dim), freqs).transpose(1, 2)
        k = apply_rotary(k.view(b, t, self.kv_heads, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_cache.update(input_pos, k, v)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(b, t, -1))


def apply_rotary(x, freqs):
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = freqs[..., 0].view(1, xs.size(1), 1, -1), freqs[..., 1].view(1, xs.size(1), 1, -1)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.attention = Attention(dim, heads, kv_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.n1, self.n2 = nn.RMSNorm(dim), nn.RMSNorm(dim)

    def forward(self, x, freqs, mask, input_pos):
        h = x + self.attention(self.n1(x), freqs, mask, input_pos)
        return h + self.ffn(self.n2(h))


class GptFast(nn.Module):
    """gpt-fast's ``Transformer``: ``setup_caches`` then ``forward(idx, input_pos)``."""

    def __init__(self, layers=1, dim=128, heads=4, kv_heads=2, vocab=VOCAB):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm, self.out = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads

    def setup_caches(self, batch, length, dtype=torch.float32, lazy=False):
        for block in self.layers:
            block.attention.kv_cache = KVCache(batch, self.kv_heads, length, self.head_dim, dtype, lazy)
        half = self.head_dim // 2
        angles = torch.outer(torch.arange(length).float(), 1.0 / 10000 ** (torch.arange(half).float() / half))
        self.register_buffer("freqs", torch.stack([angles.cos(), angles.sin()], -1), persistent=False)
        self.register_buffer(
            "causal", torch.tril(torch.ones(length, length, dtype=torch.bool)), persistent=False
        )

    def forward(self, idx, input_pos):
        mask = self.causal[None, None, input_pos]
        freqs = self.freqs[input_pos]
        x = self.tok(idx)
        for block in self.layers:
            x = block(x, freqs, mask, input_pos)
        return self.out(self.norm(x))


def gpt_fast(seed=0, dtype=torch.float32, layers=1):
    torch.manual_seed(seed)
    return GptFast(layers=layers).to(dtype).eval()


@torch.no_grad()
def gpt_fast_generate(model, forward, prompt, new_tokens, lazy=False):
    """Greedy gpt-fast generation with ``forward`` (eager or compiled); returns (tokens, step logits)."""
    batch, length = prompt.shape
    model.setup_caches(batch, length + new_tokens, dtype=model.tok.weight.dtype, lazy=lazy)
    logits = forward(prompt, torch.arange(length))[:, -1]
    tokens, steps = [logits.argmax(-1)], [logits]
    for pos in range(length, length + new_tokens - 1):
        logits = forward(tokens[-1][:, None], torch.tensor([pos]))[:, -1]
        tokens.append(logits.argmax(-1))
        steps.append(logits)
    return torch.cat([prompt, torch.stack(tokens, 1)], 1), torch.stack(steps, 1)
