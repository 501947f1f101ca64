"""Jitted sampler for masked and block diffusion LMs with pluggable commit policies (decode_methods.md Part B, B0).

State: ``x [B, P+N]`` = the LEFT-padded prompt, then ``N`` generated positions that start as ``mask_id``. One
``lax.while_loop`` runs denoising steps; every row keeps its own semi-autoregressive block ``[lo, hi)`` (generation
indices): when a row's block has no masks left, its next block starts at its first masked position — fixed length
``block_len`` (a block-causal model: the model's own position blocks, ``position // block_size``) or chosen by the
policy's ``block_rule`` (AdaBlock). This is B0's "blocks × inner loop" with per-row block pointers, so rows never
wait for each other's blocks and finished rows are frozen with ``where``. Each step::

    logits = model(x)                       # 1 NFE, position-aligned [B, N, V] (CFG: one batched 2B forward)
    x0     = sample(logits / T)             # Gumbel-max in log space (§0.1); T = 0: argmax
    conf   = softmax(logits)[x0]            # un-tempered (§0.2)
    commit = POLICY(info, args, state)      # decode/commit_policies.py; only masked positions
    x      = where(commit, x0, x)           # committed tokens are never re-masked
    done  |= no masks left | (stop_early and a terminator is committed with every earlier position decoded)

Caps: the loop stops after ``max(N, num_blocks · steps_per_block) + num_blocks`` steps at the latest; every policy
commits at least one token per step (or finishes its block at its last scheduled step), so it ends earlier.

Outputs (:class:`DiffusionResult`): tokens, per-row NFE, and the commit trajectory ``commit_step [B, N]`` (the
0-based step at which each position was revealed; the state after s steps is :func:`trajectory_state`) for TAD
(train_methods.md §5) and CJ-GRPO (§10).

Caches (``SamplerArgs.cache``, §B10):

- ``none``: a full forward every step.
- ``prefix`` / ``dual`` (Fast-dLLM, approximate): when any row starts a block, a full forward refreshes a
  :class:`jaxtok.models.KVCache` with every position's keys (and gives the step's logits); other steps run only a
  window — ``prefix``: from the block start to the end (``[B, N]``), ``dual``: the block (``[B, block_len]``) — over
  the cache, whose slots for the window's own columns are hidden (positions -1) and whose other keys are stale
  until the next refresh. Same NFE, less compute per step; outputs drift from ``none`` (measured, not asserted). On a
  block-causal model both are exact: the window is widened to whole position blocks (:func:`window_columns`), so a
  prompt ending inside a position block has its tail recomputed with the block, and no stale key is visible to it.
- ``block``: the exact block KV cache of a block-causal model: positions before the previous block live in the
  cache, each step runs a ``[B, 2·block]`` window (previous block, current block) and rolls the cache back, and a
  row entering its next block keeps the previous block's (now final) keys. The first step's prefill counts as one
  extra NFE.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.models import KVCache, check_token_ids
from jaxtok.registry import COMMIT_POLICIES, ConfigError
from jaxtok.sampling import first_true_index, gumbel_argmax

from . import commit_policies  # noqa: F401  (registers the policies)
from .commit_policies import LoopSpec, StepInfo

DEFAULT_MASK_ID = 3
DEFAULT_STOP_IDS = (2,) + tuple(range(4, 11))  # <eos> and the Rainbow pads <pad_1..7> of the task tokenizer
_WINDOW_ONLY = ("llada", "threshold", "factor", "eoser", "ass", "bacd")  # policies that read only the block


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiffusionResult:
    """Output of :func:`diffusion_generate`.

    ``tokens [B, N]`` int32 generated ids (``mask_id`` where a row hit the cap; ``pad_id`` where ``stop_early``
    filled); ``valid [B, N]`` up to and including the first terminator; ``lengths [B]``; ``done [B]``;
    ``nfe [B]`` int32 forwards the row took part in; ``commit_step [B, N]`` int32 step at which each position was
    committed (-1: never); ``num_steps []`` loop iterations; ``policy_state`` the policy's final carry."""

    tokens: jax.Array
    valid: jax.Array
    lengths: jax.Array
    done: jax.Array
    nfe: jax.Array
    commit_step: jax.Array
    num_steps: jax.Array
    policy_state: Any = None  # the policy's final carry (Dystruct: window, visible-position sums)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    x: jax.Array  # [B, L]
    commit_step: jax.Array  # [B, N]
    step: jax.Array  # []
    nfe: jax.Array  # [B]
    done: jax.Array  # [B]
    lo: jax.Array  # [B]
    hi: jax.Array  # [B]
    block_step: jax.Array  # [B]
    block_masks: jax.Array  # [B]
    pstate: Any
    cache: Optional[KVCache]
    base: Optional[jax.Array]  # [B] cache slots kept (block cache)
    cached_kb: Optional[jax.Array]  # [B] block the cache is prepared for


def trajectory_state(tokens: jax.Array, commit_step: jax.Array, step, mask_id: int = DEFAULT_MASK_ID) -> jax.Array:
    """``x^(step)``: the generated part after ``step`` denoising steps (``0`` = all masks): positions committed at a
    step ``< step`` show their token, the rest ``mask_id``. ``[B, N]``."""
    shown = (commit_step >= 0) & (commit_step < step)
    return jnp.where(shown, tokens, mask_id)


# ----------------------------------------------------------------------------------------------------------------
# Pieces of one step
# ----------------------------------------------------------------------------------------------------------------


def sample_x0(logits: jax.Array, keys: jax.Array, temperature: float) -> jax.Array:
    """§0.1: ``argmax(logits/T + g)`` per row (``keys [B]``), or ``argmax logits`` at ``T = 0``. ``[B, N]``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda k, lg: gumbel_argmax(jax.random.fold_in(k, 0), lg / temperature))(keys, logits)


def confidence(logits: jax.Array, x0: jax.Array) -> jax.Array:
    """§0.2: ``softmax(logits)[x0]`` in float32 from the un-tempered logits. ``[B, N]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.exp(jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0])


def fixed_block_end(start: jax.Array, plen: jax.Array, block_len: int, n: int, aligned: bool) -> jax.Array:
    """End ``[B]`` of the fixed block holding generation index ``start``: multiples of ``block_len`` from the first
    generated position, or (``aligned``, block-causal models) of the absolute position ``plen + i``."""
    if aligned:
        pos = plen + start
        end = (pos // block_len + 1) * block_len - plen
    else:
        end = (start // block_len + 1) * block_len
    return jnp.minimum(end, n).astype(jnp.int32)


def window_columns(start: jax.Array, end: jax.Array, pad: jax.Array, block_size: Optional[int], length: int):
    """Columns ``[c0, c1)`` (``[B]`` each) a Fast-dLLM cache window (§B10) recomputes for the window ``[start, end)``.

    Bidirectional models: the window itself. Block-causal models (``block_size`` given; position = column − ``pad``):
    widened to whole position blocks, ``c0 = pad + (start − pad) // bs · bs`` and ``c1 = pad + ⌈(end − pad) / bs⌉ · bs``
    (≤ ``length``). Every key a block query can see then is either recomputed or final in the cache (earlier position
    blocks never attend to later ones), so the cached window equals the full forward exactly — also when the prompt
    ends inside a position block. Widens each side by at most ``bs − 1`` columns."""
    if block_size is None:
        return start, end
    c0 = pad + ((start - pad) // block_size) * block_size
    c1 = jnp.minimum(pad + -(-(end - pad) // block_size) * block_size, length)
    return c0.astype(jnp.int32), c1.astype(jnp.int32)


def _row_keys(rng: jax.Array, step: jax.Array, b: int) -> jax.Array:
    k = jax.random.fold_in(rng, step)
    return jax.vmap(lambda r: jax.random.fold_in(k, r))(jnp.arange(b))


# ----------------------------------------------------------------------------------------------------------------
# Jitted core
# ----------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "head_defs", "policy", "args", "spec", "temperature",
                                             "attention", "block_size", "pad_id"))
def _diffusion_jit(graphdef, model_state, head_defs, head_states, prompt, prompt_valid, rng, *, policy, args, spec,
                   temperature, attention, block_size, pad_id):
    entry = COMMIT_POLICIES.entry(policy)
    fn = entry.fn
    block_rule = entry.meta.get("block_rule")
    heads = {name: nnx.merge(d, s) for name, d, s in zip(head_defs[0], head_defs[1], head_states)}
    b, p = prompt.shape
    n, mask = spec.gen_len, spec.mask_id
    length = p + n
    aligned = attention == "block_causal"
    use_cache = args.cache == "block"
    shift = 1 if args.shift_logits else 0
    plen = jnp.sum(prompt_valid, axis=1).astype(jnp.int32)  # [B]
    pad = (p - plen).astype(jnp.int32)
    full_valid = jnp.concatenate([prompt_valid, jnp.ones((b, n), bool)], axis=1)  # [B, L]
    positions = jnp.maximum(jnp.cumsum(full_valid, axis=1, dtype=jnp.int32) - 1, 0)
    gen_cols = jnp.broadcast_to(p + jnp.arange(n, dtype=jnp.int32) - shift, (b, n))
    idx = jnp.arange(n, dtype=jnp.int32)[None, :]
    stop = jnp.asarray(spec.stop_ids if spec.stop_ids else (-1,), jnp.int32)
    nb_max = math.ceil(n / spec.block_len) + 1
    cap = max(n, nb_max * spec.steps_per_block) + nb_max

    needs_hidden = bool(entry.meta.get("needs_hidden"))
    windowed = bool(entry.meta.get("window"))  # Dystruct: the model sees generated positions < pstate["window"]

    def forward_full(x, visible=None):
        model = nnx.merge(graphdef, model_state)
        fv = full_valid if visible is None else jnp.concatenate([prompt_valid, visible], axis=1)  # windowed: [B, L]
        if args.cfg_scale > 0:  # LLaDA unsupervised CFG: un-conditional = prompt replaced by masks
            un_x = x.at[:, :p].set(jnp.where(prompt_valid, mask, x[:, :p]))
            out = model(jnp.concatenate([x, un_x]), valid=jnp.concatenate([fv, fv]),
                        attention=attention, block_size=block_size, logits_at=jnp.concatenate([gen_cols, gen_cols]))
            cond, uncond = out.logits[:b], out.logits[b:]
            return uncond + (args.cfg_scale + 1.0) * (cond - uncond)
        if needs_hidden:
            out = model(x, valid=fv, attention=attention, block_size=block_size, logits_at=gen_cols,
                        return_hidden=True)
            return out.logits, out.hidden[:, p:]
        return model(x, valid=fv, attention=attention, block_size=block_size, logits_at=gen_cols).logits

    bs = block_size or 1

    def refill(x, kb):
        """A fresh cache holding every row's positions before block ``kb - 1``."""
        model = nnx.merge(graphdef, model_state)
        cache = KVCache.init(model.cfg, b, length + n + 4 * bs)
        keep = full_valid & (positions < ((kb - 1) * bs)[:, None])
        out = model(x, positions=positions, valid=keep, attention=attention, block_size=block_size, cache=cache,
                    return_logits=False)
        return out.cache, jnp.full((b,), length, jnp.int32)

    def forward_window(x, cache, base, kb):
        """Logits of block ``kb`` of every row from the window (block kb-1, block kb) over the cached prefix."""
        model = nnx.merge(graphdef, model_state)
        wpos = ((kb - 1) * bs)[:, None] + jnp.arange(2 * bs, dtype=jnp.int32)[None, :]  # [B, 2bs]
        cols = wpos + pad[:, None]
        wvalid = (wpos >= 0) & (cols < length)
        tokens = jnp.where(wvalid, jnp.take_along_axis(x, jnp.clip(cols, 0, length - 1), axis=1), pad_id)
        at = jnp.broadcast_to(bs + jnp.arange(bs, dtype=jnp.int32) - shift, (b, bs))
        out = model(tokens, positions=jnp.maximum(wpos, 0), valid=wvalid, attention=attention,
                    block_size=block_size, cache=cache.rollback(base), logits_at=at)
        off = jnp.clip(plen[:, None] + idx - (kb * bs)[:, None], 0, bs - 1)  # [B, N] -> window offset
        logits = jnp.take_along_axis(out.logits, off[..., None], axis=1)  # [B, N, V]; exact inside block kb
        return logits, out.cache

    def block_starts(s, masked):
        """``(new [B], start [B])``: rows whose active block has no masks left start a block at their first mask."""
        in_block = (idx >= s.lo[:, None]) & (idx < s.hi[:, None])
        new = ~jnp.any(masked & in_block, axis=-1) & jnp.any(masked, axis=-1)
        return new, first_true_index(masked)

    def set_blocks(s, masked, new, start, end):
        lo = jnp.where(new, start, s.lo)
        hi = jnp.where(new, jnp.maximum(end, start + 1), s.hi)
        in_block = (idx >= lo[:, None]) & (idx < hi[:, None])
        return dataclasses.replace(
            s, lo=lo, hi=hi, block_step=jnp.where(new, 0, s.block_step),
            block_masks=jnp.where(new, jnp.sum(masked & in_block, axis=-1), s.block_masks).astype(jnp.int32))

    approx = args.cache in ("prefix", "dual")
    width = n if (args.cache == "prefix" or block_rule is not None) else min(spec.block_len, n)
    if approx and aligned:  # room for the rest of the position blocks the window touches (prompt tail included)
        width += 2 * (bs - 1)

    def refresh(x):
        """Fast-dLLM cache refresh: a full forward writing every position's keys (and this step's logits)."""
        model = nnx.merge(graphdef, model_state)
        out = model(x, valid=full_valid, attention=attention, block_size=block_size,
                    cache=KVCache.init(model.cfg, b, length + width), logits_at=gen_cols)
        return out.logits, out.cache

    def approx_window(x, cache, lo, hi):
        """Logits of the window from the block start (prefix: to the end; dual: the block) over the refreshed
        cache, whose slots for the window's own columns are hidden (positions -1). On a block-causal model the window
        is widened to whole position blocks (:func:`window_columns`): the prompt's tail (a prompt ending inside a
        position block) and any other column sharing a position block with the active block attend to it, so their
        keys change as it is decoded and must be recomputed, not read stale from the cache."""
        model = nnx.merge(graphdef, model_state)
        end = jnp.broadcast_to(length if args.cache == "prefix" else p + hi, (b,))
        c0, end = window_columns(p + lo, end, pad, bs if aligned else None, length)  # [B], [B]
        cols = c0[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [B, W]
        wvalid = cols < end[:, None]
        slot = jnp.arange(cache.capacity)[None, :]
        hide = (slot >= c0[:, None]) & (slot < end[:, None])
        view = dataclasses.replace(cache, positions=jnp.where(hide, -1, cache.positions))
        safe = jnp.clip(cols, 0, length - 1)
        out = model(jnp.take_along_axis(x, safe, axis=1), positions=jnp.take_along_axis(positions, safe, axis=1),
                    valid=wvalid, attention=attention, block_size=block_size, cache=view)
        off = jnp.clip(p + idx - c0[:, None], 0, width - 1)
        return jnp.take_along_axis(out.logits, off[..., None], axis=1)  # [B, N, V]; exact in the window

    def lookahead(x, pos, tok):
        """``[B, C, N, V]`` logits of C copies of ``x``, copy c with ``tok[:, c]`` committed at ``pos[:, c]``."""
        c = pos.shape[1]
        cand = jnp.where(idx[:, None, :] == pos[..., None], tok[..., None], x[:, None, p:])  # [B, C, N]
        xs = jnp.concatenate([jnp.broadcast_to(x[:, None, :p], (b, c, p)), cand], axis=-1).reshape(b * c, length)
        rep = lambda a: jnp.repeat(a, c, axis=0)  # noqa: E731
        logits = nnx.merge(graphdef, model_state)(xs, valid=rep(full_valid), attention=attention,
                                                  block_size=block_size, logits_at=rep(gen_cols)).logits
        return logits.at[..., mask].set(-jnp.inf).reshape(b, c, n, -1)

    def verify_ar(x, drafts, start):
        """``[B, K, V]``: the model in AR mode (causal attention) predicting generation index ``start + c`` of copy
        c, whose masked positions before it hold ``drafts`` (one batched forward of K copies)."""
        kb = spec.block_len
        c = jnp.arange(kb, dtype=jnp.int32)
        gen = x[:, p:]
        filled = jnp.where(gen == mask, drafts, gen)
        cand = jnp.where(idx[:, None, :] < (start[:, None] + c[None, :])[..., None], filled[:, None], gen[:, None])
        xs = jnp.concatenate([jnp.broadcast_to(x[:, None, :p], (b, kb, p)), cand], -1).reshape(b * kb, length)
        at = jnp.clip(p + start[:, None] + c[None, :], 0, length - 1).reshape(b * kb, 1)
        rep = lambda a: jnp.repeat(a, kb, axis=0)  # noqa: E731
        logits = nnx.merge(graphdef, model_state)(xs, valid=rep(full_valid), attention="causal", logits_at=at).logits
        return logits.at[..., mask].set(-jnp.inf).reshape(b, kb, -1)

    def body(s: _State) -> _State:
        gen = s.x[:, p:]
        visible = (idx < s.pstate["window"][:, None]) if windowed else None  # [B, N]
        masked = (gen == mask) & ~s.done[:, None]  # [B, N]
        live = jnp.any(masked, axis=-1)
        if windowed:  # a live row whose window is used up still runs (its policy widens the window)
            masked = masked & visible
        keys = _row_keys(rng, s.step, b)
        extra_nfe = jnp.zeros((b,), jnp.int32)
        new, start = block_starts(s, masked)
        if block_rule is None:
            s = set_blocks(s, masked, new, start, fixed_block_end(start, plen, spec.block_len, n, aligned))
        if approx:
            logits, cache = jax.lax.cond(jnp.any(new & live), lambda: refresh(s.x),
                                         lambda: (approx_window(s.x, s.cache, s.lo, s.hi), s.cache))
            s = dataclasses.replace(s, cache=cache)
        elif use_cache:
            kb = (plen + s.lo) // bs
            advance = kb == s.cached_kb + 1
            ok = (kb == s.cached_kb) | advance | ~live
            need = ~jnp.all(ok)

            def do_refill(_):
                c, base = refill(s.x, kb)
                return c, base, kb

            def do_advance(_):
                return s.cache, jnp.where(advance, s.base + bs, s.base), jnp.where(advance, kb, s.cached_kb)

            cache, base, cached_kb = jax.lax.cond(need, do_refill, do_advance, None)
            extra_nfe = jnp.where(need & live, 1, 0)
            logits, cache = forward_window(s.x, cache, base, kb)
            s = dataclasses.replace(s, cache=cache, base=base, cached_kb=cached_kb)
        else:
            logits = forward_full(s.x, visible)
        hidden = None
        if needs_hidden:
            logits, hidden = logits
        logits = logits.at[..., mask].set(-jnp.inf)  # the mask token is never a proposal
        x0 = sample_x0(logits, keys, temperature)
        conf = confidence(logits, x0)
        is_stop = jnp.isin(x0, stop)

        def info_of(st, eligible):
            return StepInfo(logits=logits, x0=x0, conf=conf, eligible=eligible, masked=masked, is_stop=is_stop,
                            lo=st.lo, hi=st.hi, block_step=st.block_step, block_masks=st.block_masks, step=st.step,
                            keys=keys, hidden=hidden)

        if block_rule is not None:
            s = set_blocks(s, masked, new, start, block_rule(info_of(s, masked), args, start, spec))
        eligible = masked & (idx >= s.lo[:, None]) & (idx < s.hi[:, None])
        step_heads = heads
        if entry.meta.get("lookahead"):
            step_heads = dict(heads, lookahead=functools.partial(lookahead, s.x))
        if entry.meta.get("verifier"):
            step_heads = dict(heads, verify=functools.partial(verify_ar, s.x))
        dec = fn(info_of(s, eligible), args, s.pstate, spec, step_heads)
        if dec.nfe is not None:
            extra_nfe = extra_nfe + dec.nfe * live
        commit = dec.commit & masked
        gen = jnp.where(commit, dec.x0, gen)
        commit_step = jnp.where(commit, s.step, s.commit_step)
        done = s.done | ~jnp.any(gen == mask, axis=-1)
        if args.stop_early:
            first = first_true_index(jnp.isin(gen, stop))  # committed terminators (masks never match)
            finished = (first < n) & ~jnp.any((gen == mask) & (idx < first[:, None]), axis=-1) & ~s.done
            fill = finished[:, None] & (idx > first[:, None]) & (gen == mask)
            gen = jnp.where(fill, pad_id, gen)
            commit_step = jnp.where(fill, s.step, commit_step)
            done = done | finished
        pstate = jax.tree.map(lambda new, old: jnp.where(live.reshape((b,) + (1,) * (new.ndim - 1)), new, old),
                              dec.state, s.pstate)
        return dataclasses.replace(
            s, x=s.x.at[:, p:].set(gen), commit_step=commit_step, step=s.step + 1,
            nfe=s.nfe + live.astype(jnp.int32) + extra_nfe, done=done,
            block_step=s.block_step + live.astype(jnp.int32), pstate=pstate)

    init_state = entry.meta.get("init_state")
    x = jnp.concatenate([jnp.where(prompt_valid, prompt, pad_id), jnp.full((b, n), mask, jnp.int32)], axis=1)
    zeros = jnp.zeros((b,), jnp.int32)
    state = _State(
        x=x, commit_step=jnp.full((b, n), -1, jnp.int32), step=jnp.zeros((), jnp.int32), nfe=zeros,
        done=jnp.zeros((b,), bool), lo=zeros, hi=zeros, block_step=zeros, block_masks=zeros,
        pstate=init_state(b, n, args) if init_state else {},
        cache=(KVCache.init(nnx.merge(graphdef, model_state).cfg, b, length + n + 4 * bs) if use_cache else
               KVCache.init(nnx.merge(graphdef, model_state).cfg, b, length + width) if approx else None),
        base=zeros if use_cache else None, cached_kb=jnp.full((b,), -(10**6), jnp.int32) if use_cache else None)
    state = jax.lax.while_loop(lambda s: (s.step < cap) & ~jnp.all(s.done), body, state)
    gen = state.x[:, p:]
    first = first_true_index(jnp.isin(gen, stop))
    return DiffusionResult(tokens=gen, valid=idx <= first[:, None], lengths=jnp.minimum(first + 1, n),
                           done=state.done, nfe=state.nfe, commit_step=state.commit_step, num_steps=state.step,
                           policy_state=state.pstate)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def policy_args_of(policy: str, policy_args=None, **overrides):
    """The policy's argument dataclass from a dataclass instance, a mapping (checked like a config) or None
    (defaults); keyword ``overrides`` that are not None replace fields (``block_len=``, ``steps=``)."""
    entry = COMMIT_POLICIES.entry(policy, "policy")
    if policy_args is None or isinstance(policy_args, Mapping):
        policy_args = COMMIT_POLICIES.parse_args(policy, policy_args, "policy_args")
    elif not isinstance(policy_args, entry.config_cls):
        raise ConfigError(f"policy_args: {type(policy_args).__name__} is not the arguments of policy {policy!r} "
                          f"({entry.config_cls.__name__})")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(policy_args, **changes) if changes else policy_args


def diffusion_generate(
    model: nnx.Module,
    prompt,
    prompt_valid,
    *,
    gen_len: int,
    policy: str = "llada",
    policy_args=None,
    block_len: Optional[int] = None,
    steps: Optional[int] = None,
    temperature: float = 0.0,
    rng: Optional[jax.Array] = None,
    mask_id: Optional[int] = None,
    stop_tokens: Sequence[int] = DEFAULT_STOP_IDS,
    pad_id: int = 0,
    attention: str = "bidirectional",
    block_size: Optional[int] = None,
    heads: Optional[Mapping[str, nnx.Module]] = None,
) -> DiffusionResult:
    """Decode ``gen_len`` tokens per row with a masked/block diffusion LM in one jitted call (module docstring).

    Args:
      model: a ``jaxtok.models.Decoder`` trained as a diffusion LM (position-aligned logits; Dream models shift
        through their config, AR-adapted ones with ``policy_args.shift_logits``).
      prompt, prompt_valid: ``[B, P]`` LEFT-padded prompt ids and mask (each row >= 1 token).
      gen_len: N generated positions (all start masked).
      policy: a ``COMMIT_POLICIES`` name; policy_args: its dataclass, a mapping, or None (defaults).
      block_len, steps: override ``policy_args.block_len`` / ``.steps`` when given.
      temperature: Python float; 0 = argmax proposals.
      rng: PRNG key (step s, row r use ``fold_in(fold_in(rng, s), r)``: rows are batch-invariant).
      mask_id: default the model config's ``mask_token_id`` (3 without one).
      stop_tokens: terminators (default ``<eos>`` and the Rainbow pads 4..10).
      pad_id: prompt padding and ``stop_early`` fill.
      attention: ``bidirectional`` (LLaDA/MDLM) or ``block_causal`` with ``block_size`` (then blocks follow the
        model's position blocks and ``block_len`` defaults to ``block_size``).
      heads: learned modules a policy needs, e.g. ``{"filter": FilterHead}`` for ``learn2pd``.
    """
    entry = COMMIT_POLICIES.entry(policy, "policy")
    if block_len is None and attention == "block_causal" and block_size and (
            policy_args is None or (isinstance(policy_args, Mapping) and "block_len" not in policy_args)):
        block_len = block_size
    args = policy_args_of(policy, policy_args, block_len=block_len, steps=steps)
    cfg = model.cfg
    prompt = np.asarray(prompt) if not isinstance(prompt, jax.Array) else prompt
    prompt_valid = np.asarray(prompt_valid, bool) if not isinstance(prompt_valid, jax.Array) else prompt_valid
    if prompt.ndim != 2 or prompt_valid.shape != prompt.shape:
        raise ValueError(f"prompt/prompt_valid: expected equal [B, P] shapes, got {prompt.shape} and "
                         f"{prompt_valid.shape}")
    if isinstance(gen_len, bool) or not isinstance(gen_len, (int, np.integer)) or gen_len < 1:
        raise ValueError(f"gen_len={gen_len!r}: allowed a positive integer")
    if attention not in ("bidirectional", "block_causal"):
        raise ValueError(f"attention={attention!r}: allowed 'bidirectional', 'block_causal'")
    if attention == "block_causal" and not (block_size and block_size > 0):
        raise ValueError(f"attention='block_causal' needs a positive block_size, got {block_size!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: allowed a Python float >= 0")
    if mask_id is None:
        mask_id = cfg.mask_token_id if cfg.mask_token_id is not None else DEFAULT_MASK_ID
    for name, ids in (("stop_tokens", tuple(stop_tokens)), ("pad_id", (pad_id,)), ("mask_id", (mask_id,))):
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < cfg.vocab_size:
                raise ValueError(f"{name}: id {t!r} is outside the vocabulary [0, {cfg.vocab_size})")
    if mask_id in tuple(stop_tokens) or mask_id == pad_id:
        raise ValueError(f"mask_id={mask_id} must differ from pad_id={pad_id} and stop_tokens={tuple(stop_tokens)}")
    if args.cache != "none" and any(entry.meta.get(k) for k in ("lookahead", "needs_hidden", "verifier", "window")):
        raise ConfigError(f"policy {policy!r} reads full-sequence forwards (lookahead / hidden states): use "
                          f"cache='none'")
    if args.cfg_scale > 0 and entry.meta.get("needs_hidden"):
        raise ConfigError(f"policy {policy!r} reads hidden states: cfg_scale must be 0, got {args.cfg_scale}")
    if args.cache != "none" and (args.cfg_scale > 0 or args.shift_logits or cfg.shift_logits):
        raise ConfigError(f"policy_args.cache={args.cache!r} does not support cfg_scale or shifted logits "
                          f"(cfg_scale={args.cfg_scale}, shift_logits={args.shift_logits or cfg.shift_logits})")
    if args.cache == "dual" and policy not in _WINDOW_ONLY + ("adablock",):
        raise ConfigError(f"policy_args.cache='dual' has logits only inside the block; policy={policy!r} reads "
                          f"beyond it (allowed: {list(_WINDOW_ONLY + ('adablock',))}; use cache='prefix')")
    if args.cache == "block":
        if attention != "block_causal":
            raise ConfigError("policy_args.cache='block' is the exact cache of block-causal models: needs "
                              "attention='block_causal'")
        if args.block_len != block_size:
            raise ConfigError(f"policy_args.cache='block': block_len={args.block_len} must equal the model's "
                              f"block_size={block_size}")
        if policy not in _WINDOW_ONLY:
            raise ConfigError(f"policy_args.cache='block' supports policies {list(_WINDOW_ONLY)}; got {policy!r}")
    missing = [h for h in entry.meta.get("heads", ()) if not heads or h not in heads]
    if missing:
        raise ConfigError(f"policy {policy!r} needs heads {missing} (pass heads={{name: module}})")
    pv = np.asarray(prompt_valid) if not isinstance(prompt_valid, jax.core.Tracer) else None
    if pv is not None and (not np.all(pv[:, -1]) or np.any(pv[:, 1:] < pv[:, :-1])):
        raise ValueError("prompt_valid: every row must be left-padded with at least one token (False...True)")
    if pv is not None and not isinstance(prompt, jax.core.Tracer):
        check_token_ids(np.where(pv, np.asarray(prompt), 0), cfg.vocab_size, name="prompt")

    n_blocks = math.ceil(gen_len / args.block_len)
    total = args.steps or gen_len
    spec = LoopSpec(gen_len=int(gen_len), block_len=int(args.block_len), steps=int(total),
                    steps_per_block=max(1, total // n_blocks), stop_ids=tuple(int(t) for t in stop_tokens),
                    mask_id=int(mask_id), temperature=float(temperature))
    graphdef, model_state = nnx.split(model)
    names = tuple(sorted(heads or {}))
    splits = [nnx.split(heads[k]) for k in names]
    head_defs = (names, tuple(d for d, _ in splits))
    head_states = tuple(st for _, st in splits)
    rng = jax.random.key(0) if rng is None else rng
    return _diffusion_jit(graphdef, model_state, head_defs, head_states, jnp.asarray(prompt, jnp.int32),
                          jnp.asarray(prompt_valid, bool), rng, policy=policy, args=args, spec=spec,
                          temperature=float(temperature), attention=attention,
                          block_size=int(block_size) if block_size else None, pad_id=int(pad_id))


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation, `jaxtok decode` handler body and the policy benchmark
# ----------------------------------------------------------------------------------------------------------------


def stop_ids_of(tok) -> tuple[int, ...]:
    """Terminators of a tokenizer: its end-of-sequence ids and its Rainbow pads (B20)."""
    from jaxtok.tasks.tokenizer import SpecialTokens

    sp = SpecialTokens.of(tok)
    return tuple(sp.eos_ids) + tuple(sp.rainbow_pads)


def evaluate_policy(cfg, model, tok, task, *, policy: str, policy_args=None, heads=None,
                    num_examples: Optional[int] = None) -> tuple[dict, list[dict]]:
    """Decode ``num_examples`` (default ``data.num_eval``) held-out prompts of ``task`` with one commit policy:
    :func:`jaxtok.decode.evaluate.evaluate` of a :func:`~jaxtok.decode.evaluate.diffusion_step` (the benchmarks'
    and head training's shorthand).

    Settings from ``cfg``: ``decode.max_new_tokens`` (= gen_len), ``decode.temperature``, ``decode.batch_size``,
    ``model.attention``/``model.block_size``, ``train.seed``. Returns ``(metrics, sample rows)``: ``policy``,
    ``exact_match``, ``format_ok`` (tasks with an answer format), ``mean_nfe`` (forwards per decoded row),
    ``tokens_per_nfe``, ``mean_length``, ``wall_s``, ``tokens_per_s``, ``compile_s``, ``num_examples`` (over-long
    prompts included: they score 0) and ``overlong_prompts``.
    """
    from .evaluate import diffusion_step, evaluate

    if not heads and COMMIT_POLICIES.entry(policy, "policy").spec.heads:
        policy_args, heads = policy_args_and_heads(policy, policy_args)  # from policy_args.head_path
    temperature = 0.0 if cfg.decode.method == "greedy" else float(cfg.decode.temperature)
    step = diffusion_step(model, tok, gen_len=cfg.decode.max_new_tokens, policy=policy, policy_args=policy_args,
                          heads=heads, temperature=temperature, attention=cfg.model.attention,
                          block_size=cfg.model.block_size)
    m, samples = evaluate(step, task, tok, prompt_len=cfg.data.prompt_len, batch_size=cfg.decode.batch_size,
                          num_examples=num_examples or cfg.data.num_eval, overlong=cfg.data.overlong,
                          key=jax.random.key(cfg.train.seed), sample_stats=("nfe",))
    keys = ("exact_match", "mean_nfe", "tokens_per_nfe", "mean_length", "wall_s", "tokens_per_s", "compile_s",
            "num_examples", "overlong_prompts", "format_ok")
    return {"policy": policy, **{k: m[k] for k in keys if k in m}}, samples


def policy_args_and_heads(policy: str, policy_args=None):
    """``(policy args dataclass, heads or None)``: for a policy with learned heads (``learn2pd``, ``tracelock``) the
    heads are loaded from ``policy_args.head_path`` (the run directory of ``jaxtok train configs/heads/<policy>.yaml``,
    :func:`jaxtok.models.heads.load_policy_heads`)."""
    args = policy_args_of(policy, policy_args)
    needed = COMMIT_POLICIES.entry(policy, "decode.policy").spec.heads
    if not needed:
        return args, None
    head_path = getattr(args, "head_path", None)
    if not head_path:
        raise ConfigError(f"decode.policy={policy!r} needs learned heads {list(needed)}: set "
                          f"decode.policy_args.head_path=<run dir of jaxtok train configs/heads/{policy}.yaml>")
    from jaxtok.models.heads import load_policy_heads

    heads = load_policy_heads(head_path)
    missing = [h for h in needed if h not in heads]
    if missing:
        raise ConfigError(f"decode.policy_args.head_path={head_path!r} holds heads {sorted(heads)}; policy "
                          f"{policy!r} needs {list(needed)}")
    return args, heads
