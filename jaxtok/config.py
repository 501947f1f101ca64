"""Config schema and loading (DESIGN.md, principle 5: config is the interface).

Frozen dataclasses are the schema; OmegaConf structured configs merge YAML files and dotted command-line overrides
onto it and reject unknown keys and wrong types. Field metadata declares allowed values (``choices``) and ranges
(``min``/``max``), checked by :func:`validate` before any compute. Every error is a :class:`ConfigError` naming the
dotted key, the bad value and what is allowed.

YAML files may include others with ``base: other.yaml`` (or a list), resolved relative to the including file and
merged first, so an experiment file states only what it changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxtok.registry import COMMIT_POLICIES, OBJECTIVES, TASKS, ConfigError, Registry

__all__ = ["Config", "ConfigError", "load_config", "to_yaml", "validate", "validate_names", "build_optimizer"]


def _f(default, *, choices: Optional[Sequence] = None, min=None, max=None, gt=None, doc: str = ""):
    """A dataclass field with validation metadata (``choices``, ``min``, ``max``, ``gt``) and a doc string."""
    meta = {"choices": choices, "min": min, "max": max, "gt": gt, "doc": doc}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to build or load."""

    preset: str = _f("tiny_student", doc="a name from jaxtok.models.presets (ignored with hf_path)")
    hf_path: Optional[str] = _f(None, doc="local Hugging Face checkpoint directory to load instead of a preset")
    init_from: Optional[str] = _f(None, doc="run directory (or checkpoint dir) of an earlier stage to start from")
    dtype: str = _f("float32", choices=("float32", "bfloat16"), doc="compute dtype of matmuls")
    param_dtype: str = _f("float32", choices=("float32", "bfloat16"), doc="storage dtype of parameters")
    vocab_size: Optional[int] = _f(None, min=1, doc="default: the tokenizer's vocabulary size")
    attention: str = _f("causal", choices=("causal", "bidirectional", "block_causal"), doc="attention kind")
    block_size: Optional[int] = _f(None, min=1, doc="block length for block_causal attention")
    overrides: Dict[str, Any] = _f({}, doc="ModelConfig field overrides, e.g. {num_layers: 3}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh: degrees of the ``data``, ``fsdp`` and ``tensor`` axes (-1 = fill with the remaining devices)."""

    data: int = _f(-1, min=-1)
    fsdp: int = _f(1, min=-1)
    tensor: int = _f(1, min=-1)
    distributed: bool = _f(False, doc="call jax.distributed.initialize (multi-host)")
    coordinator_address: Optional[str] = _f(None, doc="host:port of process 0; default from the environment")
    num_processes: Optional[int] = _f(None, min=1)
    process_id: Optional[int] = _f(None, min=0)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training/eval data: a synthetic task from jaxtok.tasks, or a local JSONL/Parquet prompt file."""

    task: str = _f("arith", doc="a registered task name, or 'jsonl' / 'parquet' with path")
    task_args: Dict[str, Any] = _f({}, doc="arguments of the task (its dataclass), e.g. {digits: 2, steps: 1}")
    path: Optional[str] = _f(None, doc="file for task=jsonl|parquet")
    prompt_field: str = _f("prompt")
    answer_field: str = _f("answer")
    target_field: Optional[str] = _f(None, doc="full response for SFT (default: the answer)")
    seq_len: int = _f(64, min=2, doc="SFT sequence length (prompt + response)")
    prompt_len: int = _f(32, min=1, doc="left-padded prompt length for rollouts and eval")
    batch_size: int = _f(32, min=1, doc="global batch size (rows)")
    num_train: int = _f(200_000, min=1, doc="training examples drawn from the task")
    num_eval: int = _f(256, min=1, doc="held-out examples for eval")
    seed: int = _f(0)
    worker_count: int = _f(0, min=0, doc="grain worker processes (0 = in-process)")
    overlong: str = _f("drop", choices=("drop", "error"), doc="over-long examples: dropped with a counted warning, or an error")


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    """optax optimizer and learning-rate schedule."""

    name: str = _f("adamw", choices=("adamw", "adam", "sgd", "lion", "adafactor"))
    lr: float = _f(1e-3, gt=0.0)
    schedule: str = _f("warmup_cosine", choices=("constant", "linear", "cosine", "warmup_cosine"))
    warmup_steps: int = _f(0, min=0)
    end_lr_ratio: float = _f(0.1, min=0.0, max=1.0, doc="final lr as a fraction of lr (cosine/linear)")
    weight_decay: float = _f(0.0, min=0.0)
    b1: float = _f(0.9, min=0.0, max=1.0)
    b2: float = _f(0.999, min=0.0, max=1.0)
    eps: float = _f(1e-8, gt=0.0)
    grad_clip: float = _f(1.0, min=0.0, doc="global-norm clipping; 0 = off")


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
    """The loss: a registered objective name and its arguments."""

    name: str = _f("sft", doc="a name from the OBJECTIVES registry")
    args: Dict[str, Any] = _f({}, doc="the objective's arguments (its dataclass)")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Training loop."""

    steps: int = _f(1000, min=1)
    micro_batches: int = _f(1, min=1, doc="gradient accumulation: micro-batches per step (token-weighted)")
    eval_every: int = _f(0, min=0, doc="steps between evals; 0 = only at the end")
    log_every: int = _f(50, min=1)
    checkpoint_every: int = _f(0, min=0, doc="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _f(2, min=1)
    seed: int = _f(0)
    eval_batches: int = _f(4, min=1)


@dataclasses.dataclass(frozen=True)
class DecodeSection:
    """Decoding: sampling parameters and the decode policy with its arguments."""

    method: str = _f("ar", choices=("ar", "speculative", "diffusion"))
    max_new_tokens: int = _f(32, min=1)
    temperature: float = _f(0.0, min=0.0, doc="0 = greedy")
    top_k: int = _f(0, min=0, doc="0 = off")
    top_p: float = _f(1.0, gt=0.0, max=1.0)
    min_p: float = _f(0.0, min=0.0, max=1.0)
    policy: str = _f("fixed", doc="draft-length or commit policy name")
    policy_args: Dict[str, Any] = _f({})
    batch_size: int = _f(32, min=1)


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Where outputs go."""

    out_dir: str = _f("runs", doc="parent of run directories")
    name: Optional[str] = _f(None, doc="run directory name; default: the config file's stem")
    resume: bool = _f(True, doc="resume from the run directory's last good checkpoint")
    cache_dir: str = _f(".cache/jaxtok", doc="recipe stage cache")
    progress: bool = _f(True, doc="show progress bars")


@dataclasses.dataclass(frozen=True)
class BenchSection:
    """A benchmark by name and its arguments."""

    name: str = _f("train")
    args: Dict[str, Any] = _f({})


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    objective: ObjectiveSection = dataclasses.field(default_factory=ObjectiveSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    decode: DecodeSection = dataclasses.field(default_factory=DecodeSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    bench: BenchSection = dataclasses.field(default_factory=BenchSection)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def read_yaml_with_bases(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML file, merging the files named by its ``base`` key first (recursively, relative paths)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged = OmegaConf.create({})
    for base in [bases] if isinstance(bases, str) else bases:
        merged = OmegaConf.merge(merged, read_yaml_with_bases(path.parent / base, _seen + (path,)))
    return OmegaConf.to_container(OmegaConf.merge(merged, OmegaConf.create(data)))


def _omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    head, _, leaf = key.rpartition(".")
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    allowed = ""
    node = _section_class(head)
    if node is not None and "not in" in msg:
        allowed = f"; allowed keys of {head or 'the top level'}: {sorted(f.name for f in dataclasses.fields(node))}"
    return ConfigError(f"{key}: {msg}{allowed}")


def _section_class(dotted: str):
    """The schema dataclass at ``dotted`` ("" = Config), or None if that key is not a section."""
    cls = Config
    for part in [p for p in dotted.split(".") if p]:
        cls = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
    return cls if dataclasses.is_dataclass(cls) else None


def from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a plain mapping plus dotted overrides."""
    try:
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (with its ``base`` includes), apply ``a.b=value`` overrides, validate; raise ConfigError."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.subkey=value")
    return from_dict(read_yaml_with_bases(path), overrides)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field's ``choices``/``min``/``max``/``gt`` metadata, recursively; raise ConfigError."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        meta = f.metadata
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r}: allowed values {list(meta['choices'])}")
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{key}={value!r}: must be >= {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{key}={value!r}: must be <= {meta['max']}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise ConfigError(f"{key}={value!r}: must be > {meta['gt']}")


_REGISTERING_MODULES = ("jaxtok.tasks", "jaxtok.train.objectives", "jaxtok.decode")


def validate_names(cfg: Config) -> None:
    """Check registered method names and their arguments (imports the registering packages)."""
    for mod in _REGISTERING_MODULES:
        importlib.import_module(mod)
    if cfg.data.task not in ("jsonl", "parquet"):
        TASKS.parse_args(cfg.data.task if cfg.data.task in TASKS else _unknown(TASKS, "data.task", cfg.data.task),
                         cfg.data.task_args, "data.task_args")
    elif not cfg.data.path:
        raise ConfigError(f"data.path: required with data.task={cfg.data.task!r}")
    name = cfg.objective.name
    OBJECTIVES.parse_args(name if name in OBJECTIVES else _unknown(OBJECTIVES, "objective.name", name),
                          cfg.objective.args, "objective.args")
    from jaxtok.models import presets

    if cfg.model.hf_path is None and cfg.model.preset not in presets.PRESETS:
        raise ConfigError(f"model.preset={cfg.model.preset!r}: allowed {presets.names()}")
    if cfg.decode.method == "diffusion" and len(COMMIT_POLICIES.names()):
        COMMIT_POLICIES.parse_args(
            cfg.decode.policy if cfg.decode.policy in COMMIT_POLICIES else _unknown(COMMIT_POLICIES, "decode.policy", cfg.decode.policy),
            cfg.decode.policy_args, "decode.policy_args")


def _unknown(registry: Registry, key: str, value: str):
    raise ConfigError(f"{key}={value!r}: not a known {registry.kind}; allowed: {registry.names()}")


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for the README config reference."""
    rows = []
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            rows += describe(t, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, f.metadata["choices"]))
        rows.append((prefix + f.name, repr(default), doc))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------


def build_optimizer(section: OptimizerSection, total_steps: int):
    """The optax optimizer of ``section``: schedule, optional global-norm clipping, then the update rule."""
    import optax

    lr, end = section.lr, section.lr * section.end_lr_ratio
    decay_steps = max(total_steps - section.warmup_steps, 1)
    if section.schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif section.schedule == "linear":
        sched = optax.linear_schedule(lr, end, decay_steps)
    elif section.schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, decay_steps, alpha=section.end_lr_ratio)
    else:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, section.warmup_steps, total_steps, end_value=end)
    if section.schedule != "warmup_cosine" and section.warmup_steps:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, section.warmup_steps), sched],
                                     [section.warmup_steps])
    if section.name == "adamw":
        opt = optax.adamw(sched, section.b1, section.b2, section.eps, weight_decay=section.weight_decay)
    elif section.name == "adam":
        opt = optax.adam(sched, section.b1, section.b2, section.eps)
    elif section.name == "lion":
        opt = optax.lion(sched, section.b1, section.b2, weight_decay=section.weight_decay)
    elif section.name == "adafactor":
        opt = optax.adafactor(sched, weight_decay_rate=section.weight_decay or None)
    else:
        opt = optax.sgd(sched, momentum=section.b1 or None)
    if section.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(section.grad_clip), opt)
    return opt
