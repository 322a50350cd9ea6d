"""A runtime check for attention that stays unquantized over a cache buffer passed into the graph.

Such a buffer is legitimate when it holds real 16-bit tokens (an eager prefill, gpt-fast-style module
buffers). It is not when it was derived from a mixkvq store handle: transformers' beam search
reorders a cache with ``keys.index_select(0, beam_idx)``, which turns the zero-stride handle into a
plain tensor filled with one repeated scratch value and drops every quantized token. Attention over
that would be silently wrong, so ``mixkvq::check_cache`` raises instead. The check reads the cached
positions once per buffer object (buffers that passed are remembered weakly).
"""

from __future__ import annotations

import weakref

import torch

_checked: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> buffer


@torch.library.custom_op("mixkvq::check_cache", mutates_args=())
def check_cache(key_buffer: torch.Tensor, positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A zero scalar of ``like``'s dtype; raises ``RuntimeError`` if the ``positions[0]`` tokens before
    the write are all one repeated value (the remains of a reordered mixkvq store).

    Args:
        key_buffer: ``[B, H, L, D]`` the plain cache buffer the attention reads.
        positions: ``[Lq]`` int cache positions of the tokens written in this step.
        like: any tensor; the result has its dtype and device (added to the query: a data dependency).
    """
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    if _checked.get(id(key_buffer)) is key_buffer or positions.numel() == 0:
        return zero
    start = int(positions.reshape(-1)[0])
    if start <= 1:
        return zero
    past = key_buffer[:, :, :start]
    first = past.reshape(-1)[0]
    if bool((past == first).all()):
        raise RuntimeError(
            "mixkvq: an attention reads a plain cache buffer whose cached tokens are all one repeated "
            "value: the mixkvq store behind it was copied or reordered (e.g. beam search, num_beams > 1, "
            "reorders the cache with index_select), which drops the quantized tokens. mixkvq does not "
            "support cache reordering: generate with num_beams=1, or run this model without "
            "backend='mixkvq'."
        )
    _checked[id(key_buffer)] = key_buffer
    return zero


@check_cache.register_fake
def _(key_buffer, positions, like):
    return like.new_empty(())
