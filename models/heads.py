"""Small heads on top of (or beside) the decoder: a value head and the learned decoding controllers.

Modules and their files; their training lives with the methods that use them (``train/objectives/lenvm.py``, the
PPO critic, ``train/objectives/draft_heads.py`` and ``train/objectives/commit_heads.py`` for the decoding
controllers, run by ``jaxtok train configs/heads/<kind>.yaml``). A trained decoding controller is saved as
``head.npz`` + ``head.json`` (:func:`save_head`) in its run directory, which ``decode.policy_args.head_path`` names
(:func:`load_head`).

- :class:`ValueHead` — LenVM value model (train_methods.md §11) and PPO critic: hidden ``[B, T, D]`` -> ``[B, T]``.
- :class:`MLPHead` — SpecDec++ acceptance head (decode_methods.md §A2: residual SiLU blocks on the drafter's
  last hidden state -> 2 logits, class 1 = accept) and the SpecKV γ-predictor (§A3: step features -> logits over
  the γ candidates {2, 4, 6, 8}).
- :class:`FilterHead` — Learn2PD unmask filter (§B16): the block's per-position features (confidence) -> one
  keep/re-mask logit per block position.
- :class:`TraceController` — TraceLock commitment controller (§B17): a 1–2 layer transformer encoder over the
  trace-state sequence (features + state id) with a padding mask -> per-position commit logits and a
  sequence-level threshold logit.

All heads compute in float32 (they are tiny). Parameters carry ``logical_axes`` metadata as in
:mod:`jaxtok.models.transformer`: a dimension read from the decoder's hidden state is ``"embed"`` (so it follows the
decoder's sharding); the heads' own internal widths are ``None`` (replicated; they are too small to shard).
Padding positions of per-position outputs are set to :data:`PAD_LOGIT` (sigmoid = 0: never kept / committed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.models.transformer import check_token_ids, dense

PAD_LOGIT = -1e9  # finite: BCE-with-logits stays finite where a loss weight of 0 masks it
_ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}
_MASKED = -1e30


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation={name!r}: allowed {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return value


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` in float32; kernel ``[in, out]`` (normal, std ``in^-0.5``), bias ``[out]`` (zeros)."""

    def __init__(self, in_features: int, out_features: int, *, axes: Sequence[Optional[str]] = (None, None),
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kernel = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * in_features**-0.5
        self.kernel = nnx.Param(kernel.astype(param_dtype), logical_axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return dense(x, self.kernel[...].astype(jnp.float32)) + self.bias[...].astype(jnp.float32)


class MLPHead(nnx.Module):
    """A small MLP ``[..., in_features] -> [..., out_features]`` float32 logits.

    ``depth`` hidden layers, then a linear output layer (``depth=0`` is a linear/logistic head).

    - ``residual=False``: ``Linear(in->hidden), act, ..., Linear(hidden->out)``. SpecKV γ-predictor (§A3): 6 step
      features -> ``hidden=16`` ReLU -> one logit per γ candidate (e.g. ``out_features=4`` for {2, 4, 6, 8}).
    - ``residual=True``: SpecDec++ acceptance head (§A2): ``depth`` blocks ``x + act(Linear_{D->D}(x))`` (width
      ``in_features``; each block has its own weights, unlike the reference's shared ``[ResBlock]*n``), then
      ``Linear(D->out)``; with ``out_features=2`` and ``activation="silu"``, ``softmax(.)[..., 1]`` = P(accept).

    ``in_axis`` is the logical axis of the input features (``"embed"`` when they are the decoder's hidden state).
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int = 1, *,
                 activation: str = "silu", residual: bool = False, in_axis: Optional[str] = None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        _positive("in_features", in_features)
        _positive("out_features", out_features)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth={depth!r}: must be a non-negative integer")
        if depth and not residual:
            _positive("hidden", hidden)
        if residual and hidden not in (None, in_features):
            raise ValueError(f"residual=True keeps the width in_features={in_features}; got hidden={hidden!r} "
                             f"(pass hidden=None or hidden=in_features)")
        self.act = _activation(activation)
        self.residual = residual
        width = in_features if residual else hidden
        layers = []
        prev, prev_axis = in_features, in_axis
        for _ in range(depth):
            layers.append(Dense(prev, width, axes=(prev_axis, in_axis if residual else None),
                                param_dtype=param_dtype, rngs=rngs))
            prev, prev_axis = width, (in_axis if residual else None)
        self.layers = nnx.List(layers)
        self.out = Dense(prev, out_features, axes=(prev_axis, None), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., in_features]`` -> logits ``[..., out_features]`` float32."""
        h = x.astype(jnp.float32)
        for layer in self.layers:
            h = h + self.act(layer(h)) if self.residual else self.act(layer(h))
        return self.out(h)


class ValueHead(nnx.Module):
    """Scalar value per position: hidden ``[B, T, D]`` -> ``[B, T]`` float32 (raw, unsquashed).

    LenVM (train_methods.md §11) uses a linear head (``hidden=None``) and maps the raw output to
    ``pred = -sigmoid(raw)`` in its objective; a PPO critic uses the raw value. ``hidden`` adds one SiLU layer.
    """

    def __init__(self, in_features: int, hidden: Optional[int] = None, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        _positive("in_features", in_features)
        depth = 0 if hidden is None else 1
        self.mlp = MLPHead(in_features, hidden, 1, depth, activation="silu", in_axis="embed",
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """``hidden [B, T, D]`` -> values ``[B, T]`` float32."""
        return self.mlp(hidden)[..., 0]


class FilterHead(nnx.Module):
    """Learn2PD unmask filter (decode_methods.md §B16): block features ``[B, L, F]`` -> keep logits ``[B, L]``.

    The reference filter sees the whole block at once: its input is the confidence vector of the block (``F=1``,
    all ``L = block_size`` positions, decoded ones included) and it outputs one logit per block position; decode
    keeps position j if ``sigmoid(logit_j) > 0.9``. The block's features are flattened to ``[B, L*F]`` and fed to an
    MLP with ``depth`` ReLU layers. ``valid [B, L]`` (False = padding, e.g. a block past the sequence end): padding
    features are zeroed before the MLP, so whatever they hold never changes the outputs, and padding outputs are
    :data:`PAD_LOGIT`.
    """

    def __init__(self, block_size: int, hidden: int = 64, num_features: int = 1, depth: int = 1, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.block_size = _positive("block_size", block_size)
        self.num_features = _positive("num_features", num_features)
        self.mlp = MLPHead(block_size * num_features, hidden, block_size, depth, activation="relu",
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
        """``features [B, L, F]`` (or ``[B, L]`` when F=1), ``valid [B, L]`` bool -> logits ``[B, L]`` float32."""
        if features.ndim == 2:
            features = features[..., None]
        B, L, F = features.shape
        if (L, F) != (self.block_size, self.num_features):
            raise ValueError(f"features: shape {features.shape} does not match block_size={self.block_size}, "
                             f"num_features={self.num_features} (expected [B, {self.block_size}, {self.num_features}])")
        valid = jnp.ones((B, L), bool) if valid is None else valid.astype(bool)
        x = jnp.where(valid[..., None], features.astype(jnp.float32), 0.0).reshape(B, L * F)  # [B, L*F]
        return jnp.where(valid, self.mlp(x), PAD_LOGIT)  # [B, L]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ControllerOutput:
    """``logits [B, T]`` per-position commit logits (:data:`PAD_LOGIT` at padding), ``threshold_logit [B]``."""

    logits: jax.Array
    threshold_logit: jax.Array

    @property
    def commit_logits(self) -> jax.Array:
        """``[B, T]`` TraceLock's dynamic-threshold logit: ``prob_i = sigmoid(logit_i - threshold_logit)``."""
        return jnp.where(self.logits <= PAD_LOGIT, PAD_LOGIT, self.logits - self.threshold_logit[:, None])


def _layer_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _sinusoid(positions: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal position encoding (Vaswani et al. 2017): ``positions [B, T]`` -> ``[B, T, dim]``."""
    half = dim // 2
    inv = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / max(half, 1)))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, half]
    enc = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
    return jnp.pad(enc, ((0, 0), (0, 0), (0, dim - 2 * half)))


class EncoderLayer(nnx.Module):
    """Pre-norm bidirectional transformer encoder layer (multi-head attention + GELU FFN) with a key padding mask."""

    def __init__(self, d_model: int, num_heads: int, ffn: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm1 = nnx.Param(jnp.ones((d_model,), param_dtype), logical_axes=(None,))
        self.norm2 = nnx.Param(jnp.ones((d_model,), param_dtype), logical_axes=(None,))
        self.qkv = Dense(d_model, 3 * d_model, param_dtype=param_dtype, rngs=rngs)
        self.o = Dense(d_model, d_model, param_dtype=param_dtype, rngs=rngs)
        self.ff1 = Dense(d_model, ffn, param_dtype=param_dtype, rngs=rngs)
        self.ff2 = Dense(ffn, d_model, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """``x [B, T, d]``, ``valid [B, T]`` -> ``[B, T, d]``; padding keys are never attended."""
        B, T, d = x.shape
        H = self.num_heads
        q, k, v = jnp.split(self.qkv(_layer_norm(x, self.norm1[...])), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, d // H) for a in (q, k, v))
        scores = jnp.einsum("bthn,bshn->bhts", q, k) * (d // H) ** -0.5
        scores = jnp.where(valid[:, None, None, :], scores, _MASKED)
        ctx = jnp.einsum("bhts,bshn->bthn", jax.nn.softmax(scores, axis=-1), v).reshape(B, T, d)
        x = x + self.o(ctx)
        return x + self.ff2(jax.nn.gelu(self.ff1(_layer_norm(x, self.norm2[...]))))


class TraceController(nnx.Module):
    """TraceLock commitment controller (decode_methods.md §B17).

    Input: the trace state of each position — ``features [B, T, F]`` (e.g. projected hidden states of the
    backbone, position-aligned with its logits, plus optional confidence) and ``state_ids [B, T]`` in
    ``[0, num_states)`` (PROMPT=0, LOCKED=1, GEN=2, EOT=3) — and ``valid [B, T]`` (False = padding / outside the
    active window). ``x = Linear(features) + state_embedding + sinusoid(position)`` with position
    ``cumsum(valid) - 1`` (so left and right padding are equivalent), then ``num_layers`` encoder layers attending
    only to valid keys, a final LayerNorm, and two outputs: per-position ``logits [B, T]`` and a sequence-level
    ``threshold_logit [B]`` (from the mean of valid positions). Commit probability
    ``sigmoid(logit_i - threshold_logit)`` (:attr:`ControllerOutput.commit_logits`). The reference uses 5 layers of
    width 384 and dropout 0.1; this module is the small, dropout-free version.
    """

    STATES = ("PROMPT", "LOCKED", "GEN", "EOT")

    def __init__(self, in_features: int, d_model: int = 64, num_heads: int = 4, num_layers: int = 2,
                 ffn: Optional[int] = None, num_states: int = 4, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _positive("in_features", in_features)
        _positive("d_model", d_model)
        _positive("num_heads", num_heads)
        _positive("num_layers", num_layers)
        self.num_states = _positive("num_states", num_states)
        self.d_model = d_model
        self.in_features = in_features
        self.proj = Dense(in_features, d_model, param_dtype=param_dtype, rngs=rngs)
        emb = jax.random.normal(rngs.params(), (num_states, d_model), jnp.float32) * 0.02
        self.state_embed = nnx.Param(emb.astype(param_dtype), logical_axes=(None, None))
        self.layers = nnx.List([EncoderLayer(d_model, num_heads, ffn or 2 * d_model, param_dtype=param_dtype,
                                             rngs=rngs) for _ in range(num_layers)])
        self.final_norm = nnx.Param(jnp.ones((d_model,), param_dtype), logical_axes=(None,))
        self.logit = Dense(d_model, 1, param_dtype=param_dtype, rngs=rngs)
        self.threshold = Dense(d_model, 1, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array, state_ids: jax.Array, valid: Optional[jax.Array] = None
                 ) -> ControllerOutput:
        """``features [B, T, F]``, ``state_ids [B, T]`` int, ``valid [B, T]`` bool -> :class:`ControllerOutput`."""
        B, T = state_ids.shape
        if features.shape != (B, T, self.in_features):
            raise ValueError(f"features: shape {features.shape}, expected [B, T, in_features] = "
                             f"{(B, T, self.in_features)} to match state_ids {state_ids.shape}")
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
        state_ids = jnp.where(valid, state_ids, 0)  # padding ids are never read
        check_token_ids(state_ids, self.num_states, name="state_ids")
        positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)  # [B, T]
        feats = jnp.where(valid[..., None], features.astype(jnp.float32), 0.0)  # garbage in padding stays out
        x = self.proj(feats) + jnp.take(self.state_embed[...].astype(jnp.float32), state_ids, axis=0)
        x = x + _sinusoid(positions, self.d_model)  # [B, T, d]
        for layer in self.layers:
            x = layer(x, valid)
        x = _layer_norm(x, self.final_norm[...])
        logits = jnp.where(valid, self.logit(x)[..., 0], PAD_LOGIT)  # [B, T]
        count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
        pooled = jnp.sum(jnp.where(valid[..., None], x, 0.0), axis=1) / count  # [B, d]
        return ControllerOutput(logits=logits, threshold_logit=self.threshold(pooled)[..., 0])


# ----------------------------------------------------------------------------------------------------------------
# Head files: what ``decode.policy_args.head_path`` loads
# ----------------------------------------------------------------------------------------------------------------

HEAD_FILE = "head.npz"  # parameters by tree path
HEAD_META = "head.json"  # {"kind": ..., **constructor arguments}


def specdecpp_head(hidden_size: int, depth: int = 3, seed: int = 0) -> MLPHead:
    """A new SpecDec++ acceptance head (§A2): ``depth`` residual SiLU blocks of width D (the drafter's hidden
    size), then D -> 2 (class 1 = accept)."""
    return MLPHead(hidden_size, None, 2, depth, activation="silu", residual=True, in_axis="embed",
                   rngs=nnx.Rngs(seed))


def speckv_head(hidden: int = 16, seed: int = 0, in_features: int = 6) -> MLPHead:
    """A new SpecKV predictor (§A3): the 6 round features -> ``hidden`` ReLU -> 1 (acceptance rate, clipped by the
    caller)."""
    return MLPHead(in_features, hidden, 1, 1, activation="relu", rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class HeadKind:
    """A kind of saved head: ``build(**ctor, seed=)`` makes a fresh one, ``policy`` is the decode policy it serves
    and ``slot`` its name in that policy's heads (``heads={"filter": ...}`` of the diffusion sampler)."""

    build: Callable[..., nnx.Module]
    policy: str
    slot: str


HEAD_KINDS = {
    "specdecpp": HeadKind(specdecpp_head, "specdecpp", "head"),
    "speckv": HeadKind(speckv_head, "speckv", "head"),
    "learn2pd_filter": HeadKind(lambda seed=0, **ctor: FilterHead(**ctor, rngs=nnx.Rngs(seed)), "learn2pd",
                                "filter"),
    "tracelock_controller": HeadKind(lambda seed=0, **ctor: TraceController(**ctor, rngs=nnx.Rngs(seed)),
                                     "tracelock", "controller"),
}


def build_head(kind: str, seed: int = 0, **ctor) -> nnx.Module:
    """A fresh head of ``kind`` (:data:`HEAD_KINDS`) from its constructor arguments."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind={kind!r}: allowed {sorted(HEAD_KINDS)}")
    return HEAD_KINDS[kind].build(seed=seed, **ctor)


def save_head(head: nnx.Module, path: str | Path, kind: str, **ctor) -> None:
    """``path/head.npz`` (the head's parameters by tree path) and ``path/head.json`` (``kind`` and the constructor
    arguments :func:`build_head` takes); ``jaxtok decode ... head_path=path`` loads them (:func:`load_head`)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind={kind!r}: allowed {sorted(HEAD_KINDS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(head, nnx.Param))[0]
    np.savez(path / HEAD_FILE, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    (path / HEAD_META).write_text(json.dumps({"kind": kind, **ctor}))


def head_kind(path: str | Path) -> str:
    """The kind named by ``path/head.json`` (FileNotFoundError naming ``head_path`` when there is none)."""
    meta = Path(path) / HEAD_META
    if not meta.is_file():
        raise FileNotFoundError(f"head_path={str(path)!r}: no {HEAD_META} (train a head with `jaxtok train "
                                f"configs/heads/<kind>.yaml`; its run directory is the head_path)")
    return json.loads(meta.read_text())["kind"]


def load_head(path: str | Path, kinds: Optional[Sequence[str]] = None) -> nnx.Module:
    """Rebuild the head saved at ``path`` (a ``jaxtok train configs/heads/...`` run directory or any directory
    :func:`save_head` wrote); ``kinds``: the kinds the caller accepts (ValueError naming the file otherwise)."""
    path = Path(path)
    kind = head_kind(path)
    meta = json.loads((path / HEAD_META).read_text())
    meta.pop("kind")
    allowed = sorted(HEAD_KINDS) if kinds is None else list(kinds)
    if kind not in allowed:
        raise ValueError(f"{path / HEAD_META}: kind={kind!r}, allowed {allowed}")
    head = build_head(kind, **meta)
    arrays = np.load(path / HEAD_FILE)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(head, nnx.Param))
    missing = [jax.tree_util.keystr(k) for k, _ in leaves if jax.tree_util.keystr(k) not in arrays]
    if missing:
        raise ValueError(f"{path / HEAD_FILE} lacks parameters {missing[:4]} for {kind} {meta}")
    bad = [f"{jax.tree_util.keystr(k)} {arrays[jax.tree_util.keystr(k)].shape} != {v.shape}" for k, v in leaves
           if arrays[jax.tree_util.keystr(k)].shape != v.shape]
    if bad:
        raise ValueError(f"{path / HEAD_FILE}: parameter shape {bad[0]} for {kind} {meta}")
    nnx.update(head, jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[jax.tree_util.keystr(k)])
                                                            for k, _ in leaves]))
    return head


def load_policy_heads(path: str | Path) -> dict[str, nnx.Module]:
    """``{slot: head}`` for a diffusion commit policy's ``heads`` from a saved head (``filter`` for Learn2PD,
    ``controller`` for TraceLock)."""
    return {HEAD_KINDS[head_kind(path)].slot: load_head(path)}
