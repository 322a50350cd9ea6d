"""Configuration of the mixkvq backend: one frozen, validated dataclass plus presets.

A config is reachable three ways::

    torch.compile(model.forward, backend="mixkvq", options={"preset": "kivi2"})
    torch.compile(model.forward, backend="mixkvq", options={"value_bits": 4, "residual_length": 64})
    torch.compile(model.forward, backend=mixkvq_compile.backend(MixKVQConfig(value_bits=4)))

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the option and
the allowed values, so a mistake surfaces when the backend is first invoked, never inside a kernel.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

KEY_TIER_BITS_ALLOWED = (2, 4, 16)
VALUE_BITS_ALLOWED = (2, 4, 16)
PREFILL_COMPILERS = ("auto", "inductor", "eager")
GROUP_SIZES_ALLOWED = (8, 16, 32, 64, 128)
LAYER_OVERRIDE_FIELDS = (
    "key_bits",
    "key_bits_budget",
    "key_thresholds",
    "key_tier_fractions",
    "key_tiering",
    "residual_length",
    "rpc_ratio",
    "value_bits",
)
PLAN_FORMAT = "mixkvq-layer-plan"
KEY_TIERING_ALIASES = {"salience": "budget"}  # old name -> policy


class KeyTiering(str, enum.Enum):
    """How the channels of each flushed key group are assigned to the high/mid/low tiers.

    The store's layout is static: every group of a layer keeps the same number of channels per tier
    (``MixKVQConfig.tier_channels``), so a policy decides *which* channels fill the tiers and, through
    the config, *how many* per layer. Scores per channel d of a group of G tokens (MixKVQ):
    I_d = running mean |q_d| (post-RoPE, mean over the query heads of the KV head and over every query
    of the sequence so far, prefill and decode); S_d = (max k_d - min k_d) / 3 (the 2-bit step of the
    channel over the group); A_d = I_d * S_d. Channels are ranked by their score; the highest fill the
    high tier, the next the mid tier, the rest the low tier.

    UNIFORM:    every channel in one tier (KIVI); no score, no per-group channel order.
    BUDGET:     rank by A_d; tier sizes from ``key_bits_budget`` (a target mean of nominal key bits per
                channel, the same for every group of the layer) or, without a budget, from
                ``key_tier_fractions``. Portable across models. ``"salience"`` is an accepted alias.
    THRESHOLDS: the paper's two absolute thresholds ``key_thresholds = (tau_high, tau_mid)`` on A_d.
                With a static layout a tier cannot grow or shrink per group, so the thresholds set the
                *sizes* of the tiers (``key_tier_fractions`` per layer, calibrated offline by
                ``mixkvq_compile.profiler.calibrate_thresholds``: the mean share of channels above each
                threshold) and at run time the channels fill the tiers in score order. When more
                channels pass tau_high than the high tier holds, the lowest-scoring of them go to the
                mid tier (then low); when fewer pass, the free high slots take the next channels by
                score (they are paid for in memory anyway, and promotion only lowers the error).
    DIFFICULTY: rank by S_d alone (no query statistics); tier sizes as for BUDGET. The ablation.
    """

    UNIFORM = "uniform"
    BUDGET = "budget"
    THRESHOLDS = "thresholds"
    DIFFICULTY = "difficulty"
    SALIENCE = "budget"  # alias: the policy's first name

    @classmethod
    def _missing_(cls, value: object) -> KeyTiering | None:
        return cls(KEY_TIERING_ALIASES[value]) if value in KEY_TIERING_ALIASES else None

    @property
    def query_aware(self) -> bool:
        """True when the policy needs the query statistic I_d."""
        return self in (KeyTiering.BUDGET, KeyTiering.THRESHOLDS)


@dataclasses.dataclass(frozen=True)
class MixKVQConfig:
    """Quantized KV-cache settings. Defaults follow MixKVQ (keys 16/4/2-bit per channel, values 2-bit).

    Attributes:
        key_bits: bits of the (high, mid, low) key tiers, each in {16, 4, 2}; 16 stores the model dtype.
        key_tier_fractions: share of each key group's channels in the (high, mid) tiers; the rest
            is low. The counts are ``round(fraction * head_dim)`` and fixed per layer, so the store has
            a static size (CUDA-graph friendly); the tiering policy only decides *which* channels.
            With ``key_bits_budget`` set, only the high fraction is used (as an upper bound).
        key_tiering: policy choosing the channels of each tier (see ``KeyTiering``).
        key_bits_budget: target mean of nominal key bits per channel (e.g. 2.5); sets the tier sizes
            (see ``tier_channels``): never exceeded, met exactly when ``budget * head_dim`` is reachable
            with the tier widths. With ``key_tiering="uniform"`` it must equal one of ``key_bits``
            (every channel in that tier). None: sizes from ``key_tier_fractions``.
        key_thresholds: ``(tau_high, tau_mid)`` on A_d for ``key_tiering="thresholds"`` (required there,
            ignored elsewhere); tau_high >= tau_mid >= 0. The paper's pairs are for its models (e.g.
            R1-Llama-8B (1.44, 0.79)); absolute thresholds do not transfer between models.
        value_bits: bits of every value element, in {16, 4, 2}; values are quantized per token.
        group_size: tokens per key quantization group (keys are quantized per channel over this many
            tokens); tokens leave the residual window one whole group at a time.
        value_group_size: channels per value quantization group (values are quantized per token);
            must divide the model's head_dim.
        residual_length: recent tokens kept in full precision (R); a multiple of ``group_size``.
        rpc_ratio: KVmix's recent pivotal context (RPC) ratio r in [0, 1), in steps of 0.001. After
            every write the store keeps ``max(R, floor(r * F))`` of its F full-precision tokens (those
            after the sinks and the packed groups) and packs the oldest whole groups of the rest, so
            right after a prompt of P tokens about ``r * P`` stay in full precision and the window
            shrinks back over the next decode steps (to below ``G / (1 - r)`` tokens with R = 0). 0 (the
            default) is the fixed window: R to R + G - 1 tokens. The ring buffer is allocated for the
            largest window, ``max(R, r * capacity) + G`` tokens, for the whole run. Sliding-window
            layers use the fixed window (r = 0).
        sink_tokens: first tokens of the sequence kept in full precision forever (0 = none; none
            in sliding-window layers, whose window drops them).
        layer_overrides: ``{layer_index: {field: value}}`` for fields in ``LAYER_OVERRIDE_FIELDS``;
            layer_index counts attention sites in graph order (the model's layer order).
        layer_plan: path of a JSON layer plan written by ``mixkvq-profile`` (KVmix bits and/or
            calibrated threshold tier sizes); its ``layer_overrides`` are loaded, and entries given in
            ``layer_overrides`` win field by field. See ``load_layer_plan``.
        cuda_graphs: capture the one-token decode graphs in CUDA graphs (Inductor's cudagraph trees,
            as ``mode="reduce-overhead"`` does), so a decode step is a graph replay instead of a few
            hundred kernel launches. Graphs that allocate the store (the prefill) or attend with more
            than one query token are never captured. No effect on CPU.
        prefill_compiler: what runs the graphs with a multi-token attention or a store allocation
            (prompt chunks, the first call): ``"inductor"``; ``"eager"``, the rewritten graph as
            traced, op by op (no Inductor compile: a prompt graph runs once per ``generate``, and on
            CPU compiling it took longer than running it: 39 s of the cold quickstart's 148 s); ``"auto"``:
            eager on CPU, Inductor on CUDA. One-token decode graphs always use Inductor. Default
            ``"eager"``: on an H200 (8B-shaped model, 8 x 32k, ``docs/performance.md``) Inductor made the
            prefill 6-12% faster, but the first ``generate()`` took 120-171 s against 70 s as traced
            (16-58 s in fp16); as traced, the prefill is within 3% of fp16's and the first call 1.26x.
        quantize_sliding_windows: quantize sliding-window layers in a store that keeps only their
            window (default). Their attention runs in PyTorch, not in the fused kernels: on an
            H200, an 8B-shaped model whose every layer has a 4096-token window decoded 8 x 8k tokens
            at 49.7 ms per step against 13.2 ms in fp16 (``docs/performance.md``). False keeps them in
            the model's dtype (logged): their attention is the model's own, the full-attention
            layers are still quantized, and a decode graph with a quantized layer and no sliding
            store is again captured in a CUDA graph (speed not measured).
    """

    key_bits: tuple[int, int, int] = (16, 4, 2)
    key_tier_fractions: tuple[float, float] = (1 / 32, 1 / 8)
    key_tiering: KeyTiering = KeyTiering.BUDGET
    key_bits_budget: float | None = None
    key_thresholds: tuple[float, float] | None = None
    value_bits: int = 2
    group_size: int = 32
    value_group_size: int = 32
    residual_length: int = 128
    rpc_ratio: float = 0.0
    sink_tokens: int = 0
    layer_overrides: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    layer_plan: str | None = None
    cuda_graphs: bool = True
    prefill_compiler: str = "eager"
    quantize_sliding_windows: bool = True

    def __post_init__(self) -> None:
        for name in ("cuda_graphs", "quantize_sliding_windows"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")
        if self.prefill_compiler not in PREFILL_COMPILERS:
            raise ValueError(
                f"prefill_compiler={self.prefill_compiler!r}: allowed values are {list(PREFILL_COMPILERS)}"
            )
        _set(self, "key_bits", tuple(self.key_bits))
        _set(self, "key_tier_fractions", tuple(float(f) for f in self.key_tier_fractions))
        _set(self, "key_tiering", _enum(KeyTiering, self.key_tiering, "key_tiering"))
        if len(self.key_bits) != 3 or any(b not in KEY_TIER_BITS_ALLOWED for b in self.key_bits):
            raise ValueError(
                f"key_bits={self.key_bits!r}: expected three tier widths (high, mid, low), "
                f"each one of {KEY_TIER_BITS_ALLOWED}"
            )
        high, mid = self.key_tier_fractions if len(self.key_tier_fractions) == 2 else (-1, -1)
        if not (0.0 <= high <= 1.0 and 0.0 <= mid <= 1.0 and high + mid <= 1.0):
            raise ValueError(
                f"key_tier_fractions={self.key_tier_fractions!r}: expected (high, mid) with each "
                "fraction in [0, 1] and high + mid <= 1"
            )
        if self.key_tiering is KeyTiering.UNIFORM and (high, mid) not in ((1.0, 0.0), (0.0, 1.0), (0.0, 0.0)):
            raise ValueError(
                f"key_tier_fractions={self.key_tier_fractions!r} with key_tiering='uniform': uniform "
                "tiering puts every channel in one tier; allowed (1, 0), (0, 1) or (0, 0)"
            )
        _check_choice("value_bits", self.value_bits, VALUE_BITS_ALLOWED)
        _check_choice("group_size", self.group_size, GROUP_SIZES_ALLOWED)
        _check_choice("value_group_size", self.value_group_size, GROUP_SIZES_ALLOWED)
        for name in ("residual_length", "sink_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r}: expected a non-negative integer")
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length={self.residual_length}: must be a multiple of group_size="
                f"{self.group_size} (tokens leave the window one group at a time)"
            )
        ratio = self.rpc_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"rpc_ratio={ratio!r}: expected a ratio in [0, 1) (0 = fixed residual window)")
        if abs(ratio * 1000 - round(ratio * 1000)) > 1e-9:
            raise ValueError(
                f"rpc_ratio={ratio!r}: expected a multiple of 0.001 (the store keeps it in permille)"
            )
        _set(self, "rpc_ratio", float(ratio))
        self._check_budget_and_thresholds()
        overrides = self.layer_overrides
        if self.layer_plan is not None:
            if not isinstance(self.layer_plan, (str, os.PathLike)):
                raise ValueError(f"layer_plan={self.layer_plan!r}: expected the path of a JSON layer plan")
            _set(self, "layer_plan", os.fspath(self.layer_plan))
            overrides = _merge_overrides(load_layer_plan(self.layer_plan), overrides)
        _set(self, "layer_overrides", _freeze_overrides(overrides, self))

    def _check_budget_and_thresholds(self) -> None:
        budget = self.key_bits_budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
                raise ValueError(f"key_bits_budget={budget!r}: expected a number of bits or None")
            _set(self, "key_bits_budget", float(budget))
            low, high = min(self.key_bits), max(self.key_bits)
            if self.key_tiering is KeyTiering.UNIFORM:
                if budget not in self.key_bits:
                    raise ValueError(
                        f"key_bits_budget={budget!r} with key_tiering='uniform': uniform tiering puts every "
                        f"channel in one tier, so the budget must be one of key_bits={self.key_bits}"
                    )
            elif not low <= budget <= high:
                raise ValueError(
                    f"key_bits_budget={budget!r}: expected a mean key width between the lowest and the "
                    f"highest of key_bits={self.key_bits}, i.e. in [{low}, {high}]"
                )
            elif not self.key_bits[0] > self.key_bits[1] > self.key_bits[2]:
                raise ValueError(
                    f"key_bits={self.key_bits} with key_bits_budget: the (high, mid, low) widths must be "
                    "strictly decreasing, e.g. (16, 4, 2)"
                )
        thresholds = self.key_thresholds
        if thresholds is not None:
            try:
                pair = tuple(float(t) for t in thresholds)
            except (TypeError, ValueError):
                pair = ()
            if len(pair) != 2 or not (pair[0] >= pair[1] >= 0.0) or not all(map(math.isfinite, pair)):
                raise ValueError(
                    f"key_thresholds={thresholds!r}: expected (tau_high, tau_mid) with "
                    "tau_high >= tau_mid >= 0"
                )
            _set(self, "key_thresholds", pair)
        if self.key_tiering is KeyTiering.THRESHOLDS and thresholds is None:
            raise ValueError(
                "key_tiering='thresholds' needs key_thresholds=(tau_high, tau_mid); their tier sizes per "
                "layer come from key_tier_fractions (calibrate them with `mixkvq-profile --thresholds`)"
            )

    def for_layer(self, layer_index: int) -> MixKVQConfig:
        """The config of one attention layer: this config with its ``layer_overrides`` applied."""
        overrides = self.layer_overrides.get(layer_index)
        if not overrides:
            if not self.layer_overrides and self.layer_plan is None:
                return self
            return dataclasses.replace(self, layer_overrides={}, layer_plan=None)
        return dataclasses.replace(self, layer_overrides={}, layer_plan=None, **overrides)

    @property
    def rpc_permille(self) -> int:
        """``rpc_ratio`` in thousandths: the store's integer form, so host and kernels round alike."""
        return round(self.rpc_ratio * 1000)

    def tier_channels(self, head_dim: int) -> tuple[int, int, int]:
        """Channels per key group in the (high, mid, low) tiers for a given head_dim.

        Without ``key_bits_budget``: ``round(fraction * head_dim)`` for the high and mid tiers. With a
        budget of b bits (total ``floor(b * head_dim)`` bits per token of a group): start with every
        channel low; give the high tier ``round(key_tier_fractions[0] * head_dim)`` channels or as many
        as the budget affords; spend the rest on mid channels; if every remaining channel is mid and
        bits are left, upgrade mid channels to high. Example, head_dim 64, (16, 4, 2) bits, default
        high fraction 1/32: b=2.5 -> (2, 2, 60), b=3.0 -> (2, 18, 44), b=2.3 -> (1, 2, 61) (2.28 bits).
        """
        if self.key_bits_budget is None:
            high = round(self.key_tier_fractions[0] * head_dim)
            mid = min(round(self.key_tier_fractions[1] * head_dim), head_dim - high)
            return high, mid, head_dim - high - mid
        if self.key_tiering is KeyTiering.UNIFORM:
            counts = [0, 0, 0]
            counts[self.key_bits.index(int(self.key_bits_budget))] = head_dim
            return counts[0], counts[1], counts[2]
        b_high, b_mid, b_low = self.key_bits
        spare = math.floor(self.key_bits_budget * head_dim + 1e-6) - b_low * head_dim
        high = min(round(self.key_tier_fractions[0] * head_dim), spare // (b_high - b_low), head_dim)
        spare -= high * (b_high - b_low)
        mid = min(head_dim - high, spare // (b_mid - b_low))
        spare -= mid * (b_mid - b_low)
        if high + mid == head_dim:
            upgrade = min(mid, spare // (b_high - b_mid))
            high, mid = high + upgrade, mid - upgrade
        return high, mid, head_dim - high - mid

    def key_bits_nominal(self, head_dim: int) -> float:
        """Mean nominal code bits per key element of a packed group (no scales, zeros or order)."""
        channels = self.tier_channels(head_dim)
        return sum(c * b for c, b in zip(channels, self.key_bits)) / head_dim

    @classmethod
    def from_plan(cls, path: str | os.PathLike, **fields: Any) -> MixKVQConfig:
        """A config whose ``layer_overrides`` come from the JSON plan at ``path`` (plus ``fields``)."""
        return cls(layer_plan=os.fspath(path), **fields)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> MixKVQConfig:
        """Build a config from ``torch.compile(..., options=...)``: an optional ``"preset"`` plus fields."""
        options = dict(options or {})
        preset = options.pop("preset", "mixkvq")
        base = preset_config(preset)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown mixkvq option(s) {unknown}; allowed: 'preset' and {sorted(fields)}")
        return dataclasses.replace(base, **options) if options else base


def load_layer_plan(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """The ``layer_overrides`` of a JSON layer plan written by ``mixkvq-profile``.

    The file is ``{"format": "mixkvq-layer-plan", "version": 1, "layer_overrides": {"0": {...}, ...},
    ...}`` (other keys, e.g. the profiler's scores, are informational). ``ValueError`` naming the file
    for a missing file, bad JSON or another format.
    """
    try:
        with open(path, encoding="utf-8") as file:
            plan = json.load(file)
    except OSError as error:
        raise ValueError(f"layer_plan={os.fspath(path)!r}: cannot read the file ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"layer_plan={os.fspath(path)!r}: not valid JSON ({error})") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(
            f'layer_plan={os.fspath(path)!r}: expected a JSON object with "format": "{PLAN_FORMAT}" '
            "(written by mixkvq-profile)"
        )
    overrides = plan.get("layer_overrides")
    if not isinstance(overrides, dict):
        raise ValueError(f'layer_plan={os.fspath(path)!r}: "layer_overrides" must be an object')
    return {int(layer) if str(layer).isdigit() else layer: dict(f) for layer, f in overrides.items()}


def _merge_overrides(
    base: Mapping[Any, Mapping[str, Any]], top: Mapping[Any, Mapping[str, Any]]
) -> dict[Any, dict[str, Any]]:
    merged: dict[Any, dict[str, Any]] = {}
    for source in (base, top):
        if not isinstance(source, Mapping):
            return top  # type: ignore[return-value]  # _freeze_overrides reports the bad value
        for layer, fields in source.items():
            key = int(layer) if isinstance(layer, str) and layer.isdigit() else layer
            if not isinstance(fields, Mapping):
                merged[key] = fields  # type: ignore[assignment]
                continue
            merged.setdefault(key, {}).update(fields)
    return merged


def _set(config: MixKVQConfig, name: str, value: Any) -> None:
    object.__setattr__(config, name, value)


def _enum(enum_type: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = [member.value for member in enum_type]
        aliases = KEY_TIERING_ALIASES if enum_type is KeyTiering else {}
        note = "".join(f" ({alias!r} is an alias of {target!r})" for alias, target in aliases.items())
        raise ValueError(f"{name}={value!r}: allowed values are {allowed}{note}") from None


def _check_choice(name: str, value: Any, allowed: tuple[int, ...]) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed values are {list(allowed)}")


def _freeze_overrides(
    overrides: Mapping[int, Mapping[str, Any]], config: MixKVQConfig
) -> Mapping[int, Mapping[str, Any]]:
    if not isinstance(overrides, Mapping):
        raise ValueError(
            f"layer_overrides={overrides!r}: expected a mapping {{layer_index: {{field: value}}}}"
        )
    frozen = {}
    for layer, fields in overrides.items():
        layer_index = int(layer) if isinstance(layer, str) and layer.isdigit() else layer
        if not isinstance(layer_index, int) or isinstance(layer_index, bool) or layer_index < 0:
            raise ValueError(f"layer_overrides key {layer!r}: expected a non-negative layer index")
        if not isinstance(fields, Mapping):
            raise ValueError(f"layer_overrides[{layer!r}]={fields!r}: expected a mapping of fields")
        bad = sorted(set(fields) - set(LAYER_OVERRIDE_FIELDS))
        if bad:
            raise ValueError(
                f"layer_overrides[{layer!r}] has unknown field(s) {bad}; "
                f"allowed: {list(LAYER_OVERRIDE_FIELDS)}"
            )
        # Validate the overridden layer config now, with a message naming the layer.
        try:
            dataclasses.replace(config, layer_overrides={}, layer_plan=None, **fields)
        except ValueError as error:
            raise ValueError(f"layer_overrides[{layer_index}]: {error}") from None
        frozen[layer_index] = MappingProxyType(dict(fields))
    return MappingProxyType(frozen)


PRESETS: Mapping[str, MixKVQConfig] = MappingProxyType(
    {
        # The whole rewrite runs, but every element is stored in the model dtype: equals eager.
        "passthrough": MixKVQConfig(
            key_tier_fractions=(1.0, 0.0), key_tiering=KeyTiering.UNIFORM, value_bits=16
        ),
        "kivi2": MixKVQConfig(key_tier_fractions=(0.0, 0.0), key_tiering=KeyTiering.UNIFORM, value_bits=2),
        "kivi4": MixKVQConfig(key_tier_fractions=(0.0, 1.0), key_tiering=KeyTiering.UNIFORM, value_bits=4),
        "mixkvq": MixKVQConfig(),
    }
)


def preset_config(name: str) -> MixKVQConfig:
    """The config of a named preset; ``ValueError`` listing the presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown mixkvq preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]
