"""Name → function registries: a new paper becomes a small function registered by name (DESIGN.md, principle 2).

Each entry may carry a frozen dataclass of its arguments; :meth:`Registry.parse_args` turns a config mapping into
that dataclass and rejects unknown keys or wrong types with a message naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Mapping, Optional

from jaxtok.specs import CommitPolicySpec, DecodeMethodSpec, DraftPolicySpec, ObjectiveSpec


class ConfigError(ValueError):
    """A configuration problem found before any compute: names the key, the bad value and the allowed ones."""


# Setting names users bring from TRL (GRPOConfig, GKDConfig), verl (actor/rollout/algorithm) and Tunix (GRPOConfig)
# -> where jaxtok keeps the same setting, and how its default or meaning differs. An unknown key with one of these
# names is answered with the pointer (a did-you-mean), never silently renamed: the semantics are not always equal.
PEER_NAMES: dict[str, str] = {
    "beta": "objective.args.kl_coef, the KL coefficient of policy_gradient (default 0 = off, as TRL's beta=0; verl "
            "kl_loss_coef); in objective opd, objective.args.beta is the JSD mixture weight",
    "kl_loss_coef": "objective.args.kl_coef",
    "kl_ctl": "objective.args.kl_coef (a fixed coefficient; no adaptive KL controller)",
    "epsilon": "objective.args.eps_low (TRL's epsilon; also sets the upper clip unless eps_high is given: "
               "objective.args.eps_high)",
    "epsilon_low": "objective.args.eps_low",
    "epsilon_high": "objective.args.eps_high (DAPO clip-higher; loss_mode dapo defaults to 0.28)",
    "clip_ratio": "objective.args.eps_low and objective.args.eps_high (verl clip_ratio)",
    "clip_ratio_low": "objective.args.eps_low",
    "clip_ratio_high": "objective.args.eps_high",
    "clip_ratio_c": "objective.args.dual_clip_c (dual clip is ON by default here, c = 3 as verl; TRL has none: "
                    "set dual_clip_c: null to match TRL)",
    "num_iterations": "rollout.inner_epochs (optimizer steps per rollout batch, PPO's mu)",
    "ppo_epochs": "rollout.inner_epochs",
    "num_generations": "rollout.num_generations",
    "num_samples": "rollout.num_generations",
    "max_completion_length": "rollout.max_new_tokens",
    "max_response_length": "rollout.max_new_tokens",
    "max_tokens_to_generate": "rollout.max_new_tokens",
    "max_prompt_length": "data.prompt_len",
    "kl_loss_type": "objective.args.kl_estimator (k1 | k2 | k3 | k3+; verl's low_var_kl is k3)",
    "low_var_kl": "objective.args.kl_estimator: k3 (verl's low_var_kl is the k3 estimator)",
    "loss_type": "objective.args.loss_mode (grpo | dr_grpo | dapo | ...) and objective.args.aggregation; TRL's bnpo "
                 "is aggregation: token-mean",
    "bnpo": "objective.args.aggregation: token-mean (TRL's loss_type bnpo)",
    "loss_agg_mode": "objective.args.aggregation (verl's names: token-mean, seq-mean-token-mean, seq-mean-token-sum, "
                     "seq-mean-token-sum-norm)",
    "scale_rewards": "objective.args.advantage_estimator (grpo: std-scaled; dr_grpo: not scaled)",
    "lmbda": "rollout.off_policy_fraction = 1 - lmbda (TRL GKD's lmbda is the on-policy fraction; jaxtok's key "
             "counts the off-policy share)",
    "learning_rate": "optimizer.lr",
    "max_steps": "train.steps",
    "gradient_accumulation_steps": "train.micro_batches",
    "per_device_train_batch_size": "data.batch_size (the global batch, in rows)",
    "train_batch_size": "data.batch_size (the global batch, in rows)",
}


def peer_hint(key: str) -> str:
    """`` (TRL/verl/Tunix name: ...)`` when the last part of dotted ``key`` is a peer's setting name, else ''."""
    name = key.rsplit(".", 1)[-1]
    return f" ({name!r} is a TRL/verl/Tunix name; in jaxtok: {PEER_NAMES[name]})" if name in PEER_NAMES else ""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered callable, the dataclass of its arguments (``None``: it takes none) and the family's typed
    ``spec`` (:mod:`jaxtok.specs`; ``None`` for families without one, e.g. tasks or rewards)."""

    name: str
    fn: Callable
    config_cls: Optional[type]
    spec: Any = None


class Registry:
    """Registry of named callables of one kind (objectives, tasks, selection rules, decode policies, ...)."""

    def __init__(self, kind: str, spec_cls: Optional[type] = None):
        self.kind = kind
        self.spec_cls = spec_cls
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config_cls: Optional[type] = None, **spec: Any) -> Callable[[Callable], Callable]:
        """Decorator: ``@OBJECTIVES.register("opd", OPDArgs, data="rollout")``; ``config_cls`` is the frozen
        dataclass of the entry's arguments (``None``: it takes none); keywords are the fields of the family's
        spec (:mod:`jaxtok.specs`), a TypeError at import time when one is not a field."""
        if config_cls is not None and not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"{self.kind} {name!r}: config_cls must be a dataclass, got {config_cls!r}")
        if self.spec_cls is None and spec:
            raise TypeError(f"{self.kind} {name!r}: this registry has no spec; got {sorted(spec)}")
        built = self.spec_cls(**spec) if self.spec_cls is not None else None

        def deco(fn: Callable) -> Callable:
            if name in self._entries and self._entries[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, config_cls, built)
            return fn

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str, key: Optional[str] = None) -> Entry:
        """The entry of ``name``; an unknown name raises ConfigError naming ``key`` (e.g. ``objective.name``),
        the value and the registered names."""
        if name not in self._entries:
            where = f"{key}={name!r}" if key else f"{self.kind} {name!r}"
            raise ConfigError(f"{where} is not a known {self.kind}; allowed: {self.names()}")
        return self._entries[name]

    def get(self, name: str, key: Optional[str] = None) -> Callable:
        """The callable registered as ``name`` (ConfigError listing the allowed names if there is none)."""
        return self.entry(name, key).fn

    def parse_args(self, name: str, mapping: Optional[Mapping[str, Any]], key: str = "args") -> Any:
        """Build the entry's argument dataclass from ``mapping``; unknown keys and wrong types raise ConfigError.

        ``key`` is the dotted config key of ``mapping`` (e.g. ``objective.args``) used in messages."""
        cls = self.entry(name).config_cls
        mapping = dict(mapping or {})
        if cls is None:
            if mapping:
                raise ConfigError(f"{key}: {self.kind} {name!r} takes no arguments, got {sorted(mapping)}")
            return None
        return build_dataclass(cls, mapping, key)


@dataclasses.dataclass(frozen=True)
class Selection:
    """A token-selection rule as a config writes it, ``{rule: <SELECTIONS name>, ...that rule's arguments}``,
    parsed: the rule's name and its argument dataclass (:mod:`jaxtok.select`). An argument field typed
    ``Selection`` (``OPDArgs.selection``) is built from that mapping by :func:`build_dataclass`."""

    rule: str
    args: Any = None

    @classmethod
    def parse(cls, value: Any, key: str) -> "Selection":
        """``value`` (a Selection, or a mapping with a ``rule`` key and that rule's arguments) checked against
        :data:`SELECTIONS`; ConfigError naming ``key`` for a missing or unknown rule or bad arguments."""
        if isinstance(value, Selection):
            return value
        if not isinstance(value, Mapping) or "rule" not in value:
            raise ConfigError(f"{key}={value!r}: a mapping with a 'rule' key, one of {SELECTIONS.names()}")
        rule = value["rule"]
        SELECTIONS.entry(rule, f"{key}.rule")
        return cls(rule, SELECTIONS.parse_args(rule, {k: v for k, v in value.items() if k != "rule"}, key))


def build_dataclass(cls: type, mapping: Mapping[str, Any], key: str) -> Any:
    """``cls(**mapping)`` with checks: unknown keys, and values that do not match simple field types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        bad = unknown[0]
        raise ConfigError(f"{key}.{bad}={mapping[bad]!r}: unknown key{peer_hint(bad)}; allowed keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in mapping.items():
        values[name] = _coerce(hints.get(name, Any), value, f"{key}.{name}", finite=_finite_default(fields[name]))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _finite_default(f: dataclasses.Field) -> bool:
    """False when the field's default holds a NaN or infinity (then non-finite values are meaningful for it)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return True

    def finite(x):
        if isinstance(x, float):
            return math.isfinite(x)
        if isinstance(x, (list, tuple)):
            return all(finite(v) for v in x)
        return True

    return finite(default)


def _coerce(tp, value, key, finite: bool = True):
    """``value`` checked against the type hint ``tp`` (bool/int/float/str, Optional/Union, Literal, list/tuple of
    those); ints are accepted for floats and lists for tuples; with ``finite`` a float NaN or infinity is refused.
    a :class:`Selection` from its mapping. Other types pass through."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is Selection:
        return Selection.parse(value, key)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise ConfigError(f"{key}=None: a value is required")
        errors = []
        for a in args:
            try:
                return _coerce(a, value, key, finite)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{key}={value!r}: {' or '.join(errors)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: allowed values {list(allowed)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if finite and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} items")
            items = [_coerce(a, v, f"{key}[{i}]", finite) for i, (a, v) in enumerate(zip(args, value))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(elem, v, f"{key}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    return value


# The global registries. Other modules register into them; jaxtok/ itself never imports models/train/decode.
OBJECTIVES = Registry("objective", ObjectiveSpec)  # objective.name (jaxtok.train.objectives)
TASKS = Registry("task")  # data.task (jaxtok.tasks)
SELECTIONS = Registry("selection rule")  # token-selection rules (jaxtok.select)
DRAFT_POLICIES = Registry("draft-length policy", DraftPolicySpec)  # decode.policy with decode.method=speculative
COMMIT_POLICIES = Registry("commit policy", CommitPolicySpec)  # decode.policy with decode.method=diffusion
LOGIT_GUIDES = Registry("logit guide")  # decode.policy with decode.method=greedy|sample (LenVM length control)
DECODE_METHODS = Registry("decode method", DecodeMethodSpec)  # decode.method (jaxtok.decode.run: its step builders)
DRAFTERS = Registry("drafter")  # decode.drafter with decode.method=speculative (jaxtok.decode.run)
REWARDS = Registry("reward")  # rollout.rewards keys (jaxtok.train.rewards)
BENCHES = Registry("benchmark")  # bench.name (jaxtok.bench registers into it)
LOSS_MODES = Registry("loss mode")  # objective.args.loss_mode of policy_gradient (jaxtok.policy)
