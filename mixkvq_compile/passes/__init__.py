"""Graph passes of the mixkvq backend (Dynamo-level FX graphs, before AOT/Inductor lowering)."""

from .manager import PassManager, counters, reset_counters

__all__ = ["PassManager", "counters", "reset_counters"]
