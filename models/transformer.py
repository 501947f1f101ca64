"""One decoder family in Flax NNX covering Llama-3, Qwen2/2.5, Qwen3 shapes and their MoE variants (Qwen3-MoE,
Mixtral: :mod:`jaxtok.models.moe`).

RMSNorm, RoPE (default, ``linear`` and ``llama3`` scaling), grouped-query attention, SwiGLU MLP, optional q/k/v bias
(Qwen2), optional per-head q/k RMSNorm (Qwen3), tied or untied embeddings, explicit ``head_dim``.

The attention kind is chosen per call, so one set of weights serves AR decoding (``causal``), masked diffusion
(``bidirectional``, LLaDA/Dream) and block diffusion (``block_causal``: bidirectional inside a block, causal across
blocks). Every kind is combined with a padding mask; left padding works through per-row positions.

Parameters carry logical axis names in their ``logical_axes`` metadata and activations are annotated with
:func:`jaxtok.mesh.constrain`; ``jaxtok.mesh`` maps both to the ``data``/``fsdp``/``tensor`` mesh.

Einsum letters: B batch, T query length, S key length, D embed, H query heads, K kv heads, G = H/K group size,
N head_dim, F mlp hidden, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtok.mesh import constrain
from jaxtok.models.attention import ATTENTION_IMPLS, attend
from jaxtok.models.cache import KVCache
from jaxtok.models.layers import _param, dense
from jaxtok.models.moe import MOE_DISPATCHES, SparseMoE

Attention = Literal["causal", "bidirectional", "block_causal", "siblings"]
ATTENTION_KINDS = ("causal", "bidirectional", "block_causal", "siblings")
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe")
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral", "qwen2_moe")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as in HF ``rope_scaling``: ``linear`` or ``llama3``."""

    kind: Literal["linear", "llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder; presets in :mod:`jaxtok.models.presets`, HF configs via :mod:`jaxtok.models.hf`.

    ``mask_token_id`` marks a masked-diffusion LM; ``shift_logits`` is Dream's convention (the logit at i predicts
    token i+1), undone in :meth:`Decoder.__call__` so every sampler sees position-aligned logits.

    Mixture of experts (:mod:`jaxtok.models.moe`; architectures ``qwen3_moe``/``mixtral``/``qwen2_moe``, HF key
    names):
    ``num_experts`` > 0 routes each token of a sparse layer to ``num_experts_per_tok`` of ``num_experts`` SwiGLU
    experts of width ``moe_intermediate_size``, combine weights renormalised when ``norm_topk_prob`` (always for
    Mixtral). Layer i is sparse unless ``i in mlp_only_layers`` or ``(i + 1) % decoder_sparse_step``; dense layers
    keep the ``intermediate_size`` MLP. ``shared_expert_intermediate_size`` > 0 (Qwen2-MoE) adds an always-on
    shared expert scaled by a sigmoid gate. ``router_aux_loss_coef`` weighs the load-balancing loss
    (:func:`jaxtok.models.moe.with_router_aux_loss`). ``num_experts=0`` is the dense decoder.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    architecture: Literal["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe"] = "llama"
    mask_token_id: Optional[int] = None
    shift_logits: bool = False
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay float32
    param_dtype: str = "float32"
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    router_aux_loss_coef: float = 0.001
    shared_expert_intermediate_size: int = 0
    # execution, not architecture (same parameters, same values up to float rounding):
    attention_impl: str = "auto"  # models.attention.ATTENTION_IMPLS; auto: xla on CPU
    scan_layers: bool = False  # stack the blocks' parameters on a leading "layers" axis and lax.scan over them
    remat: str = "none"  # REMAT_POLICIES: what each block keeps for the backward pass
    moe_dispatch: str = "auto"  # models.moe.MOE_DISPATCHES: ragged_dot (grouped GEMM) or tiled (CPU); auto picks

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.architecture={self.architecture!r}: allowed {ARCHITECTURES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: allowed float32, bfloat16, float16")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"ModelConfig.mask_token_id={self.mask_token_id} outside [0, {self.vocab_size})")
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}: allowed {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}: allowed {tuple(REMAT_POLICIES)}")
        if self.moe_dispatch not in MOE_DISPATCHES:
            raise ValueError(f"ModelConfig.moe_dispatch={self.moe_dispatch!r}: allowed {MOE_DISPATCHES}")
        if self.scan_layers and len({self.is_sparse_layer(i) for i in range(self.num_layers)}) > 1:
            raise ValueError(
                f"ModelConfig.scan_layers=True needs every layer of one kind, but this MoE model mixes dense and "
                f"sparse layers (mlp_only_layers={self.mlp_only_layers}, decoder_sparse_step="
                f"{self.decoder_sparse_step}); use scan_layers=False (remat still applies)")
        if (self.num_experts > 0) != (self.architecture in MOE_ARCHITECTURES):
            raise ValueError(f"ModelConfig(architecture={self.architecture!r}, num_experts={self.num_experts}): "
                             f"architectures {MOE_ARCHITECTURES} and only they have experts (num_experts > 0)")
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok}: allowed "
                                 f"1..num_experts={self.num_experts}")
            if self.moe_intermediate_size <= 0 or self.decoder_sparse_step < 1 or self.shared_expert_intermediate_size < 0:
                raise ValueError(f"ModelConfig.moe_intermediate_size={self.moe_intermediate_size}, decoder_sparse_step="
                                 f"{self.decoder_sparse_step}: must be positive (shared_expert_intermediate_size="
                                 f"{self.shared_expert_intermediate_size}: >= 0)")

    def is_sparse_layer(self, i: int) -> bool:
        """Whether layer ``i`` is a mixture-of-experts layer (HF Qwen3-MoE's rule; every layer for Mixtral)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def is_diffusion(self) -> bool:
        return self.mask_token_id is not None


# Remat policies by MaxText's names (MaxText ``get_remat_policy``): what a block saves for the backward pass;
# everything else is recomputed. Names refer to :func:`jax.ad_checkpoint.checkpoint_name` tags in the block:
# query_proj / key_proj / value_proj (q, k, v projections), context (attention output before o_proj), out_proj
# (attention output), mlpwi_0 / mlpwi_1 (gate, up), mlpwo (down). ``none``: no remat (save everything);
# ``full``: save nothing (only the block inputs); ``minimal``: save every matmul without batch dimensions
# (``checkpoint_dots_with_no_batch_dims``, MaxText's original ``minimal``).
_QKV = ("query_proj", "key_proj", "value_proj", "qkv_proj")
REMAT_POLICIES = {
    "none": None,
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "minimal": lambda: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dot_with_context_except_mlp": lambda: jax.checkpoint_policies.save_only_these_names(*_QKV, "context", "out_proj"),
    "save_dot_except_mlpwi": lambda: jax.checkpoint_policies.save_only_these_names(*_QKV, "out_proj", "mlpwo"),
    "save_dot_except_mlp": lambda: jax.checkpoint_policies.save_only_these_names(*_QKV, "out_proj"),
    "save_qkv_proj": lambda: jax.checkpoint_policies.save_only_these_names(*_QKV),
    "save_out_proj": lambda: jax.checkpoint_policies.save_only_these_names("out_proj"),
}


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of remat policy ``name`` (:data:`REMAT_POLICIES`); ``none`` has none."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r}: allowed {tuple(REMAT_POLICIES)}")
    make = REMAT_POLICIES[name]
    return None if make is None else make()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecoderOutput:
    """``logits [B, T|K, V]`` float32 (None if not requested), ``hidden [B, T, D]`` final-normed (None unless
    ``return_hidden``), ``cache`` the updated :class:`KVCache` (None without a cache)."""

    logits: Optional[jax.Array]
    hidden: Optional[jax.Array]
    cache: Optional[KVCache]


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * w``, statistics in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> np.ndarray:
    """RoPE inverse frequencies ``theta^(-2i/d)`` with optional ``linear`` or ``llama3`` (Llama 3.1) scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.kind == "linear":
        return (inv / scaling.factor).astype(np.float32)
    if scaling.kind != "llama3":
        raise ValueError(f"rope_scaling.kind={scaling.kind!r}: allowed 'linear', 'llama3'")
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding (Su et al. 2021), half-split layout as in HF: ``x*cos + rotate_half(x)*sin``.

    x: ``[B, T, H, N]``; positions: ``[B, T]``.
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, N/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, N]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


def attention_mask(
    kind: str,
    q_pos: jax.Array,
    q_valid: jax.Array,
    k_pos: jax.Array,
    k_live: jax.Array,
    block_size: Optional[int] = None,
    q_slot: Optional[jax.Array] = None,
    k_slot: Optional[jax.Array] = None,
) -> jax.Array:
    """Boolean ``[B, T, S]`` mask: which key each query may attend to.

    ``causal``: k_pos <= q_pos. ``bidirectional``: every live key. ``block_causal``: key block <= query block with
    block = position // block_size (bidirectional inside a block, causal across blocks). ``siblings``: causal, but
    a key at the query's own position is seen only from its own slot (``q_slot [B, T]``, ``k_slot [B, S]``): several
    alternative tokens written at one position are scored in one forward, each seeing the prefix and itself, not
    each other (a depth-one token tree; LenVM's candidate values). All kinds also require a live key (written, not
    padding) and a valid query.
    """
    live = k_live[:, None, :] & q_valid[:, :, None]  # [B, T, S]
    if kind == "bidirectional":
        return live
    if kind == "causal":
        return live & (k_pos[:, None, :] <= q_pos[:, :, None])
    if kind == "siblings":
        if q_slot is None or k_slot is None:
            raise ValueError("attention='siblings' needs q_slot and k_slot")
        own = k_slot[:, None, :] == q_slot[:, :, None]
        return live & ((k_pos[:, None, :] < q_pos[:, :, None]) | own)
    if kind == "block_causal":
        if not block_size or block_size <= 0:
            raise ValueError(f"attention='block_causal' needs a positive block_size, got {block_size!r}")
        return live & (k_pos[:, None, :] // block_size <= q_pos[:, :, None] // block_size)
    raise ValueError(f"attention={kind!r}: allowed {ATTENTION_KINDS}")


# Decoder.logits of a tied model uses dense_t up to this many rows (decode: batch x new tokens). The product is then
# bound by reading the [V, D] embedding, which the transposed copy doubles: a 4-layer qwen3-0.6b-shaped batch-1
# decode step 353 -> 200 ms (docs/results/tied_logits_decode.md). Larger (training) calls keep dense(h, embed.T):
# a 2-layer qwen3-0.6b-shaped SFT forward+backward (2 x 128 tokens) measured 0.96-1.25x (median ~1.16x) slower with
# dense_t on the loaded 2-core CPU, so training is left as it was.
_MATVEC_ROWS = 64


def dense_t(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """``x [..., K] · w [N, K]ᵀ -> [..., N]`` contracting the LAST axis of ``w`` in the dot itself (``dot_general``
    dimension numbers), for the tied LM head (``embed [V, D]``): ``dense(x, w.T)`` made XLA:CPU copy a transposed
    ``[D, V]`` embedding every call, i.e. every decode step (``scripts/tied_logits_decode.py``). A wider
    ``preferred_element_type`` (float32 logits from bfloat16 operands) keeps the backward in the operands' dtype, as
    :func:`dense` does."""
    lead = x.shape[:-1]
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"dense_t: x's last axis {x.shape[-1]} does not match w's last axis {w.shape[-1]}")
    x2 = x.reshape(-1, x.shape[-1])
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != x.dtype == w.dtype:
        y = _dot_t_wide_out(x2, w, jnp.dtype(preferred_element_type))
    else:
        y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=preferred_element_type)
    return y.reshape(lead + w.shape[:1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_t_wide_out(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """``x [M, K] · w [N, K]ᵀ`` accumulated and returned in ``out_dtype``; cotangent cast to the operands' dtype."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _dot_t_wide_out_fwd(x, w, out_dtype):
    return _dot_t_wide_out(x, w, out_dtype), (x, w)


def _dot_t_wide_out_bwd(out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)  # [M, N]
    return jnp.dot(g, w), jnp.dot(g.T, x)  # [M, K], [N, K]


_dot_t_wide_out.defvjp(_dot_t_wide_out_fwd, _dot_t_wide_out_bwd)


def with_lora(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``y = dense(x, W)`` plus the low-rank update ``(alpha/r) * (x A) B`` (LoRA, Hu et al. 2021) of the adapter
    ``<name>_lora`` that :func:`jaxtok.models.lora.apply_lora` attached to ``module`` (``q``/``k``/``v``/``o``,
    ``gate``/``up``/``down``); ``y`` unchanged when the module has none."""
    adapter = getattr(module, f"{name}_lora", None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


def check_token_ids(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Reject token ids outside ``[0, vocab_size)`` (JAX gathers would clamp them silently). Host-side only:
    a no-op on traced values, so callers validate at their entry points before ``jit``."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = np.argwhere((arr < 0) | (arr >= vocab_size))[0].tolist()
        raise ValueError(
            f"{name}: token id {int(arr[tuple(bad)])} at index {bad} is outside the vocabulary [0, {vocab_size}) "
            f"(min id {lo}, max id {hi})"
        )


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, weight ``[D]``."""

    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), (axis_name,), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, N = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.q_weight_dhn = _param(rngs, (D, H, N), ("embed", "heads", "head_dim"), pd, D**-0.5)
        self.k_weight_dkn = _param(rngs, (D, K, N), ("embed", "kv_heads", "head_dim"), pd, D**-0.5)
        self.v_weight_dkn = _param(rngs, (D, K, N), ("embed", "kv_heads", "head_dim"), pd, D**-0.5)
        self.o_weight_hnd = _param(rngs, (H, N, D), ("heads", "head_dim", "embed"), pd, (H * N) ** -0.5)
        if cfg.qkv_bias:
            self.q_bias_hn = _param(rngs, (H, N), ("heads", "head_dim"), pd, init="zeros")
            self.k_bias_kn = _param(rngs, (K, N), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias_kn = _param(rngs, (K, N), ("kv_heads", "head_dim"), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(N, cfg.rms_norm_eps, "head_dim", pd, rngs=rngs)
            self.k_norm = RMSNorm(N, cfg.rms_norm_eps, "head_dim", pd, rngs=rngs)

    def __call__(self, x, positions, mask, cache: Optional[KVCache], layer, mask_kind: str = "general",
                 valid: Optional[jax.Array] = None):
        """x ``[B, T, D]``, positions ``[B, T]``, mask ``[B, T, S]`` (``mask_kind``, ``valid [B, T]``: what it is,
        :func:`jaxtok.models.attention.attend`); returns ``([B, T, D], cache)``. ``layer``: this block's index
        into the cache (an int, or a traced scalar under ``scan_layers``)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x = x.astype(dt)
        q = checkpoint_name(with_lora(self, "q", x, dense(x, self.q_weight_dhn[...].astype(dt))), "query_proj")  # [B, T, H, N]
        k = checkpoint_name(with_lora(self, "k", x, dense(x, self.k_weight_dkn[...].astype(dt))), "key_proj")  # [B, T, K, N]
        v = checkpoint_name(with_lora(self, "v", x, dense(x, self.v_weight_dkn[...].astype(dt))), "value_proj")
        if cfg.qkv_bias:
            q = q + self.q_bias_hn[...].astype(dt)
            k = k + self.k_bias_kn[...].astype(dt)
            v = v + self.v_bias_kn[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "act_heads", None))
        k = apply_rope(k, positions, inv_freq)
        if cache is not None:
            cache = cache.write_layer(layer, k, v)
            k, v = cache.k[layer].astype(dt), cache.v[layer].astype(dt)  # [B, S, K, N]
        ctx = attend(q, k, v, mask, kind=mask_kind, valid=valid, impl=cfg.attention_impl, dtype=dt)  # [B, T, H, N]
        ctx = checkpoint_name(ctx, "context")
        out = with_lora(self, "o", ctx, dense(ctx, self.o_weight_hnd[...].astype(dt), n_in=2))  # [B, T, D]
        return checkpoint_name(out, "out_proj"), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_weight_df = _param(rngs, (D, F), ("embed", "mlp"), pd, D**-0.5)
        self.up_weight_df = _param(rngs, (D, F), ("embed", "mlp"), pd, D**-0.5)
        self.down_weight_fd = _param(rngs, (F, D), ("mlp", "embed"), pd, F**-0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        gate = checkpoint_name(with_lora(self, "gate", x, dense(x, self.gate_weight_df[...].astype(dt))), "mlpwi_0")  # [B, T, F]
        up = checkpoint_name(with_lora(self, "up", x, dense(x, self.up_weight_df[...].astype(dt))), "mlpwi_1")
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return checkpoint_name(with_lora(self, "down", hidden, dense(hidden, self.down_weight_fd[...].astype(dt))), "mlpwo")  # [B, T, D]


class Block(nnx.Module):
    """Pre-norm transformer block; ``sparse``: a :class:`~jaxtok.models.moe.SparseMoE` instead of the MLP."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, sparse: bool = False):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pd, rngs=rngs)
        self.mlp = SparseMoE(cfg, rngs=rngs) if sparse else MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, cache, layer, mask_kind: str = "general", valid=None):
        attn_out, cache = self.attn(self.attn_norm(x), positions, mask, cache, layer, mask_kind, valid)
        x = x + attn_out.astype(x.dtype)
        if isinstance(self.mlp, SparseMoE):  # valid queries see at least their own key
            x = x + self.mlp(self.mlp_norm(x), jnp.any(mask, axis=-1)).astype(x.dtype)
        else:
            x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return constrain(x, ("batch", "length", "act_embed")), cache


def stack_blocks(blocks: list) -> Block:
    """One :class:`Block` whose every parameter is the ``blocks``' stacked on a new leading axis ``[L, ...]`` with
    logical axis ``layers`` (unsharded by :data:`jaxtok.mesh.DEFAULT_RULES`); the blocks must share one structure."""
    graphdef = nnx.graphdef(blocks[0])
    flats = [nnx.to_flat_state(nnx.state(b)) for b in blocks]
    for i, (b, f) in enumerate(zip(blocks, flats)):
        if nnx.graphdef(b) != graphdef or [p for p, _ in f] != [p for p, _ in flats[0]]:
            raise ValueError(f"stack_blocks: block {i} differs in structure from block 0 (mixed dense/MoE layers?)")
    out = []
    for j, (path, var) in enumerate(flats[0]):
        meta = var.get_metadata()
        axes = meta.get("logical_axes")
        value = jnp.stack([f[j][1].get_value() for f in flats])  # [L, ...]
        meta = {**meta, **({"logical_axes": ("layers",) + tuple(axes)} if axes is not None else {})}
        out.append((path, type(var)(value, **meta)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def unstack_blocks(stacked: Block) -> list:
    """The inverse of :func:`stack_blocks`: ``L`` blocks, block ``i`` holding slice ``i`` of every parameter."""
    graphdef = nnx.graphdef(stacked)
    flat = nnx.to_flat_state(nnx.state(stacked))
    L = flat[0][1].get_value().shape[0]
    blocks = []
    for i in range(L):
        one = []
        for path, var in flat:
            meta = var.get_metadata()
            axes = meta.get("logical_axes")
            meta = {**meta, **({"logical_axes": tuple(axes)[1:]} if axes is not None else {})}
            one.append((path, type(var)(var.get_value()[i], **meta)))
        blocks.append(nnx.merge(graphdef, nnx.from_flat_state(one)))
    return blocks


def stack_layer_values(values: dict, num_layers: int) -> dict:
    """Parameter values keyed by module path, unrolled layout ``("layers", i, *rest)`` -> scanned layout
    ``("layers", *rest)`` with the L values stacked on axis 0 (numpy in, numpy out: HF views stay on the host)."""
    out, groups = {}, {}
    for path, value in values.items():
        if len(path) > 2 and path[0] == "layers" and isinstance(path[1], int):
            groups.setdefault(("layers",) + tuple(path[2:]), {})[path[1]] = value
        else:
            out[path] = value
    for path, by_layer in groups.items():
        if sorted(by_layer) != list(range(num_layers)):
            raise ValueError(f"stack_layer_values: {'.'.join(map(str, path))} has layers {sorted(by_layer)}, "
                             f"expected 0..{num_layers - 1}")
        parts = [by_layer[i] for i in range(num_layers)]
        out[path] = (jnp.stack(parts) if any(isinstance(p, jax.Array) for p in parts)
                     else np.stack([np.asarray(p) for p in parts]))
    return out


def unstack_layer_values(values: dict) -> dict:
    """The inverse of :func:`stack_layer_values`: ``("layers", *rest) [L, ...]`` -> ``("layers", i, *rest)``."""
    out = {}
    for path, value in values.items():
        if len(path) > 1 and path[0] == "layers" and not isinstance(path[1], int):
            for i in range(value.shape[0]):
                out[("layers", i) + tuple(path[1:])] = value[i]
        else:
            out[path] = value
    return out


def with_execution(model: "Decoder", *, attention_impl: Optional[str] = None, scan_layers: Optional[bool] = None,
                   remat: Optional[str] = None, moe_dispatch: Optional[str] = None) -> "Decoder":
    """``model`` with other execution settings (:class:`ModelConfig` ``attention_impl`` / ``scan_layers`` /
    ``remat`` / ``moe_dispatch``; None keeps the model's): the same parameter values, restacked when ``scan_layers``
    changes. A model already so configured is returned as it is."""
    changes = {k: v for k, v in dict(attention_impl=attention_impl, scan_layers=scan_layers, remat=remat,
                                     moe_dispatch=moe_dispatch).items() if v is not None}
    cfg = dataclasses.replace(model.cfg, **changes)
    if cfg == model.cfg:
        return model
    values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    plain = nnx.eval_shape(lambda: type(model)(model.cfg, rngs=nnx.Rngs(0)))
    extra = sorted(set(values) - {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(plain))}, key=str)
    if extra:  # e.g. LoRA adapters attached to the modules: they would be dropped
        raise ValueError(f"with_execution: the model holds variables a plain {type(model).__name__} does not "
                         f"({len(extra)}, e.g. {'.'.join(map(str, extra[0]))}); change execution settings before "
                         f"attaching them")
    if model.cfg.scan_layers and not cfg.scan_layers:
        values = unstack_layer_values(values)
    elif cfg.scan_layers and not model.cfg.scan_layers:
        values = stack_layer_values(values, cfg.num_layers)
    abstract = nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(values[tuple(path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _block_fn(graphdef, policy_name: str, static_layer=None):
    """``f(state, x, positions, mask, cache, layer, valid, mask_kind) -> (x, cache, router_stats)``: one block as a
    pure function of its parameter ``state``, under ``jax.checkpoint`` with the remat policy unless ``none``.
    MoE router statistics are collected inside (a transform's body is a trace of its own, which the outer
    :func:`jaxtok.models.moe.collect_router_stats` skips) and returned as outputs."""
    from jaxtok.models.moe import collect_router_stats

    def f(state, x, positions, mask, cache, layer, valid, mask_kind):
        block = nnx.merge(graphdef, state)
        with collect_router_stats() as seen:
            x, cache = block(x, positions, mask, cache, layer if static_layer is None else static_layer,
                             mask_kind, valid)
        return x, cache, [s for _, s in seen]

    if policy_name == "none":
        return f
    return jax.checkpoint(f, policy=remat_policy(policy_name), static_argnums=(7,))


def _report_router_stats(owner, stats: list) -> None:
    """Hand router statistics computed inside a transform to the enclosing :func:`collect_router_stats`."""
    from jaxtok.models import moe

    collector = moe._COLLECTOR.get()
    if collector is not None and collector[1] == moe._trace():
        collector[0].extend((owner, s) for s in stats)


def run_layers(layers, cfg: ModelConfig, x, positions, mask, cache, mask_kind: str, valid):
    """The decoder's block stack: unrolled over ``nnx.List`` ``layers``, or ``jax.lax.scan`` over the stacked
    :class:`Block` of ``scan_layers`` (carry: hidden states and the whole KV cache, written at the traced layer
    index); each block under ``jax.checkpoint`` with ``cfg.remat``'s policy. Returns ``(x [B, T, D], cache)``."""
    if not cfg.scan_layers:
        if cfg.remat == "none":  # the plain loop (no split/merge)
            for i, block in enumerate(layers):
                x, cache = block(x, positions, mask, cache, i, mask_kind, valid)
            return x, cache
        for i, block in enumerate(layers):
            graphdef, state = nnx.split(block)
            x, cache, stats = _block_fn(graphdef, cfg.remat, static_layer=i)(
                state, x, positions, mask, cache, None, valid, mask_kind)
            if isinstance(block.mlp, SparseMoE):
                _report_router_stats(block.mlp, stats)
        return x, cache
    graphdef, state = nnx.split(layers)
    fn = _block_fn(graphdef, cfg.remat)

    def body(carry, xs):
        x, cache = carry
        state_i, i = xs
        x, cache, stats = fn(state_i, x, positions, mask, cache, i, valid, mask_kind)
        return (x, cache), stats

    L = cfg.num_layers
    (x, cache), stats = jax.lax.scan(body, (x, cache), (state, jnp.arange(L, dtype=jnp.int32)))
    if isinstance(layers.mlp, SparseMoE):  # stats: per-layer RouterStats stacked [L, ...]
        _report_router_stats(layers.mlp, [jax.tree.map(lambda a, i=i: a[i], s) for s in stats for i in range(L)])
    return x, cache


class Decoder(nnx.Module):
    """The jaxtok decoder: token embedding, ``num_layers`` pre-norm blocks, final RMSNorm, LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed_vd = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, 1.0)
        blocks = [Block(cfg, rngs=rngs, sparse=cfg.is_sparse_layer(i)) for i in range(cfg.num_layers)]
        # scan_layers: one Block whose parameters are the L blocks' stacked on a leading "layers" axis (the same
        # values, drawn in the same order, as the unrolled model of the same seed)
        self.layers = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pd, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head_dv = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, cfg.hidden_size**-0.5)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project final-normed hidden states ``[..., D]`` to float32 logits ``[..., V]``."""
        dt = jnp.dtype(self.cfg.dtype)
        rows = int(np.prod(hidden.shape[:-1]))
        if self.cfg.tie_embeddings and rows <= _MATVEC_ROWS:
            # decode-sized: contract embed [V, D]'s D axis in the dot, no transposed [D, V] copy per call
            out = dense_t(hidden.astype(dt), self.embed_vd[...].astype(dt), preferred_element_type=jnp.float32)
        elif self.cfg.tie_embeddings:
            out = dense(hidden.astype(dt), self.embed_vd[...].T.astype(dt), preferred_element_type=jnp.float32)
        else:
            out = dense(hidden.astype(dt), self.lm_head_dv[...].astype(dt), preferred_element_type=jnp.float32)
        return out.astype(jnp.float32)  # [..., V]

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: Optional[jax.Array] = None,
        valid: Optional[jax.Array] = None,
        attention: Attention = "causal",
        block_size: Optional[int] = None,
        cache: Optional[KVCache] = None,
        logits_at: Optional[jax.Array] = None,
        return_logits: bool = True,
        return_hidden: bool = False,
    ) -> DecoderOutput:
        """Forward pass.

        Args:
          tokens: ``[B, T]`` int32 ids in ``[0, vocab_size)``.
          positions: ``[B, T]`` RoPE positions; default ``cumsum(valid) - 1`` after the cache's last position, so
            left padding needs no special care.
          valid: ``[B, T]`` bool, False for padding (padding keys are never attended).
          attention: ``causal`` | ``bidirectional`` | ``block_causal`` (with ``block_size``) | ``siblings`` (tokens
            sharing a position are alternatives: each sees the prefix and itself, see :func:`attention_mask`).
          cache: a :class:`KVCache`; the T tokens are written at each row's offset ``cache.lengths`` and attend to
            the row's live entries. The returned cache has ``lengths + T``.
          logits_at: ``[B, K]`` int32 indices into the T axis; logits are computed only there (gather, then
            matmul) -> ``[B, K, V]``. Lets losses skip logits they will not use.
          return_logits / return_hidden: what to return.
        """
        cfg = self.cfg
        check_token_ids(tokens, cfg.vocab_size)
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={attention!r}: allowed {ATTENTION_KINDS}")
        B, T = tokens.shape
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
        if positions is None:
            start = cache.next_positions() if cache is not None else jnp.zeros((B,), jnp.int32)
            positions = start[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        positions = positions.astype(jnp.int32)

        if cache is not None and cfg.shift_logits:
            raise ValueError(
                "shift_logits (Dream) with a KV cache is not supported: the first logit of an appended chunk is "
                "predicted by the previous chunk's last hidden state, which the cache does not keep. Run the full "
                "forward, or append with one token of overlap and drop its logit."
            )
        if cache is not None:
            if not isinstance(cache.lengths, jax.core.Tracer) and int(np.max(cache.lengths)) + T > cache.capacity:
                raise ValueError(
                    f"KV cache overflow: writing {T} tokens at length {int(np.max(cache.lengths))} exceeds "
                    f"capacity {cache.capacity}"
                )
            cache = cache.write_positions(jnp.where(valid, positions, -1))
            k_pos = cache.positions  # [B, S]
            slot = jnp.arange(cache.capacity)[None, :]
            k_live = (slot < (cache.lengths + T)[:, None]) & (k_pos >= 0)
            q_slot = cache.lengths[:, None] + jnp.arange(T)[None, :]  # [B, T]
            k_slot = jnp.broadcast_to(slot, k_pos.shape)  # [B, S]
        else:
            k_pos, k_live = positions, valid
            q_slot = k_slot = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
        mask = attention_mask(attention, positions, valid, k_pos, k_live, block_size, q_slot, k_slot)  # [B, T, S]

        # What the mask is, for attention kernels that rebuild it from lengths/segments (models/attention.py):
        # without a cache, causal/bidirectional with padding. Causal is rebuilt in index order, which equals the
        # position order whenever positions increase along T over valid tokens (default positions, left padding,
        # every jaxtok data pipeline); the xla kernel reads the mask itself.
        mask_kind = attention if cache is None and attention in ("causal", "bidirectional") else "general"
        x = jnp.take(self.embed_vd[...], tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B, T, D]
        x = constrain(x, ("batch", "length", "act_embed"))
        x, cache = run_layers(self.layers, cfg, x, positions, mask, cache, mask_kind, valid)
        hidden = self.final_norm(x)
        if cache is not None:
            cache = cache.advance(T)

        logits = None
        if return_logits:
            if logits_at is not None:
                idx = logits_at.astype(jnp.int32)
                if cfg.shift_logits:  # Dream: position i is predicted by the hidden state at i-1
                    idx = jnp.maximum(idx - 1, 0)
                picked = jnp.take_along_axis(hidden, idx[..., None], axis=1)  # [B, K, D]
                logits = self.logits(picked)
            else:
                logits = self.logits(hidden)  # [B, T, V]
                if cfg.shift_logits:
                    logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
            logits = constrain(logits, ("batch", "length", "act_vocab"))
        return DecoderOutput(logits=logits, hidden=hidden if return_hidden else None, cache=cache)
