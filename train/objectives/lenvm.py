"""Length Value Model (LenVM): a value head that predicts how many tokens remain until EOS (train_methods.md §11).

Per-token reward ``r = −(1 − γ)`` until EOS; with ``n_t`` tokens left (the EOS position has ``n = 0``) the
discounted return is ``V_t = Σ_{k<n_t} γ^k r = −(1 − γ^{n_t}) ∈ (−1, 0]`` — bounded and monotone in ``n_t``, with
the inverse ``n = ln(1 + V) / ln γ`` (:func:`value_to_length`, the readout decoders use for length control:
:mod:`jaxtok.decode.length_control`).

Model: :class:`jaxtok.models.value.LengthValueModel` (values in the objective's ``gamma``) — the decoder with a
linear :class:`jaxtok.models.heads.ValueHead` on its last hidden state, ``pred_t = −sigmoid(W h_t + b)``. Valued
positions: the last prompt token and every completion token up to and including EOS (:func:`lenvm_targets`).
Targets: ``λ = 1`` (default) is the Monte-Carlo / closed form ``−(1 − γ^n)``; ``λ < 1`` uses GAE on the detached
predictions (:func:`gae_targets`): ``δ_t = r + γ v_{t+1} − v_t``, ``A_t = δ_t + γλ A_{t+1}``, target ``v_t + A_t``,
the EOS target exactly 0 and the recursion reset at EOS.
Loss: Huber (δ = 1) between ``pred`` and the target, or ``bce`` (``BCE_with_logits(raw, 1 − γ^n)``), token-mean
over valued positions as ``(sum, count)``.

Data: generations of the policy whose lengths are modelled, in the rollout layout (``tokens, positions, valid,
loss_mask``; completions end with ``eos_id``). Truncated completions (no EOS, length unknown) are not valued. In
the loop the policy is the frozen ``teacher`` (``rollout.teacher_init_from``) completing every prompt
(``rollout.off_policy_fraction: 1``), so the value model's own drift does not change the data; the training model
must be a :class:`LengthValueModel` (``ObjectiveSpec.wrap_model``: ``with_value_head(decoder, args, rngs)``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtok.models import Decoder
from jaxtok.models.value import LengthValueModel, length_to_value, value_to_length
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.objectives.policy_gradient import require_keys

__all__ = ["LenVMArgs", "LengthValueModel", "with_value_head", "length_to_value", "value_to_length",
           "lenvm_targets", "gae_targets", "lenvm_loss_terms", "lenvm_loss"]

_F32 = jnp.float32
LENVM_LOSSES = ("huber", "bce")


@dataclasses.dataclass(frozen=True)
class LenVMArgs:
    """``gamma`` (example yaml 0.997; code default 0.999), ``lam`` (GAE λ; 1 = closed form), ``loss``:
    ``huber`` | ``bce``, ``huber_delta`` (1.0: on values in (−1, 0] Huber is ½·MSE), ``eos_id`` (the stop token;
    None: every completion's last token is its end), ``value_hidden`` (None: linear head, as the paper)."""

    gamma: float = 0.997
    lam: float = 1.0
    loss: str = "huber"
    huber_delta: float = 1.0
    eos_id: Optional[int] = 2
    value_hidden: Optional[int] = None

    def __post_init__(self):
        if not 0.0 < self.gamma < 1.0:
            raise ConfigError(f"gamma={self.gamma!r} must be in (0, 1)")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"lam={self.lam!r} must be in [0, 1]")
        if self.loss not in LENVM_LOSSES:
            raise ConfigError(f"loss={self.loss!r} is not allowed; allowed: {list(LENVM_LOSSES)}")
        if self.huber_delta <= 0:
            raise ConfigError(f"huber_delta={self.huber_delta!r} must be > 0")


def with_value_head(decoder: Decoder, args: LenVMArgs, rngs: nnx.Rngs) -> LengthValueModel:
    """The training model of the ``lenvm`` objective built from the loop's decoder (``ObjectiveSpec.wrap_model``): the
    decoder's weights, a fresh value head, values in the discount ``args.gamma``."""
    return LengthValueModel.from_decoder(decoder, rngs=rngs, gamma=args.gamma, value_hidden=args.value_hidden)


# ----------------------------------------------------------------------------------------------------------------
# targets


def lenvm_targets(loss_mask, tokens, gamma: float, eos_id: Optional[int] = 2):
    """Closed-form LenVM targets (§11, λ = 1). Returns ``(target, value_mask, remaining)``, all ``[B, T]``.

    Valued positions: the last prompt token (``loss_mask[t+1]``) and the completion tokens (``loss_mask[t]``) of
    rows whose completion ends with ``eos_id`` (every row with a completion when ``eos_id`` is None).
    ``remaining[t] = e − t`` with ``e`` the EOS index; ``target = −(1 − γ^remaining)``, 0 off the mask."""
    gen = jnp.asarray(loss_mask, bool)
    B, T = gen.shape
    t = jnp.arange(T)[None, :]
    has = jnp.any(gen, axis=1)
    end = jnp.max(jnp.where(gen, t, -1), axis=1)  # [B] index of the last completion token
    finished = has
    if eos_id is not None:
        last_tok = jnp.take_along_axis(jnp.asarray(tokens), jnp.maximum(end, 0)[:, None], axis=1)[:, 0]
        finished = has & (last_tok == eos_id)
    nxt = jnp.concatenate([gen[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
    mask = (gen | nxt) & finished[:, None]
    remaining = jnp.where(mask, end[:, None] - t, 0)
    return jnp.where(mask, length_to_value(remaining, gamma), 0.0), mask, remaining


def gae_targets(values_old, value_mask, gamma: float, lam: float):
    """GAE targets for the LenVM value (§11) ``[B, T]``: along each row's valued span (contiguous, ending at EOS),
    ``δ_t = r + γ v_{t+1} − v_t`` with ``r = −(1 − γ)`` and ``v_EOS = 0``; ``A_t = δ_t + γλ A_{t+1}`` (reset at EOS);
    target ``v_t + A_t``; the EOS target is exactly 0. ``λ = 1`` gives the closed form ``−(1 − γ^n)``."""
    v = jax.lax.stop_gradient(jnp.asarray(values_old, _F32))
    m = jnp.asarray(value_mask, bool)
    B, T = m.shape
    end = m & ~jnp.concatenate([m[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
    r = -(1.0 - gamma)

    def step(carry, xs):
        adv_next, v_next = carry
        v_t, m_t, end_t = xs
        adv = r + gamma * v_next - v_t + gamma * lam * adv_next
        target = jnp.where(end_t, 0.0, jnp.where(m_t, v_t + adv, 0.0))
        adv_carry = jnp.where(m_t & ~end_t, adv, 0.0)
        v_carry = jnp.where(m_t & ~end_t, v_t, 0.0)
        return (adv_carry, v_carry), target

    zeros = jnp.zeros((B,), _F32)
    _, targets = jax.lax.scan(step, (zeros, zeros), (v.T, m.T, end.T), reverse=True)
    return targets.T


# ----------------------------------------------------------------------------------------------------------------
# loss


def lenvm_loss_terms(raw, target, value_mask, args: LenVMArgs):
    """Per-position loss and its ``(sum, count)``: Huber(−sigmoid(raw) − target) or BCE(raw, −target)."""
    raw = jnp.asarray(raw, _F32)
    m = jnp.asarray(value_mask, _F32)
    if args.loss == "huber":
        per = optax.huber_loss(-jax.nn.sigmoid(raw), jnp.asarray(target, _F32), delta=args.huber_delta)
    else:
        per = optax.sigmoid_binary_cross_entropy(raw, -jnp.asarray(target, _F32))
    per = jnp.where(m > 0, per, 0.0)
    return per, jnp.sum(per), jnp.sum(m)


@OBJECTIVES.register("lenvm", LenVMArgs, data="rollout", models=("teacher",), wrap_model=with_value_head)
def lenvm_loss(model: nnx.Module, batch: dict, rng: jax.Array, args: LenVMArgs = LenVMArgs(), *,
               teacher: Optional[nnx.Module] = None):
    """LenVM value loss ``(Σ loss, #valued positions, aux)`` (module docstring). ``teacher`` (the policy that
    generated the data) is not used in the loss. Aux: ``value_mae`` (|pred − target|), ``length_mae`` (tokens,
    through :func:`value_to_length`), ``finished_rows`` (share of rows ending with EOS)."""
    del rng, teacher
    require_keys(batch, ("tokens", "loss_mask"), "lenvm")
    if not hasattr(model, "value_head"):
        raise ConfigError("objective 'lenvm' trains a model with a value head (LengthValueModel); build it with "
                          "jaxtok.train.objectives.lenvm.with_value_head (ObjectiveSpec.wrap_model)")
    if getattr(model, "gamma", args.gamma) != args.gamma:
        raise ConfigError(f"objective.args.gamma={args.gamma} differs from the value model's gamma={model.gamma} (its "
                          f"readout would convert values with the wrong discount); keep the gamma it was built with")
    raw = model.raw_values(batch["tokens"], positions=batch.get("positions"), valid=batch.get("valid"))  # [B, T]
    target, mask, remaining = lenvm_targets(batch["loss_mask"], batch["tokens"], args.gamma, args.eos_id)
    if args.lam < 1.0:
        target = gae_targets(-jax.nn.sigmoid(raw), mask, args.gamma, args.lam)
    _, loss_sum, count = lenvm_loss_terms(raw, target, mask, args)
    pred = jax.lax.stop_gradient(-jax.nn.sigmoid(raw))
    m = mask.astype(_F32)
    n_len = value_to_length(pred, args.gamma)
    B = jnp.full((), mask.shape[0], _F32)
    aux = {"value_mae": jnp.sum(jnp.abs(pred - target) * m),
           "length_mae": jnp.sum(jnp.abs(n_len - remaining) * m),
           "finished_rows": (jnp.sum(jnp.any(mask, axis=1).astype(_F32)), B)}
    return loss_sum, count, aux
