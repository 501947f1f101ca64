"""LenVM-guided length control for autoregressive decoding (train_methods.md §11; LenVM abstract: "LenVM provides a
highly effective signal at inference time ... continuous control over the trade off between performance and
efficiency ... predicts total generation length from the prompt boundary").

A Length Value Model (:class:`jaxtok.models.value.LengthValueModel`) reads out, after any prefix, the tokens left
until EOS: ``n = ln(1 + V) / ln γ``. Guidance scores the policy's K most likely next tokens: every candidate ``c`` is
appended to the value model's cached prefix in ONE forward (attention ``siblings``: candidates share a position and
see the prefix and themselves, not each other), giving ``n_c``, and the predicted completion length if ``c`` is
emitted at step ``t`` (0-based) is ``L_c = t + 1 + n_c``. The policy's logits are re-weighted on the candidates
(every other token is dropped, as the reference serves guidance with top-k 10 sampling):

- ``tilt`` (efficiency trade-off, the reference's ``centered_exp``): ``logit_c + s·(E_p[n] − n_c)``, i.e.
  ``p'(c) ∝ p(c)·exp(−s·n_c)``; ``s > 0`` prefers tokens after which less remains, ``s < 0`` longer answers.
- ``target`` (exact length matching, LIFEBench-style): ``logit_c − s·|L_c − L*|`` for a per-row target ``L*``.
- ``budget`` (finish within a token budget): ``logit_c − s·max(0, L_c − L*)``; only overruns are penalised.

``s = 0`` leaves the top-K-restricted policy unchanged (tested); the log-probs :func:`jaxtok.decode.generate`
returns are those of the guided distribution. The bonus is added to the raw logits, before the
temperature and the other filters of :func:`jaxtok.decode.generate`. [INFERRED] The exact re-weighting of the
reference (served in an SGLang fork) is not public; these are our formulations, in tokens so ``s`` reads as
log-odds per token. Cost: one value-model forward of ``1 + K`` tokens per step (the previous token and the K
candidates), on top of the policy's forward.

:func:`predict_length` is the prompt-boundary readout: the value at the last prompt token, as total tokens to come.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.models import KVCache
from jaxtok.models.value import LengthValueModel, value_to_length
from jaxtok.registry import LOGIT_GUIDES, ConfigError

__all__ = ["LENGTH_MODES", "LengthGuide", "LengthGuideArgs", "length_bonus", "guided_logits", "predict_length",
           "length_error_sums", "length_errors", "length_guide"]

LENGTH_MODES = ("tilt", "target", "budget")
_NEG = -1e30  # finite "minus infinity" for dropped tokens (a row of only dropped tokens stays finite)


@dataclasses.dataclass(frozen=True)
class LengthGuideArgs:
    """``decode.policy: lenvm`` with ``decode.method`` greedy | sample. ``value_init_from``: run directory of a
    trained LenVM (``jaxtok train configs/rl/lenvm.yaml``); ``mode``: tilt | target | budget; ``scale``: s (log-odds
    per token); ``target_length``: L* in tokens (target / budget); ``candidates``: K, the policy's top-K tokens
    scored per step."""

    value_init_from: Optional[str] = None
    mode: str = "tilt"
    scale: float = 1.0
    target_length: int = 0
    candidates: int = 8

    def __post_init__(self):
        if self.mode not in LENGTH_MODES:
            raise ConfigError(f"mode={self.mode!r}: allowed {list(LENGTH_MODES)}")
        if self.mode in ("target", "budget") and self.target_length < 1:
            raise ConfigError(f"mode={self.mode!r} needs target_length >= 1 (tokens), got {self.target_length!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ConfigError(f"candidates={self.candidates!r}: allowed a positive integer")
        if not np.isfinite(self.scale):
            raise ConfigError(f"scale={self.scale!r} must be finite")


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------


def length_bonus(remaining, step, mode: str, scale, target):
    """Per-candidate log-odds bonus ``[B, K]`` (module docstring). ``remaining [B, K]``: predicted tokens left after
    each candidate; ``step``: index of the token being chosen; ``scale``/``target``: scalars or ``[B]``."""
    n = jnp.asarray(remaining, jnp.float32)
    s = jnp.asarray(scale, jnp.float32).reshape(-1, 1) if jnp.ndim(scale) else jnp.asarray(scale, jnp.float32)
    L = jnp.asarray(target, jnp.float32).reshape(-1, 1) if jnp.ndim(target) else jnp.asarray(target, jnp.float32)
    total = jnp.asarray(step, jnp.float32) + 1.0 + n  # [B, K] predicted completion length
    if mode == "tilt":
        return -s * n
    if mode == "target":
        return -s * jnp.abs(total - L)
    if mode == "budget":
        return -s * jnp.maximum(total - L, 0.0)
    raise ValueError(f"mode={mode!r}: allowed {LENGTH_MODES}")


def guided_logits(logits, cand_ids, bonus):
    """``[B, V]``: ``logits + bonus`` on the candidates ``cand_ids [B, K]``, a large negative value elsewhere."""
    logits = jnp.asarray(logits, jnp.float32)
    picked = jnp.take_along_axis(logits, cand_ids, axis=-1) + bonus  # [B, K]
    out = jnp.full_like(logits, _NEG)
    return jax.vmap(lambda row, ids, vals: row.at[ids].set(vals))(out, cand_ids, picked)


def length_errors(lengths, target: int) -> dict:
    """Per-row errors ``[B]`` of a length-controlled decode against ``target``: ``length_abs_err`` |length − target|,
    ``exact_length`` [length == target], ``over_target`` [length > target]."""
    lengths = np.asarray(lengths)
    return {"length_abs_err": np.abs(lengths - target).astype(np.float64),
            "exact_length": (lengths == target).astype(np.int64), "over_target": (lengths > target).astype(np.int64)}


def length_error_sums(lengths, target: int) -> dict:
    """:func:`length_errors` summed over rows (divide by the row count for shares)."""
    return {k: (float if k == "length_abs_err" else int)(np.sum(v)) for k, v in length_errors(lengths, target).items()}


def predict_length(value_model: LengthValueModel, prompt, prompt_valid) -> jax.Array:
    """Prompt-boundary readout ``[B]`` float32: predicted completion length (tokens, EOS included) from the value at
    each row's last prompt token (column ``P - 1`` of a left-padded batch)."""
    n = value_model.remaining_length(jnp.asarray(prompt, jnp.int32), valid=jnp.asarray(prompt_valid, bool))
    return n[:, -1]


# ----------------------------------------------------------------------------------------------------------------
# The guide plugged into jaxtok.decode.generate
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static (hashable) half of a :class:`LengthGuide`: the value model's graph, the mode and K."""

    graphdef: nnx.GraphDef
    mode: str
    candidates: int
    vocab_size: int

    def init(self, arrays: dict, prompt, prompt_valid, max_new_tokens: int) -> dict:
        """Carry: the value model's cache holding the prompt minus its last token, which is ``pending`` (fed with
        the first candidates, so every step is one forward of the same shape)."""
        vm = nnx.merge(self.graphdef, arrays["model"])
        b, p = prompt.shape
        cache = KVCache.init(vm.cfg, b, p + max_new_tokens + self.candidates)
        if p > 1:
            cache = vm(prompt[:, :-1], valid=prompt_valid[:, :-1], cache=cache, return_logits=False).cache
        return {"cache": cache, "pending": prompt[:, -1]}

    def adjust(self, arrays: dict, carry: dict, logits, step, done):
        """Guided logits ``[B, V]`` for token ``step``; the carry's cache gains the pending token."""
        vm = nnx.merge(self.graphdef, arrays["model"])
        k = self.candidates
        b = logits.shape[0]
        cand = jax.lax.top_k(logits, k)[1].astype(jnp.int32)  # [B, K]
        pos = carry["cache"].next_positions()  # [B] position of the pending token
        tokens = jnp.concatenate([carry["pending"][:, None], cand], axis=1)  # [B, 1+K]
        positions = jnp.concatenate([pos[:, None], jnp.broadcast_to(pos[:, None] + 1, (b, k))], axis=1)
        valid = jnp.broadcast_to(~done[:, None], (b, 1 + k))
        out = vm(tokens, positions=positions, valid=valid, cache=carry["cache"], attention="siblings",
                 return_logits=False, return_hidden=True)
        n = value_to_length(vm.values_of_hidden(out.hidden[:, 1:]), vm.gamma)  # [B, K] tokens left after each
        bonus = length_bonus(n, step, self.mode, arrays["scale"], arrays["target"])
        cache = out.cache.rollback(out.cache.lengths - k)  # keep the pending token, drop the candidates
        return guided_logits(logits, cand, bonus), {"cache": cache, "pending": carry["pending"]}

    def advance(self, carry: dict, token) -> dict:
        """The sampled token becomes the pending one."""
        return {"cache": carry["cache"], "pending": token.astype(jnp.int32)}


@dataclasses.dataclass(frozen=True)
class LengthGuide:
    """A LenVM guide for :func:`jaxtok.decode.generate` (``guide=``): ``spec`` is static, ``arrays`` traced (the
    value model's state and per-row ``scale``/``target`` ``[B]``, so changing them does not recompile)."""

    spec: _Spec
    arrays: dict

    @classmethod
    def of(cls, value_model: LengthValueModel, *, mode: str = "tilt", scale=1.0, target=0,
           candidates: int = 8) -> "LengthGuide":
        if not isinstance(value_model, LengthValueModel):
            raise ValueError(f"length guidance needs a LengthValueModel (a LenVM run), got "
                             f"{type(value_model).__name__}")
        if mode not in LENGTH_MODES:
            raise ValueError(f"mode={mode!r}: allowed {LENGTH_MODES}")
        if mode in ("target", "budget") and np.any(np.asarray(target) < 1):
            raise ValueError(f"mode={mode!r} needs target lengths >= 1, got {target!r}")
        if candidates < 1 or candidates > value_model.cfg.vocab_size:
            raise ValueError(f"candidates={candidates!r}: allowed 1..{value_model.cfg.vocab_size}")
        graphdef, state = nnx.split(value_model)
        arrays = {"model": state, "scale": jnp.asarray(scale, jnp.float32), "target": jnp.asarray(target, jnp.float32)}
        return cls(_Spec(graphdef, mode, int(candidates), int(value_model.cfg.vocab_size)), arrays)

    def check(self, batch: int, vocab_size: int) -> None:
        """Per-row arrays must be scalars or ``[batch]``; the value model must share the policy's vocabulary."""
        if self.spec.vocab_size != vocab_size:
            raise ValueError(f"length guide: the value model's vocabulary ({self.spec.vocab_size}) differs from the "
                             f"policy's ({vocab_size}); train the LenVM from the policy's tokenizer")
        for name in ("scale", "target"):
            shape = self.arrays[name].shape
            if shape not in ((), (batch,)):
                raise ValueError(f"length guide {name}: shape {shape}, expected a scalar or [{batch}]")

    def for_batch(self, batch: int) -> dict:
        """``arrays`` with ``scale``/``target`` broadcast to ``[batch]``."""
        a = dict(self.arrays)
        a["scale"] = jnp.broadcast_to(a["scale"], (batch,))
        a["target"] = jnp.broadcast_to(a["target"], (batch,))
        return a


@LOGIT_GUIDES.register("lenvm", LengthGuideArgs)
def length_guide(args: LengthGuideArgs, *, mesh=None, **_) -> LengthGuide:
    """The guide of ``decode.policy: lenvm``: loads ``args.value_init_from`` (a LenVM run directory)."""
    from jaxtok.models.hf import load_any

    if not args.value_init_from:
        raise ConfigError("decode.policy=lenvm needs decode.policy_args.value_init_from=<LenVM run directory>")
    if not Path(args.value_init_from).exists():
        raise ConfigError(f"decode.policy_args.value_init_from={args.value_init_from!r}: no such run directory "
                          f"(train one: jaxtok train configs/rl/lenvm.yaml)")
    vm, _ = load_any(args.value_init_from, key="decode.policy_args.value_init_from", mesh=mesh)
    if not isinstance(vm, LengthValueModel):
        raise ConfigError(f"decode.policy_args.value_init_from={args.value_init_from!r} is not a LenVM run (its "
                          f"checkpoint holds a {type(vm).__name__}); train one with configs/rl/lenvm.yaml")
    return LengthGuide.of(vm, mode=args.mode, scale=args.scale, target=args.target_length,
                          candidates=args.candidates)
