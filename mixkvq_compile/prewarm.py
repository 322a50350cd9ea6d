"""Compile a decode graph's attention kernels in a background thread while Inductor compiles the graph.

The first run of a compiled decode step JIT-compiles its Triton kernels, the planar decode kernel
taking 10-15 s of an 8B-shaped model's first call on an H200 (``bench/compile_profile.py``, session
14). Inductor compiles the same graph for about as long just before, mostly in Python code that
leaves Triton's C++ passes and ptxas free to run: measured offline (Triton 3.6, sm_90), a thread
compiling the decode kernels left a busy Python thread its full speed. So ``start`` launches each
distinct ``decode_attention`` call of the graph once, in a thread, over the layer's real store (it
only reads it) and stand-ins for the step's other tensors (same shapes, strides and dtypes, so the
same Triton specialization), and ``join_before_first_call`` makes the compiled graph wait for that
thread before its first run. A failure in the thread is logged and changes nothing: the first run
then compiles as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

import torch

from .passes.rewrite import fake_tensor
from .store import KVStore, StoreLayout

log = logging.getLogger("mixkvq_compile")


def decode_calls(gm: torch.fx.GraphModule, example_inputs: list) -> list[dict]:
    """The distinct ``decode_attention`` calls of the one-token ``mixkvq::kv_attention`` ops in ``gm``:
    a dict of ``decode_attention`` keyword arguments per distinct specialization. Store handles are the
    graph's inputs (``example_inputs``, real tensors); the other tensors are zero-filled stand-ins made
    from each node's fake value. Ops whose handles are not graph inputs are left out."""
    placeholders = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    target = torch.ops.mixkvq.kv_attention.default
    calls, seen = [], set()
    for node in gm.graph.find_nodes(op="call_function", target=target):
        args = list(node.args)
        if any(arg not in placeholders for arg in args[4:6]):
            continue
        metas = [fake_tensor(arg) for arg in args[:7]]  # query, key, value, positions, two handles, mask
        if any(meta is None for meta in metas[:4]):  # query, key, value, positions: tensors in a step
            continue
        key = (args[7], args[8], args[10]) + tuple(
            None if m is None else (tuple(m.shape), tuple(m.stride()), m.dtype) for m in metas
        )
        if key in seen:
            continue
        seen.add(key)
        tensors = []
        for i, meta in enumerate(metas):
            if i in (4, 5):
                tensors.append(example_inputs[placeholders[args[i]]])
            elif meta is None:
                tensors.append(None)
            else:
                tensors.append(_stand_in(meta))
        query, key_new, value_new, positions, key_handle, value_handle, mask = tensors
        store = KVStore.open(StoreLayout.from_key(args[10]), key_handle, value_handle)
        calls.append(
            dict(
                query=query,
                store=store,
                length=positions.to(torch.int64),  # position 0: as ``ops.decode_step`` passes it
                attn_mask=mask,
                scale=args[7],
                new_key=key_new,
                new_value=value_new,
                causal=args[8],
            )
        )
    return calls


def _stand_in(meta: torch.Tensor) -> torch.Tensor:
    """A zero tensor of ``meta``'s shape, strides, dtype and device."""
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=meta.device).zero_()


def enabled() -> bool:
    """``MIXKVQ_PREWARM`` unset or ``1``: on; ``0``: off (to time a first call without it)."""
    flag = os.environ.get("MIXKVQ_PREWARM", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"MIXKVQ_PREWARM must be 0, 1 or unset, got {flag!r}")
    return flag != "0"


def start(gm: torch.fx.GraphModule, example_inputs: list) -> threading.Thread | None:
    """Start compiling the decode kernels of ``gm`` (a rewritten one-token graph) in a daemon thread
    on a stream of its own; None when there is nothing to compile."""
    try:
        calls = decode_calls(gm, example_inputs)
    except Exception as error:  # noqa: BLE001 - best effort: never fail a compile for it
        log.warning("mixkvq: no ahead-of-time compile of the decode kernels: %r", error)
        return None
    if not calls:
        return None
    device = calls[0]["query"].device

    def compile_kernels():
        from .kernels.decode_attention import decode_attention

        try:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for call in calls:
                    decode_attention(**call)
            if stream is not None:
                stream.synchronize()
        except Exception as error:  # noqa: BLE001 - best effort: the first run compiles instead
            log.warning("mixkvq: compiling the decode kernels ahead of the first step failed: %r", error)

    thread = threading.Thread(target=compile_kernels, name="mixkvq-prewarm", daemon=True)
    thread.start()
    return thread


def join_before_first_call(compiled, thread: threading.Thread):
    """``compiled`` (Inductor's callable, its attributes such as ``_boxed_call`` kept) waiting for
    ``thread`` before it runs."""

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        thread.join()
        return compiled(*args, **kwargs)

    return run
