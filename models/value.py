"""Length Value Model (LenVM, train_methods.md §11): a decoder with a value head whose output is the discounted
return of a constant per-token reward ``r = −(1 − γ)`` until EOS, ``V_t = −(1 − γ^{n_t}) ∈ (−1, 0]`` with
``n_t`` the tokens left after position t (the EOS position has ``n = 0``). The value is monotone in ``n`` and
inverts to ``n = ln(1 + V) / ln γ`` (:func:`value_to_length`), the readout decoders use for length control
(:mod:`jaxtok.decode.length_control`).

The model lives here (not with its objective in ``train/objectives/lenvm.py``) so decoders can load and query it;
its checkpoint meta (:meth:`LengthValueModel.checkpoint_meta`) lets :func:`jaxtok.models.hf.load_checkpoint_with_meta`
rebuild it from a run directory without the training package.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtok.models.heads import ValueHead
from jaxtok.models.transformer import Decoder, ModelConfig

__all__ = ["LengthValueModel", "MODULE_META", "build_module", "length_to_value", "value_to_length"]

_F32 = jnp.float32
MODULE_META = "module"  # checkpoint meta: the module class the parameters belong to (absent: a plain Decoder)
MODULE_ARGS_META = "module_args"  # checkpoint meta: that class's constructor options


def length_to_value(n, gamma: float):
    """``V = −(1 − γ^n) = expm1(n ln γ)`` (float32)."""
    return jnp.expm1(jnp.asarray(n, _F32) * math.log(gamma))


def value_to_length(value, gamma: float):
    """Remaining tokens ``n = ln(1 + V) / ln γ`` for ``V ∈ (−1, 0]`` (clamped to ``[−1 + 1e-7, 0]``; ``n ≥ 0``)."""
    v = jnp.clip(jnp.asarray(value, _F32), -1.0 + 1e-7, 0.0)
    return jnp.log1p(v) / math.log(gamma)


class LengthValueModel(Decoder):
    """A :class:`Decoder` with a value head (``value_head``: hidden ``[B, T, D]`` -> raw ``[B, T]``) and the discount
    ``gamma`` its values are expressed in. It is still a decoder (sampling, scoring and KV caches work as before)."""

    def __init__(self, cfg: ModelConfig, *, gamma: float = 0.997, value_hidden: Optional[int] = None,
                 rngs: nnx.Rngs):
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma={gamma!r} must be in (0, 1)")
        super().__init__(cfg, rngs=rngs)
        self.gamma = float(gamma)
        self.value_hidden = value_hidden
        self.value_head = ValueHead(cfg.hidden_size, value_hidden, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)

    @classmethod
    def from_decoder(cls, decoder: Decoder, *, rngs: nnx.Rngs, gamma: float = 0.997,
                     value_hidden: Optional[int] = None) -> "LengthValueModel":
        """A LengthValueModel whose backbone is a copy of ``decoder``'s weights and whose head is fresh."""
        model = cls(decoder.cfg, gamma=gamma, value_hidden=value_hidden, rngs=rngs)
        nnx.update(model, nnx.state(decoder))
        return model

    def checkpoint_meta(self) -> dict:
        """Meta that :func:`build_module` turns back into this module's (abstract) structure."""
        return {MODULE_META: "LengthValueModel",
                MODULE_ARGS_META: {"gamma": self.gamma, "value_hidden": self.value_hidden}}

    def raw_values(self, tokens, *, positions=None, valid=None) -> jax.Array:
        """Raw head outputs ``[B, T]`` float32 (``pred = −sigmoid(raw)``)."""
        out = self(tokens, positions=positions, valid=valid, return_logits=False, return_hidden=True)
        return self.value_head(out.hidden)

    def values_of_hidden(self, hidden) -> jax.Array:
        """Predicted ``V = −sigmoid(head(h)) ∈ (−1, 0)`` for hidden states ``[..., D]`` -> ``[...]`` float32 (for
        callers that ran the backbone themselves, e.g. through a KV cache)."""
        return -jax.nn.sigmoid(self.value_head(hidden))

    def values(self, tokens, *, positions=None, valid=None) -> jax.Array:
        """Predicted ``V_t = −sigmoid(raw) ∈ (−1, 0)`` ``[B, T]``."""
        return -jax.nn.sigmoid(self.raw_values(tokens, positions=positions, valid=valid))

    def remaining_length(self, tokens, *, positions=None, valid=None) -> jax.Array:
        """Readout: predicted tokens left until EOS after each position ``[B, T]`` float32 (0 at an EOS)."""
        return value_to_length(self.values(tokens, positions=positions, valid=valid), self.gamma)


_MODULES = {"LengthValueModel": LengthValueModel}


def build_module(cfg: ModelConfig, meta: dict) -> nnx.Module:
    """The module a checkpoint's parameters belong to: meta ``module`` names a class of this file (with
    ``module_args``); without it, a plain :class:`Decoder`."""
    name = meta.get(MODULE_META)
    if name is None:
        return Decoder(cfg, rngs=nnx.Rngs(0))
    if name not in _MODULES:
        raise ValueError(f"checkpoint meta module={name!r}: known modules {sorted(_MODULES)}")
    return _MODULES[name](cfg, **dict(meta.get(MODULE_ARGS_META) or {}), rngs=nnx.Rngs(0))
