"""Tied-LoRA configuration: factor flags, the paper's presets and one validated, frozen config.

The update (docs/design.md section 1) for layer l is ``z = W_l x + s * v_l ⊙ (B (u_l ⊙ (A x)))`` with
``s = alpha / r``. Each of A, B (shared across layers when ``tied``), u_l, v_l is trained or frozen; :data:`PRESETS`
names the flag sets of the paper's Table 1 (Renduchintala et al., arXiv 2311.09578 v2). Everything that can be checked
without the model's shape is checked once, in :meth:`TiedLoraConfig.__post_init__`; the shape-dependent checks live in
:meth:`TiedLoraConfig.validate_for_model`.

Plain Python only: this module imports neither torch, NeMo nor Megatron.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from nemo_tiedlora.core.errors import TiedLoraConfigError

FACTOR_NAMES: tuple[str, ...] = ("A", "B", "u", "v")
"""Every adapter factor, in the order of the product ``v ⊙ B (u ⊙ A x)`` read right to left."""

TARGET_MODULES: tuple[str, ...] = ("attention_qkv",)
"""Supported targets (NeMo's name for Megatron's fused ``linear_qkv``)."""

A_INIT_METHODS: tuple[str, ...] = ("kaiming", "xavier", "normal")
"""Initializers for a trained, non-zero A (see :func:`nemo_tiedlora.core.functional.init_factors`)."""

_FLAG_NAMES: tuple[str, ...] = ("tied", "train_a", "train_b", "train_u", "train_v")


@dataclass(frozen=True)
class FactorFlags:
    """Which factors are shared by all layers (``tied``) and which are trained.

    ``tied=False`` gives every layer its own A and B (LoRA); u and v are always per layer.
    """

    tied: bool
    train_a: bool
    train_b: bool
    train_u: bool
    train_v: bool

    @property
    def zero_factor(self) -> str:
        """The one factor initialized to zero (docs/design.md section 3), so the model equals the base at step 0.

        B if B is trained, else v if v is trained, else A if A is trained, else u. It is always a trained
        factor when any factor is trained, so no two zero factors deadlock the gradients.
        """
        if self.train_b:
            return "B"
        if self.train_v:
            return "v"
        if self.train_a:
            return "A"
        return "u"

    def trains(self, factor: str) -> bool:
        """Whether ``factor`` (one of :data:`FACTOR_NAMES`) is trained."""
        by_name = {"A": self.train_a, "B": self.train_b, "u": self.train_u, "v": self.train_v}
        if factor not in by_name:
            raise KeyError(f"unknown factor {factor!r}: expected one of {', '.join(FACTOR_NAMES)}")
        return by_name[factor]

    @property
    def trained_factors(self) -> tuple[str, ...]:
        """The trained factors, in :data:`FACTOR_NAMES` order."""
        return tuple(name for name in FACTOR_NAMES if self.trains(name))


def _flags(*, tied: bool, a: bool, b: bool, u: bool, v: bool) -> FactorFlags:
    return FactorFlags(tied=tied, train_a=a, train_b=b, train_u=u, train_v=v)


PRESETS: dict[str, FactorFlags] = {
    # name: flags                                           trainable parameters (L layers, d hidden, r rank, MHA)
    "lora": _flags(tied=False, a=True, b=True, u=False, v=False),  # 4Ldr
    "vera": _flags(tied=True, a=False, b=False, u=True, v=True),  # L(r + 3d)
    "tl1": _flags(tied=True, a=True, b=False, u=False, v=False),  # dr
    "tl2": _flags(tied=True, a=True, b=False, u=True, v=True),  # dr + L(r + 3d)
    "tl3": _flags(tied=True, a=False, b=True, u=False, v=False),  # 3dr
    "tl4": _flags(tied=True, a=False, b=True, u=True, v=False),  # 3dr + Lr
    "tl5": _flags(tied=True, a=True, b=True, u=False, v=False),  # 4dr
    "tl6": _flags(tied=True, a=True, b=True, u=True, v=True),  # 4dr + L(r + 3d), the paper's recommendation
}
"""The paper's Table 1 as flag sets (docs/design.md section 2)."""

_VERA_U_INIT = 0.1  # VeRA initializes its r-wide scaling vector d (our u) to 0.1
_DEFAULT_SCALE_INIT = 1.0

# NeMo YAML key (model.peft.tiedlora_tuning) -> TiedLoraConfig field
_NEMO_KEYS: dict[str, str] = {
    "adapter_dim": "rank",
    "alpha": "alpha",
    "preset": "preset",
    "tied": "tied",
    "train_a": "train_a",
    "train_b": "train_b",
    "train_u": "train_u",
    "train_v": "train_v",
    "adapter_dropout": "dropout",
    "u_init": "u_init",
    "v_init": "v_init",
    "a_init": "a_init",
    "column_init_method": "a_init",  # NeMo LoRA's name for the down-projection initializer
    "seed": "seed",
    "target_modules": "target_modules",
    "layer_selection": "layer_selection",
}


# Keys of model.peft.tiedlora_tuning that configure the training run, not the adapter: read by
# :class:`LossScalingGuard` (and never stored in an adapter archive).
RUN_KEYS: tuple[str, ...] = ("fp16_max_skipped_steps", "fp16_min_loss_scale")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class TiedLoraConfig:
    """One Tied-LoRA adapter configuration, validated at construction.

    Flags: ``preset`` gives all five of ``tied``/``train_a``/``train_b``/``train_u``/``train_v``; an explicit
    flag overrides the preset's value; with ``preset=None`` all five must be given. ``alpha=None`` means
    ``alpha = rank`` (scale 1, as in the paper). ``u_init``/``v_init`` are the values u and v start at when
    they are not the zero factor (trained or frozen). ``a_init`` initializes a trained A that is not the zero
    factor. ``seed`` seeds every factor's initialization, including frozen random A/B, so they can be
    regenerated. ``layer_selection`` lists 1-based layer numbers (None: every layer).
    """

    rank: int = 8
    alpha: float | None = None
    preset: str | None = "tl6"
    tied: bool | None = None
    train_a: bool | None = None
    train_b: bool | None = None
    train_u: bool | None = None
    train_v: bool | None = None
    dropout: float = 0.0
    u_init: float | None = None
    v_init: float | None = None
    a_init: str = "kaiming"
    seed: int = 1234
    target_modules: tuple[str, ...] = TARGET_MODULES
    layer_selection: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Normalize sequences (lists, OmegaConf ListConfig) to tuples so the config stays hashable.
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        elif isinstance(self.target_modules, Sequence):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.layer_selection, Sequence) and not isinstance(self.layer_selection, str):
            object.__setattr__(self, "layer_selection", tuple(self.layer_selection))
        self._validate_scalars()
        self._validate_flags()
        self._validate_inits()
        self._validate_targets()

    def _validate_scalars(self) -> None:
        if not _is_int(self.rank) or self.rank <= 0:
            raise TiedLoraConfigError(
                f"rank (adapter_dim) must be a positive int, got {self.rank!r}: set adapter_dim to e.g. 8"
            )
        if self.alpha is not None and (not _is_number(self.alpha) or self.alpha <= 0):
            raise TiedLoraConfigError(
                f"alpha must be a positive number, got {self.alpha!r}: set alpha > 0, or leave it unset for "
                f"alpha = rank (scale 1, as in the paper)"
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise TiedLoraConfigError(
                f"dropout (adapter_dropout) must be in [0, 1), got {self.dropout!r}: use e.g. 0.0 or 0.1"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise TiedLoraConfigError(f"seed must be a non-negative int, got {self.seed!r}: use e.g. 1234")

    def _validate_flags(self) -> None:
        for name in _FLAG_NAMES:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TiedLoraConfigError(
                    f"{name} must be true, false or unset (unset takes the preset's value), got {value!r}"
                )
        if self.preset is None:
            missing = [name for name in _FLAG_NAMES if getattr(self, name) is None]
            if missing:
                raise TiedLoraConfigError(
                    f"preset is None but {', '.join(missing)} not given: give all five of "
                    f"{', '.join(_FLAG_NAMES)}, or pick a preset such as tl6"
                )
        elif self.preset not in PRESETS:
            raise TiedLoraConfigError(
                f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}, or set preset to None "
                f"and give all five of {', '.join(_FLAG_NAMES)}"
            )
        if not self.flags.trained_factors:
            raise TiedLoraConfigError(
                "all four factors A, B, u, v are frozen, so there is nothing to train: set at least one of "
                "train_a/train_b/train_u/train_v true or pick a preset such as tl6"
            )

    def _validate_inits(self) -> None:
        if self.a_init not in A_INIT_METHODS:
            raise TiedLoraConfigError(
                f"unknown a_init (column_init_method) {self.a_init!r}: choose one of "
                f"{', '.join(repr(m) for m in A_INIT_METHODS)} (the zero factor is chosen by rule, not by a_init)"
            )
        zero = self.flags.zero_factor
        for name, value in (("u", self.u_init), ("v", self.v_init)):
            if value is None:
                continue
            if not _is_number(value):
                raise TiedLoraConfigError(
                    f"{name}_init must be a finite number or unset, got {value!r}: use e.g. 1.0"
                )
            if value == 0 and zero != name:
                raise TiedLoraConfigError(
                    f"{name}_init=0 makes {name} a second zero factor besides {zero}, so the update stays zero "
                    f"(two zero factors deadlock the gradients): use a non-zero {name}_init such as 1.0"
                )

    def _validate_targets(self) -> None:
        if not isinstance(self.target_modules, tuple) or not self.target_modules:
            raise TiedLoraConfigError(
                f"target_modules must be a non-empty list, got {self.target_modules!r}: "
                f"set target_modules to {list(TARGET_MODULES)}"
            )
        unknown = [name for name in self.target_modules if name not in TARGET_MODULES]
        if unknown:
            raise TiedLoraConfigError(
                f"unsupported target module(s) {unknown}: the supported targets are {list(TARGET_MODULES)}; "
                f"set target_modules to {list(TARGET_MODULES)}"
            )
        if self.layer_selection is None:
            return
        if not isinstance(self.layer_selection, tuple) or not self.layer_selection:
            raise TiedLoraConfigError(
                f"layer_selection must be a non-empty list of 1-based layer numbers, got "
                f"{self.layer_selection!r}: leave it unset for all layers, or use e.g. [1, 2]"
            )
        not_int = [n for n in self.layer_selection if not _is_int(n)]
        if not_int:
            raise TiedLoraConfigError(
                f"layer_selection holds non-integers {not_int}: list 1-based layer numbers such as [1, 2]"
            )
        below = [n for n in self.layer_selection if n < 1]
        if below:
            raise TiedLoraConfigError(
                f"layer_selection holds layer numbers {below} below 1: layer numbers are 1-based (the first "
                f"layer is 1); add 1 to 0-based indices"
            )
        if len(set(self.layer_selection)) != len(self.layer_selection):
            twice = sorted({n for n in self.layer_selection if self.layer_selection.count(n) > 1})
            raise TiedLoraConfigError(f"layer_selection lists layers {twice} more than once: list each layer once")

    # Resolved values -------------------------------------------------------------------------------------------

    @property
    def flags(self) -> FactorFlags:
        """The five flags after applying explicit overrides to the preset."""
        base = PRESETS[self.preset] if self.preset is not None else None
        resolved = {
            name: getattr(self, name) if getattr(self, name) is not None else getattr(base, name)
            for name in _FLAG_NAMES
        }
        return FactorFlags(**resolved)

    @property
    def resolved_alpha(self) -> float:
        """``alpha``, or ``rank`` when unset."""
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """The update's scale ``s = alpha / rank``."""
        return self.resolved_alpha / self.rank

    @property
    def resolved_u_init(self) -> float:
        """Start value of u when it is not the zero factor: ``u_init``, or 0.1 for preset vera, else 1.0."""
        if self.u_init is not None:
            return float(self.u_init)
        return _VERA_U_INIT if self.preset == "vera" else _DEFAULT_SCALE_INIT

    @property
    def resolved_v_init(self) -> float:
        """Start value of v when it is not the zero factor: ``v_init``, or 1.0."""
        return _DEFAULT_SCALE_INIT if self.v_init is None else float(self.v_init)

    # Shape-dependent validation ----------------------------------------------------------------------------------

    def validate_for_model(self, *, hidden_size: int, num_layers: int, out_features: int) -> None:
        """Check the config against a model: hidden size ``d``, ``L`` layers, QKV output width ``out``.

        Raises :class:`TiedLoraConfigError` when the rank exceeds the hidden size or ``layer_selection``
        names layers the model does not have.
        """
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("out_features", out_features)):
            if not _is_int(value) or value <= 0:
                raise TiedLoraConfigError(f"{name} must be a positive int, got {value!r}: check the model config")
        if self.rank > hidden_size:
            raise TiedLoraConfigError(
                f"rank {self.rank} exceeds hidden size {hidden_size}: choose adapter_dim <= {hidden_size}"
            )
        if self.layer_selection is not None:
            beyond = [n for n in self.layer_selection if n > num_layers]
            if beyond:
                raise TiedLoraConfigError(
                    f"layer_selection names layers {beyond} but the model has num_layers={num_layers}: use "
                    f"1-based layer numbers from 1 to {num_layers}"
                )

    def num_adapted_layers(self, num_layers: int) -> int:
        """How many of the model's ``num_layers`` layers carry an adapter."""
        return num_layers if self.layer_selection is None else len(self.layer_selection)

    # Construction from NeMo YAML and checkpoint metadata -----------------------------------------------------

    @classmethod
    def from_nemo(cls, tuning_cfg: Mapping[str, Any]) -> TiedLoraConfig:
        """Build from the NeMo YAML section ``model.peft.tiedlora_tuning`` (a dict or an OmegaConf DictConfig).

        Keys: adapter_dim (-> rank), alpha, preset, tied, train_a, train_b, train_u, train_v, adapter_dropout
        (-> dropout), u_init, v_init, a_init (alias column_init_method), seed, target_modules, layer_selection.
        A missing key or a YAML null takes the default (so ``preset: null`` means the default preset; give all
        five flags to describe a custom set, they override the preset). Unknown keys raise.
        """
        unknown = sorted(str(key) for key in tuning_cfg if key not in _NEMO_KEYS and key not in RUN_KEYS)
        if unknown:
            raise TiedLoraConfigError(
                f"unknown key(s) {unknown} in model.peft.tiedlora_tuning: check the spelling; valid keys are "
                f"{', '.join((*_NEMO_KEYS, *RUN_KEYS))}"
            )
        LossScalingGuard.from_nemo(tuning_cfg)  # the run keys are validated here too, not stored
        kwargs: dict[str, Any] = {}
        for key in tuning_cfg:
            if key in RUN_KEYS:
                continue
            value = tuning_cfg[key]
            if value is None:
                continue
            if isinstance(value, Sequence) and not isinstance(value, str):
                value = tuple(value)
            name = _NEMO_KEYS[key]
            if name in kwargs and kwargs[name] != value:
                raise TiedLoraConfigError(
                    f"a_init={kwargs[name]!r} and column_init_method={value!r} disagree: give only one of them"
                )
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field plus the resolved values (flags, alpha, scale, inits)."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["target_modules"] = list(self.target_modules)
        data["layer_selection"] = None if self.layer_selection is None else list(self.layer_selection)
        data["resolved"] = self._resolved()
        return data

    def _resolved(self) -> dict[str, Any]:
        flags = self.flags
        return {
            "flags": asdict(flags),
            "zero_factor": flags.zero_factor,
            "alpha": self.resolved_alpha,
            "scale": self.scale,
            "u_init": self.resolved_u_init,
            "v_init": self.resolved_v_init,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TiedLoraConfig:
        """Inverse of :meth:`to_dict` (checkpoint metadata).

        When ``data`` carries the resolved values, they must match what this version resolves, so that an
        adapter is never silently rebuilt with other defaults.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in names and key != "resolved")
        if unknown:
            raise TiedLoraConfigError(
                f"unknown key(s) {unknown} in Tied-LoRA config metadata: valid keys are {', '.join(names)}, "
                f"resolved; the checkpoint may come from a newer nemo_tiedlora, upgrade to load it"
            )
        config = cls(**{name: data[name] for name in names if name in data})
        saved = data.get("resolved")
        if saved is not None:
            now = config._resolved()
            differ = sorted(key for key in now if key in saved and saved[key] != now[key])
            if differ:
                detail = "; ".join(f"{key}: saved {saved[key]!r}, now {now[key]!r}" for key in differ)
                raise TiedLoraConfigError(
                    f"Tied-LoRA config metadata resolves differently in this version ({detail}): set these "
                    f"values explicitly in the config or load with the nemo_tiedlora version that wrote it"
                )
        return config


@dataclass(frozen=True, kw_only=True)
class LossScalingGuard:
    """When fp16 loss scaling cannot recover (``model.peft.tiedlora_tuning.fp16_*``; read by
    ``nemo_tiedlora.nemo.loss_scaling``).

    In fp16 with NeMo's grad scaler an overflow (a NaN/Inf in the scaled gradients) skips the step and lowers the
    scale. The run stops only when the scaler cannot fix it: ``max_skipped_steps`` optimizer steps skipped in a
    row, or an overflow while the loss scale is already at or below ``min_loss_scale`` (the gradients are then
    non-finite without amplification: the forward pass or the data, not the scale).
    """

    max_skipped_steps: int = 50
    min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        if not _is_int(self.max_skipped_steps) or self.max_skipped_steps < 1:
            raise TiedLoraConfigError(
                f"fp16_max_skipped_steps must be a positive int, got {self.max_skipped_steps!r}: use e.g. 50 (the "
                "loss scale falls from 2^32 to 1 in about 33 skipped steps)")
        if not _is_number(self.min_loss_scale) or self.min_loss_scale <= 0:
            raise TiedLoraConfigError(
                f"fp16_min_loss_scale must be a positive number, got {self.min_loss_scale!r}: use e.g. 1.0 (an "
                "overflow at a scale of 1 or less is not the scaler's to fix)")

    @classmethod
    def from_nemo(cls, tuning_cfg: Mapping[str, Any]) -> LossScalingGuard:
        """From ``model.peft.tiedlora_tuning`` (missing keys or nulls take the defaults)."""
        names = {"fp16_max_skipped_steps": "max_skipped_steps", "fp16_min_loss_scale": "min_loss_scale"}
        return cls(**{names[key]: tuning_cfg[key] for key in names
                      if key in tuning_cfg and tuning_cfg[key] is not None})
