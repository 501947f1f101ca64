"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on jaxtok's projections.

A frozen weight ``W [*in, *out]`` gets a trainable low-rank update: ``y = x W + (alpha / r) * (x A) B`` with
``A [*in, r]`` and ``B [r, *out]``. ``B`` starts at zero, so the adapted model equals the base model at step 0;
``A`` starts uniform in ``+-1/sqrt(fan_in)`` (PEFT's ``kaiming_uniform(a=sqrt(5))``, which the seed methods'
scripts use).

The adapters are Flax NNX ``nnx.LoRAParam`` variables (a subclass of ``nnx.Param``, the type Flax's own
``nnx.LoRA`` / ``nnx.LoRALinear``, qwix and Tunix filter on) held by a :class:`LoRAAdapter` that
:func:`apply_lora` attaches to each targeted :class:`~jaxtok.models.transformer.Attention` / ``MLP`` module as
``<name>_lora``; :func:`jaxtok.models.transformer.with_lora` adds its update where the module applies ``W``.
qwix's ``LoraProvider`` is not used: it selects adapters by module path and op kind only (q, k, v and o are four
``dot_general`` calls of one ``attn`` module, so "o only" cannot be expressed) and, run eagerly by
``apply_lora_to_model``, it found no weight behind the attention projections (3-D weights reshaped to 2-D by
:func:`~jaxtok.models.transformer.dense`) and created no adapter there, then failed inside ``jit`` trying to create
them late; see ``docs/performance.md`` "LoRA".

Training only the adapters: :func:`jaxtok.train.step.split_model` puts the ``nnx.LoRAParam`` variables of a model
that has any into the train state's ``params`` (so gradients and the optimizer state cover only them) and the base
weights into ``rest``. :func:`merge_lora` folds every adapter into its weight (``W + (alpha/r) A B``) and removes
it, giving a plain :class:`~jaxtok.models.transformer.Decoder` whose logits equal the adapted model's up to float
rounding; :func:`save_merged_hf` writes that model with :func:`jaxtok.models.hf.save_hf`.

Stacked layers (``ModelConfig.scan_layers``: every weight has a leading ``[L]`` axis) get stacked adapters
``A [L, *in, r]``, ``B [L, r, *out]``, which the layer scan slices like every other parameter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtok.models.transformer import MLP, Attention, dense

__all__ = ["TARGETS", "LoraConfig", "LoRAAdapter", "apply_lora", "merge_lora", "merged", "has_lora", "lora_state",
           "num_lora_params", "save_merged_hf"]

# target name -> (module class, weight attribute, number of input axes, number of output axes)
TARGETS = {
    "q": (Attention, "q_weight_dhn", 1, 2),
    "k": (Attention, "k_weight_dkn", 1, 2),
    "v": (Attention, "v_weight_dkn", 1, 2),
    "o": (Attention, "o_weight_hnd", 2, 1),
    "gate": (MLP, "gate_weight_df", 1, 1),
    "up": (MLP, "up_weight_df", 1, 1),
    "down": (MLP, "down_weight_fd", 1, 1),
}
# HF / PEFT module names users write in target_modules, as jaxtok's
PEFT_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank ``r`` (> 0), ``alpha`` (the update is scaled by ``alpha / r``) and the projections that get adapters
    (names of :data:`TARGETS`: ``q``, ``k``, ``v``, ``o`` of attention; ``gate``, ``up``, ``down`` of the MLP)."""

    rank: int
    alpha: float
    targets: tuple = ("q", "k", "v", "o")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check_targets(self.targets, "targets")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank={self.rank!r}: must be a positive integer")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha={self.alpha!r}: must be a positive finite number")

    @property
    def scale(self) -> float:
        """``alpha / r``, the factor of ``(x A) B``."""
        return float(self.alpha) / self.rank


def check_targets(targets: Sequence[str], key: str) -> None:
    """``targets`` must be a non-empty list of distinct names from :data:`TARGETS` (ValueError naming ``key``; a
    PEFT name such as ``o_proj`` gets the jaxtok name as a hint)."""
    targets = list(targets)
    if not targets:
        raise ValueError(f"{key}=[]: name at least one projection of {list(TARGETS)}")
    for t in targets:
        if t not in TARGETS:
            hint = f" (PEFT's {t!r} is {PEFT_NAMES[t]!r} here)" if t in PEFT_NAMES else ""
            raise ValueError(f"{key}: {t!r} is not a projection{hint}; allowed {list(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"{key}={targets!r}: a projection is named twice")


class LoRAAdapter(nnx.Module):
    """The low-rank update of one weight ``W [*lead, *in, *out]`` (``lead``: the ``[L]`` axis of stacked layers):
    ``lora_a [*lead, *in, r]`` (uniform ``+-1/sqrt(prod(in))``), ``lora_b [*lead, r, *out]`` (zeros), both
    float32 ``nnx.LoRAParam`` with the weight's logical axes (the rank axis unsharded). Called on ``x [..., *in]``
    it returns ``(alpha/r) * (x A) B  [..., *out]`` in ``x``'s dtype (the compute dtype)."""

    def __init__(self, weight: nnx.Param, n_in: int, n_out: int, rank: int, alpha: float, *, rngs: nnx.Rngs):
        shape = tuple(weight.shape)
        lead = len(shape) - n_in - n_out
        if lead < 0:
            raise ValueError(f"LoRAAdapter: weight of shape {shape} has fewer than {n_in} + {n_out} axes")
        axes = weight.get_metadata().get("logical_axes") or (None,) * len(shape)
        lead_s, in_s, out_s = shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]
        lead_a, in_a, out_a = tuple(axes[:lead]), tuple(axes[lead:lead + n_in]), tuple(axes[lead + n_in:])
        bound = 1.0 / math.sqrt(math.prod(in_s))
        a = jax.random.uniform(rngs.params(), lead_s + in_s + (rank,), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, logical_axes=lead_a + in_a + (None,))
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead_s + (rank,) + out_s, jnp.float32),
                                    logical_axes=lead_a + (None,) + out_a)
        self.n_in, self.rank, self.scale = n_in, rank, float(alpha) / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = dense(x, self.lora_a[...].astype(dt), n_in=self.n_in)  # [..., r]
        return dense(h, self.lora_b[...].astype(dt)) * jnp.asarray(self.scale, dt)  # [..., *out]

    def delta(self) -> jax.Array:
        """``(alpha/r) A B`` in float32, shaped like the weight ``[*lead, *in, *out]``."""
        a, b = self.lora_a[...], self.lora_b[...]
        lead = a.ndim - self.n_in - 1
        in_s, out_s = a.shape[lead:-1], b.shape[lead + 1:]
        a2 = a.reshape(a.shape[:lead] + (math.prod(in_s), self.rank))  # [*lead, K, r]
        b2 = b.reshape(b.shape[:lead] + (self.rank, math.prod(out_s)))  # [*lead, r, N]
        d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)  # [*lead, K, N]
        return (d * self.scale).reshape(a.shape[:lead] + in_s + out_s)


def _targets_in(model: nnx.Module, targets: Sequence[str]):
    """``[(module, target name)]`` of every module of ``model`` holding a targeted projection."""
    out = []
    for _, module in nnx.iter_modules(model):
        for t in targets:
            cls, attr, _, _ = TARGETS[t]
            if isinstance(module, cls) and hasattr(module, attr):
                out.append((module, t))
    return out


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Attach a :class:`LoRAAdapter` as ``<target>_lora`` to every targeted projection of ``model`` (in place;
    returns ``model``). The base weights are untouched; ``B = 0`` makes the adapted model's outputs equal the base
    model's. Raises ValueError when the model already has adapters, when a target names a projection the model
    does not have, or when MLP targets meet mixture-of-experts layers (LoRA on experts is not implemented)."""
    if has_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora them first)")
    from jaxtok.models.moe import SparseMoE

    mlp_targets = [t for t in cfg.targets if TARGETS[t][0] is MLP]
    if mlp_targets and any(isinstance(m, SparseMoE) for _, m in nnx.iter_modules(model)):
        raise ValueError(f"LoRA targets {mlp_targets}: this model has mixture-of-experts layers, whose experts "
                         f"have no LoRA adapters; target the attention projections (q, k, v, o) only")
    found = _targets_in(model, cfg.targets)
    missing = sorted(set(cfg.targets) - {t for _, t in found})
    if missing:
        raise ValueError(f"LoRA targets {missing}: the model has no such projection")
    for module, t in found:
        _, attr, n_in, n_out = TARGETS[t]
        setattr(module, f"{t}_lora", LoRAAdapter(getattr(module, attr), n_in, n_out, cfg.rank, cfg.alpha,
                                                 rngs=rngs))
    return model


def has_lora(model: nnx.Module) -> bool:
    """Whether ``model`` holds any ``nnx.LoRAParam``."""
    return any(True for _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapters' ``nnx.State`` (the trainable part of a LoRA model)."""
    return nnx.state(model, nnx.LoRAParam)


def num_lora_params(model: nnx.Module) -> int:
    """Number of adapter parameters of ``model``."""
    return sum(int(math.prod(v.shape)) for v in jax.tree.leaves(lora_state(model)))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its weight, ``W <- W + (alpha/r) A B`` (computed in float32, stored in ``W``'s
    dtype), and remove the adapters (in place; returns ``model``, now a plain model of the same class). Works on
    concrete arrays and inside ``jit``."""
    for _, module in list(nnx.iter_modules(model)):
        for t, (cls, attr, _, _) in TARGETS.items():
            adapter = getattr(module, f"{t}_lora", None) if isinstance(module, cls) else None
            if adapter is None:
                continue
            w = getattr(module, attr)
            w[...] = (w[...].astype(jnp.float32) + adapter.delta()).astype(w[...].dtype)
            delattr(module, f"{t}_lora")
    return model


def merged(model: nnx.Module) -> nnx.Module:
    """A merged copy of ``model`` (:func:`merge_lora` on ``nnx.clone(model)``); ``model`` keeps its adapters."""
    return merge_lora(nnx.clone(model))


def merged_params_fn(graphdef):
    """``f(params, rest) -> nnx.State``: the ``nnx.Param`` state of the merged model built from a LoRA train state
    (``params`` = adapters, ``rest`` = base weights and other variables): what a plain model's checkpoint holds."""

    def f(params, rest):
        return nnx.state(merge_lora(nnx.merge(graphdef, params, rest)), nnx.Param)

    return f


def save_merged_hf(model: nnx.Module, path: str, *, dtype: Optional[str] = None,
                   architecture: Optional[str] = None) -> None:
    """Merge the adapters of a copy of ``model`` and write it as a Hugging Face checkpoint
    (:func:`jaxtok.models.hf.save_hf`; ``transformers`` loads it without PEFT)."""
    from jaxtok.models.hf import save_hf

    save_hf(merged(model), path, dtype=dtype, architecture=architecture)
