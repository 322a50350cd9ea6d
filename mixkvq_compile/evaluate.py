"""Accuracy harness: streaming perplexity, KL and agreement of quantized KV caches against 16 bits.

Each configuration is compiled once (``torch._dynamo.reset()`` in between) and then measured on one
token sequence ``ids`` (``[T]`` int64):

- **streaming perplexity**: the text goes through the *compiled* forward in chunks of ``chunk``
  tokens over one ``StaticCache(max_cache_len=T)``, so every chunk attends to the quantized store of
  the tokens before it (a single-pass prefill never reads the cache and measures nothing). Scored on
  the next-token predictions at positions ``>= score_from`` (default 256: earlier positions cannot see
  any packed group when R = 128), so every configuration is scored on the same tokens;
- **KL**: mean KL(16-bit || quantized) of the next-token distributions at the same positions, the
  16-bit logits coming from the same chunked loop over an uncompiled model and a 16-bit cache;
- **top-1 agreement** (teacher-forced): share of those positions where the argmax equals the 16-bit
  argmax;
- **greedy agreement**: the first ``prompt_tokens`` tokens are streamed as a prompt (same chunks),
  then ``new_tokens`` tokens are decoded greedily one at a time (the decode graph); the share of
  positions where the tokens equal the 16-bit greedy tokens (``greedy_prefix``: tokens before the
  first difference);
- **bits**: nominal code bits per element (mean of keys and values, from the config), the same with
  float16 scales and zeros and the uint8 channel order, and the bytes per token that
  ``memory_report`` measures on the cache after the streaming run (held bytes / ``T``: sinks, the
  full-precision residual window and the packed groups of every layer).

``compiler="eager"`` (default) runs the mixkvq passes on the Dynamo graph and executes the rewritten
graph without Inductor: the quantized store and its ops are exactly those of ``backend="mixkvq"``,
only the code generation of the rest of the model is skipped (Inductor costs 40-100 s per
configuration on a 2-core CPU). ``compiler="inductor"`` uses ``mixkvq_compile.backend(config)``.

Command line (``mixkvq-eval --help``)::

    mixkvq-eval --out docs/accuracy          # SmolLM2-135M on pydoc_data topics, the issue's table

After the 16-bit baseline, the configurations are measured in ``--jobs`` processes (default 2, one
thread each), each against the baseline's ``Reference``; the numbers equal a sequential run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import MixKVQConfig, preset_config
from .memory import memory_report
from .store import StoreLayout

COMPILERS = ("eager", "inductor")


@dataclasses.dataclass(frozen=True)
class EvalCase:
    """One row of the table: ``config`` None is the 16-bit baseline (uncompiled, plain StaticCache)."""

    name: str
    policy: str
    config: MixKVQConfig | None


@dataclasses.dataclass(frozen=True)
class EvalResult:
    name: str
    policy: str
    nominal_bits: float
    bits_with_metadata: float
    bytes_per_token: float
    perplexity: float
    kl: float
    top1_agreement: float
    greedy_agreement: float
    greedy_prefix: int
    seconds: float


# -- text ----------------------------------------------------------------------------------------


def pydoc_text() -> str:
    """Real English text shipped with every Python: the ``pydoc_data`` help topics, in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def license_text() -> str:
    """Python's LICENSE.txt (the calibration text of the profiler in this harness)."""
    import sysconfig

    for folder in (sysconfig.get_path("stdlib"), os.path.dirname(os.__file__)):
        path = pathlib.Path(folder) / "LICENSE.txt"
        if path.exists():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError("LICENSE.txt not found next to the standard library")


# -- running a model -----------------------------------------------------------------------------


def _cache_kwargs(model, cache, start: int, end: int, device) -> dict:
    """Keyword arguments of one chunk: the cache under its name in this transformers version
    (``cache`` in 5.24, ``past_key_values`` in 5.17), explicit positions and, where the model takes
    it, ``cache_position``."""
    params = _forward_params(model)
    positions = torch.arange(start, end, device=device)
    kwargs = {"position_ids": positions[None], "use_cache": True}
    kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if "cache_position" in params:
        kwargs["cache_position"] = positions
    return kwargs


def _forward_params(model) -> set[str]:
    names = set()
    for module in (model, getattr(model, "model", None)):
        if module is not None:
            names |= set(inspect.signature(module.forward).parameters)
    return names


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the 16-bit baseline leaves for the other cases: log-probabilities ``[n_scored, V]`` at the
    scored positions and the greedy tokens ``[new_tokens]``."""

    logp: torch.Tensor
    tokens: torch.Tensor


def new_cache(model, max_cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@torch.no_grad()
def stream(
    forward: Callable,
    model,
    ids: torch.Tensor,
    chunk: int,
    cache,
    on_chunk: Callable[[int, int, torch.Tensor], None],
    after_first: Callable[[], None] | None = None,
    progress=None,
) -> None:
    """Feed ``ids`` (``[T]``) through ``forward`` in chunks; ``on_chunk(start, end, logits [n, V])``."""
    device = ids.device
    for start in range(0, ids.numel(), chunk):
        end = min(start + chunk, ids.numel())
        out = forward(input_ids=ids[None, start:end], **_cache_kwargs(model, cache, start, end, device))
        if start == 0 and after_first is not None:
            after_first()
        on_chunk(start, end, out.logits[0].float())
        if progress is not None:
            progress.update(end - start)


@torch.no_grad()
def greedy(
    forward: Callable, model, prompt: torch.Tensor, new_tokens: int, chunk: int, cache, progress=None
) -> torch.Tensor:
    """Stream ``prompt`` in chunks, then decode ``new_tokens`` greedily one at a time; ``[new_tokens]``."""
    last = []
    stream(forward, model, prompt, chunk, cache, lambda s, e, logits: last.append(logits[-1]), None, progress)
    token = last[-1].argmax()
    tokens = [token]
    position = prompt.numel()
    for _ in range(new_tokens - 1):
        out = forward(
            input_ids=token.view(1, 1), **_cache_kwargs(model, cache, position, position + 1, prompt.device)
        )
        token = out.logits[0, -1].argmax()
        tokens.append(token)
        position += 1
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.update(1)
    return torch.stack(tokens)


def compile_forward(model, config: MixKVQConfig, compiler: str = "eager") -> Callable:
    """``model.forward`` compiled for ``config`` (call ``torch._dynamo.reset()`` before a new config)."""
    if compiler == "inductor":
        from .backend import backend

        return torch.compile(model.forward, backend=backend(config))
    if compiler != "eager":
        raise ValueError(f"compiler={compiler!r}: allowed values are {list(COMPILERS)}")
    from .passes import PassManager

    def mixkvq_eager(gm: torch.fx.GraphModule, example_inputs: list):
        return PassManager(config)(gm).forward

    return torch.compile(model.forward, backend=mixkvq_eager)


# -- bit accounting --------------------------------------------------------------------------------


def bits_per_element(config: MixKVQConfig, model_config, dtype_bits: int = 16) -> tuple[float, float]:
    """(nominal code bits, bits with scales/zeros/order) per stored K and V element, mean over layers.

    Only the packed groups count (the full-precision window and sinks are in the measured bytes);
    the 16-bit tier counts 16 bits, whatever the model dtype.
    """
    layers, heads, head_dim = _shape(model_config)
    nominal, with_meta = [], []
    for layer in range(layers):
        cfg = config.for_layer(layer)
        lay = StoreLayout.create(cfg, 1, heads, 2 * cfg.group_size, head_dim, head_dim, torch.bfloat16)
        key_nom = sum(c * b for c, b in zip(lay.key_channels, lay.key_bits)) / head_dim
        key_meta = sum(
            c * (b if b == 16 else b + 32 / lay.group_size) for c, b in zip(lay.key_channels, lay.key_bits)
        ) / head_dim + (8 / lay.group_size if lay.mixed_keys else 0.0)
        value_nom = lay.value_bits
        value_meta = value_nom + (32 / lay.value_group_size if value_nom != 16 else 0.0)
        nominal.append((key_nom + value_nom) / 2)
        with_meta.append((key_meta + value_meta) / 2)
    return sum(nominal) / layers, sum(with_meta) / layers


def _shape(model_config) -> tuple[int, int, int]:
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return model_config.num_hidden_layers, kv_heads, head_dim


# -- the harness ---------------------------------------------------------------------------------


def evaluate(
    model,
    ids: torch.Tensor,
    cases: Sequence[EvalCase],
    chunk: int = 64,
    new_tokens: int = 256,
    prompt_tokens: int = 512,
    score_from: int = 256,
    compiler: str = "eager",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    reference: Reference | None = None,
    return_reference: bool = False,
) -> list[EvalResult] | tuple[list[EvalResult], Reference]:
    """Measure every case on ``ids`` (``[T]`` int64); see the module docstring for the metrics.

    ``model``: a transformers causal LM in eval mode whose attention reaches SDPA over a
    ``StaticCache``; its dtype is the cache dtype. Raises ``RuntimeError`` when a compiled
    configuration rewrote no attention (the backend did not see the cache; nothing was quantized).
    The first case must be the 16-bit baseline unless ``reference`` (from an earlier call with
    ``return_reference=True``, which then returns ``(results, reference)``) is given.
    """
    from .passes import counters, reset_counters

    ids = ids.reshape(-1)
    total = ids.numel()
    if not 0 < prompt_tokens <= total or new_tokens < 1 or not 0 < score_from < total - 1:
        raise ValueError(
            "need 0 < prompt_tokens <= len(ids), new_tokens >= 1 and 0 < score_from < len(ids) - 1; got "
            f"{total} ids, prompt_tokens={prompt_tokens}, new_tokens={new_tokens}, score_from={score_from}"
        )
    prompt = ids[:prompt_tokens]
    targets = ids[1:]
    n_scored = total - 1 - score_from
    bar = _progress_bar(len(cases) * (total + prompt_tokens + new_tokens), progress)

    reference_logp = torch.empty(0) if reference is None else reference.logp
    reference_tokens = torch.empty(0, dtype=torch.long) if reference is None else reference.tokens
    results = []
    for case in cases:
        started = time.perf_counter()
        torch._dynamo.reset()
        reset_counters()
        if case.config is None:
            forward = model.forward
            after_first = None
        else:
            forward = compile_forward(model, case.config, compiler)

            def after_first(name=case.name):
                if counters["attention_rewritten"] == 0:
                    raise RuntimeError(
                        f"{name}: the compiled forward rewrote no attention (counters {dict(counters)}): "
                        "the KV cache was not quantized, the numbers would be 16-bit ones"
                    )

        scorer = _Scorer(targets, score_from, reference_logp if reference_logp.numel() else None)
        cache = new_cache(model, max(total, prompt_tokens + new_tokens))
        stream(forward, model, ids, chunk, cache, scorer, after_first, bar)
        report = memory_report(cache)
        streamed = time.perf_counter()
        if scorer.reference is None:
            if case.config is not None:
                raise ValueError("the first case must be the 16-bit baseline (config=None)")
            reference_logp = torch.cat(scorer.logp_parts)
            scorer.agree = n_scored
        # The same cache, reset (``zero_()`` + position 0 starts a new sequence in the store): the
        # compiled graphs are reused, no recompilation for a new cache object.
        cache.reset()
        tokens = greedy(forward, model, prompt, new_tokens, chunk, cache, bar)
        del cache
        if log is not None:
            greedy_s = time.perf_counter() - streamed
            log(f"{case.name}: streaming {streamed - started:.0f} s, greedy {greedy_s:.0f} s")
        if reference_tokens.numel() == 0:
            reference_tokens = tokens
        same = tokens == reference_tokens
        prefix = int(same.long().cumprod(0).sum())
        if case.config is None:
            nominal = with_meta = float(torch.finfo(model.dtype).bits)
        else:
            nominal, with_meta = bits_per_element(case.config, model.config)
        result = EvalResult(
            name=case.name,
            policy=case.policy,
            nominal_bits=nominal,
            bits_with_metadata=with_meta,
            bytes_per_token=report.held_bytes / report.layers[0].capacity,
            perplexity=math.exp(scorer.nll / n_scored),
            kl=scorer.kl / n_scored,
            top1_agreement=scorer.agree / n_scored,
            greedy_agreement=float(same.float().mean()),
            greedy_prefix=prefix,
            seconds=time.perf_counter() - started,
        )
        results.append(result)
        if log is not None:
            log(format_row(result))
    if bar is not None:
        bar.close()
    torch._dynamo.reset()
    if return_reference:
        return results, Reference(reference_logp, reference_tokens)
    return results


class _Scorer:
    """Accumulates NLL, KL(reference || model) and argmax agreement of the positions >= ``score_from``.

    Without a reference (the 16-bit run) it keeps the log-probabilities, which become the reference.
    """

    def __init__(self, targets: torch.Tensor, score_from: int, reference: torch.Tensor | None):
        self.targets, self.score_from, self.reference = targets, score_from, reference
        self.nll, self.kl, self.agree = 0.0, 0.0, 0
        self.logp_parts: list[torch.Tensor] = []

    def __call__(self, start: int, end: int, logits: torch.Tensor) -> None:
        lo, hi = max(start, self.score_from), min(end, self.targets.numel())
        if lo >= hi:
            return
        logp = F.log_softmax(logits[lo - start : hi - start], dim=-1)
        self.nll -= float(logp.gather(-1, self.targets[lo:hi, None]).sum())
        if self.reference is None:
            self.logp_parts.append(logp)
            return
        ref = self.reference[lo - self.score_from : hi - self.score_from]
        self.kl += float((ref.exp() * (ref - logp)).sum())
        self.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())


def _progress_bar(total: int, enabled: bool, unit: str = "tok", desc: str = "mixkvq-eval"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr)


# -- output --------------------------------------------------------------------------------------

HEADER = (
    "| configuration | policy | nominal bits | bits incl. scales+zeros | KV bytes/token | "
    "streaming ppl | KL vs 16-bit | top-1 agree (TF) | greedy agree (256) |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(r: EvalResult) -> str:
    return (
        f"| {r.name} | {r.policy} | {r.nominal_bits:.2f} | {r.bits_with_metadata:.2f} | "
        f"{r.bytes_per_token:,.0f} | {r.perplexity:.3f} | {r.kl:.4f} | {r.top1_agreement:.3f} | "
        f"{r.greedy_agreement:.3f} ({r.greedy_prefix}) |"
    )


def format_table(results: Sequence[EvalResult]) -> str:
    """A markdown table, one row per result."""
    return "\n".join([HEADER, *map(format_row, results)])


def plot(results: Sequence[EvalResult], path: str | os.PathLike) -> None:
    """Perplexity vs measured KV bytes per token, one line per policy (PNG at ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    policies: dict[str, list[EvalResult]] = {}
    for r in results:
        policies.setdefault(r.policy, []).append(r)
    for policy, rows in policies.items():
        rows = sorted(rows, key=lambda r: r.bytes_per_token)
        if policy == "fp16":
            ax.axhline(rows[0].perplexity, color="black", lw=0.8, ls="--", label="fp16 (bytes off-scale)")
            continue
        xs, ys = [r.bytes_per_token for r in rows], [r.perplexity for r in rows]
        ax.plot(xs, ys, marker="o", label=policy)
        for r in rows:
            ax.annotate(r.name, (r.bytes_per_token, r.perplexity), fontsize=6, alpha=0.7)
    ax.set_xlabel("measured KV bytes per token (all layers, memory_report)")
    ax.set_ylabel("streaming perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the table -----------------------------------------------------------------------------

BUDGETS = (2.3, 2.5, 3.0)
THRESHOLDS = (1.85, 1.58)  # MixKVQ's searched (tau_BF16, tau_UINT4) for R1-Qwen-32B


def default_cases(
    kvmix_plan: str | os.PathLike | None = None,
    combined_plan: str | os.PathLike | None = None,
    thresholds: tuple[float, float] | None = None,
    thresholds_plan: str | os.PathLike | None = None,
    kvmix_rpc_plan: str | os.PathLike | None = None,
) -> list[EvalCase]:
    """The issue's table: fp16, kivi2, kivi4, MixKVQ thresholds, budget and difficulty at ``BUDGETS``,
    the KVmix plan (with our 128-token window, and as KVmix runs it: its recent pivotal context and no
    fixed window), MixKVQ + KVmix; then MixKVQ at kivi2's bytes (budget 2.5 with R = 96: the bytes
    of 32 fewer full-precision tokens pay for the higher tiers) with and without 4 sink tokens, and
    MixKVQ + KVmix with 4 sinks."""
    mixkvq = preset_config("mixkvq")
    cases = [
        EvalCase("fp16", "fp16", None),
        EvalCase("kivi2", "kivi", preset_config("kivi2")),
        EvalCase("kivi4", "kivi", preset_config("kivi4")),
    ]
    if thresholds is not None:
        config = dataclasses.replace(
            mixkvq,
            key_tiering="thresholds",
            key_thresholds=thresholds,
            layer_plan=None if thresholds_plan is None else os.fspath(thresholds_plan),
        )
        cases.append(EvalCase(f"thresholds {thresholds[0]:g}/{thresholds[1]:g}", "mixkvq thresholds", config))
    for policy in ("budget", "difficulty"):
        for budget in BUDGETS:
            config = dataclasses.replace(mixkvq, key_tiering=policy, key_bits_budget=budget)
            cases.append(EvalCase(f"{policy} {budget:g}", f"mixkvq {policy}", config))
    if kvmix_plan is not None:
        config = dataclasses.replace(preset_config("kivi2"), layer_plan=os.fspath(kvmix_plan))
        cases.append(EvalCase("kvmix plan", "kvmix", config))
    if kvmix_rpc_plan is not None:
        config = dataclasses.replace(
            preset_config("kivi2"), residual_length=0, layer_plan=os.fspath(kvmix_rpc_plan)
        )
        cases.append(EvalCase("kvmix plan + rpc", "kvmix", config))
    combined = None
    if combined_plan is not None:
        combined = dataclasses.replace(mixkvq, layer_plan=os.fspath(combined_plan))
        cases.append(EvalCase("mixkvq + kvmix", "mixkvq + kvmix", combined))
    iso = dataclasses.replace(mixkvq, key_bits_budget=2.5, residual_length=96)
    cases.append(EvalCase("budget 2.5 R96", "mixkvq budget, kivi2 bytes", iso))
    cases.append(
        EvalCase("budget 2.5 R96 S4", "mixkvq budget, kivi2 bytes", dataclasses.replace(iso, sink_tokens=4))
    )
    if combined is not None:
        cases.append(
            EvalCase("mixkvq + kvmix S4", "mixkvq + kvmix", dataclasses.replace(combined, sink_tokens=4))
        )
    return cases


_WORKER: dict = {}


def _init_worker(dtype: str, threads: int, reference: Reference) -> None:
    from .models import load_smollm2

    torch.set_num_threads(max(1, threads))
    _WORKER["model"] = load_smollm2(dtype=getattr(torch, dtype))[0]
    _WORKER["reference"] = reference


def _worker_case(name: str, paths: dict, ids: torch.Tensor, settings: dict) -> EvalResult:
    """One configuration of ``default_cases`` (rebuilt here from the plan files: configs hold read-only
    mappings that do not pickle), measured against the baseline's reference."""
    cases = default_cases(
        paths["kvmix"], paths["combined"], THRESHOLDS, paths["thresholds"], paths["kvmix_rpc"]
    )
    case = next(c for c in cases if c.name == name)
    return evaluate(
        _WORKER["model"], ids, [case], progress=False, reference=_WORKER["reference"], **settings
    )[0]


def _evaluate_in_processes(names, paths, ids, reference, settings, args, log) -> list[EvalResult]:
    """Measure the named cases in ``args.jobs`` spawned processes (each loads the model once, uses
    ``args.threads`` threads); results in the order of ``names``, a progress bar over cases."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    init = (args.dtype, args.threads, reference)
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker, initargs=init) as pool:
        futures = {pool.submit(_worker_case, name, paths, ids, settings): name for name in names}
        bar = _progress_bar(
            len(names), not args.no_progress, "config", f"mixkvq-eval ({args.jobs} processes)"
        )
        done = {}
        for future in as_completed(futures):
            result = future.result()
            done[futures[future]] = result
            log(f"{result.name}: {result.seconds:.0f} s")
            log(format_row(result))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return [done[name] for name in names]


def _log(line: str, path: pathlib.Path) -> None:
    print(line, file=sys.stderr, flush=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``mixkvq-eval``: run the table on SmolLM2-135M and write table, JSON and plot."""
    parser = argparse.ArgumentParser(prog="mixkvq-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/accuracy", help="folder for table.md, results.json, plot")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of text (cache capacity)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy tokens")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="greedy prompt (start of the text)")
    parser.add_argument("--score-from", type=int, default=256)
    parser.add_argument("--compiler", choices=COMPILERS, default="eager")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--only", nargs="*", help="run only the cases with these names (fp16 always)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per process")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes measuring configurations in parallel after the 16-bit baseline (default: 2)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from .models import load_smollm2
    from .profiler import calibrate_thresholds, kvmix_plan_from_scores, profile_layers, write_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype))
    # Tokenize a prefix only: the GGUF tokenizer is slow on the whole 465k-character text.
    ids = tokenizer(pydoc_text()[: 16 * args.tokens], return_tensors="pt").input_ids[0, : args.tokens]
    if ids.numel() < args.tokens:
        raise ValueError(f"the text has only {ids.numel()} tokens; lower --tokens")
    calibration = [tokenizer(license_text()[:8000], return_tensors="pt").input_ids[0, :512]]
    scores = profile_layers(model, calibration, progress=not args.no_progress)
    plans = {
        # KVmix: top 20% of layers by gradient norm get 4-bit keys (KVmix: 3-bit) / 4-bit values.
        "kvmix": kvmix_plan_from_scores(scores, key_bits=2.4, value_bits=2.4, key_levels=(4.0, 2.0)),
        # The same plan with KVmix's recent pivotal context (paper: r = 0.2 high layers, 0.1 others).
        "kvmix_rpc": kvmix_plan_from_scores(
            scores, key_bits=2.4, value_bits=2.4, key_levels=(4.0, 2.0), rpc_levels=(0.2, 0.1)
        ),
        # MixKVQ tiers inside every layer, a larger key budget in the high-scoring layers.
        "combined": kvmix_plan_from_scores(scores, key_bits=2.5, value_bits=2.4, key_levels=(3.0, 2.3)),
        # MixKVQ's absolute thresholds (R1-Qwen-32B's pair) -> per-layer tier sizes on this model.
        "thresholds": calibrate_thresholds(model, calibration, THRESHOLDS),
    }
    paths = {name: out / f"{name}_plan.json" for name in plans}
    for name, plan in plans.items():
        write_plan(plan, paths[name])
    cases = default_cases(
        paths["kvmix"], paths["combined"], THRESHOLDS, paths["thresholds"], paths["kvmix_rpc"]
    )
    if args.only:
        cases = [c for c in cases if c.config is None or c.name in args.only]
    settings = dict(
        chunk=args.chunk,
        new_tokens=args.new_tokens,
        prompt_tokens=args.prompt_tokens,
        score_from=args.score_from,
        compiler=args.compiler,
    )
    (out / "log.txt").write_text("")  # this run's log only
    log = lambda line: _log(line, out / "log.txt")  # noqa: E731
    if args.jobs <= 1:
        results = evaluate(model, ids, cases, progress=not args.no_progress, log=log, **settings)
    else:
        baseline, reference = evaluate(
            model, ids, cases[:1], progress=False, log=log, return_reference=True, **settings
        )
        rest = _evaluate_in_processes([c.name for c in cases[1:]], paths, ids, reference, settings, args, log)
        results = baseline + rest
    elapsed = time.perf_counter() - started
    table = format_table(results)
    (out / "table.md").write_text(table + f"\n\nTotal time {elapsed:.0f} s.\n")
    (out / "results.json").write_text(
        json.dumps(
            {"args": vars(args), "seconds": elapsed, "results": [dataclasses.asdict(r) for r in results]},
            indent=1,
        )
    )
    plot(results, out / "ppl_vs_bytes.png")
    print(table)
    print(f"total {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
