"""Sparse Mixture-of-Experts feed-forward (Qwen3-MoE / Mixtral), its token dispatch and the router's auxiliary
load-balancing loss.

Router: ``logits = x · W_r [D, E]`` (float32), ``p = softmax(logits)`` over all E experts, the top-k experts by
``p``. Combine weights: Qwen3-MoE uses the top-k probabilities as they are, or renormalised to sum to 1 when
``norm_topk_prob`` (Qwen3-30B-A3B sets it); Mixtral always renormalises, which equals a softmax over the top-k
logits (HF ``MixtralTopKRouter``; a Mixtral :class:`~jaxtok.models.ModelConfig` has ``norm_topk_prob=True``).
Each expert is a SwiGLU MLP ``down(silu(gate(x)) * up(x))`` of width ``moe_intermediate_size``; the output is
``Σ_k w_k · expert_{i_k}(x)``. Qwen2-MoE adds a shared expert every token goes through, a SwiGLU MLP of width
``shared_expert_intermediate_size`` scaled by ``sigmoid(x · g)`` (HF ``shared_expert``/``shared_expert_gate``);
Qwen3-MoE and Mixtral have none.

Expert weights are stacked, ``gate/up [E, D, F]`` and ``down [E, F, D]``, with the logical axis ``expert`` first
(``jaxtok.mesh`` maps it to the ``expert`` mesh axis, so experts are split across it).

Dispatch is **dropless** (no capacity factor, no token is ever dropped, so a token's output never depends on the
other tokens of the batch and cached decoding equals the full forward), in one of two ways chosen by
``ModelConfig.moe_dispatch`` (:data:`MOE_DISPATCHES`, :func:`resolve_dispatch`):

* ``ragged_dot`` (:func:`grouped_swiglu`): the ``N·k`` (token, expert) assignments are sorted by expert (static
  shape ``[N·k]``) and each expert's contiguous group of rows is multiplied by its own weights with one grouped
  matmul, ``jax.lax.ragged_dot(rows [N·k, D], W [E, D, F], group_sizes [E])``. FLOPs are ``k/E`` of running every
  expert on every token on GPU/TPU, where ``ragged_dot`` lowers to a grouped GEMM. On CPU JAX has no such lowering:
  its generic rule masks the rows into ``[E, N·k, D]`` and multiplies every row by every expert (E/k x the work;
  the time does not depend on how many experts are activated). Under a mesh with an ``expert`` axis GSPMD
  partitions ``ragged_dot`` over its group (expert) dimension: the expert weights are never gathered, each device
  runs its own experts, the sorted token rows are all-gathered and the expert outputs all-reduced (read off the
  compiled HLO of a data 2 x expert 2 x tensor 2 forward). There is no hand-written all-to-all dispatch (a
  ``shard_map`` with ``ragged_all_to_all`` would move only the routed rows at pod scale).
* ``tiled`` (:func:`tiled_swiglu`): the sorted assignments are gathered into expert-aligned tiles of a static
  height (expert e's ``s_e`` rows fill ``ceil(s_e / tile)`` tiles of its own, at most ``(N·k − M) // tile + M``
  tiles with ``M = min(E, N·k)``), and a ``lax.scan`` over the tiles runs one expert's SwiGLU per tile inside
  ``lax.cond``: unused tiles cost a branch, work and weight reads are proportional to the routed rows and the
  activated experts. The backward is a custom VJP of the same shape (per-tile weight gradients added into their
  expert's slice). Same float32-accumulated products as ``ragged_dot``, so logits and gradients agree to float
  rounding. On an expert-sharded mesh it is still exact (GSPMD gathers the indexed expert's weights per tile), but
  it loses expert parallelism, so ``auto`` does not pick it there.
* ``auto`` (default): ``ragged_dot`` on GPU/TPU and inside :func:`jaxtok.mesh.axis_rules` with an ``expert`` axis
  > 1, ``tiled`` otherwise (CPU). Set it per model with ``model.overrides: {moe_dispatch: tiled}`` (presets) or
  :func:`jaxtok.models.transformer.with_execution`.

Mixtral's ``router_jitter_noise`` (training-only multiplicative noise on the router input) is not implemented: the
forward takes no RNG and has no train/eval mode, so HF checkpoints with a non-zero value are refused at load.

Load-balancing loss (Switch Transformer eq. 4-6, HF ``load_balancing_loss_func``): with ``f_e`` the fraction of
(token, top-k slot) assignments sent to expert e and ``P_e`` the mean router probability of e, both averaged over
the valid tokens of every MoE layer of one forward, ``aux = E · Σ_e f_e · P_e`` (k when perfectly balanced, as in
HF). HF adds ``router_aux_loss_coef · aux`` to the LM loss; here the coefficient is
``ModelConfig.router_aux_loss_coef`` (same key as HF's config.json; 0.001 for Qwen3-MoE, 0.02 for Mixtral) and an
objective adds it with :func:`with_router_aux_loss`, which wraps any ``loss_fn(model, batch, rng)`` (the train
loop's ``build_objective`` wraps every objective; dense models pass through unchanged). Layers report
their router statistics to a :func:`collect_router_stats` context (like :func:`jaxtok.mesh.constrain`'s rules: a
Python side channel read inside the same trace, nothing stored on the model), so the forward stays a pure function
and jit/closures behave as for dense models.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterator, Optional

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from jaxtok.mesh import constrain
from jaxtok.models.layers import _param, dense


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------


def route(logits: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``logits [N, E]`` -> ``(probs [N, E] float32, weights [N, k] float32, experts [N, k] int32)``: softmax over
    all experts, top-k by probability (descending), renormalised over the k when ``norm_topk_prob``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def _swiglu_f32(a: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """One expert's SwiGLU ``down(silu(a·gate) * (a·up))`` on rows ``a [R, D]``, float32 accumulation, compute dtype
    out (the matmul precision of :func:`grouped_swiglu`)."""
    dt = a.dtype
    mm = lambda u, w: jnp.dot(u, w, preferred_element_type=jnp.float32).astype(dt)  # noqa: E731
    return mm(jax.nn.silu(mm(a, gate)) * mm(a, up), down)


def grouped_swiglu(x: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Dropless expert MLPs: ``x [N, D]``, ``experts [N, k]`` -> ``[N, k, D]``, row (n, j) being expert
    ``experts[n, j]``'s SwiGLU of token n. Assignments are sorted by expert and run as grouped matmuls
    (``jax.lax.ragged_dot``, one group per expert, group sizes counted under jit). Dispatch ``ragged_dot``: a real
    grouped matmul on GPU/TPU; on CPU JAX's generic rule multiplies every row by every expert (E/k x the work)."""
    N, k = experts.shape
    E = gate.shape[0]
    flat = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    rows = jnp.take(x, order // k, axis=0)  # [N*k, D]
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
    dt = x.dtype
    mm = lambda a, w: jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32).astype(dt)  # noqa: E731
    g, u = mm(rows, gate), mm(rows, up)  # [N*k, F]; float32 accumulation, as the dense matmuls get on every backend
    out = mm(jax.nn.silu(g) * u, down)  # [N*k, D]
    return jnp.take(out, jnp.argsort(order), axis=0).reshape(N, k, -1)  # back to (token, slot) order


def tile_rows(rows: int, num_experts: int, max_tile: int = 64) -> int:
    """Static tile height of :func:`tiled_swiglu` for ``rows = N·k`` assignments: the mean rows per expert rounded
    up to a power of two, at most ``max_tile`` (an expert with r rows runs ``ceil(r / tile)`` tiles, so the
    padding is at most one partial tile per activated expert)."""
    mean = -(-rows // num_experts)
    return int(min(max_tile, 1 << max(mean - 1, 0).bit_length()))


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    """Where each (token, slot) assignment sits in expert-aligned tiles of :func:`tiled_swiglu`:
    ``src [n_tiles·tile]`` token of each tile row (``N`` = a zero padding row), ``slot [N·k]`` tile row of each
    assignment in (token, slot) order, ``tile_expert [n_tiles]`` the expert of each tile, ``active [n_tiles]``
    whether the tile holds any row (trailing tiles past the used ones are skipped)."""

    src: jax.Array
    slot: jax.Array
    tile_expert: jax.Array
    active: jax.Array


def tile_schedule(experts: jax.Array, num_experts: int, tile: int) -> TileSchedule:
    """The :class:`TileSchedule` of ``experts [N, k]``: expert e's ``s_e`` rows fill ``ceil(s_e / tile)`` tiles of its
    own, experts in order. Static bound on the tile count (``R = N·k`` rows, ``M = min(E, R)`` the most activated
    experts): ``Σ_e ceil(s_e / tile) <= (R - M) // tile + M``."""
    N, k = experts.shape
    R, E = N * k, num_experts
    M = min(E, R)
    n_tiles = (R - M) // tile + M
    flat = jnp.asarray(experts).reshape(-1)  # [R]
    order = jnp.argsort(flat, stable=True)  # [R] assignments grouped by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E]
    tiles_e = (sizes + tile - 1) // tile  # [E]
    tile_end = jnp.cumsum(tiles_e)  # [E]
    row_begin = jnp.cumsum(sizes) - sizes  # [E]
    e_sorted = flat[order]  # [R]
    pos = (tile_end - tiles_e)[e_sorted] * tile + jnp.arange(R, dtype=jnp.int32) - row_begin[e_sorted]  # [R] sorted
    src = jnp.full((n_tiles * tile,), N, jnp.int32).at[pos].set((order // k).astype(jnp.int32))
    slot = jnp.zeros((R,), jnp.int32).at[order].set(pos)
    ids = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, ids, side="right"), E - 1).astype(jnp.int32)
    return TileSchedule(src=src, slot=slot, tile_expert=tile_expert, active=ids < tile_end[-1])


@jax.custom_vjp
def _tile_loop(tiles: jax.Array, tile_expert: jax.Array, active: jax.Array, gate: jax.Array, up: jax.Array,
               down: jax.Array) -> jax.Array:
    """``tiles [n, T, D]`` -> ``[n, T, D]``: tile i through expert ``tile_expert[i]``'s SwiGLU when ``active[i]``,
    zeros otherwise (``lax.scan`` over the tiles, ``lax.cond`` per tile). Its VJP (:func:`_tile_loop_bwd`) is a
    second such loop that adds each tile's weight gradients into expert slices of ``[E, ...]`` accumulators (plain
    autodiff of the scan would add a full ``[E, D, F]`` cotangent per tile)."""

    def one(_, xs):
        e, on, a = xs
        run = lambda a: _swiglu_f32(a, gate[e], up[e], down[e])  # noqa: E731
        return None, jax.lax.cond(on, run, jnp.zeros_like, a)

    return jax.lax.scan(one, None, (tile_expert, active, tiles))[1]


def _tile_loop_fwd(tiles, tile_expert, active, gate, up, down):
    return _tile_loop(tiles, tile_expert, active, gate, up, down), (tiles, tile_expert, active, gate, up, down)


def _tile_loop_bwd(res, dout):
    """SwiGLU backward per active tile (``y = (silu(a·G) * (a·U))·W``): ``dp = dy·Wᵀ``, ``dW = pᵀ·dy``,
    ``dh₁ = dp * (a·U) * silu'(a·G)``, ``dh₂ = dp * silu(a·G)``, ``da = dh₁·Gᵀ + dh₂·Uᵀ``, ``dG = aᵀ·dh₁``,
    ``dU = aᵀ·dh₂``; weight gradients accumulate in float32 at the tile's expert."""
    tiles, tile_expert, active, gate, up, down = res
    dt = tiles.dtype
    f32 = lambda u, w: jnp.dot(u, w, preferred_element_type=jnp.float32)  # noqa: E731

    def grads(a, dy, G, U, W):
        h1, h2 = f32(a, G), f32(a, U)  # [T, F]
        sig = jax.nn.sigmoid(h1)
        s = h1 * sig
        p = (s.astype(dt) * h2.astype(dt))  # [T, F] as in the forward
        dp = f32(dy, W.T)  # [T, F]
        dh1 = (dp * h2 * sig * (1 + h1 * (1 - sig))).astype(dt)
        dh2 = (dp * s).astype(dt)
        da = (f32(dh1, G.T) + f32(dh2, U.T)).astype(dt)  # [T, D]
        return da, f32(a.T, dh1), f32(a.T, dh2), f32(p.T, dy)

    def one(acc, xs):
        e, on, a, dy = xs

        def run(acc):
            dG, dU, dW = acc
            da, g, u, w = grads(a, dy, gate[e], up[e], down[e])
            add = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, buf[e] + v, e, 0)  # noqa: E731
            return (add(dG, g), add(dU, u), add(dW, w)), da

        return jax.lax.cond(on, run, lambda acc: (acc, jnp.zeros_like(a)), acc)

    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in (gate, up, down))
    (dG, dU, dW), dtiles = jax.lax.scan(one, zeros, (tile_expert, active, tiles, dout.astype(dt)))
    return dtiles, None, None, dG.astype(gate.dtype), dU.astype(up.dtype), dW.astype(down.dtype)


_tile_loop.defvjp(_tile_loop_fwd, _tile_loop_bwd)


def tiled_swiglu(x: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                 tile: Optional[int] = None) -> jax.Array:
    """Dropless expert MLPs with work proportional to the routed rows (dispatch ``tiled``), same contract as
    :func:`grouped_swiglu`: ``x [N, D]``, ``experts [N, k]`` -> ``[N, k, D]``. The assignments are gathered into
    expert-aligned tiles of ``tile`` rows (:func:`tile_schedule`; default :func:`tile_rows`) and a ``lax.scan``
    over the static tile bound runs one expert's SwiGLU per tile inside ``lax.cond`` (:func:`_tile_loop`): an
    unused tile costs a branch, an expert with r rows ``ceil(r / tile)`` tile matmuls reading only its own weights.
    Static shapes, exact (the same per-row float32-accumulated products as ``ragged_dot``), differentiable (a
    custom VJP doing the same per-tile work backwards)."""
    N, k = experts.shape
    E, D = gate.shape[0], x.shape[1]
    tile = tile or tile_rows(N * k, E)
    s = tile_schedule(experts, E, tile)
    xp = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])  # [N+1, D]; row N pads partial tiles
    tiles = jnp.take(xp, s.src, axis=0).reshape(-1, tile, D)  # [n_tiles, tile, D]
    out = _tile_loop(tiles, s.tile_expert, s.active, gate, up, down)  # [n_tiles, tile, D]
    return jnp.take(out.reshape(-1, D), s.slot, axis=0).reshape(N, k, D)


MOE_DISPATCHES = ("auto", "ragged_dot", "tiled")
_DISPATCH_FNS = {"ragged_dot": grouped_swiglu, "tiled": tiled_swiglu}


def _expert_mesh() -> int:
    """Size of the ``expert`` axis of the mesh active in :func:`jaxtok.mesh.axis_rules` (1 without one)."""
    from jaxtok.mesh import _ACTIVE

    active = _ACTIVE.get()
    return 1 if active is None else int(dict(active[0].shape).get("expert", 1))


def resolve_dispatch(dispatch: str, backend: Optional[str] = None, expert_axis: Optional[int] = None) -> str:
    """The expert dispatch a call runs for ``ModelConfig.moe_dispatch``: ``auto`` -> ``ragged_dot`` on GPU/TPU
    (a grouped-GEMM kernel) and under a mesh whose ``expert`` axis is > 1 (GSPMD splits ``ragged_dot`` over its
    expert dimension so each device runs its own experts; the tile loop indexes one expert per tile and would make
    every device gather every expert's weights), else ``tiled`` (CPU, where ``ragged_dot`` runs every expert on
    every row). An explicit ``ragged_dot``/``tiled`` is used as given (``tiled`` stays exact on any mesh)."""
    if dispatch not in MOE_DISPATCHES:
        raise ValueError(f"moe_dispatch={dispatch!r}: allowed {MOE_DISPATCHES}")
    if dispatch != "auto":
        return dispatch
    backend = backend or jax.default_backend()
    expert_axis = _expert_mesh() if expert_axis is None else expert_axis
    return "ragged_dot" if backend in ("gpu", "tpu") or expert_axis > 1 else "tiled"


def expert_swiglu(x: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                  dispatch: str = "auto") -> jax.Array:
    """``x [N, D]``, ``experts [N, k]`` -> ``[N, k, D]`` through the dispatch :func:`resolve_dispatch` picks."""
    return _DISPATCH_FNS[resolve_dispatch(dispatch)](x, experts, gate, up, down)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterStats:
    """One MoE layer's router statistics over the valid tokens of one forward: ``counts [E]`` top-k assignments
    per expert, ``probs [E]`` summed router probabilities, ``rows []`` valid tokens (float32 sums)."""

    counts: jax.Array
    probs: jax.Array
    rows: jax.Array


def router_stats(probs: jax.Array, experts: jax.Array, valid: Optional[jax.Array]) -> RouterStats:
    """Statistics of ``probs [N, E]`` and ``experts [N, k]`` over tokens where ``valid [N]`` (all if None)."""
    E = probs.shape[-1]
    w = jnp.ones(probs.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32) * w[:, None, None], axis=(0, 1))
    return RouterStats(counts=counts, probs=jnp.sum(probs * w[:, None], axis=0), rows=jnp.sum(w))


def load_balancing_loss(stats: list[RouterStats]) -> jax.Array:
    """HF ``load_balancing_loss_func`` over the given layers: ``E · Σ_e (Σ_l counts / Σ_l rows) · (Σ_l probs /
    Σ_l rows)``; 0 without layers or valid tokens."""
    if not stats:
        return jnp.zeros((), jnp.float32)
    counts = sum(s.counts for s in stats)
    probs = sum(s.probs for s in stats)
    rows = sum(s.rows for s in stats)
    inv = jnp.where(rows > 0, 1.0 / jnp.where(rows > 0, rows, 1.0), 0.0)
    return counts.shape[0] * jnp.sum(counts * inv * probs * inv)


# --------------------------------------------------------------------------------------------------------------
# Collecting router statistics during a forward
# --------------------------------------------------------------------------------------------------------------

_COLLECTOR: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("jaxtok_router_stats", default=None)


def _trace():
    return jax.extend.core.get_opaque_trace_state(convention="nnx")


@contextlib.contextmanager
def collect_router_stats() -> Iterator[list]:
    """Inside the block, every :class:`SparseMoE` call appends ``(module, RouterStats)`` to the yielded list.
    Use it inside the function being traced: only calls at the block's own trace level are collected (a forward
    inside a nested transform, e.g. a ``lax.scan`` or ``jax.checkpoint`` body, is skipped: its arrays would be
    tracers of a trace that has ended)."""
    out: list = []
    token = _COLLECTOR.set((out, _trace()))
    try:
        yield out
    finally:
        _COLLECTOR.reset(token)


def moe_modules(model: nnx.Module) -> list["SparseMoE"]:
    """The :class:`SparseMoE` submodules of ``model`` (any wrapper around a Decoder)."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseMoE)]


def with_router_aux_loss(loss_fn: Callable, coef: Optional[float] = None) -> Callable:
    """Wrap ``loss_fn(model, batch, rng, **frozen) -> (loss_sum, count, aux)`` so the loss becomes
    ``loss + coef · aux_loss`` (``coef`` default the model config's ``router_aux_loss_coef``), ``aux_loss`` being
    :func:`load_balancing_loss` over the routers of ``model`` in every forward ``loss_fn`` runs (frozen models,
    e.g. an MoE teacher, are not counted). The added term is ``coef · aux_loss · count`` in the sum, so the
    step's ``Σ sum / Σ count`` reports ``CE + coef · aux_loss`` as HF's ``MoeCausalLMOutputWithPast.loss`` does;
    ``aux["router_aux_loss"]`` reports ``aux_loss``. For a model without MoE layers (or any non-nnx model) the
    result is ``loss_fn``'s unchanged, so wrapping every objective is safe."""

    def wrapped(model, batch, rng, **kw):
        with collect_router_stats() as seen:
            loss_sum, count, aux = loss_fn(model, batch, rng, **kw)
        mine = moe_modules(model) if isinstance(model, nnx.Module) else []
        ids = {id(m) for m in mine}
        stats = [s for owner, s in seen if id(owner) in ids]
        if not stats:
            return loss_sum, count, aux
        c = mine[0].router_aux_loss_coef if coef is None else coef
        lb = load_balancing_loss(stats)
        count32 = jnp.asarray(count, jnp.float32)
        return loss_sum + c * lb * count32, count, {**aux, "router_aux_loss": lb * count32}

    return wrapped


# --------------------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------------------


class SparseMoE(nnx.Module):
    """Top-k routed SwiGLU experts (see the module docstring). Parameters: ``router_weight_de [D, E]``,
    ``gate_weight_edf``/``up_weight_edf [E, D, F]``, ``down_weight_efd [E, F, D]``."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.router_aux_loss_coef = cfg.router_aux_loss_coef
        self.dispatch = cfg.moe_dispatch
        self.router_weight_de = _param(rngs, (D, E), ("embed", None), pd, D**-0.5)
        self.gate_weight_edf = _param(rngs, (E, D, F), ("expert", "embed", "mlp"), pd, D**-0.5)
        self.up_weight_edf = _param(rngs, (E, D, F), ("expert", "embed", "mlp"), pd, D**-0.5)
        self.down_weight_efd = _param(rngs, (E, F, D), ("expert", "mlp", "embed"), pd, F**-0.5)
        self.shared = cfg.shared_expert_intermediate_size > 0
        if self.shared:
            Fs = cfg.shared_expert_intermediate_size
            self.shared_gate_weight_df = _param(rngs, (D, Fs), ("embed", "mlp"), pd, D**-0.5)
            self.shared_up_weight_df = _param(rngs, (D, Fs), ("embed", "mlp"), pd, D**-0.5)
            self.shared_down_weight_fd = _param(rngs, (Fs, D), ("mlp", "embed"), pd, Fs**-0.5)
            self.shared_expert_gate_weight_d1 = _param(rngs, (D, 1), ("embed", None), pd, D**-0.5)

    def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, D]``, ``valid [B, T]`` (tokens counted by the load-balancing statistics) -> ``[B, T, D]``."""
        dt = self.dtype
        B, T, D = x.shape
        flat = x.astype(dt).reshape(B * T, D)
        logits = jnp.dot(flat, self.router_weight_de[...].astype(dt), preferred_element_type=jnp.float32)
        probs, weights, experts = route(logits, self.top_k, self.norm_topk_prob)  # [N, E], [N, k], [N, k]
        collector = _COLLECTOR.get()
        if collector is not None and collector[1] == _trace():
            collector[0].append((self, router_stats(probs, experts, None if valid is None else valid.reshape(-1))))
        per_slot = expert_swiglu(flat, experts, self.gate_weight_edf[...].astype(dt), self.up_weight_edf[...].astype(dt),
                                 self.down_weight_efd[...].astype(dt), self.dispatch)  # [N, k, D]
        out = jnp.einsum("nkd,nk->nd", per_slot, weights.astype(dt))
        if self.shared:
            h = jax.nn.silu(dense(flat, self.shared_gate_weight_df[...].astype(dt))) * dense(
                flat, self.shared_up_weight_df[...].astype(dt))
            gate = jax.nn.sigmoid(dense(flat, self.shared_expert_gate_weight_d1[...].astype(dt)))  # [N, 1]
            out = out + gate * dense(h, self.shared_down_weight_fd[...].astype(dt))
        return constrain(out.reshape(B, T, D), ("batch", "length", "act_embed"))
