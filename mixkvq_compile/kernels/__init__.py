"""Triton kernels over the packed KV store (CUDA path; the CPU path is ``mixkvq_compile.reference``).

Importing this package does not import Triton. The kernel modules do, on first import:

- ``mixkvq_compile.kernels.decode_attention``: ``decode_attention`` (fused split-K attention of a few
  query tokens over sinks, packed groups and the ring, with a combine step); for planar stores
  (``StoreLayout.planar``) the packed groups go through ``planar_attention.planar_split_kernel``;
- ``mixkvq_compile.kernels.dequantize``: ``dequantize_groups`` (the packed groups of a store as dense
  keys and values, for ``KVStore.read_into`` before a long prompt chunk and for sliding windows);
- ``mixkvq_compile.kernels.quantize``: ``store_groups`` (quantize and pack whole groups into the store,
  one or many at once, channel ranking in the kernel), ``write_tokens`` (full-precision sink/ring
  writes), ``append`` (the fused equivalent of ``KVStore.append``) and ``append_token`` (one decode
  token at a position held on the device: no host read, CUDA-graph capturable).

On a machine without CUDA the kernel modules set ``TRITON_INTERPRET=1`` (unless it is set already)
before defining their kernels, so the same kernels run in Triton's CPU interpreter for tests.
"""

from __future__ import annotations

import importlib
from typing import Any

# ``decode_attention`` is not re-exported here: the submodule of the same name would shadow it. Use
# ``from mixkvq_compile.kernels.decode_attention import decode_attention``.
_EXPORTS = {
    "store_groups": "quantize",
    "write_tokens": "quantize",
    "append": "quantize",
    "append_token": "quantize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
