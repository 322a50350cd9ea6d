"""Attention of a long prompt chunk over its prefix without a mask tensor.

A chunk of ``Lq`` queries at positions ``P .. P + Lq - 1`` under the plain causal rule sees every one of
the ``P`` prefix keys and the chunk's keys up to its own position. ``attend_split`` computes that as two
mask-free attentions, each returning its log-sum-exp, and merges them:

- the prefix: every query against keys ``0 .. P - 1`` (no mask);
- the chunk: causal attention of the chunk over itself (a square causal problem, which flash and
  cuDNN kernels run without a mask and skipping the tiles above the diagonal);
- merged per query row: ``out = w * out_prefix + (1 - w) * out_chunk`` with
  ``w = sigmoid(lse_prefix - lse_chunk)``, the prefix's share of the softmax mass.

The mask transformers passes for a chunk is ``[B, 1, Lq, capacity]`` booleans; SDPA turns it into an
additive bias and reads it in every call. ``is_plain_causal`` tells when it says nothing beyond the
causal rule (no padding), so the caller may use ``attend_split`` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attend_split", "is_plain_causal", "supports_split"]

# (backend, dtype, head dims, causal) combinations that raised here; not tried again.
_FAILED: set[tuple] = set()


def supports_split(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``attend_split`` takes these shapes and dtype: always on the CPU (float32 reference); on
    the GPU half precision with equal key and value head dims of at most 256, a multiple of 8, which
    flash attention takes when cuDNN does not."""
    if not query.is_cuda:
        return True
    d = query.shape[-1]
    return query.dtype in (torch.float16, torch.bfloat16) and value.shape[-1] == d and d % 8 == 0 and d <= 256


def is_plain_causal(mask: torch.Tensor, start: int, total: int) -> bool:
    """True when the bool ``mask`` ``[B | 1, H | 1, Lq, >= total]`` restricted to its first ``total``
    columns is exactly the causal rule for queries at positions ``start .. start + Lq - 1``
    (``total = start + Lq``). Reads the mask once, one batch row at a time (host sync)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] < total:
        return False
    lq = mask.shape[2]
    keys = torch.arange(total, device=mask.device)
    causal = keys[None, :] <= (start + torch.arange(lq, device=mask.device))[:, None]
    return all(torch.equal(row[..., :total], causal.expand(row.shape[:-1] + (total,))) for row in mask)


def _lse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Lq, Dv] in query.dtype, lse [B, Hq, Lq] float32, natural log)`` of attention with
    grouped-query heads (query head h reads KV head ``h // (Hq / H)``), causal from the top left."""
    if not query.is_cuda:
        return _math_lse_attention(query, key, value, causal, scale)
    if not supports_split(query, key, value):
        raise ValueError(
            f"mixkvq: split attention on the GPU takes float16/bfloat16 and equal head dims <= 256, not "
            f"{query.dtype} with head dims {query.shape[-1]}/{value.shape[-1]}"
        )
    for backend in ("cudnn", "flash"):
        combo = (backend, query.dtype, query.shape[-1], causal)
        if combo in _FAILED:
            continue
        try:
            if backend == "cudnn":
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    query, key, value, None, True, 0.0, causal, False, scale=scale
                )
            else:
                res = torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, 0.0, causal, False, scale=scale
                )
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # this backend does not take these inputs here: the next one
            _FAILED.add(combo)
            continue
        return res[0], res[1].reshape(query.shape[:3]).float()
    raise RuntimeError(f"mixkvq: neither cuDNN nor flash attention returned a log-sum-exp for {combo[1:]}")


def _math_lse_attention(query, key, value, causal, scale):
    """``_lse_attention`` in float32 with the scores in memory (the CPU path; small problems)."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(n_rep, 1)
    v = value.float().repeat_interleave(n_rep, 1)
    scores = query.float() @ k.transpose(-1, -2) * scale
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(
            torch.ones(lq, lk, dtype=torch.bool, device=scores.device).triu(1), -torch.inf
        )
    lse = torch.logsumexp(scores, -1)
    return (torch.softmax(scores, -1) @ v).to(query.dtype), lse


def attend_split(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """Causal attention of ``query`` ``[B, Hq, Lq, D]`` (positions ``start ..``) over ``keys`` /
    ``values`` ``[B, H, start + Lq, D | Dv]`` (the prefix, then the chunk): ``[B, Hq, Lq, Dv]``."""
    if start == 0:
        return F.scaled_dot_product_attention(
            query, keys, values, scale=scale, is_causal=True, enable_gqa=True
        )
    out_p, lse_p = _lse_attention(query, keys[:, :, :start], values[:, :, :start], False, scale)
    out_c, lse_c = _lse_attention(query, keys[:, :, start:], values[:, :, start:], True, scale)
    share = torch.sigmoid(lse_p - lse_c).unsqueeze(-1)  # the prefix's part of the softmax mass
    return torch.lerp(out_c.float(), out_p.float(), share).to(query.dtype)
