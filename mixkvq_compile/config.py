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
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

KEY_TIER_BITS_ALLOWED = (2, 4, 16)
VALUE_BITS_ALLOWED = (2, 4, 16)
GROUP_SIZES_ALLOWED = (8, 16, 32, 64, 128)
LAYER_OVERRIDE_FIELDS = ("key_bits", "key_tier_fractions", "key_tiering", "value_bits")


class KeyTiering(str, enum.Enum):
    """How the channels of each flushed key group are assigned to the high/mid/low tiers.

    UNIFORM:  every channel in one tier (KIVI); the tier fractions must put all channels in one tier.
    SALIENCE: MixKVQ query-aware salience A_d = I_d * S_d, with I_d the running mean |q_d| (post-RoPE,
              over the query heads of the KV head) and S_d the channel's 2-bit step in the group; the
              ``key_tier_fractions`` highest-salience channels go to the high and mid tiers.
    """

    UNIFORM = "uniform"
    SALIENCE = "salience"


@dataclasses.dataclass(frozen=True)
class MixKVQConfig:
    """Quantized KV-cache settings. Defaults follow MixKVQ (keys 16/4/2-bit per channel, values 2-bit).

    Attributes:
        key_bits: bits of the (high, mid, low) key tiers, each in {16, 4, 2}; 16 stores the model dtype.
        key_tier_fractions: share of each key group's channels in the (high, mid) tiers; the rest
            is low. The counts are ``round(fraction * head_dim)`` and fixed per layer, so the store has
            a static size (CUDA-graph friendly); the tiering policy only decides *which* channels.
        key_tiering: policy choosing the channels of each tier (see ``KeyTiering``).
        value_bits: bits of every value element, in {16, 4, 2}; values are quantized per token.
        group_size: tokens per key quantization group (keys are quantized per channel over this many
            tokens); tokens leave the residual window one whole group at a time.
        value_group_size: channels per value quantization group (values are quantized per token);
            must divide the model's head_dim.
        residual_length: recent tokens kept in full precision (R); a multiple of ``group_size``.
        sink_tokens: first tokens of the sequence kept in full precision forever (0 = none).
        layer_overrides: ``{layer_index: {field: value}}`` for fields in ``LAYER_OVERRIDE_FIELDS``;
            layer_index counts attention sites in graph order (the model's layer order).
    """

    key_bits: tuple[int, int, int] = (16, 4, 2)
    key_tier_fractions: tuple[float, float] = (1 / 32, 1 / 8)
    key_tiering: KeyTiering = KeyTiering.SALIENCE
    value_bits: int = 2
    group_size: int = 32
    value_group_size: int = 32
    residual_length: int = 128
    sink_tokens: int = 0
    layer_overrides: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
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
        _set(self, "layer_overrides", _freeze_overrides(self.layer_overrides, self))

    def for_layer(self, layer_index: int) -> MixKVQConfig:
        """The config of one attention layer: this config with its ``layer_overrides`` applied."""
        overrides = self.layer_overrides.get(layer_index)
        if not overrides:
            return self if not self.layer_overrides else dataclasses.replace(self, layer_overrides={})
        return dataclasses.replace(self, layer_overrides={}, **overrides)

    def tier_channels(self, head_dim: int) -> tuple[int, int, int]:
        """Channels per key group in the (high, mid, low) tiers for a given head_dim."""
        high = round(self.key_tier_fractions[0] * head_dim)
        mid = min(round(self.key_tier_fractions[1] * head_dim), head_dim - high)
        return high, mid, head_dim - high - mid

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


def _set(config: MixKVQConfig, name: str, value: Any) -> None:
    object.__setattr__(config, name, value)


def _enum(enum_type: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = [member.value for member in enum_type]
        raise ValueError(f"{name}={value!r}: allowed values are {allowed}") from None


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
            dataclasses.replace(config, layer_overrides={}, **fields)
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
