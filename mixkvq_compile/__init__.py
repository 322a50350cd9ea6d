"""mixkvq: mixed-precision quantized KV caches as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="mixkvq")            # preset "mixkvq"
    model.forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "kivi2"})
    model.forward = torch.compile(model.forward, backend=mixkvq_compile.backend(MixKVQConfig(...)))
    out = model.generate(**inputs, cache_implementation="static")
    print(mixkvq_compile.memory_report(model))

Importing the package is light: no CUDA initialisation, no kernel compilation. ``backend="mixkvq"``
normally resolves through the package's entry point without any import; importing the package also
registers it, for source checkouts where the entry point is not installed.
"""

from .backend import backend, mixkvq_backend
from .config import PRESETS, KeyTiering, MixKVQConfig
from .diagnostics import explain
from .memory import memory_report, store_bytes
from .passes import counters, reset_counters

__all__ = [
    "PRESETS",
    "KeyTiering",
    "MixKVQConfig",
    "backend",
    "counters",
    "explain",
    "memory_report",
    "mixkvq_backend",
    "reset_counters",
    "store_bytes",
]


def _register_backend() -> None:
    from torch._dynamo.backends import registry

    if "mixkvq" not in registry._COMPILER_FNS and "mixkvq" not in registry._BACKENDS:
        registry.register_backend(compiler_fn=mixkvq_backend, name="mixkvq")


_register_backend()
