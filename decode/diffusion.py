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

The step is :func:`denoise_step` (``state -> state`` over :class:`_State`); the commit policy arrives resolved once
(:class:`CommitPolicy`: its rule, parsed arguments and :class:`jaxtok.specs.CommitPolicySpec`), and the loop wires
its hooks — block rule, window, hidden states, lookahead and verifier forwards — by reading that spec, never by its
name. Where the step's logits come from is the cache mode's forward strategy (:data:`FORWARDS`), chosen once outside
the loop.

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

``dual`` and ``block`` have logits only inside the block: they serve policies whose spec is ``block_local``
(``block``: with fixed blocks); policies whose spec needs full forwards (``full_forward_only``) take ``none``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.models import KVCache, check_token_ids
from jaxtok.registry import COMMIT_POLICIES, ConfigError
from jaxtok.sampling import first_true_index, gumbel_argmax
from jaxtok.specs import CommitPolicySpec

from . import commit_policies  # noqa: F401  (registers the policies)
from .commit_policies import Decision, LoopSpec, SamplerArgs, StepInfo

DEFAULT_MASK_ID = 3
DEFAULT_STOP_IDS = (2,) + tuple(range(4, 11))  # <eos> and the Rainbow pads <pad_1..7> of the task tokenizer


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
    """The loop carry of :func:`denoise_step` (``L = P + N``)."""

    x: jax.Array  # [B, L] prompt, then the generated positions (mask_id until committed)
    commit_step: jax.Array  # [B, N] step at which each position was committed (-1: not yet)
    step: jax.Array  # [] loop iterations so far
    nfe: jax.Array  # [B] forwards each row took part in
    done: jax.Array  # [B]
    lo: jax.Array  # [B] active block [lo, hi) in generation indices
    hi: jax.Array  # [B]
    block_step: jax.Array  # [B] steps spent in the active block
    block_masks: jax.Array  # [B] masked positions of the active block when it started
    pstate: Any  # the commit policy's carry (CommitPolicySpec.init_state)
    fwd: Any  # the forward strategy's carry (its KV cache; None without one)


def trajectory_state(tokens: jax.Array, commit_step: jax.Array, step, mask_id: int = DEFAULT_MASK_ID) -> jax.Array:
    """``x^(step)``: the generated part after ``step`` denoising steps (``0`` = all masks): positions committed at a
    step ``< step`` show their token, the rest ``mask_id``. ``[B, N]``."""
    shown = (commit_step >= 0) & (commit_step < step)
    return jnp.where(shown, tokens, mask_id)


@dataclasses.dataclass(frozen=True)
class CommitPolicy:
    """A commit policy resolved once (issue 16): the registered ``name``, its rule ``fn(info, args, state, spec,
    heads) -> Decision`` (:mod:`.commit_policies`), the loop hooks it declares (``spec``,
    :class:`jaxtok.specs.CommitPolicySpec`) and its parsed ``args`` (a :class:`SamplerArgs` subclass). Hashable:
    the jitted loop takes it as a static argument. Built by :func:`commit_policy` (or :func:`policy_and_heads`,
    which also loads the learned heads it needs)."""

    name: str
    fn: Callable[..., Any]
    spec: CommitPolicySpec
    args: SamplerArgs


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


def in_block(s: _State, idx: jax.Array) -> jax.Array:
    """``[B, N]``: generation indices ``idx [1, N]`` inside each row's active block ``[lo, hi)``."""
    return (idx >= s.lo[:, None]) & (idx < s.hi[:, None])


def block_starts(s: _State, masked: jax.Array, idx: jax.Array):
    """``(new [B], start [B])``: rows whose active block has no masks left start a block at their first mask."""
    new = ~jnp.any(masked & in_block(s, idx), axis=-1) & jnp.any(masked, axis=-1)
    return new, first_true_index(masked)


def set_blocks(s: _State, masked: jax.Array, new: jax.Array, start: jax.Array, end: jax.Array, idx) -> _State:
    """Rows in ``new`` move their active block to ``[start, max(end, start + 1))`` with a fresh step count."""
    lo = jnp.where(new, start, s.lo)
    hi = jnp.where(new, jnp.maximum(end, start + 1), s.hi)
    block = (idx >= lo[:, None]) & (idx < hi[:, None])
    return dataclasses.replace(
        s, lo=lo, hi=hi, block_step=jnp.where(new, 0, s.block_step),
        block_masks=jnp.where(new, jnp.sum(masked & block, axis=-1), s.block_masks).astype(jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# The loop: constants of one call, the step, and one forward strategy per cache mode
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Loop:
    """Everything a step reads besides its state: the model (``graphdef``/``model_state``), the policy and its
    ``heads``, the static :class:`LoopSpec`, and the prompt layout (``[B, L]`` validity and positions of the
    left-padded ``x``; ``plen``/``pad`` ``[B]`` prompt tokens and padding; ``gen_cols [B, N]`` the columns whose
    logits predict the generated positions, shifted left by one for AR-adapted models)."""

    graphdef: Any
    model_state: Any
    heads: Mapping[str, nnx.Module]
    policy: CommitPolicy
    spec: LoopSpec
    temperature: float
    attention: str
    block_size: Optional[int]
    pad_id: int
    rng: jax.Array
    prompt_valid: jax.Array  # [B, P]
    full_valid: jax.Array  # [B, L]
    positions: jax.Array  # [B, L]
    gen_cols: jax.Array  # [B, N]
    plen: jax.Array  # [B]
    pad: jax.Array  # [B]
    idx: jax.Array  # [1, N] generation indices
    stop: jax.Array  # [S] terminator ids

    @classmethod
    def of(cls, graphdef, model_state, heads, prompt_valid, rng, *, policy, spec, temperature, attention,
           block_size, pad_id) -> "_Loop":
        b, p = prompt_valid.shape
        n = spec.gen_len
        shift = 1 if policy.args.shift_logits else 0
        plen = jnp.sum(prompt_valid, axis=1).astype(jnp.int32)  # [B]
        full_valid = jnp.concatenate([prompt_valid, jnp.ones((b, n), bool)], axis=1)  # [B, L]
        return cls(graphdef=graphdef, model_state=model_state, heads=heads, policy=policy, spec=spec,
                   temperature=temperature, attention=attention, block_size=block_size, pad_id=pad_id, rng=rng,
                   prompt_valid=prompt_valid, full_valid=full_valid,
                   positions=jnp.maximum(jnp.cumsum(full_valid, axis=1, dtype=jnp.int32) - 1, 0),
                   gen_cols=jnp.broadcast_to(p + jnp.arange(n, dtype=jnp.int32) - shift, (b, n)),
                   plen=plen, pad=(p - plen).astype(jnp.int32), idx=jnp.arange(n, dtype=jnp.int32)[None, :],
                   stop=jnp.asarray(spec.stop_ids if spec.stop_ids else (-1,), jnp.int32))

    b = property(lambda self: self.prompt_valid.shape[0])
    p = property(lambda self: self.prompt_valid.shape[1])
    n = property(lambda self: self.spec.gen_len)
    length = property(lambda self: self.p + self.spec.gen_len)
    mask = property(lambda self: self.spec.mask_id)
    aligned = property(lambda self: self.attention == "block_causal")  # blocks follow the model's position blocks
    bs = property(lambda self: self.block_size or 1)

    @property
    def cap(self) -> int:
        """The most steps the loop runs (module docstring)."""
        nb_max = math.ceil(self.n / self.spec.block_len) + 1
        return max(self.n, nb_max * self.spec.steps_per_block) + nb_max

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.model_state)

    def full_logits(self, x: jax.Array, visible: Optional[jax.Array] = None):
        """``(logits [B, N, V], hidden [B, N, D] or None)`` of a full forward of ``x``; ``visible [B, N]``: only
        those generated positions are attended (Dystruct's window). CFG (``cfg_scale`` w > 0, LLaDA's unsupervised
        guidance): one batched 2B forward, ``uncond + (w + 1)(cond − uncond)`` with the prompt masked out."""
        model, b, p, args = self.model(), self.b, self.p, self.policy.args
        kw = dict(attention=self.attention, block_size=self.block_size)
        fv = self.full_valid if visible is None else jnp.concatenate([self.prompt_valid, visible], axis=1)  # [B, L]
        if args.cfg_scale > 0:
            un_x = x.at[:, :p].set(jnp.where(self.prompt_valid, self.mask, x[:, :p]))
            out = model(jnp.concatenate([x, un_x]), valid=jnp.concatenate([fv, fv]),
                        logits_at=jnp.concatenate([self.gen_cols, self.gen_cols]), **kw)
            cond, uncond = out.logits[:b], out.logits[b:]
            return uncond + (args.cfg_scale + 1.0) * (cond - uncond), None
        if self.policy.spec.needs_hidden:
            out = model(x, valid=fv, logits_at=self.gen_cols, return_hidden=True, **kw)
            return out.logits, out.hidden[:, p:]
        return model(x, valid=fv, logits_at=self.gen_cols, **kw).logits, None

    def lookahead(self, x, pos, tok):
        """``[B, C, N, V]`` logits of C copies of ``x``, copy c with ``tok[:, c]`` committed at ``pos[:, c]``."""
        b, p, c = self.b, self.p, pos.shape[1]
        cand = jnp.where(self.idx[:, None, :] == pos[..., None], tok[..., None], x[:, None, p:])  # [B, C, N]
        xs = jnp.concatenate([jnp.broadcast_to(x[:, None, :p], (b, c, p)), cand], axis=-1).reshape(b * c, self.length)
        rep = lambda a: jnp.repeat(a, c, axis=0)  # noqa: E731
        logits = self.model()(xs, valid=rep(self.full_valid), attention=self.attention, block_size=self.block_size,
                              logits_at=rep(self.gen_cols)).logits
        return logits.at[..., self.mask].set(-jnp.inf).reshape(b, c, self.n, -1)

    def verify_ar(self, x, drafts, start):
        """``[B, K, V]``: the model in AR mode (causal attention) predicting generation index ``start + c`` of copy
        c, whose masked positions before it hold ``drafts`` (one batched forward of K copies)."""
        b, p, kb, length = self.b, self.p, self.spec.block_len, self.length
        c = jnp.arange(kb, dtype=jnp.int32)
        gen = x[:, p:]
        filled = jnp.where(gen == self.mask, drafts, gen)
        cand = jnp.where(self.idx[:, None, :] < (start[:, None] + c[None, :])[..., None], filled[:, None],
                         gen[:, None])
        xs = jnp.concatenate([jnp.broadcast_to(x[:, None, :p], (b, kb, p)), cand], -1).reshape(b * kb, length)
        at = jnp.clip(p + start[:, None] + c[None, :], 0, length - 1).reshape(b * kb, 1)
        rep = lambda a: jnp.repeat(a, kb, axis=0)  # noqa: E731
        logits = self.model()(xs, valid=rep(self.full_valid), attention="causal", logits_at=at).logits
        return logits.at[..., self.mask].set(-jnp.inf).reshape(b, kb, -1)

    def step_heads(self, x: jax.Array) -> Mapping[str, Any]:
        """The ``heads`` the policy sees this step: its learned modules, plus the model hooks its spec asks for
        (``lookahead``: :meth:`lookahead`, ``verifier``: ``verify`` = :meth:`verify_ar`, both at state ``x``)."""
        hooks = {}
        if self.policy.spec.lookahead:
            hooks["lookahead"] = functools.partial(self.lookahead, x)
        if self.policy.spec.verifier:
            hooks["verify"] = functools.partial(self.verify_ar, x)
        return dict(self.heads, **hooks) if hooks else self.heads

    def init(self, prompt: jax.Array, fwd: Any) -> _State:
        """All generated positions masked, no block yet (the first step starts one in every row)."""
        b, n = self.b, self.n
        x = jnp.concatenate([jnp.where(self.prompt_valid, prompt, self.pad_id), jnp.full((b, n), self.mask, jnp.int32)],
                            axis=1)
        zeros = jnp.zeros((b,), jnp.int32)
        init_state = self.policy.spec.init_state
        return _State(x=x, commit_step=jnp.full((b, n), -1, jnp.int32), step=jnp.zeros((), jnp.int32), nfe=zeros,
                      done=jnp.zeros((b,), bool), lo=zeros, hi=zeros, block_step=zeros, block_masks=zeros,
                      pstate=init_state(b, n, self.policy.args) if init_state else {}, fwd=fwd)

    def result(self, s: _State) -> DiffusionResult:
        gen = s.x[:, self.p:]
        first = first_true_index(jnp.isin(gen, self.stop))
        return DiffusionResult(tokens=gen, valid=self.idx <= first[:, None], lengths=jnp.minimum(first + 1, self.n),
                               done=s.done, nfe=s.nfe, commit_step=s.commit_step, num_steps=s.step,
                               policy_state=s.pstate)


def denoise_step(c: _Loop, forward: "_Forward", s: _State) -> _State:
    """One denoising step of every row (module docstring): block pointers, the forward strategy's logits, proposals
    and confidences, the commit policy's decision, then :func:`_commit`."""
    hooks = c.policy.spec
    masked = (s.x[:, c.p:] == c.mask) & ~s.done[:, None]  # [B, N]
    live = jnp.any(masked, axis=-1)  # [B]
    visible = (c.idx < s.pstate["window"][:, None]) if hooks.window else None  # [B, N] Dystruct's window
    if hooks.window:  # a live row whose window is used up still runs (its policy widens the window)
        masked = masked & visible
    keys = _row_keys(c.rng, s.step, c.b)
    new, start = block_starts(s, masked, c.idx)
    if hooks.block_rule is None:
        s = set_blocks(s, masked, new, start, fixed_block_end(start, c.plen, c.spec.block_len, c.n, c.aligned), c.idx)
    logits, hidden, fwd, extra_nfe = forward.logits_and_hidden(c, s, new, live, visible)
    logits = logits.at[..., c.mask].set(-jnp.inf)  # the mask token is never a proposal
    x0 = sample_x0(logits, keys, c.temperature)
    conf = confidence(logits, x0)
    is_stop = jnp.isin(x0, c.stop)

    def info(st, eligible):
        return StepInfo(logits=logits, x0=x0, conf=conf, eligible=eligible, masked=masked, is_stop=is_stop,
                        lo=st.lo, hi=st.hi, block_step=st.block_step, block_masks=st.block_masks, step=st.step,
                        keys=keys, hidden=hidden)

    if hooks.block_rule is not None:
        s = set_blocks(s, masked, new, start, hooks.block_rule(info(s, masked), c.policy.args, start, c.spec), c.idx)
    dec = c.policy.fn(info(s, masked & in_block(s, c.idx)), c.policy.args, s.pstate, c.spec, c.step_heads(s.x))
    if dec.nfe is not None:
        extra_nfe = extra_nfe + dec.nfe * live
    return _commit(c, dataclasses.replace(s, fwd=fwd), dec, masked, live, extra_nfe)


def _commit(c: _Loop, s: _State, dec: Decision, masked: jax.Array, live: jax.Array, extra_nfe: jax.Array) -> _State:
    """``x = where(commit, x0, x)`` on masked positions, the commit steps, NFE and ``done`` (no masks left, or
    ``stop_early`` and a committed terminator with every earlier position decoded: the rest is ``pad_id``); finished
    rows keep their policy carry."""
    b, n = c.b, c.n
    commit = dec.commit & masked
    gen = jnp.where(commit, dec.x0, s.x[:, c.p:])
    commit_step = jnp.where(commit, s.step, s.commit_step)
    done = s.done | ~jnp.any(gen == c.mask, axis=-1)
    if c.policy.args.stop_early:
        first = first_true_index(jnp.isin(gen, c.stop))  # committed terminators (masks never match)
        finished = (first < n) & ~jnp.any((gen == c.mask) & (c.idx < first[:, None]), axis=-1) & ~s.done
        fill = finished[:, None] & (c.idx > first[:, None]) & (gen == c.mask)
        gen = jnp.where(fill, c.pad_id, gen)
        commit_step = jnp.where(fill, s.step, commit_step)
        done = done | finished
    pstate = jax.tree.map(lambda new, old: jnp.where(live.reshape((b,) + (1,) * (new.ndim - 1)), new, old),
                          dec.state, s.pstate)
    return dataclasses.replace(
        s, x=s.x.at[:, c.p:].set(gen), commit_step=commit_step, step=s.step + 1,
        nfe=s.nfe + live.astype(jnp.int32) + extra_nfe, done=done,
        block_step=s.block_step + live.astype(jnp.int32), pstate=pstate)


class _Forward(abc.ABC):
    """How a step gets its logits (one strategy per ``SamplerArgs.cache``, chosen once outside the loop).

    ``init(c)`` is the strategy's carry (its KV cache); ``logits_and_hidden(c, s, new, live, visible)`` returns
    ``(logits [B, N, V], hidden [B, N, D] or None, carry, extra_nfe [B])`` for state ``s`` (blocks already set
    for fixed-block policies; ``new [B]`` rows starting a block this step, ``live [B]`` rows with masks left,
    ``visible [B, N]`` Dystruct's window or None); its refresh rule decides when the cache is rebuilt."""

    def init(self, c: _Loop) -> Any:
        return None

    @abc.abstractmethod
    def logits_and_hidden(self, c: _Loop, s: _State, new, live, visible):
        """One step's ``(logits [B, N, V], hidden or None, carry, extra_nfe [B])``; every cache mode defines it."""


class _NoCache(_Forward):
    """``cache='none'``: a full forward of every position every step (:meth:`_Loop.full_logits`)."""

    def logits_and_hidden(self, c, s, new, live, visible):
        logits, hidden = c.full_logits(s.x, visible)
        return logits, hidden, None, jnp.zeros((c.b,), jnp.int32)


@dataclasses.dataclass(frozen=True)
class _FastDLLMCache(_Forward):
    """``cache='prefix'`` / ``'dual'`` (Fast-dLLM, §B10, approximate): refreshed by a full forward whenever a live
    row starts a block; other steps recompute only a window over the cache — ``prefix``: from the block start to
    the end, ``dual``: the block."""

    prefix: bool

    def width(self, c: _Loop) -> int:
        """Window columns: the generation (prefix, or adaptive blocks) or one block; on a block-causal model room
        for the rest of the position blocks the window touches (prompt tail included)."""
        width = c.n if (self.prefix or c.policy.spec.block_rule is not None) else min(c.spec.block_len, c.n)
        return width + 2 * (c.bs - 1) if c.aligned else width

    def init(self, c):
        return KVCache.init(c.model().cfg, c.b, c.length + self.width(c))

    def refresh(self, c: _Loop, x):
        """A full forward writing every position's keys (and this step's logits)."""
        model = c.model()
        out = model(x, valid=c.full_valid, attention=c.attention, block_size=c.block_size,
                    cache=KVCache.init(model.cfg, c.b, c.length + self.width(c)), logits_at=c.gen_cols)
        return out.logits, out.cache

    def window(self, c: _Loop, x, cache, lo, hi):
        """Logits of the window from the block start (prefix: to the end; dual: the block) over the refreshed
        cache, whose slots for the window's own columns are hidden (positions -1). On a block-causal model the window
        is widened to whole position blocks (:func:`window_columns`): the prompt's tail (a prompt ending inside a
        position block) and any other column sharing a position block with the active block attend to it, so their
        keys change as it is decoded and must be recomputed, not read stale from the cache."""
        b, p, length, width = c.b, c.p, c.length, self.width(c)
        end = jnp.broadcast_to(length if self.prefix else p + hi, (b,))
        c0, end = window_columns(p + lo, end, c.pad, c.bs if c.aligned else None, length)  # [B], [B]
        cols = c0[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [B, W]
        slot = jnp.arange(cache.capacity)[None, :]
        hide = (slot >= c0[:, None]) & (slot < end[:, None])
        view = dataclasses.replace(cache, positions=jnp.where(hide, -1, cache.positions))
        safe = jnp.clip(cols, 0, length - 1)
        out = c.model()(jnp.take_along_axis(x, safe, axis=1), positions=jnp.take_along_axis(c.positions, safe, axis=1),
                        valid=cols < end[:, None], attention=c.attention, block_size=c.block_size, cache=view)
        off = jnp.clip(p + c.idx - c0[:, None], 0, width - 1)
        return jnp.take_along_axis(out.logits, off[..., None], axis=1)  # [B, N, V]; exact in the window

    def logits_and_hidden(self, c, s, new, live, visible):
        logits, cache = jax.lax.cond(jnp.any(new & live), lambda: self.refresh(c, s.x),
                                     lambda: (self.window(c, s.x, s.fwd, s.lo, s.hi), s.fwd))
        return logits, None, cache, jnp.zeros((c.b,), jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _BlockCarry:
    cache: KVCache
    base: jax.Array  # [B] cache slots kept
    kb: jax.Array  # [B] position block the cache is prepared for


class _BlockCache(_Forward):
    """``cache='block'``: the exact block KV cache of a block-causal model. Positions before the previous block
    live in the cache; each step runs the window (previous block, current block) and rolls the cache back. A row
    entering its next block keeps the previous block's (now final) keys; any other move refills the cache from the
    full sequence (one extra NFE)."""

    def capacity(self, c: _Loop) -> int:
        return c.length + c.n + 4 * c.bs

    def init(self, c):
        zeros = jnp.zeros((c.b,), jnp.int32)
        return _BlockCarry(KVCache.init(c.model().cfg, c.b, self.capacity(c)), zeros,
                           jnp.full((c.b,), -(10**6), jnp.int32))

    def refill(self, c: _Loop, x, kb):
        """A fresh cache holding every row's positions before block ``kb - 1``."""
        model = c.model()
        cache = KVCache.init(model.cfg, c.b, self.capacity(c))
        keep = c.full_valid & (c.positions < ((kb - 1) * c.bs)[:, None])
        out = model(x, positions=c.positions, valid=keep, attention=c.attention, block_size=c.block_size,
                    cache=cache, return_logits=False)
        return out.cache, jnp.full((c.b,), c.length, jnp.int32)

    def window(self, c: _Loop, x, cache, base, kb):
        """Logits of block ``kb`` of every row from the window (block kb-1, block kb) over the cached prefix."""
        b, bs, length = c.b, c.bs, c.length
        wpos = ((kb - 1) * bs)[:, None] + jnp.arange(2 * bs, dtype=jnp.int32)[None, :]  # [B, 2bs]
        cols = wpos + c.pad[:, None]
        wvalid = (wpos >= 0) & (cols < length)
        tokens = jnp.where(wvalid, jnp.take_along_axis(x, jnp.clip(cols, 0, length - 1), axis=1), c.pad_id)
        at = jnp.broadcast_to(bs + jnp.arange(bs, dtype=jnp.int32) - (1 if c.policy.args.shift_logits else 0),
                              (b, bs))
        out = c.model()(tokens, positions=jnp.maximum(wpos, 0), valid=wvalid, attention=c.attention,
                        block_size=c.block_size, cache=cache.rollback(base), logits_at=at)
        off = jnp.clip(c.plen[:, None] + c.idx - (kb * bs)[:, None], 0, bs - 1)  # [B, N] -> window offset
        logits = jnp.take_along_axis(out.logits, off[..., None], axis=1)  # [B, N, V]; exact inside block kb
        return logits, out.cache

    def logits_and_hidden(self, c, s, new, live, visible):
        kb = (c.plen + s.lo) // c.bs
        prev = s.fwd
        advance = kb == prev.kb + 1
        need = ~jnp.all((kb == prev.kb) | advance | ~live)  # some live row left the cached block pair: refill

        def do_refill(_):
            cache, base = self.refill(c, s.x, kb)
            return cache, base, kb

        def do_advance(_):
            return prev.cache, jnp.where(advance, prev.base + c.bs, prev.base), jnp.where(advance, kb, prev.kb)

        cache, base, cached_kb = jax.lax.cond(need, do_refill, do_advance, None)
        logits, cache = self.window(c, s.x, cache, base, kb)
        return logits, None, _BlockCarry(cache, base, cached_kb), jnp.where(need & live, 1, 0)


FORWARDS: Mapping[str, _Forward] = {"none": _NoCache(), "prefix": _FastDLLMCache(prefix=True),
                                    "dual": _FastDLLMCache(prefix=False), "block": _BlockCache()}


@functools.partial(jax.jit, static_argnames=("graphdef", "head_defs", "policy", "spec", "temperature",
                                             "attention", "block_size", "pad_id"))
def _diffusion_jit(graphdef, model_state, head_defs, head_states, prompt, prompt_valid, rng, *, policy, spec,
                   temperature, attention, block_size, pad_id):
    """The sampler loop: :func:`denoise_step` under ``lax.while_loop`` until every row is done or the cap."""
    heads = {name: nnx.merge(d, s) for name, d, s in zip(head_defs[0], head_defs[1], head_states)}
    c = _Loop.of(graphdef, model_state, heads, prompt_valid, rng, policy=policy, spec=spec, temperature=temperature,
                 attention=attention, block_size=block_size, pad_id=pad_id)
    forward = FORWARDS[policy.args.cache]  # the cache mode's strategy, chosen once
    step = functools.partial(denoise_step, c, forward)
    state = jax.lax.while_loop(lambda s: (s.step < c.cap) & ~jnp.all(s.done), step, c.init(prompt, forward.init(c)))
    return c.result(state)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def commit_policy(policy: Union[str, CommitPolicy], policy_args=None, **overrides) -> CommitPolicy:
    """The one place a commit policy's arguments are parsed: ``policy`` (a ``COMMIT_POLICIES`` name) with
    ``policy_args`` (its dataclass, a mapping checked like a config, or None: defaults) as a :class:`CommitPolicy`.
    A :class:`CommitPolicy` is returned as it is (``policy_args`` must then be None). ``overrides`` that are not None
    replace argument fields (``block_len=``, ``steps=``)."""
    if isinstance(policy, CommitPolicy):
        if policy_args is not None:
            raise ConfigError(f"policy_args: the commit policy {policy.name!r} is already resolved with its "
                              f"arguments; got policy_args={policy_args!r} too")
        resolved = policy
    else:
        entry = COMMIT_POLICIES.entry(policy, "policy")
        if policy_args is None or isinstance(policy_args, Mapping):
            policy_args = COMMIT_POLICIES.parse_args(policy, policy_args, "policy_args")
        elif not isinstance(policy_args, entry.config_cls):
            raise ConfigError(f"policy_args: {type(policy_args).__name__} is not the arguments of policy {policy!r} "
                              f"({entry.config_cls.__name__})")
        resolved = CommitPolicy(policy, entry.fn, entry.spec, policy_args)
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(resolved, args=dataclasses.replace(resolved.args, **changes)) if changes else resolved


def policy_and_heads(policy: Union[str, CommitPolicy], policy_args=None):
    """``(CommitPolicy, heads or None)`` (:func:`commit_policy`); for a policy with learned heads (``learn2pd``,
    ``tracelock``) the heads are loaded from ``policy_args.head_path`` (the run directory of ``jaxtok train
    configs/heads/<policy>.yaml``, :func:`jaxtok.models.heads.load_policy_heads`)."""
    resolved = commit_policy(policy, policy_args)
    needed, name = resolved.spec.heads, resolved.name
    if not needed:
        return resolved, None
    head_path = getattr(resolved.args, "head_path", None)
    if not head_path:
        raise ConfigError(f"decode.policy={name!r} needs learned heads {list(needed)}: set "
                          f"decode.policy_args.head_path=<run dir of jaxtok train configs/heads/{name}.yaml>")
    from jaxtok.models.heads import load_policy_heads

    heads = load_policy_heads(head_path)
    missing = [h for h in needed if h not in heads]
    if missing:
        raise ConfigError(f"decode.policy_args.head_path={head_path!r} holds heads {sorted(heads)}; policy "
                          f"{name!r} needs {list(needed)}")
    return resolved, heads


def check_policy(policy: CommitPolicy, *, attention: str, block_size: Optional[int], shift_logits: bool,
                 heads: Optional[Mapping[str, nnx.Module]]) -> None:
    """ConfigError when the policy's hooks (its spec) or arguments do not fit the cache mode (§B10), CFG, the
    model's attention, or the ``heads`` given."""
    name, spec, args = policy.name, policy.spec, policy.args
    if args.cache != "none" and spec.full_forward_only:
        raise ConfigError(f"policy {name!r} reads full-sequence forwards (lookahead / hidden states): use "
                          f"cache='none'")
    if args.cfg_scale > 0 and spec.needs_hidden:
        raise ConfigError(f"policy {name!r} reads hidden states: cfg_scale must be 0, got {args.cfg_scale}")
    if args.cache != "none" and (args.cfg_scale > 0 or args.shift_logits or shift_logits):
        raise ConfigError(f"policy_args.cache={args.cache!r} does not support cfg_scale or shifted logits "
                          f"(cfg_scale={args.cfg_scale}, shift_logits={args.shift_logits or shift_logits})")
    if args.cache == "dual" and not spec.block_local:
        raise ConfigError(f"policy_args.cache='dual' has logits only inside the block; policy={name!r} reads "
                          f"beyond it (allowed: {_block_local()}; use cache='prefix')")
    if args.cache == "block":
        if attention != "block_causal":
            raise ConfigError("policy_args.cache='block' is the exact cache of block-causal models: needs "
                              "attention='block_causal'")
        if args.block_len != block_size:
            raise ConfigError(f"policy_args.cache='block': block_len={args.block_len} must equal the model's "
                              f"block_size={block_size}")
        if not spec.block_local or spec.block_rule is not None:
            raise ConfigError(f"policy_args.cache='block' supports policies "
                              f"{_block_local(fixed_blocks=True)}; got {name!r}")
    missing = [h for h in spec.heads if not heads or h not in heads]
    if missing:
        raise ConfigError(f"policy {name!r} needs heads {missing} (pass heads={{name: module}})")


def _block_local(fixed_blocks: bool = False) -> list[str]:
    """Commit policies whose spec says they read only the active block (``fixed_blocks``: without a block rule)."""
    return [n for n in COMMIT_POLICIES.names() if COMMIT_POLICIES.entry(n).spec.block_local
            and not (fixed_blocks and COMMIT_POLICIES.entry(n).spec.block_rule is not None)]


def diffusion_generate(
    model: nnx.Module,
    prompt,
    prompt_valid,
    *,
    gen_len: int,
    policy: Union[str, CommitPolicy] = "llada",
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
      policy: a resolved :class:`CommitPolicy` (:func:`commit_policy` / :func:`policy_and_heads`: its arguments
        are used as they are, nothing is parsed again; ``policy_args`` must be None), or a ``COMMIT_POLICIES`` name
        with ``policy_args``: its dataclass, a mapping, or None (defaults).
      block_len, steps: override ``policy_args.block_len`` / ``.steps`` when given.
      temperature: Python float; 0 = argmax proposals.
      rng: PRNG key (step s, row r use ``fold_in(fold_in(rng, s), r)``: rows are batch-invariant).
      mask_id: default the model config's ``mask_token_id`` (3 without one).
      stop_tokens: terminators (default ``<eos>`` and the Rainbow pads 4..10).
      pad_id: prompt padding and ``stop_early`` fill.
      attention: ``bidirectional`` (LLaDA/MDLM) or ``block_causal`` with ``block_size`` (then blocks follow the
        model's position blocks, and ``block_len`` defaults to ``block_size`` when ``policy`` is a name and
        ``policy_args`` sets no ``block_len``).
      heads: learned modules a policy needs, e.g. ``{"filter": FilterHead}`` for ``learn2pd``.
    """
    if block_len is None and attention == "block_causal" and block_size and not isinstance(policy, CommitPolicy) and (
            policy_args is None or (isinstance(policy_args, Mapping) and "block_len" not in policy_args)):
        block_len = block_size
    policy = commit_policy(policy, policy_args, block_len=block_len, steps=steps)
    args, cfg = policy.args, model.cfg
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
    check_policy(policy, attention=attention, block_size=block_size, shift_logits=bool(cfg.shift_logits), heads=heads)
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
                          jnp.asarray(prompt_valid, bool), rng, policy=policy, spec=spec,
                          temperature=float(temperature), attention=attention,
                          block_size=int(block_size) if block_size else None, pad_id=int(pad_id))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer terminators
# ----------------------------------------------------------------------------------------------------------------


def stop_ids_of(tok) -> tuple[int, ...]:
    """Terminators of a tokenizer: its end-of-sequence ids and its Rainbow pads (B20)."""
    from jaxtok.tasks.tokenizer import SpecialTokens

    sp = SpecialTokens.of(tok)
    return tuple(sp.eos_ids) + tuple(sp.rainbow_pads)
