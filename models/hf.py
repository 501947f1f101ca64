"""Hugging Face interop: load and save ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` and the
mixture-of-experts ``Qwen3MoeForCausalLM``, ``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM`` directories (``config.json`` + safetensors,
single file or sharded with ``model.safetensors.index.json``).

Loading builds the :class:`~jaxtok.models.Decoder` abstractly (``nnx.eval_shape``) and fills every parameter straight
from the memory-mapped safetensors files. With a ``mesh`` each tensor is created by
``jax.make_array_from_callback`` on its ``NamedSharding`` (from the parameter's ``logical_axes`` through
:func:`jaxtok.mesh.logical_to_spec`), so each device reads only its own slice and no full host copy is made per device.

Layouts: torch ``nn.Linear`` stores ``[out, in]``; jaxtok names tensors by their einsum letters, e.g.
``q_proj.weight [H*N, D]`` -> ``q_weight_dhn [D, H, N]`` and ``o_proj.weight [D, H*N]`` -> ``o_weight_hnd [H, N, D]``.
Each tensor is described once (:class:`TensorSpec`: stored shape, split view, permutation) and the same
description serves loading and saving. MoE experts are stored per expert on the Hub and by ``save_pretrained``
(``mlp.experts.{e}.gate_proj.weight [F, D]``; Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``) and stacked in
jaxtok (``gate_weight_edf [E, D, F]``): :class:`ExpertSpec` describes one stacked parameter, and a sharded load
reads only the experts (and slices) of each device.

Masked-diffusion checkpoints: the native ``LLaDAModelLM`` (GSAI-ML LLaDA: ``model_type: llada``, OLMo-style
config keys ``d_model``/``n_heads``/``mlp_hidden_size``/..., tensors ``model.transformer.wte``,
``model.transformer.blocks.N.{q,k,v}_proj``/``attn_out``/``ff_proj`` (gate)/``up_proj``/``ff_out`` (down)/
``attn_norm``/``ff_norm``, ``model.transformer.ln_f``, ``model.transformer.ff_out`` (LM head)) and ``DreamModel``
(Dream-org Dream: ``model_type: Dream``, Qwen2 config and tensor names) load as diffusion LMs with the mask token
of their config.json; Dream's logit at position i predicts token i+1 (``shift_logits``), which
:class:`~jaxtok.models.Decoder` re-aligns so every sampler sees position-aligned logits. Llama/Qwen2 weights load as
a diffusion LM with ``diffusion=True``. The attention kind is chosen per call (``attention="bidirectional"``).

:func:`load_any` loads whatever a config names as a model (a jaxtok run directory or an HF directory) and turns a
bad path or an unsupported checkpoint into a :class:`~jaxtok.registry.ConfigError` naming the config key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxtok.mesh import DEFAULT_RULES, logical_to_spec
from jaxtok.model_source import HF_FORMATS, hf_format
from jaxtok.registry import ConfigError
from jaxtok.models.transformer import Decoder, ModelConfig, RopeScaling, stack_layer_values, unstack_layer_values
from jaxtok.models.value import build_module
from jaxtok.tasks.tokenizer import copy_tokenizer_files

# HF class name -> jaxtok architecture, and back (the causal-LM classes save_hf writes)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}
_HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral",
               "qwen2_moe": "qwen2_moe"}
# every readable HF format (jaxtok.model_source.HF_FORMATS) -> the decoder architecture it maps to
_FORMAT_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "llada": "llama", "dream": "qwen2",
                "qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}
_QK_NORM = ("qwen3", "qwen3_moe")  # the HF families with (and always with) per-head q/k RMSNorm
_FORMAT_CLASS = {v: k for k, v in HF_FORMATS.items()}
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
    """The jaxtok decoder architecture (``llama``/``qwen2``/``qwen3``) of an HF config dict (LLaDA maps to
    ``llama``, Dream to ``qwen2``); ValueError naming the architecture and the supported ones otherwise."""
    return _FORMAT_ARCH[hf_format(hf, path)]


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


def _causal_dims(hf: dict, arch: str, path: str) -> dict:
    """ModelConfig fields of a Llama/Qwen2/Qwen3/Dream/Qwen3-MoE/Mixtral/Qwen2-MoE ``config.json`` (transformers
    key names)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act={hf['hidden_act']!r} (only 'silu')", path)
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias=true", path)
    if arch not in ("qwen2", "qwen2_moe") and hf.get("attention_bias"):
        raise _unsupported("attention_bias=true (it adds an o_proj bias)", path)
    if hf.get("use_sliding_window"):
        raise _unsupported("use_sliding_window=true", path)
    if arch == "mixtral" and hf.get("sliding_window") is not None:
        raise _unsupported(f"sliding_window={hf['sliding_window']!r} (only null)", path)
    if hf.get("router_jitter_noise"):
        raise _unsupported(f"router_jitter_noise={hf['router_jitter_noise']!r} (only 0)", path)
    theta, scaling = _rope_from_hf(hf, path)
    heads = int(hf["num_attention_heads"])
    moe = {}
    if arch in ("qwen3_moe", "mixtral", "qwen2_moe"):
        qwen = arch != "mixtral"
        moe = dict(
            num_experts=int(hf.get("num_experts") or hf.get("num_local_experts") or 0),
            num_experts_per_tok=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"] if qwen else hf["intermediate_size"]),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if qwen else True,
            decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1) if qwen else 1,
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()) if qwen else (),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0)
            if arch == "qwen2_moe" else 0,
        )
    return dict(
        **moe,
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
        qkv_bias=arch == "qwen2" or (arch == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        qk_norm=arch in _QK_NORM,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
    )


# LLaDA's config keys (OLMo ModelConfig) with the defaults LLaDAConfig fills in when config.json omits them; the
# keys jaxtok's decoder needs at a fixed value, and those it reads
_LLADA_DEFAULTS = dict(d_model=768, n_heads=12, n_kv_heads=None, n_layers=12, mlp_ratio=4, mlp_hidden_size=None,
                       activation_type="swiglu", block_type="sequential", block_group_size=1, alibi=False,
                       rope=False, multi_query_attention=None, attention_layer_norm=False, input_emb_norm=False,
                       layer_norm_type="default", layer_norm_with_affine=True, rms_norm_eps=1e-5,
                       max_sequence_length=1024, rope_theta=10000.0, include_qkv_bias=False, include_bias=False,
                       bias_for_layer_norm=None, scale_logits=False, vocab_size=50257, embedding_size=50304,
                       weight_tying=True, clip_qkv=None)
_LLADA_REQUIRED = dict(activation_type="silu", block_type="llama", block_group_size=1, alibi=False, rope=True,
                       attention_layer_norm=False, input_emb_norm=False, layer_norm_type="rms",
                       layer_norm_with_affine=True, include_qkv_bias=False, include_bias=False, scale_logits=False,
                       clip_qkv=None)


def _llada_dims(hf: dict, path: str) -> dict:
    """ModelConfig fields of a LLaDA ``config.json`` (``LLaDAModelLM``: OLMo key names, Llama block, SwiGLU MLP
    ``ff_out(silu(ff_proj(x)) * up_proj(x))``, RMSNorm, RoPE, no biases)."""
    c = {k: hf.get(k, d) for k, d in _LLADA_DEFAULTS.items()}
    if c["bias_for_layer_norm"] is None:
        c["bias_for_layer_norm"] = c["include_bias"]
    for key, want in {**_LLADA_REQUIRED, "bias_for_layer_norm": False}.items():
        if c[key] != want and not (want is False and not c[key]):
            raise _unsupported(f"LLaDA {key}={c[key]!r} (jaxtok's decoder needs {want!r})", path)
    heads, d = int(c["n_heads"]), int(c["d_model"])
    if d % heads:
        raise ValueError(f"{path}: d_model={d} is not a multiple of n_heads={heads}")
    kv = c["n_kv_heads"]
    mqa = c["multi_query_attention"]
    if kv is None:
        kv = 1 if mqa else heads
    elif mqa is not None and int(kv) != (1 if mqa else heads):
        raise ValueError(f"{path}: n_kv_heads={kv} contradicts multi_query_attention={mqa}")
    if hf.get("rope_scaling"):
        raise _unsupported(f"LLaDA rope_scaling={hf['rope_scaling']!r}", path)
    return dict(
        vocab_size=int(c["embedding_size"] or c["vocab_size"]),  # the embedding (and logit) rows
        hidden_size=d,
        intermediate_size=int(c["mlp_hidden_size"] or c["mlp_ratio"] * d),
        num_layers=int(c["n_layers"]),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=d // heads,
        rope_theta=float(c["rope_theta"]),
        rope_scaling=None,
        rms_norm_eps=float(c["rms_norm_eps"]),
        tie_embeddings=bool(c["weight_tying"]),
        qkv_bias=False,
        qk_norm=False,
        max_position_embeddings=int(c["max_sequence_length"]),
    )


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
    """Map an HF ``config.json`` dict to a :class:`ModelConfig` (see :func:`load_hf` for the diffusion flags).

    LLaDA (``LLaDAModelLM``) and Dream (``DreamModel``) configs are always masked-diffusion models."""
    fmt = hf_format(hf, path)
    arch = _FORMAT_ARCH[fmt]
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None and value not in _DTYPES:
            raise ValueError(f"{name}={value!r}: allowed {_DTYPES}")
    dims = _llada_dims(hf, path) if fmt == "llada" else _causal_dims(hf, arch, path)
    diffusion = diffusion or fmt in ("llada", "dream")
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
    return ModelConfig(
        **dims,
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
    if cfg.qk_norm != (cfg.architecture in _QK_NORM):
        raise ValueError(
            f"ModelConfig(architecture={cfg.architecture!r}, qk_norm={cfg.qk_norm}) has no HF equivalent: "
            "only Qwen3ForCausalLM and Qwen3MoeForCausalLM have (and always have) q/k norm"
        )
    if cfg.architecture == "mixtral" and (not cfg.norm_topk_prob or cfg.mlp_only_layers or cfg.decoder_sparse_step != 1
                                          or cfg.intermediate_size != cfg.moe_intermediate_size):
        raise ValueError(
            "ModelConfig(architecture='mixtral') has no HF equivalent unless norm_topk_prob=True, every layer is "
            "sparse (mlp_only_layers=(), decoder_sparse_step=1) and intermediate_size == moe_intermediate_size"
        )
    if cfg.qkv_bias and cfg.architecture not in ("qwen2", "qwen2_moe"):  # (qwen2 without: zero biases)
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
    if cfg.architecture not in ("qwen2", "qwen2_moe"):
        out["attention_bias"] = False
    if cfg.architecture == "llama":
        out["mlp_bias"] = False
    elif cfg.architecture == "mixtral":
        out.update(sliding_window=None, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=0.0)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    if cfg.architecture == "qwen2_moe":
        out.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_expert_intermediate_size)
    if cfg.architecture in ("qwen3_moe", "qwen2_moe"):
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
                   router_aux_loss_coef=cfg.router_aux_loss_coef)
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


class _ExpertStack:
    """Lazy ``[E, ...]`` stack of per-expert views: indexing reads only the selected experts' slices."""

    def __init__(self, views: list):
        self.views = views
        self.shape = (len(views),) + tuple(views[0].shape)
        self.ndim = len(self.shape)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        first, rest = (idx[0], idx[1:]) if idx else (slice(None), ())
        sel = range(len(self.views))[first]
        if isinstance(sel, int):
            return np.asarray(self.views[sel][rest])
        return np.stack([np.asarray(self.views[e][rest]) for e in sel])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """One stacked expert parameter ``[E, *per_expert]``: the E HF tensors ``hf_names`` (one per expert), each
    laid out as ``expert`` (a :class:`TensorSpec`, whose ``hf_name`` is the first expert's)."""

    path: tuple
    hf_names: tuple
    expert: TensorSpec

    @property
    def shape(self) -> tuple:
        return (len(self.hf_names),) + self.expert.shape

    def to_ours(self, stored: list) -> _ExpertStack:
        return _ExpertStack([self.expert.to_ours(t) for t in stored])

    def to_hf(self, ours: np.ndarray) -> list:
        return [self.expert.to_hf(ours[e]) for e in range(len(self.hf_names))]


def _hf_names(fmt: str) -> dict:
    """Tensor names of an HF format: global names and per-layer templates (``{i}`` = layer index)."""
    if fmt == "llada":  # LLaDAModelLM.model (LLaDAModel).transformer, LLaDALlamaBlock
        b = "model.transformer.blocks.{i}."
        return dict(embed="model.transformer.wte.weight", norm="model.transformer.ln_f.weight",
                    head="model.transformer.ff_out.weight", attn_norm=b + "attn_norm.weight",
                    mlp_norm=b + "ff_norm.weight", q=b + "q_proj.", k=b + "k_proj.", v=b + "v_proj.",
                    o=b + "attn_out.weight", gate=b + "ff_proj.weight", up=b + "up_proj.weight",
                    down=b + "ff_out.weight", q_norm=None, k_norm=None)
    p, a = "model.layers.{i}.", "model.layers.{i}.self_attn."  # Llama/Qwen2/Qwen3 and Dream
    # sparse layers: Qwen3-MoE's router and per-expert names; Mixtral's block_sparse_moe.gate/experts.{e}.w1/w3/w2
    moe = "block_sparse_moe." if fmt == "mixtral" else "mlp."
    proj = ("w1", "w3", "w2") if fmt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    return dict(embed="model.embed_tokens.weight", norm="model.norm.weight", head="lm_head.weight",
                attn_norm=p + "input_layernorm.weight", mlp_norm=p + "post_attention_layernorm.weight",
                q=a + "q_proj.", k=a + "k_proj.", v=a + "v_proj.", o=a + "o_proj.weight",
                gate=p + "mlp.gate_proj.weight", up=p + "mlp.up_proj.weight", down=p + "mlp.down_proj.weight",
                q_norm=a + "q_norm.weight", k_norm=a + "k_norm.weight", router=p + moe + "gate.weight",
                **{f"expert_{key}": p + moe + "experts.{e}." + name + ".weight"
                   for key, name in zip(("gate", "up", "down"), proj)},
                **{f"shared_{key}": p + "mlp.shared_expert." + key + "_proj.weight" for key in ("gate", "up", "down")},
                shared_expert_gate=p + "mlp.shared_expert_gate.weight")


def tensor_specs(cfg: ModelConfig, fmt: Optional[str] = None) -> list:
    """Every parameter of ``Decoder(cfg)`` with its HF tensor in format ``fmt`` (default ``cfg.architecture``:
    LlamaForCausalLM/Qwen2/Qwen3 naming, which Dream shares; ``llada``: LLaDAModelLM naming; ``qwen3_moe``,
    ``mixtral``). :class:`TensorSpec` per tensor, :class:`ExpertSpec` per stacked expert parameter."""
    V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    H, K, N = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n = _hf_names(fmt or cfg.architecture)
    same = lambda shape: dict(stored=shape, view=shape, perm=tuple(range(len(shape))))  # noqa: E731
    transposed = lambda o, i: dict(stored=(o, i), view=(o, i), perm=(1, 0))  # noqa: E731
    specs = [TensorSpec(("embed_vd",), n["embed"], **same((V, D))),
             TensorSpec(("final_norm", "weight"), n["norm"], **same((D,)))]
    if not cfg.tie_embeddings:
        specs.append(TensorSpec(("lm_head_dv",), n["head"], **transposed(V, D)))
    for i in range(cfg.num_layers):
        L = ("layers", i)
        at = lambda key: n[key].format(i=i)  # noqa: E731
        specs += [
            TensorSpec(L + ("attn_norm", "weight"), at("attn_norm"), **same((D,))),
            TensorSpec(L + ("mlp_norm", "weight"), at("mlp_norm"), **same((D,))),
            TensorSpec(L + ("attn", "q_weight_dhn"), at("q") + "weight", (H * N, D), (H, N, D), (2, 0, 1)),
            TensorSpec(L + ("attn", "k_weight_dkn"), at("k") + "weight", (K * N, D), (K, N, D), (2, 0, 1)),
            TensorSpec(L + ("attn", "v_weight_dkn"), at("v") + "weight", (K * N, D), (K, N, D), (2, 0, 1)),
            TensorSpec(L + ("attn", "o_weight_hnd"), at("o"), (D, H * N), (D, H, N), (1, 2, 0)),
        ]
        if cfg.is_sparse_layer(i):
            E, Fm = cfg.num_experts, cfg.moe_intermediate_size

            def experts(name, key, o, i_):
                names = tuple(n[key].format(i=i, e=e) for e in range(E))
                return ExpertSpec(L + ("mlp", name), names, TensorSpec(L + ("mlp", name), names[0], **transposed(o, i_)))

            specs += [
                TensorSpec(L + ("mlp", "router_weight_de"), at("router"), **transposed(E, D)),
                experts("gate_weight_edf", "expert_gate", Fm, D),
                experts("up_weight_edf", "expert_up", Fm, D),
                experts("down_weight_efd", "expert_down", D, Fm),
            ]
            if cfg.shared_expert_intermediate_size:  # Qwen2-MoE
                Fs = cfg.shared_expert_intermediate_size
                specs += [
                    TensorSpec(L + ("mlp", "shared_gate_weight_df"), at("shared_gate"), **transposed(Fs, D)),
                    TensorSpec(L + ("mlp", "shared_up_weight_df"), at("shared_up"), **transposed(Fs, D)),
                    TensorSpec(L + ("mlp", "shared_down_weight_fd"), at("shared_down"), **transposed(D, Fs)),
                    TensorSpec(L + ("mlp", "shared_expert_gate_weight_d1"), at("shared_expert_gate"),
                               **transposed(1, D)),
                ]
        else:
            specs += [
                TensorSpec(L + ("mlp", "gate_weight_df"), at("gate"), **transposed(F, D)),
                TensorSpec(L + ("mlp", "up_weight_df"), at("up"), **transposed(F, D)),
                TensorSpec(L + ("mlp", "down_weight_fd"), at("down"), **transposed(D, F)),
            ]
        if cfg.qkv_bias:
            specs += [
                TensorSpec(L + ("attn", "q_bias_hn"), at("q") + "bias", (H * N,), (H, N), (0, 1)),
                TensorSpec(L + ("attn", "k_bias_kn"), at("k") + "bias", (K * N,), (K, N), (0, 1)),
                TensorSpec(L + ("attn", "v_bias_kn"), at("v") + "bias", (K * N,), (K, N), (0, 1)),
            ]
        if cfg.qk_norm:
            specs += [
                TensorSpec(L + ("attn", "q_norm", "weight"), at("q_norm"), **same((N,))),
                TensorSpec(L + ("attn", "k_norm", "weight"), at("k_norm"), **same((N,))),
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
    if cfg.scan_layers:  # HF's per-layer tensors stacked on the leading "layers" axis
        views = stack_layer_values(views, cfg.num_layers)
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


def hf_views(
    cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str = "", fmt: Optional[str] = None
) -> dict[tuple, np.ndarray]:
    """Lazy views, in jaxtok's layout, of the HF ``tensors`` (format ``fmt``, see :func:`tensor_specs`) for every
    parameter of ``Decoder(cfg)``; errors name a missing tensor, a shape mismatch, or tensors the decoder would
    silently ignore."""
    views = {}
    specs = tensor_specs(cfg, fmt)

    def stored(name: str, want: tuple) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{where}: tensor {name!r} is missing from the checkpoint")
        if tuple(tensors[name].shape) != want:
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, config.json implies {want}"
            )
        return tensors[name]

    used = set()
    for spec in specs:
        if isinstance(spec, ExpertSpec):
            views[spec.path] = spec.to_ours([stored(name, spec.expert.stored) for name in spec.hf_names])
            used.update(spec.hf_names)
        else:
            views[spec.path] = spec.to_ours(stored(spec.hf_name, spec.stored))
            used.add(spec.hf_name)
    ignored = {_hf_names(fmt or cfg.architecture)["head"]} if cfg.tie_embeddings else set()  # a tied copy
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
    """Load a local HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``LLaDAModelLM`` /
    ``DreamModel`` / ``Qwen3MoeForCausalLM`` / ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM`` directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
      dtype: compute dtype (``float32``/``bfloat16``/``float16``); ``param_dtype`` defaults to it.
      diffusion: load the weights as a masked-diffusion LM (LLaDA from Llama weights, Dream from Qwen2 weights);
        always on for ``LLaDAModelLM`` and ``DreamModel`` checkpoints. ``mask_token_id`` defaults to config.json's
        ``mask_token_id``; ``shift_logits`` (Dream's convention: logit i predicts token i+1) defaults to
        config.json's ``shift_logits``, else True for qwen2/Dream and False otherwise.
      mesh: place each parameter straight onto ``NamedSharding(mesh, logical_to_spec(logical_axes))``
        (``rules`` overrides :data:`jaxtok.mesh.DEFAULT_RULES`).

    Returns ``(model, cfg)``.
    """
    hf = read_hf_config(path)
    where = os.path.join(path, "config.json")
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, diffusion=diffusion, mask_token_id=mask_token_id,
                         shift_logits=shift_logits, path=where)
    views = hf_views(cfg, _open_checkpoint(path), where=path, fmt=hf_format(hf, where))
    return build_decoder(cfg, views, mesh=mesh, rules=rules), cfg


def hf_tensors(model: Decoder, cfg: ModelConfig, dtype: str) -> dict[str, np.ndarray]:
    """The model's parameters as host numpy arrays under their HF names and layouts for ``cfg``'s architecture
    (Qwen2 without biases gets zero biases, since Qwen2ForCausalLM always has them)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if model.cfg.scan_layers:  # stacked [L, ...] parameters back to HF's per-layer tensors
        params = unstack_layer_values(params)
    out = {}
    for spec in tensor_specs(cfg):
        value = np.asarray(jax.device_get(params[spec.path])).astype(np_dtype)
        if isinstance(spec, ExpertSpec):
            out.update(zip(spec.hf_names, spec.to_hf(value)))
        else:
            out[spec.hf_name] = spec.to_hf(value)
    if cfg.architecture == "qwen2" and not cfg.qkv_bias:
        for i in range(cfg.num_layers):
            for proj, width in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
                out[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = np.zeros(width * cfg.head_dim, np_dtype)
    return out


def save_hf(model: Decoder, path: str, *, dtype: Optional[str] = None, architecture: Optional[str] = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    ``dtype`` (default: the model's ``param_dtype``) is the stored dtype; ``architecture`` (``llama``/``qwen2``/
    ``qwen3``/``qwen3_moe``/``mixtral``/``qwen2_moe`` or the HF class name) overrides ``model.cfg.architecture``, e.g. for a preset. Diffusion models keep
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


def load_any(
    path,
    *,
    key: str,
    mesh: Optional[Mesh] = None,
    dtype: str = "float32",
    param_dtype: Optional[str] = None,
    diffusion: bool = False,
    step: Optional[int] = None,
    build: Optional[Callable[[ModelConfig, dict], nnx.Module]] = None,
    rules=None,
) -> tuple[nnx.Module, dict]:
    """The model at ``path``, which config key ``key`` names: a jaxtok run directory (or its checkpoint
    directory; ``step``, ``build`` as in :func:`load_checkpoint_with_meta`) or an HF directory (``dtype``,
    ``param_dtype``, ``diffusion`` as in :func:`load_hf`; LLaDA/Dream load as diffusion LMs by themselves).
    Parameters are placed on ``mesh`` when given. Returns ``(model, meta)``: the checkpoint's metadata, or for an
    HF directory ``{"source", "hf_architecture", "model_config"}``.

    A missing path, a directory of neither kind, an unsupported architecture or config feature, missing or
    mis-shaped tensors and an unreadable checkpoint raise :class:`~jaxtok.registry.ConfigError`
    ``key=path: ...``; the directory kind and config.json are checked before any weight is read."""
    from jaxtok import checkpoint as ckpt_lib
    from jaxtok.model_source import check_model_source

    path = str(path)
    kind = check_model_source(path, key)
    try:
        if kind == "jaxtok":
            return load_checkpoint_with_meta(path, step=step, mesh=mesh, build=build)
        where = os.path.join(path, "config.json")
        hf = read_hf_config(path)
        config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, diffusion=diffusion, path=where)  # before tensors
        model, cfg = load_hf(path, dtype, param_dtype=param_dtype, diffusion=diffusion, mesh=mesh, rules=rules)
    except (ValueError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    meta = {"source": os.path.abspath(path), "hf_architecture": _FORMAT_CLASS[hf_format(hf, where)],
            "model_config": dataclasses.asdict(cfg)}
    return model, meta


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
    model's for to-hf). The tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``,
    the chat template) are copied along verbatim, so ``AutoTokenizer`` loads the same values on either side.
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
    copy_tokenizer_files(src, dst)  # tokenizer.json, its config, generation config, chat template: verbatim
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
