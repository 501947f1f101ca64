"""TAD — temporal-aware trajectory self-distillation for masked diffusion LMs (``train_methods.md`` §5).

A teacher trajectory ``x^(0..S)`` (all-MASK to final response, one state per sampler step, recorded with the
privileged prompt by the diffusion sampler) gives training pairs ``x_t = x^(i)``, ``x_target = x^(min(i+δ, S))``
(:func:`trajectory_pair`). Over response positions masked in ``x_t`` (:func:`jaxtok.select.near_distant`):

* *near* (revealed in ``x_target``): hard cross-entropy of the student on ``x_target``;
* *distant* (still masked in ``x_target``): forward KL ``KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` to the frozen
  teacher, which reads the privileged prompt and the same ``x_t``;

``L = λ_ce · mean_near CE + λ_kl · τ² · mean_distant KL`` (:func:`tad_loss_from_logits`); an empty set contributes 0.

The ``tad`` objective consumes batches of recorded pairs: ``tokens``/``valid``/``positions`` ``[B, T]`` = plain
prompt (left-padded) + ``x_t``; ``teacher_tokens``/``teacher_valid``/``teacher_positions`` ``[B, T']`` = privileged
prompt (left-padded) + the same ``x_t``; ``x_target [B, L]``; ``response_valid [B, L]`` (optional, selects rows).
The response is the last ``L`` columns of both inputs. Like the TAD repository, which trains every masked position
of its fixed ``gen_length`` response, the near/distant sets cover all ``L`` positions of a kept row, the terminator
and the fill after it included (:func:`response_mask`); ``response_valid`` only says which rows are kept (the
trajectory collector marks the correct trajectories' responses up to their terminator). Both models run bidirectionally; logits ``[..., i]`` predict token ``i``
(the Decoder applies the Dream shift itself).

Normalisation: the two means are per call (the TAD repo's per-batch means), returned as ``(loss, 1)``, so with
``train.micro_batches > 1`` the step averages the micro-batch losses.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok import stats
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.select import near_distant
from jaxtok.stats import chunked_map

__all__ = ["TADArgs", "trajectory_pair", "tad_loss_from_logits", "response_mask", "tad_loss"]

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TADArgs:
    """``ce_weight`` λ_ce, ``kl_weight`` λ_kl, ``temperature`` τ of the KL (repo defaults 1, 1, 1); ``mask_id``
    (None: the model config's ``mask_token_id``); ``chunk_size`` tokens per float32 chunk; ``delta`` δ, the step
    offset of ``x_target`` used by the loop's trajectory collector (LLaDA script 8, Dream 6);
    ``privileged_template``: the teacher's prompt text from the example's ``{prompt}``, ``{target}`` (worked
    solution) and ``{answer}`` (``"{prompt}"``: no privilege, plain self-distillation)."""

    ce_weight: float = 1.0
    kl_weight: float = 1.0
    temperature: float = 1.0
    mask_id: Optional[int] = None
    chunk_size: int = 512
    delta: int = 8
    privileged_template: str = "reference answer:{target}\n{prompt}"

    def __post_init__(self):
        if self.ce_weight < 0 or self.kl_weight < 0:
            raise ConfigError(f"ce_weight={self.ce_weight!r}, kl_weight={self.kl_weight!r}: must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature!r}: must be > 0")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size={self.chunk_size!r}: must be >= 1")
        if self.delta < 0:
            raise ConfigError(f"delta={self.delta!r}: must be >= 0")
        if "{prompt}" not in self.privileged_template:
            raise ConfigError(f"privileged_template={self.privileged_template!r}: must contain {{prompt}}")


def trajectory_pair(trajectory: np.ndarray, step: int, delta: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x_t, x_target) = (x^(i), x^(min(i+δ, S)))`` from a recorded trajectory ``[S+1, L]`` (§5)."""
    trajectory = np.asarray(trajectory)
    last = trajectory.shape[0] - 1
    if not 0 <= step <= last or delta < 0:
        raise ValueError(f"step={step} must lie in [0, {last}] and delta={delta} must be >= 0")
    return trajectory[step], trajectory[min(step + delta, last)]


def tad_loss_from_logits(student_logits: jax.Array, teacher_logits: jax.Array, x_t: jax.Array,
                         x_target: jax.Array, valid: jax.Array, mask_id: int, args: TADArgs = TADArgs(), *,
                         chunk_size: Optional[int] = None):
    """TAD loss (§5) from response logits ``[B, L, V]`` (logits ``i`` predict token ``i``) and token states
    ``[B, L]``. Returns ``(loss, aux)`` with aux ``ce``, ``kl``, ``near``, ``distant`` (counts)."""
    part = near_distant(x_t, x_target, valid, mask_id)
    tau = args.temperature

    def one(c):
        lp_s = stats.log_probs(c["s"])
        ce = -jnp.take_along_axis(lp_s, c["y"][:, None], axis=-1)[:, 0]
        kl = stats.divergence("forward_kl", c["s"], jax.lax.stop_gradient(c["t"]), temperature=tau)
        return {"ce": ce, "kl": kl}

    out = chunked_map(one, {"s": student_logits, "t": teacher_logits, "y": x_target.astype(jnp.int32)},
                      chunk_size=chunk_size or args.chunk_size, token_ndim=2)
    n_near = jnp.sum(part.near.astype(_F32))
    n_far = jnp.sum(part.distant.astype(_F32))
    ce = jnp.sum(jnp.where(part.near, out["ce"], 0.0)) / jnp.maximum(n_near, 1.0)
    kl = jnp.sum(jnp.where(part.distant, out["kl"], 0.0)) / jnp.maximum(n_far, 1.0)
    loss = args.ce_weight * ce + args.kl_weight * tau * tau * kl
    return loss, {"ce": ce, "kl": kl, "near": n_near, "distant": n_far}


def response_mask(batch: dict, length: int) -> jax.Array:
    """Positions that take part in TAD's near/distant partition: every one of the ``length`` response positions of
    a kept row (§5; the reference trains all masked positions of the fixed-length response, terminator fill
    included). A row is kept when ``response_valid [B, L]`` marks any of its positions (all rows without the key).
    ``[B, L]`` bool."""
    if "response_valid" not in batch:
        return jnp.ones((jnp.shape(batch["x_target"])[0], length), bool)
    rows = jnp.any(jnp.asarray(batch["response_valid"], bool), axis=-1)  # [B]
    return jnp.broadcast_to(rows[:, None], (rows.shape[0], length))


def _response_logits(model, tokens, valid, positions, length):
    """Bidirectional logits at the last ``length`` columns only (``logits_at``). ``[B, L, V]``."""
    tokens = jnp.asarray(tokens)
    B, T = tokens.shape
    at = jnp.broadcast_to(jnp.arange(T - length, T, dtype=jnp.int32), (B, length))
    return model(tokens, positions=positions, valid=valid, attention="bidirectional", logits_at=at).logits


@OBJECTIVES.register("tad", TADArgs, data="trajectory", models=("teacher",), eval="diffusion")
def tad_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: TADArgs = TADArgs(), *,
             teacher: Optional[nnx.Module] = None):
    """TAD objective on a batch of recorded ``(x_t, x_target)`` pairs (module docstring). ``(loss, 1, aux)``."""
    del rng
    if teacher is None:
        raise ConfigError("objective 'tad' needs the frozen teacher (the base model with the privileged prompt)")
    missing = [k for k in ("tokens", "teacher_tokens", "x_target") if k not in batch]
    if missing:
        raise ConfigError(f"objective 'tad' needs batch keys {missing}; got {sorted(batch)}")
    mask_id = args.mask_id if args.mask_id is not None else model.cfg.mask_token_id
    if mask_id is None:
        raise ConfigError("tad: mask_id=None and the model config has no mask_token_id")
    x_target = jnp.asarray(batch["x_target"])
    L = x_target.shape[1]
    x_t = jnp.asarray(batch["tokens"])[:, -L:]
    valid = response_mask(batch, L)  # [B, L]
    s = _response_logits(model, batch["tokens"], batch.get("valid"), batch.get("positions"), L)
    t = jax.lax.stop_gradient(_response_logits(teacher, batch["teacher_tokens"], batch.get("teacher_valid"),
                                               batch.get("teacher_positions"), L))
    loss, aux = tad_loss_from_logits(s, t, x_t, x_target, valid, mask_id, args)
    one = jnp.ones((), _F32)
    return loss, one, {k: (v, one) for k, v in aux.items()}
