"""Shared fixtures: a clean Dynamo cache and mixkvq counters for every test."""

import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mixkvq_compile  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Each test compiles from scratch: Dynamo's per-code-object cache would otherwise hit its
    recompile limit across tests and silently fall back to eager. Inductor compiles in-process:
    its worker pool costs more than it saves on a 2-core CI machine."""
    torch._dynamo.reset()
    mixkvq_compile.reset_counters()
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()
