"""mixkvq: mixed-precision quantized KV caches as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="mixkvq")            # preset "mixkvq"
    model.forward = torch.compile(model.forward, backend="mixkvq", options={"preset": "kivi2"})
    model.forward = torch.compile(model.forward, backend=mixkvq_compile.backend(MixKVQConfig(...)))
    out = model.generate(**inputs, cache_implementation="static")
    print(mixkvq_compile.memory_report(model))

Importing the package is light: no CUDA initialisation, no kernel compilation.
"""

from .backend import backend, mixkvq_backend
from .config import PRESETS, KeyTiering, MixKVQConfig
from .memory import memory_report
from .passes import counters, reset_counters

__all__ = [
    "PRESETS",
    "KeyTiering",
    "MixKVQConfig",
    "backend",
    "counters",
    "memory_report",
    "mixkvq_backend",
    "reset_counters",
]
