"""The ``mixkvq`` torch.compile backend: run the passes, hand the graph to Inductor (or, for prompt
graphs where ``MixKVQConfig.prefill_compiler`` says so, run it as traced).

``torch.compile(fn, backend="mixkvq", options={...})`` resolves ``mixkvq_backend`` through the
``torch_dynamo_backends`` entry point; ``backend(MixKVQConfig(...))`` builds the same backend from a
config object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import prewarm
from .config import MixKVQConfig
from .ops import is_device_step, kernels_disabled
from .passes import PassManager
from .passes.rewrite import fake_tensor
from .store import StoreLayout

log = logging.getLogger("mixkvq_compile")


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
    if runs_eager(gm, config):
        log.debug("mixkvq: prompt graph of %d nodes runs as traced (prefill_compiler)", len(gm.graph.nodes))
        return gm.forward
    patches = dict(list_mode_options(mode)) if mode else {}
    reason = cuda_graph_blocker(gm)
    if reason is not None:
        patches["triton.cudagraphs"] = False
    elif config.cuda_graphs and _attends_on_cuda(gm):
        patches["triton.cudagraphs"] = True
        mark_static_inputs(gm)
    # A one-token decode graph on the kernels: its Triton kernels compile while Inductor compiles it.
    warm = (
        prewarm.start(gm, example_inputs)
        if reason is None and _attends_on_cuda(gm) and prewarm.enabled()
        else None
    )
    log.debug(
        "mixkvq: graph of %d nodes compiled with CUDA graphs %s%s",
        len(gm.graph.nodes),
        "on" if patches.get("triton.cudagraphs") else "off",
        f" ({reason})" if reason else "",
    )
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    return compiled if warm is None else prewarm.join_before_first_call(compiled, warm)


def runs_eager(gm: torch.fx.GraphModule, config: MixKVQConfig) -> bool:
    """Whether ``config.prefill_compiler`` sends this rewritten graph to eager execution: a graph with
    a mixkvq attention that allocates the store or attends with more than one query token, under
    ``"eager"``, or under ``"auto"`` on CPU."""
    if config.prefill_compiler == "inductor" or not _attention_ops(gm) or not _is_prompt_graph(gm):
        return False
    return config.prefill_compiler == "eager" or not _attends_on_cuda(gm)


def _attends_on_cuda(gm: torch.fx.GraphModule) -> bool:
    return any(fake_tensor(n).is_cuda for n in _attention_ops(gm))


def _is_prompt_graph(gm: torch.fx.GraphModule) -> bool:
    return _allocates_store(gm) or _has_multi_token_attention(gm)


def _allocates_store(gm: torch.fx.GraphModule) -> bool:
    target = torch.ops.mixkvq.new_store.default
    return any(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def _has_multi_token_attention(gm: torch.fx.GraphModule) -> bool:
    """An attention with more than one query token (or a symbolic count): not a one-token decode step."""
    for node in _attention_ops(gm):
        query_len = fake_tensor(node).shape[2]  # the output (the replaced SDPA's) is [B, Hq, Lq, Dv]
        if not isinstance(query_len, int) or not is_device_step(query_len, node.args[9]):
            return True
    return False


def _attention_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    target = torch.ops.mixkvq.kv_attention.default
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def cuda_graph_blocker(gm: torch.fx.GraphModule) -> str | None:
    """Why this rewritten graph must not be captured in a CUDA graph, or None if it may be.

    A graph that allocates a store (the prefill) must run outside the graph pool, and an attention
    with more than one query token reads the cache positions on the host (see ``ops.kv_attention``).
    """
    if _allocates_store(gm):
        return "it allocates the quantized store"
    if kernels_disabled():
        return "MIXKVQ_DISABLE_KERNELS is set (the reference path reads positions on the host)"
    if any(StoreLayout.from_key(node.args[10]).sliding for node in _attention_ops(gm)):
        return "a sliding-window layer runs on the PyTorch path (it reads positions on the host)"
    if _has_multi_token_attention(gm):
        return "an attention has more than one query token (or a symbolic length)"
    return None


def mark_static_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Mark as static (fixed address, not copied by CUDA graphs) the graph inputs that are store handles
    or that the graph mutates in place; returns their names.

    The handles must reach the kernels as themselves (a copy of a zero-stride handle is one element,
    not the store), and CUDA graphs refuse to capture a graph that mutates a non-static input, such as
    transformers' ``StaticLayer.cumulative_length`` (its ``add_`` in every step): when the prefill is
    compiled, the cache is created inside the graph and transformers skips its own
    ``mark_static_address``. Marking is "unguarded": if such an input moves, cudagraph trees record a
    new graph instead of reading stale memory.
    """
    handle_inputs = {arg for node in _attention_ops(gm) for arg in node.args[4:6]}
    marked = []
    for node in gm.graph.find_nodes(op="placeholder"):
        mutated = any(_mutates_first_argument(user) and user.args[0] is node for user in node.users)
        if node in handle_inputs or mutated:
            node.meta.setdefault("tensor_dict", {})["_dynamo_static_input_type"] = "unguarded"
            marked.append(node.name)
    return marked


def _mutates_first_argument(node: torch.fx.Node) -> bool:
    """An in-place call such as ``x.add_(y)`` or ``torch.Tensor.add_(x, y)`` (name ends with one ``_``)."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__") and bool(node.args)
