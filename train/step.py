"""The one train step (DESIGN.md, principle 2) and its eval twin.

A loss function has the signature ``loss_fn(model, batch, rng) -> (loss_sum, count, aux)``: averaged losses travel
as (sum, count) so gradient accumulation and multi-device reduction weigh tokens, not batches. The step minimises
``Σ loss_sum / Σ count`` over all micro-batches (the gradient is ``grad(Σ loss_sum) / Σ count``); a selection with
no tokens gives loss 0 and zero gradient, never NaN.

``aux`` is a dict of scalars; each value is either a plain sum (reported as ``Σ value / Σ count``, i.e. token-
weighted like the loss) or a ``(sum, count)`` pair (reported as ``Σ sum / Σ count``). Because the batch is one
global array sharded over the mesh, every sum inside the jitted step is already a global sum: metrics come out
reduced over all devices and processes without an explicit ``psum``.

The model is used functionally: ``graphdef`` is static, the train state (params, optimizer state, step, RNG) is a
pytree with declared shardings, donated to the step.

What trains (:func:`trainable`): every ``nnx.Param``, or, when the model carries LoRA adapters
(:mod:`jaxtok.models.lora`), only the adapters' ``nnx.LoRAParam``: the base weights then sit in ``rest``, get no
gradient and have no optimizer state.

Mixed precision: with ``ModelConfig(dtype="bfloat16", param_dtype="float32")`` the parameters (master weights), their
gradients and the optimizer state are float32 while every matmul runs in bfloat16 (weights are cast at use, see
:mod:`jaxtok.models.transformer`); norms, attention softmax, logits and the loss stay float32. float16 compute is
refused (:func:`make_train_step`): it needs loss scaling, which jaxtok does not implement.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtok.mesh import DEFAULT_RULES, axis_rules, batch_sharding, param_shardings, place

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes: ``params`` (nnx.State of Params), ``rest`` (other variables, passed through),
    ``opt_state`` (optax state over ``params``), ``step`` ``[]`` int32, ``rng`` ``[2]`` uint32 raw key."""

    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def trainable(model: nnx.Module):
    """The filter of the trainable variables: ``nnx.LoRAParam`` when ``model`` has LoRA adapters (only they train),
    else ``nnx.Param``."""
    from jaxtok.models.lora import has_lora

    return nnx.LoRAParam if has_lora(model) else nnx.Param


def split_model(model: nnx.Module):
    """``(graphdef, params, rest)``: the trainable variables (:func:`trainable`) and everything else."""
    return nnx.split(model, trainable(model), ...)


def check_trainable_dtypes(model: nnx.Module) -> None:
    """Refuse float16 training (ValueError): float16 gradients underflow without loss scaling, which jaxtok does not
    implement; bfloat16 has float32's exponent range and needs none."""
    cfg = getattr(model, "cfg", None)
    f16 = [k for k in ("dtype", "param_dtype") if getattr(cfg, k, None) == "float16"]
    f16 += ["parameters"] * any(x.dtype == jnp.float16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if f16:
        raise ValueError(f"float16 training ({', '.join(dict.fromkeys(f16))}): float16 needs loss scaling, which "
                         f"jaxtok does not implement; use dtype='bfloat16' (with param_dtype='float32' for float32 "
                         f"master weights)")


def merge(graphdef, params, rest) -> nnx.Module:
    return nnx.merge(graphdef, params, rest)


def abstract_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes/dtypes (and Variable metadata) of the train state of ``model`` without allocating it."""
    _, params, rest = split_model(model)
    return jax.eval_shape(lambda p, r: _fresh_state(p, r, optimizer, 0), params, rest)


def _fresh_state(params, rest, optimizer, seed) -> TrainState:
    return TrainState(params=params, rest=rest, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(model_or_abstract, optimizer: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings of the train state: params and the param-shaped optimizer slots (Adam moments carry the params'
    Variable metadata) follow ``logical_axes``; counters, step and RNG are replicated."""
    abstract = model_or_abstract
    if isinstance(model_or_abstract, nnx.Module):
        abstract = abstract_state(model_or_abstract, optimizer)
    return param_shardings(abstract, mesh, rules)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *, seed: int = 0,
                     mesh: Optional[Mesh] = None, rules=DEFAULT_RULES) -> tuple[Any, TrainState]:
    """``(graphdef, state)`` for ``model``; with a mesh the state is placed on its declared shardings."""
    graphdef, params, rest = split_model(model)
    if mesh is None:
        return graphdef, _fresh_state(params, rest, optimizer, seed)
    shardings = state_shardings(model, optimizer, mesh, rules)
    params, rest = place((params, rest), (shardings.params, shardings.rest))
    init = jax.jit(lambda p, r: _fresh_state(p, r, optimizer, seed), out_shardings=shardings)
    return graphdef, init(params, rest)


def _split_micro(batch: dict, micro_batches: int, mesh: Optional[Mesh], rules) -> dict:
    """``[B, ...]`` -> ``[M, B/M, ...]`` taking rows ``m, m+M, m+2M, ...`` for micro-batch m, so every micro-batch
    spans all data shards (contiguous row blocks live on one device each)."""

    def one(x):
        B = x.shape[0]
        if B % micro_batches:
            raise ValueError(f"batch size {B} is not divisible by micro_batches={micro_batches}")
        y = jnp.swapaxes(x.reshape((B // micro_batches, micro_batches) + x.shape[1:]), 0, 1)
        if mesh is not None:
            spec = batch_sharding(mesh, rules).spec
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec(None, *spec)))
        return y

    return jax.tree.map(one, batch)


def aux_parts(aux: dict, count: jax.Array) -> dict:
    """Each aux value as a float32 ``(sum, count)`` pair (plain sums are weighted by the loss count)."""
    out = {}
    for k, v in aux.items():
        s, c = v if isinstance(v, (tuple, list)) else (v, count)
        out[k] = (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32))
    return out


def _sums(graphdef, loss_fn: LossFn, params, rest, batch, rng, frozen_graphdefs=None, frozen=None):
    """``grad`` target: Σ loss over one (micro-)batch, with ``(count, aux)`` as auxiliary output. Frozen models
    (teacher, reference) are merged from their own states and passed by name; no gradient reaches them."""
    models = {k: nnx.merge(frozen_graphdefs[k], frozen[k]) for k in (frozen or {})}
    loss_sum, count, aux = loss_fn(merge(graphdef, params, rest), batch, rng, **models)
    return jnp.asarray(loss_sum, jnp.float32), (jnp.asarray(count, jnp.float32), aux_parts(aux, count))


def _inverse_count(c):
    """``1 / c`` for ``c > 0``, else 0: the one normaliser of the step, applied to the summed loss (reported) and to
    the summed gradient (applied), so both are ``Σ sum / Σ count`` for any positive count, fractional ones included
    (soft weights; a ``(loss, 1)`` objective averaged over micro-batches)."""
    return jnp.where(c > 0, 1.0 / jnp.where(c > 0, c, 1.0), 0.0)


def _ratio(s, c):
    """``s / c`` for ``c > 0``, else 0 (the reported side of :func:`_inverse_count`)."""
    return jnp.where(c > 0, s / jnp.where(c > 0, c, 1.0), 0.0)


def make_train_step(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    mesh: Optional[Mesh] = None,
    rules=DEFAULT_RULES,
    micro_batches: int = 1,
    donate: bool = True,
    frozen: Optional[dict[str, nnx.Module]] = None,
    batch_step: bool = False,
) -> Callable[..., tuple[TrainState, dict]]:
    """A jitted ``step(state, batch) -> (state, metrics)``, or ``step(state, batch, frozen_states)`` when
    ``frozen`` names models the loss needs besides the policy (``{"teacher": model}``): the loss is then called as
    ``loss_fn(model, batch, rng, teacher=...)`` and ``frozen_states`` is :func:`frozen_states` of them — passed as
    an argument (sharded like parameters, not donated) rather than closed over, so their weights are never baked
    into the compiled program as constants.

    Gradient accumulation: the batch ``[B, ...]`` is split into ``micro_batches`` and scanned; loss sums, counts
    and gradient sums are accumulated and divided once by the total count, so uneven token counts are weighed
    exactly as in one full-batch step. Gradient clipping is part of ``optimizer`` (``optax.clip_by_global_norm``,
    see :func:`jaxtok.config.build_optimizer`). Metrics: ``loss``, ``count`` (tokens), ``grad_norm`` (before
    clipping), ``step`` and every aux entry, all global. ``state`` is donated; with a mesh, in/out shardings are
    the declared ones and the batch is sharded on its leading axis.

    ``batch_step``: the loss sees ``batch["step"] [B]`` int32, the optimizer step ``k`` being taken (0 for the
    first; ``state.step`` before the update), filled in inside the step so schedules read by the objective (TRACE's
    λ_k, ``ObjectiveSpec.batch_step``) follow the train state, resumes included, without a host round trip.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches}: must be >= 1")
    check_trainable_dtypes(model)
    graphdef = nnx.graphdef(model)
    frozen_graphdefs = {k: nnx.graphdef(m) for k, m in (frozen or {}).items()}

    def step(state: TrainState, batch: dict, frozen_state=None):
        value_and_grad = jax.value_and_grad(
            lambda p, r, b, k: _sums(graphdef, loss_fn, p, r, b, k, frozen_graphdefs, frozen_state), has_aux=True)
        with axis_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
            rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
            if batch_step:
                rows = jax.tree.leaves(batch)[0].shape[0]
                batch = {**batch, "step": jnp.full((rows,), state.step, jnp.int32)}  # [B]
            if micro_batches == 1:
                (loss_sum, (count, aux)), grads = value_and_grad(state.params, state.rest, batch, step_rng)
            else:
                micro = _split_micro(batch, micro_batches, mesh, rules)

                def body(carry, xs):
                    m, mb = xs
                    (ls, (c, a)), g = value_and_grad(state.params, state.rest, mb, jax.random.fold_in(step_rng, m))
                    return jax.tree.map(jnp.add, carry, (ls, c, a, g)), None

                zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                    lambda: value_and_grad(state.params, state.rest, jax.tree.map(lambda x: x[0], micro), step_rng)))
                (ls0, (c0, a0)), g0 = zeros
                (loss_sum, count, aux, grads), _ = jax.lax.scan(
                    body, (ls0, c0, a0, g0), (jnp.arange(micro_batches), micro))
            scale = _inverse_count(count)  # the loss reported below is loss_sum · scale too
            grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            new_state = TrainState(params=params, rest=state.rest, opt_state=opt_state, step=state.step + 1,
                                   rng=jax.random.key_data(rng))
            metrics = {"loss": _ratio(loss_sum, count), "count": count, "grad_norm": optax.tree.norm(grads),
                       "step": new_state.step}
            metrics.update({k: _ratio(s, c) for k, (s, c) in aux.items()})
            return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    shardings = state_shardings(model, optimizer, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    in_shardings = (shardings, batch_sharding(mesh, rules))
    if frozen:
        in_shardings += (param_shardings(frozen_states(frozen), mesh, rules),)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, replicated),
                   donate_argnums=donate_argnums)


def frozen_states(frozen: dict[str, nnx.Module]) -> dict:
    """``{name: nnx.State}`` of frozen models, the third argument of a step built with ``frozen``."""
    return {k: nnx.state(m) for k, m in frozen.items()}


def make_eval_step(
    model: nnx.Module,
    metrics_fn: Callable[[nnx.Module, dict], dict],
    *,
    mesh: Optional[Mesh] = None,
    rules=DEFAULT_RULES,
) -> Callable[[Any, Any, dict], dict]:
    """A jitted ``eval_step(params, rest, batch) -> {name: (sum, count)}`` of global float32 sums.

    ``metrics_fn(model, batch)`` returns ``{name: (sum, count)}``; callers add the pairs over batches and divide
    once (:func:`finalize_metrics`), so the eval mean is token-weighted over the whole eval set.
    """
    graphdef = nnx.graphdef(model)

    def step(params, rest, batch):
        with axis_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
            out = metrics_fn(merge(graphdef, params, rest), batch)
        return {k: (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32)) for k, (s, c) in out.items()}

    if mesh is None:
        return jax.jit(step)
    _, params, rest = split_model(model)
    p_sh, r_sh = param_shardings(params, mesh, rules), param_shardings(rest, mesh, rules)
    return jax.jit(step, in_shardings=(p_sh, r_sh, batch_sharding(mesh, rules)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


def finalize_metrics(pairs: list[dict]) -> dict:
    """Add ``{name: (sum, count)}`` dicts from several eval batches and return ``{name: Σsum / Σcount}``."""
    totals: dict = {}
    for p in pairs:
        for k, (s, c) in p.items():
            ts, tc = totals.get(k, (0.0, 0.0))
            totals[k] = (ts + float(s), tc + float(c))
    return {k: (s / c if c > 0 else 0.0) for k, (s, c) in totals.items()}
