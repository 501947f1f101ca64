"""Hugging Face interop: load and save ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM``
directories (``config.json`` + safetensors, single file or sharded with ``model.safetensors.index.json``).

Loading builds the :class:`~jaxtok.models.Decoder` abstractly (``nnx.eval_shape``) and fills every parameter straight
from the memory-mapped safetensors files. With a ``mesh`` each tensor is created by
``jax.make_array_from_callback`` on its ``NamedSharding`` (from the parameter's ``logical_axes`` through
:func:`jaxtok.mesh.logical_to_spec`), so each device reads only its own slice and no full host copy is made per device.

Layouts: torch ``nn.Linear`` stores ``[out, in]``; jaxtok names tensors by their einsum letters, e.g.
``q_proj.weight [H*N, D]`` -> ``q_weight_dhn [D, H, N]`` and ``o_proj.weight [D, H*N]`` -> ``o_weight_hnd [H, N, D]``.
Each tensor is described once (:class:`TensorSpec`: stored shape, split view, permutation) and the same
description serves loading and saving.

Masked-diffusion checkpoints with Llama/Qwen2 weights load with ``diffusion=True``: LLaDA (Llama weights,
bidirectional attention, a mask token) and Dream (Qwen2 weights whose logit at position i predicts token i+1,
``shift_logits``; :class:`~jaxtok.models.Decoder` re-aligns them so every sampler sees position-aligned logits).
The attention kind is chosen per call (``attention="bidirectional"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxtok.mesh import DEFAULT_RULES, logical_to_spec
from jaxtok.models.transformer import Decoder, ModelConfig, RopeScaling
from jaxtok.models.value import build_module

# HF class name -> jaxtok architecture, and back
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_DTYPES = ("float32", "bfloat16", "float16")
# default mask token of the public masked-diffusion checkpoints, quoted in the error when none is given
_KNOWN_MASK_IDS = "LLaDA-8B uses 126336, Dream-7B uses 151666"

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# --------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------------------


def _unsupported(what: str, path: str) -> ValueError:
    return ValueError(f"{path}: {what} is not supported by jaxtok's decoder")


def hf_architecture(hf: dict, path: str = "config.json") -> str:
    """The jaxtok architecture (``llama``/``qwen2``/``qwen3``) of an HF config dict; a clear error otherwise."""
    names = hf.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if names:
        if names[0] not in ARCHITECTURES:
            raise ValueError(f"{path}: unsupported architecture {names[0]!r}; supported: {supported}")
        return ARCHITECTURES[names[0]]
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPE:
        raise ValueError(f"{path}: unsupported model_type {model_type!r} (no 'architectures'); supported: {supported}")
    return _MODEL_TYPE[model_type]


def _rope_from_hf(hf: dict, path: str) -> tuple[float, Optional[RopeScaling]]:
    """RoPE theta and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise _unsupported(f"rope type {kind!r} (allowed: default, linear, llama3)", path)


def config_from_hf(
    hf: dict,
    *,
    dtype: str = "float32",
    param_dtype: Optional[str] = None,
    diffusion: bool = False,
    mask_token_id: Optional[int] = None,
    shift_logits: Optional[bool] = None,
    path: str = "config.json",
) -> ModelConfig:
    """Map an HF ``config.json`` dict to a :class:`ModelConfig` (see :func:`load_hf` for the diffusion flags)."""
    arch = hf_architecture(hf, path)
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None and value not in _DTYPES:
            raise ValueError(f"{name}={value!r}: allowed {_DTYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act={hf['hidden_act']!r} (only 'silu')", path)
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias=true", path)
    if arch in ("llama", "qwen3") and hf.get("attention_bias"):
        raise _unsupported("attention_bias=true (it adds an o_proj bias)", path)
    if hf.get("use_sliding_window"):
        raise _unsupported("use_sliding_window=true", path)
    if not diffusion and (mask_token_id is not None or shift_logits is not None):
        raise ValueError(
            f"mask_token_id={mask_token_id!r}, shift_logits={shift_logits!r}: only meaningful with diffusion=True"
        )
    if diffusion:
        mask_token_id = mask_token_id if mask_token_id is not None else hf.get("mask_token_id")
        if mask_token_id is None:
            raise ValueError(
                f"diffusion=True needs mask_token_id (argument, or 'mask_token_id' in {path}); {_KNOWN_MASK_IDS}"
            )
        if shift_logits is None:  # Dream (Qwen2 weights) shifts, LLaDA (Llama weights) does not
            shift_logits = bool(hf.get("shift_logits", arch == "qwen2"))
    theta, scaling = _rope_from_hf(hf, path)
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        architecture=arch,
        mask_token_id=None if mask_token_id is None else int(mask_token_id),
        shift_logits=bool(shift_logits),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
    )


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """The ``config.json`` dict that ``transformers`` reads back as the same model.

    RoPE is written both as ``rope_parameters`` (transformers 5) and ``rope_theta``/``rope_scaling`` (4.x).
    """
    if cfg.architecture not in _HF_CLASS:
        raise ValueError(f"ModelConfig.architecture={cfg.architecture!r}: allowed {tuple(_HF_CLASS)}")
    if cfg.qk_norm != (cfg.architecture == "qwen3"):
        raise ValueError(
            f"ModelConfig(architecture={cfg.architecture!r}, qk_norm={cfg.qk_norm}) has no HF equivalent: "
            "only Qwen3ForCausalLM has (and always has) q/k norm"
        )
    if cfg.qkv_bias and cfg.architecture != "qwen2":  # (qwen2 without biases: save_hf writes zero biases)
        raise ValueError(
            f"ModelConfig(architecture={cfg.architecture!r}, qkv_bias=True) has no HF equivalent: "
            "its attention_bias would add an o_proj bias; use architecture='qwen2'"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                           original_max_position_embeddings=s.original_max_position_embeddings)
        rope = {**scaling, "rope_theta": cfg.rope_theta}
    out: dict[str, Any] = {
        "architectures": [_HF_CLASS[cfg.architecture]],
        "model_type": _MODEL_TYPE[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cfg.architecture in ("llama", "qwen3"):
        out["attention_bias"] = False
    if cfg.architecture == "llama":
        out["mlp_bias"] = False
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    if cfg.mask_token_id is not None:
        out.update(mask_token_id=cfg.mask_token_id, shift_logits=cfg.shift_logits)
    return out


# --------------------------------------------------------------------------------------------------------------
# Tensor layouts
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter: jaxtok path, HF name, HF stored shape, and how to view it in jaxtok's einsum layout:
    ``ours = stored.reshape(view).transpose(perm)``; saving inverts it."""

    path: tuple
    hf_name: str
    stored: tuple
    view: tuple
    perm: tuple

    @property
    def shape(self) -> tuple:
        return tuple(self.view[p] for p in self.perm)

    def to_ours(self, stored: np.ndarray) -> np.ndarray:
        """Lazy view (no copy for a memory map) of the stored tensor in jaxtok's layout."""
        return stored.reshape(self.view).transpose(self.perm)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(ours).transpose(np.argsort(self.perm)).reshape(self.stored))


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every parameter of ``Decoder(cfg)`` with its HF tensor (LlamaForCausalLM/Qwen2/Qwen3 naming)."""
    V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    H, K, N = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = lambda shape: dict(stored=shape, view=shape, perm=tuple(range(len(shape))))  # noqa: E731
    transposed = lambda o, i: dict(stored=(o, i), view=(o, i), perm=(1, 0))  # noqa: E731
    specs = [TensorSpec(("embed_vd",), "model.embed_tokens.weight", **same((V, D))),
             TensorSpec(("final_norm", "weight"), "model.norm.weight", **same((D,)))]
    if not cfg.tie_embeddings:
        specs.append(TensorSpec(("lm_head_dv",), "lm_head.weight", **transposed(V, D)))
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        L = ("layers", i)
        specs += [
            TensorSpec(L + ("attn_norm", "weight"), p + "input_layernorm.weight", **same((D,))),
            TensorSpec(L + ("mlp_norm", "weight"), p + "post_attention_layernorm.weight", **same((D,))),
            TensorSpec(L + ("attn", "q_weight_dhn"), a + "q_proj.weight", (H * N, D), (H, N, D), (2, 0, 1)),
            TensorSpec(L + ("attn", "k_weight_dkn"), a + "k_proj.weight", (K * N, D), (K, N, D), (2, 0, 1)),
            TensorSpec(L + ("attn", "v_weight_dkn"), a + "v_proj.weight", (K * N, D), (K, N, D), (2, 0, 1)),
            TensorSpec(L + ("attn", "o_weight_hnd"), a + "o_proj.weight", (D, H * N), (D, H, N), (1, 2, 0)),
            TensorSpec(L + ("mlp", "gate_weight_df"), p + "mlp.gate_proj.weight", **transposed(F, D)),
            TensorSpec(L + ("mlp", "up_weight_df"), p + "mlp.up_proj.weight", **transposed(F, D)),
            TensorSpec(L + ("mlp", "down_weight_fd"), p + "mlp.down_proj.weight", **transposed(D, F)),
        ]
        if cfg.qkv_bias:
            specs += [
                TensorSpec(L + ("attn", "q_bias_hn"), a + "q_proj.bias", (H * N,), (H, N), (0, 1)),
                TensorSpec(L + ("attn", "k_bias_kn"), a + "k_proj.bias", (K * N,), (K, N), (0, 1)),
                TensorSpec(L + ("attn", "v_bias_kn"), a + "v_proj.bias", (K * N,), (K, N), (0, 1)),
            ]
        if cfg.qk_norm:
            specs += [
                TensorSpec(L + ("attn", "q_norm", "weight"), a + "q_norm.weight", **same((N,))),
                TensorSpec(L + ("attn", "k_norm", "weight"), a + "k_norm.weight", **same((N,))),
            ]
    return specs


# --------------------------------------------------------------------------------------------------------------
# safetensors (memory-mapped, so a device reads only its slice)
# --------------------------------------------------------------------------------------------------------------


def _mmap_safetensors(file: str) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one ``.safetensors`` file (format: u64 header size, JSON header, raw data)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = np.memmap(file, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        start, end = info["data_offsets"]
        out[name] = raw[8 + n + start: 8 + n + end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _open_checkpoint(path: str) -> dict[str, np.ndarray]:
    """All tensors of an HF directory: ``model.safetensors`` or the shards named in ``model.safetensors.index.json``."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: shard listed in model.safetensors.index.json is missing")
        tensors.update(_mmap_safetensors(file))
    return tensors


def read_hf_config(path: str) -> dict:
    """``config.json`` of an HF directory, with clear errors for a missing directory or file."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF checkpoint directory {path!r} does not exist")
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: config.json is missing")
    with open(file) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------------------


def _dotted(path) -> str:
    return ".".join(map(str, path))


def _place(view: np.ndarray, dtype, sharding: Optional[NamedSharding]) -> jax.Array:
    """A jax array of ``view`` in ``dtype``; sharded: each device's slice read on its own (no full host copy)."""
    if sharding is None:
        return jnp.asarray(np.asarray(view, dtype=dtype))
    return jax.make_array_from_callback(view.shape, sharding, lambda idx: np.asarray(view[idx], dtype=dtype))


def build_decoder(
    cfg: ModelConfig, views: dict[tuple, np.ndarray], *, mesh: Optional[Mesh] = None, rules=None
) -> Decoder:
    """A :class:`Decoder` for ``cfg`` whose parameters come from ``views`` (module path -> host array, e.g. a lazy
    memory-map view, in jaxtok's layout), cast to ``cfg.param_dtype`` and placed on ``mesh`` when given.

    The module is built abstractly (``nnx.eval_shape``), so no random weights are ever materialised.
    """
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pdtype = jnp.dtype(cfg.param_dtype)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if tuple(path) not in views:
            raise ValueError(f"no value for parameter {_dotted(path)}")
        view = views[tuple(path)]
        if tuple(view.shape) != tuple(var.get_value().shape):
            raise ValueError(
                f"parameter {_dotted(path)} has shape {tuple(view.shape)}, expected {var.get_value().shape}"
            )
        sharding = None
        if mesh is not None:
            axes = var.get_metadata().get("logical_axes")  # same rule as jaxtok.mesh.param_shardings
            sharding = NamedSharding(mesh, logical_to_spec(axes, rules or DEFAULT_RULES, mesh, view.shape))
        var.set_value(_place(view, pdtype, sharding))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_views(cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str = "") -> dict[tuple, np.ndarray]:
    """Lazy views, in jaxtok's layout, of the HF ``tensors`` for every parameter of ``Decoder(cfg)``; errors name a
    missing tensor, a shape mismatch, or tensors the decoder would silently ignore."""
    views = {}
    for spec in tensor_specs(cfg):
        if spec.hf_name not in tensors:
            raise ValueError(f"{where}: tensor {spec.hf_name!r} is missing from the checkpoint")
        stored = tensors[spec.hf_name]
        if tuple(stored.shape) != spec.stored:
            raise ValueError(
                f"{where}: tensor {spec.hf_name!r} has shape {tuple(stored.shape)}, config.json implies {spec.stored}"
            )
        views[spec.path] = spec.to_ours(stored)
    used = {s.hf_name for s in tensor_specs(cfg)}
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied checkpoints store a copy
    extra = sorted(n for n in tensors if n not in used | ignored and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(
            f"{where}: checkpoint has {len(extra)} tensor(s) jaxtok's {cfg.architecture} decoder does not use, "
            f"e.g. {extra[:5]} (unsupported feature?)"
        )
    return views


def load_hf(
    path: str,
    dtype: str = "float32",
    *,
    param_dtype: Optional[str] = None,
    diffusion: bool = False,
    mask_token_id: Optional[int] = None,
    shift_logits: Optional[bool] = None,
    mesh: Optional[Mesh] = None,
    rules=None,
) -> tuple[Decoder, ModelConfig]:
    """Load a local HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
      dtype: compute dtype (``float32``/``bfloat16``/``float16``); ``param_dtype`` defaults to it.
      diffusion: load the weights as a masked-diffusion LM (LLaDA from Llama weights, Dream from Qwen2 weights).
        ``mask_token_id`` defaults to config.json's ``mask_token_id``; ``shift_logits`` (Dream's convention: logit i
        predicts token i+1) defaults to config.json's ``shift_logits``, else True for qwen2 and False otherwise.
      mesh: place each parameter straight onto ``NamedSharding(mesh, logical_to_spec(logical_axes))``
        (``rules`` overrides :data:`jaxtok.mesh.DEFAULT_RULES`).

    Returns ``(model, cfg)``.
    """
    hf = read_hf_config(path)
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, diffusion=diffusion, mask_token_id=mask_token_id,
                         shift_logits=shift_logits, path=os.path.join(path, "config.json"))
    views = hf_views(cfg, _open_checkpoint(path), where=path)
    return build_decoder(cfg, views, mesh=mesh, rules=rules), cfg


def hf_tensors(model: Decoder, cfg: ModelConfig, dtype: str) -> dict[str, np.ndarray]:
    """The model's parameters as host numpy arrays under their HF names and layouts for ``cfg``'s architecture
    (Qwen2 without biases gets zero biases, since Qwen2ForCausalLM always has them)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for spec in tensor_specs(cfg):
        out[spec.hf_name] = spec.to_hf(np.asarray(jax.device_get(params[spec.path].get_value())).astype(np_dtype))
    if cfg.architecture == "qwen2" and not cfg.qkv_bias:
        for i in range(cfg.num_layers):
            for proj, width in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
                out[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = np.zeros(width * cfg.head_dim, np_dtype)
    return out


def save_hf(model: Decoder, path: str, *, dtype: Optional[str] = None, architecture: Optional[str] = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    ``dtype`` (default: the model's ``param_dtype``) is the stored dtype; ``architecture`` (``llama``/``qwen2``/
    ``qwen3`` or the HF class name) overrides ``model.cfg.architecture``, e.g. for a preset. Diffusion models keep
    ``mask_token_id`` and ``shift_logits`` in config.json, so :func:`load_hf` with ``diffusion=True`` reads them back.
    Single-process: every parameter is gathered to this host.
    """
    from safetensors.numpy import save_file

    dtype = dtype or model.cfg.param_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {_DTYPES}")
    cfg = model.cfg
    if architecture:
        cfg = dataclasses.replace(cfg, architecture=_architecture_arg(architecture))
    config = config_to_hf(cfg, dtype)
    tensors = hf_tensors(model, cfg, dtype)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------------------------
# jaxtok checkpoints and the `jaxtok convert` command
# --------------------------------------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"  # a run directory's checkpoint folder (train/loop.py), so `init_from` accepts DST


def _config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelConfig(**d)


def save_checkpoint(model: Decoder, path: str, *, meta: Optional[dict] = None) -> str:
    """Save the parameters as step 0 of an orbax checkpoint (:class:`jaxtok.checkpoint.Checkpointer`) under
    ``path/checkpoints`` with ``meta["model_config"]``: the layout of a training run directory, so a config's
    ``model.init_from: path`` starts from these weights. Returns the checkpoint directory."""
    from jaxtok.checkpoint import Checkpointer

    directory = os.path.join(os.path.abspath(path), CHECKPOINT_DIR)
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} already holds a checkpoint; choose an empty destination")
    with Checkpointer(directory, async_save=False) as ck:
        ck.save(0, params=nnx.state(model, nnx.Param),
                meta={**(meta or {}), "model_config": dataclasses.asdict(model.cfg)})
    return directory


def load_checkpoint_with_meta(
    path: str, *, step: Optional[int] = None, mesh: Optional[Mesh] = None,
    build: Optional[Callable[[ModelConfig, dict], nnx.Module]] = None,
) -> tuple[Decoder, dict]:
    """The model saved by :func:`save_checkpoint` or a training run, and the checkpoint's metadata (step, model
    config, ...): ``path`` is a run directory or its checkpoint directory (default: latest step); parameters placed
    on ``mesh`` (``jaxtok.mesh.param_shardings``) when given. ``build(model_config, meta)`` makes the module whose
    parameters the checkpoint holds (default :func:`jaxtok.models.value.build_module`: the class named by meta
    ``module``, e.g. a :class:`~jaxtok.models.value.LengthValueModel`, else a :class:`Decoder`)."""
    from jaxtok import checkpoint as ckpt_lib
    from jaxtok.mesh import param_shardings

    path = str(path)
    directory = os.path.join(path, CHECKPOINT_DIR)
    directory = directory if os.path.isdir(directory) else path
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    with ckpt_lib.Checkpointer(directory, async_save=False) as ck:
        if ck.latest_step() is None:
            raise FileNotFoundError(f"{path}: no jaxtok checkpoint (expected {CHECKPOINT_DIR}/<step>/ from "
                                    "`jaxtok convert to-jax` or a training run)")
        meta = ck.read_meta(step)
        if "model_config" not in meta:
            raise ckpt_lib.CheckpointError(f"checkpoint {directory}: meta has no model_config")
        cfg = _config_from_dict(meta["model_config"])
        build = build or build_module
        abstract = nnx.eval_shape(lambda: build(cfg, meta))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        target = ckpt_lib.abstract_of(params)
        if mesh is not None:
            target = jax.tree.map(
                lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub),
                param_shardings(params, mesh), target, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        out = ck.restore(meta["step"], params=target, data=False)
    return nnx.merge(graphdef, out["params"], rest), meta


def load_checkpoint(
    path: str, *, step: Optional[int] = None, mesh: Optional[Mesh] = None
) -> tuple[Decoder, ModelConfig]:
    """Like :func:`load_checkpoint_with_meta`, returning ``(model, model config)``."""
    model, _ = load_checkpoint_with_meta(path, step=step, mesh=mesh)
    return model, model.cfg


def _architecture_arg(value: Optional[str]) -> Optional[str]:
    """``--architecture`` as a jaxtok architecture; accepts ``qwen3`` or ``Qwen3ForCausalLM``."""
    if not value:
        return None
    arch = ARCHITECTURES.get(value, value)
    if arch not in _HF_CLASS:
        raise ValueError(f"architecture={value!r}: allowed {sorted(_HF_CLASS) + sorted(ARCHITECTURES)}")
    return arch


def convert(
    direction: str,
    src: str,
    dst: str,
    *,
    dtype: Optional[str] = None,
    diffusion: bool = False,
    mask_token_id: Optional[int] = None,
    architecture: Optional[str] = None,
) -> ModelConfig:
    """Convert between an HF directory and a jaxtok checkpoint; returns the model's config.

    ``to-jax``: load the HF directory ``src`` (``diffusion``/``mask_token_id`` as in :func:`load_hf`; if given,
    ``architecture`` must match it) and write ``dst/checkpoints/0``, a run directory that ``model.init_from``
    accepts. ``to-hf``: load the jaxtok checkpoint (run directory or checkpoint directory) ``src`` and write an HF
    directory, as ``architecture`` when given. ``dtype`` is the stored dtype (default: float32 for to-jax, the
    model's for to-hf). ``tokenizer.json`` is copied along when ``src`` has one.
    """
    arch = _architecture_arg(architecture)
    if direction == "to-jax":
        model, cfg = load_hf(src, dtype or "float32", diffusion=diffusion,
                             mask_token_id=mask_token_id if diffusion else None)
        if arch and arch != cfg.architecture:
            raise ValueError(f"architecture={architecture!r} but {src} holds a {_HF_CLASS[cfg.architecture]}")
        save_checkpoint(model, dst, meta={"source": os.path.abspath(src)})
    elif direction == "to-hf":
        model, cfg = load_checkpoint(src)
        cfg = dataclasses.replace(cfg, architecture=arch or cfg.architecture)
        save_hf(model, dst, dtype=dtype, architecture=cfg.architecture)
    else:
        raise ValueError(f"convert direction={direction!r}: allowed 'to-jax', 'to-hf'")
    tokenizer = os.path.join(src, "tokenizer.json")
    if os.path.exists(tokenizer):  # train/loop.py finds an init_from run's tokenizer there
        shutil.copy(tokenizer, os.path.join(dst, "tokenizer.json"))
    return cfg


def convert_main(args) -> int:
    """``jaxtok convert {to-jax,to-hf} SRC DST [--dtype] [--diffusion] [--mask-token-id] [--architecture]``:
    :func:`convert` with ``args`` from ``jaxtok/cli.py``. Bad input (unsupported architecture, missing file, shape
    mismatch, a corrupt checkpoint) prints one ``jaxtok convert: ...`` line to stderr and returns exit code 2."""
    from jaxtok.checkpoint import CheckpointError

    try:
        cfg = convert(args.direction, args.src, args.dst, dtype=getattr(args, "dtype", None),
                      diffusion=bool(getattr(args, "diffusion", False)),
                      mask_token_id=getattr(args, "mask_token_id", None),
                      architecture=getattr(args, "architecture", None))
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as e:
        print(f"jaxtok convert: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {args.dst} ({args.direction}, {_HF_CLASS[cfg.architecture]}, "
          f"{cfg.num_layers} layers)")
    return 0
