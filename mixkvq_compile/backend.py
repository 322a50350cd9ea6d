"""The ``mixkvq`` torch.compile backend: run the passes, hand the graph to Inductor.

``torch.compile(fn, backend="mixkvq", options={...})`` resolves ``mixkvq_backend`` through the
``torch_dynamo_backends`` entry point; ``backend(MixKVQConfig(...))`` builds the same backend from a
config object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .config import MixKVQConfig
from .passes import PassManager


def backend(config: MixKVQConfig | None = None) -> Callable:
    """A torch.compile backend for ``config`` (default: ``MixKVQConfig()``, the MixKVQ preset).

    Example::

        config = MixKVQConfig(value_bits=4)
        model.forward = torch.compile(model.forward, backend=mixkvq_compile.backend(config))
    """
    config = config if config is not None else MixKVQConfig()
    if not isinstance(config, MixKVQConfig):
        raise TypeError(f"backend() takes a MixKVQConfig, got {type(config).__name__}")

    def mixkvq(
        gm: torch.fx.GraphModule,
        example_inputs: list,
        options: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ):
        if options:
            raise ValueError(
                "options=... is for backend='mixkvq'; with backend=mixkvq_compile.backend(config) put the "
                "settings in the MixKVQConfig"
            )
        return _compile(gm, example_inputs, config, mode)

    return mixkvq


def mixkvq_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
):
    """Entry point of ``backend="mixkvq"``; ``options`` are ``MixKVQConfig`` fields plus ``"preset"``."""
    return _compile(gm, example_inputs, MixKVQConfig.from_options(options), mode)


def _compile(gm: torch.fx.GraphModule, example_inputs: list, config: MixKVQConfig, mode: str | None):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    PassManager(config)(gm)
    patches = list_mode_options(mode) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)
