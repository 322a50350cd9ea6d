"""Pure-PyTorch quantization and attention: the test oracle and the CPU path.

Conventions (shared with the Triton kernels):
- Asymmetric min-max quantization with ``bits`` in {2, 4}: ``code = clamp(round((x - zero) / scale),
  0, 2**bits - 1)`` and ``x_hat = code * scale + zero``. ``scale`` and ``zero`` are stored in float16;
  ``zero`` is the group minimum rounded *down* to float16 so that every element is at most half a
  step from its reconstruction.
- Packing puts ``8 // bits`` codes in each uint8 along the last dimension, element ``i`` of a byte at
  bit offset ``(i % (8 // bits)) * bits`` (little-endian within the byte).
- *Planar* packing (2-bit codes only, the layout of uniform 2-bit stores, see ``store.py``) puts 8
  codes in each int16 word: of ``N`` codes, word ``j`` holds code ``j + f * N / 8`` in bits ``2f, 2f+1``
  (``f = 0..7``), so every bit field of a row of words is a contiguous run of ``N / 8`` codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKABLE_BITS = (2, 4)


def choose_qparams(x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 (scale, zero) of groups with the given minima and maxima.

    Args:
        x_min, x_max: float tensors of any equal shape, the minimum and maximum of each group.
        bits: code width, 2 or 4.

    Returns:
        (scale, zero), float16, the shape of ``x_min``. ``zero <= x_min`` exactly.
    """
    _check_bits(bits)
    x_min = x_min.float()
    zero = x_min.to(torch.float16)
    too_high = zero.float() > x_min
    zero = torch.where(too_high, torch.nextafter(zero, torch.full_like(zero, float("-inf"))), zero)
    scale = ((x_max.float() - zero.float()) / (2**bits - 1)).to(torch.float16)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``x`` (any float dtype); ``scale``/``zero`` broadcast against ``x``."""
    _check_bits(bits)
    scale = scale.float()
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = torch.round((x.float() - zero.float()) * inverse)
    return codes.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 reconstruction ``codes * scale + zero`` (scale/zero broadcast against codes)."""
    return codes.float() * scale.float() + zero.float()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., N]`` (N divisible by 8 // bits) into uint8 ``[..., N * bits // 8]``."""
    _check_bits(bits)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"pack: last dim {codes.shape[-1]} is not a multiple of {per_byte}")
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[..., M]`` to uint8 codes ``[..., M * 8 // bits]``."""
    _check_bits(bits)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def pack_planar(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit uint8 codes ``[..., N]`` (N divisible by 8) into int16 words ``[..., N // 8]``."""
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"pack_planar: last dim {n} is not a multiple of 8")
    fields = codes.to(torch.int32).reshape(*codes.shape[:-1], 8, n // 8)
    shifts = (torch.arange(8, device=codes.device, dtype=torch.int32) * 2).view(8, 1)
    words = (fields << shifts).sum(dim=-2)
    return torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)


def unpack_planar(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_planar``: int16 ``[..., M]`` to uint8 codes ``[..., 8 * M]``."""
    shifts = (torch.arange(8, device=words.device, dtype=torch.int32) * 2).view(8, 1)
    fields = (words.to(torch.int32).unsqueeze(-2) >> shifts) & 3
    return fields.reshape(*words.shape[:-1], -1).to(torch.uint8)


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack along the last dimension: each row of ``x [..., N]`` is one group.

    Returns:
        packed uint8 ``[..., N * bits // 8]`` and float16 qparams ``[..., 2]`` (scale, zero).
    """
    x = x.float()
    scale, zero = choose_qparams(x.amin(dim=-1), x.amax(dim=-1), bits)
    codes = quantize(x, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return pack(codes, bits), torch.stack([scale, zero], dim=-1)


def dequantize_groups(packed: torch.Tensor, qparams: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``quantize_groups``: float32 ``[..., N]``."""
    codes = unpack(packed, bits)
    return dequantize(codes, qparams[..., 0:1], qparams[..., 1:2])


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    causal_start: int | None,
) -> torch.Tensor:
    """Grouped-query attention of a chunk of queries over keys/values at positions 0..S-1.

    Args:
        query: ``[B, Hq, Lq, D]``.
        key, value: ``[B, Hkv, S, D]`` and ``[B, Hkv, S, Dv]``; ``Hq`` is a multiple of ``Hkv``.
        attn_mask: bool (True = attend) or additive float mask broadcastable to ``[B, Hq, Lq, S]``,
            or None.
        scale: softmax scale.
        causal_start: if not None, query ``i`` sits at position ``causal_start + i`` and attends
            only to keys at positions ``<= causal_start + i``.

    Returns:
        ``[B, Hq, Lq, Dv]`` in ``query.dtype`` (computed like eager SDPA, in the input dtype).
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if causal_start is not None:
        q_pos = torch.arange(query.shape[2], device=query.device) + causal_start
        causal = torch.arange(key.shape[2], device=query.device) <= q_pos[:, None]
        attn_mask = causal if attn_mask is None else _combine_masks(attn_mask, causal)
    return F.scaled_dot_product_attention(
        query, key.to(query.dtype), value.to(query.dtype), attn_mask=attn_mask, scale=scale
    )


def _combine_masks(mask: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & causal
    return mask + torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(~causal, float("-inf"))


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits!r}: packed codes support {PACKABLE_BITS}")
