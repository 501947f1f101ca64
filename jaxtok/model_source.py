"""What a config's model path holds, decided without JAX: a jaxtok run directory or an HF checkpoint directory.

Every model a config names (``model.init_from``, ``model.hf_path``, ``rollout.teacher_init_from``,
``rollout.reference``, ``decode.draft_init_from``, value models, diffusion drafters) may be either

- a **jaxtok run directory** (``checkpoints/<step>/`` from ``jaxtok train`` or ``jaxtok convert to-jax``) or its
  checkpoint directory itself, or
- an **HF directory**: ``config.json`` + ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``) of a supported architecture (:data:`HF_FORMATS`).

:func:`check_model_source` classifies a path and raises :class:`~jaxtok.registry.ConfigError` naming the config
key, the path and what is allowed; it reads only small JSON files, so ``jaxtok`` commands call it while checking a
config (:func:`jaxtok.config.check_paths`), before JAX starts or any weight is read.
:func:`jaxtok.models.hf.load_any` loads either kind.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from jaxtok.registry import ConfigError

# HF class name (config.json "architectures"[0]) -> format; the format names the tensor layout and config keys
HF_FORMATS = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LLaDAModelLM": "llada",  # GSAI-ML LLaDA (OLMo-style names, masked diffusion)
    "DreamModel": "dream",  # Dream-org Dream (Qwen2 names, masked diffusion, shifted logits)
    "Qwen3MoeForCausalLM": "qwen3_moe",  # mixture of experts (jaxtok.models.moe)
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
# config.json "model_type" -> format, for configs without "architectures"
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "llada": "llada", "Dream": "dream",
                  "qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}
CHECKPOINT_DIR = "checkpoints"  # a run directory's checkpoint folder (train/loop.py)
_ALLOWED = ("a jaxtok run directory (with checkpoints/<step>/) or an HF directory (config.json + "
            "model.safetensors) of " + ", ".join(HF_FORMATS))


def hf_format(hf: dict, where: str = "config.json") -> str:
    """The format (``llama``/``qwen2``/``qwen3``/``llada``/``dream``) of an HF ``config.json`` dict; ValueError
    naming the architecture and the supported ones otherwise."""
    names = hf.get("architectures") or []
    supported = ", ".join(HF_FORMATS)
    if names:
        if names[0] not in HF_FORMATS:
            raise ValueError(f"{where}: unsupported architecture {names[0]!r}; supported: {supported}")
        return HF_FORMATS[names[0]]
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{where}: unsupported model_type {model_type!r} (no 'architectures'); supported: {supported}")
    return HF_MODEL_TYPES[model_type]


def _is_step_dir(name: str) -> bool:
    return name.isdigit()


def model_source_kind(path: str) -> Optional[str]:
    """``"jaxtok"`` (a run directory with ``checkpoints/``, or a checkpoint directory of ``<step>/`` folders),
    ``"hf"`` (a directory with ``config.json``), or None."""
    if not os.path.isdir(path):
        return None
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return "jaxtok"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if any(_is_step_dir(n) and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path)):
        return "jaxtok"
    return None


def check_model_source(path, key: str) -> str:
    """Classify the model directory ``path`` named by config key ``key``: ``"jaxtok"`` or ``"hf"``.

    Raises ConfigError ``key=path: ...`` when the path does not exist, is neither kind, or is an HF directory whose
    ``config.json`` is unreadable, names an unsupported architecture, or has no safetensors weights."""
    path = str(path)
    if not os.path.exists(path):
        raise ConfigError(f"{key}={path!r}: no such directory; expected {_ALLOWED}")
    kind = model_source_kind(path)
    if kind is None:
        raise ConfigError(f"{key}={path!r}: neither a jaxtok run directory (no {CHECKPOINT_DIR}/) nor an HF "
                          f"directory (no config.json); expected {_ALLOWED}")
    if kind == "hf":
        file = os.path.join(path, "config.json")
        try:
            with open(file) as f:
                hf = json.load(f)
            hf_format(hf, file)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise ConfigError(f"{key}={path!r}: {e}") from None
        if not any(os.path.isfile(os.path.join(path, n))
                   for n in ("model.safetensors", "model.safetensors.index.json")):
            raise ConfigError(f"{key}={path!r}: HF directory without model.safetensors or "
                              f"model.safetensors.index.json (only safetensors checkpoints are read)")
    return kind


def model_path_keys(cfg) -> dict:
    """``{config key: path}`` of every model directory ``cfg`` names (unset ones left out): ``model.init_from``,
    ``model.hf_path``, ``rollout.teacher_init_from``, ``rollout.reference`` (a path, not ``init``/``none``),
    ``decode.draft_init_from``, and the ``value_init_from`` / ``deer`` / ``drafters`` entries of
    ``decode.policy_args`` and ``bench.args``."""
    keys = {"model.init_from": cfg.model.init_from, "model.hf_path": cfg.model.hf_path,
            "rollout.teacher_init_from": cfg.rollout.teacher_init_from,
            "decode.draft_init_from": cfg.decode.draft_init_from}
    if cfg.rollout.reference not in ("none", "init"):
        keys["rollout.reference"] = cfg.rollout.reference
    for section, args in (("decode.policy_args", cfg.decode.policy_args), ("bench.args", cfg.bench.args)):
        args = args or {}
        for name in ("value_init_from", "deer"):
            if isinstance(args.get(name), str):
                keys[f"{section}.{name}"] = args[name]
        drafters = args.get("drafters")
        if isinstance(drafters, (list, tuple)):
            keys.update({f"{section}.drafters[{i}]": p for i, p in enumerate(drafters) if isinstance(p, str)})
    return {k: v for k, v in keys.items() if v}


def check_model_paths(cfg) -> dict:
    """:func:`check_model_source` for every model directory of ``cfg`` (:func:`model_path_keys`); returns
    ``{key: kind}``. Raises ConfigError naming the first bad key."""
    return {key: check_model_source(path, key) for key, path in model_path_keys(cfg).items()}
