"""Continuous batching of speculative decoding: a slot engine and a dynamic-arrival host loop (FASER, §A7).

The engine keeps ``B`` slots in the speculative loop's state (:class:`~jaxtok.decode.speculative.SpecState`: one
committed buffer, KV caches, drafter and policy state per row) and exposes two jitted steps:

- :meth:`SlotEngine.admit` — prefill one request into a free slot: the prompt (left-padded to the engine's ``P``)
  through target and drafter at batch 1 (:func:`~jaxtok.decode.speculative.spec_prefill`, the same prefill as
  :func:`~jaxtok.decode.speculative.speculative_generate`), its first token from the target, and the slot's
  row of every per-row buffer overwritten (cache, lengths, counters, the draft-length policy's state);
- :meth:`SlotEngine.run` — speculative rounds (:func:`~jaxtok.decode.speculative.spec_round`, the loop body of
  ``speculative_generate``) on all slots until ``rounds`` rounds ran or a row that was generating finished; empty
  and finished slots are frozen rows (masked, as finished rows are in ``speculative_generate``).

:func:`serve` is the host loop of a continuous-batching server: requests arrive at given times (e.g. a seeded
Poisson process, :func:`poisson_arrivals`), wait in a FIFO queue, are admitted into free slots, and leave when they
emit a stop token or reach their own ``max_new_tokens``. The clock is ``"wall"`` (measured seconds of the jitted
calls, idle gaps jump to the next arrival: a discrete-event simulation with measured service times) or
``"steps"`` (one unit per round and per admission: deterministic, for tests) or ``"model"`` (:class:`CostClock`:
target AR steps computed from each call's forward counts, deterministic and free of the machine's load). Per request: queueing delay, time to
first token (the first token comes from the admission prefill), end-to-end latency, tokens; overall: throughput
and the cost proxy (target forwards, verified positions, draft forwards).

Rows keep their own length caps (``limit [B]``) but share the static ``N`` (buffer size) and ``P`` (prompt width).
The AR baseline runs in the same engine with :class:`~jaxtok.decode.speculative.NoDrafter` (every round verifies
width 0: a target AR step).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtok.models import KVCache
from jaxtok.sampling import SamplingParams

from .draft_policies import DraftPolicy, Fixed
from .generate import DEFAULT_EOS_ID, DEFAULT_PAD_ID
from .rows import ALL_GREEDY
from .speculative import (
    ModelDrafter, DeerDrafter, RoutedDrafter, RoundConfig, SpecState, cfg_of, check_length,
    seq_layout, spec_prefill, spec_round, as_drafter, check_verify_chunk, verify_widths,
)


# ----------------------------------------------------------------------------------------------------------------
# Row writes
# ----------------------------------------------------------------------------------------------------------------


def _set_row(big: jax.Array, one: jax.Array, slot: jax.Array, axis: int = 0) -> jax.Array:
    """``big`` with its row ``slot`` along ``axis`` replaced by ``one`` (size 1 along ``axis``)."""
    return jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, axis=axis)


def write_row(big, one, slot: jax.Array):
    """Write a batch-1 pytree ``one`` into row ``slot`` of the batch-B pytree ``big`` (same structure): a
    :class:`KVCache`'s keys/values along axis 1 (``[L, B, S, ...]``), its positions/lengths and every other array
    leaf along axis 0; scalars (and None) keep ``big``'s value."""
    def one_leaf(b, o):
        if isinstance(b, KVCache):
            return KVCache(k=_set_row(b.k, o.k, slot, 1), v=_set_row(b.v, o.v, slot, 1),
                           positions=_set_row(b.positions, o.positions, slot), lengths=_set_row(b.lengths, o.lengths,
                                                                                               slot))
        if b is None or jnp.ndim(b) == 0:
            return b
        return _set_row(b, o, slot)

    return jax.tree.map(one_leaf, big, one, is_leaf=lambda x: isinstance(x, KVCache) or x is None)


# ----------------------------------------------------------------------------------------------------------------
# Jitted steps
# ----------------------------------------------------------------------------------------------------------------

_STATIC = ("target_graphdef", "max_new_tokens", "gamma_max", "stop_tokens", "pad_id", "greedy", "verify_chunk")


def _stop_array(stop_tokens):
    return jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _empty_jit(target_graphdef, target_state, drafter, policy, prompt, prompt_valid, key, params, *,
               max_new_tokens, gamma_max, stop_tokens, pad_id, greedy, verify_chunk):
    """All slots empty: a prefill of placeholder rows, every row done (frozen), counters at 0."""
    flag = ALL_GREEDY.set(bool(greedy))
    try:
        st = spec_prefill(target_graphdef, target_state, drafter, policy, prompt, prompt_valid, key, params,
                           n_new=max_new_tokens, gamma_max=gamma_max, stop=_stop_array(stop_tokens), pad_id=pad_id,
                           return_logprobs=False)
    finally:
        ALL_GREEDY.reset(flag)
    b = prompt.shape[0]
    # empty slots are frozen as "done" (finished stays True whatever the host's limit) until an admission
    return dataclasses.replace(st, done=jnp.ones((b,), bool), finished=jnp.ones((b,), bool),
                               count=jnp.zeros((b,), jnp.int32), target_forwards=jnp.int32(0),
                               draft_forwards=jnp.int32(0))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _admit_jit(target_graphdef, target_state, drafter, policy, state: SpecState, slot, prompt, prompt_valid, key,
               params, limit, *, max_new_tokens, gamma_max, stop_tokens, pad_id, greedy, verify_chunk):
    """Prefill ``prompt [1, P]`` into row ``slot`` of ``state`` (a fresh row: cache, counters, policy state)."""
    flag = ALL_GREEDY.set(bool(greedy))
    try:
        one = spec_prefill(target_graphdef, target_state, drafter, policy, prompt, prompt_valid, key, params,
                            n_new=max_new_tokens, gamma_max=gamma_max, stop=_stop_array(stop_tokens), pad_id=pad_id,
                            return_logprobs=False, limit=limit)
    finally:
        ALL_GREEDY.reset(flag)
    new = write_row(state, one, slot)
    return dataclasses.replace(new, target_forwards=state.target_forwards + one.target_forwards,
                               draft_forwards=state.draft_forwards + one.draft_forwards)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _run_jit(target_graphdef, target_state, drafter, policy, state: SpecState, rng, params, limit, max_rounds, *,
             max_new_tokens, gamma_max, stop_tokens, pad_id, greedy, verify_chunk):
    """Rounds of :func:`spec_round` until ``max_rounds`` ran, no row is generating, or a row that was generating
    at the call's start finished. Returns ``(state, rounds run)``."""
    flag = ALL_GREEDY.set(bool(greedy))
    try:
        p = state.seq.shape[1] - seq_layout(1, 0, max_new_tokens, gamma_max)[1]
        widths = verify_widths(policy, drafter, gamma_max, state.seq.shape[0])
        rc = RoundConfig(p=p, g=gamma_max, stop_tokens=stop_tokens, widths=widths, pad_id=pad_id, greedy=greedy,
                          verify_chunk=verify_chunk)
        started = ~state.finished

        def cond(c):
            i, st = c
            return (i < max_rounds) & jnp.any(~st.finished) & ~jnp.any(started & st.finished)

        def body(c):
            i, st = c
            return i + 1, spec_round(st, target_graphdef, target_state, drafter, policy, rng, params, limit, rc)

        i, st = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    finally:
        ALL_GREEDY.reset(flag)
    return st, i


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------


class SlotEngine:
    """``slots`` rows of the speculative loop for continuous batching (module docstring).

    Args:
      target: the verifier (a ``jaxtok.models.Decoder``); drafter: a :class:`Drafter` or a Decoder (as
        :func:`speculative_generate`; :class:`NoDrafter` for plain AR steps).
      slots: B; prompt_len: P (prompts are left-padded to it); max_new_tokens: N, the largest per-request cap.
      draft_len: γmax; policy: the draft-length policy (``faser`` reads the live-row count each round);
      sampling: one SamplingParams for every slot (temperature 0: greedy verification, token-identical to AR);
      verify_chunk: FASER frontier verification chunk (0 = off; greedy only).
    """

    def __init__(self, target: nnx.Module, drafter, *, slots: int, prompt_len: int, max_new_tokens: int,
                 draft_len: int = 4, policy: Optional[DraftPolicy] = None, sampling: SamplingParams = SamplingParams(),
                 stop_tokens: Sequence[int] = (DEFAULT_EOS_ID,), pad_id: int = DEFAULT_PAD_ID,
                 rng: Optional[jax.Array] = None, verify_chunk: int = 0):
        for name, v in (("slots", slots), ("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens),
                        ("draft_len", draft_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}: allowed a positive integer")
        self.drafter = as_drafter(drafter)
        self.policy = Fixed() if policy is None else policy
        if not isinstance(self.policy, DraftPolicy):
            raise ValueError(f"policy={self.policy!r}: allowed a DraftPolicy")
        self.policy.check(int(draft_len))
        if self.policy.needs_hidden and not self.drafter.has_hidden:
            raise ValueError(f"policy {type(self.policy).__name__} needs drafter hidden states")
        if self.drafter.vocab_size != target.cfg.vocab_size:
            raise ValueError(f"drafter: vocab_size {self.drafter.vocab_size} differs from the target's "
                             f"{target.cfg.vocab_size}")
        check_verify_chunk(verify_chunk, sampling)
        check_length("target", target.cfg, prompt_len, max_new_tokens, draft_len)
        for d in (self.drafter.drafters if isinstance(self.drafter, RoutedDrafter) else (self.drafter,)):
            if isinstance(d, (ModelDrafter, DeerDrafter)):
                check_length("drafter", cfg_of(d.graphdef, d.state), prompt_len, max_new_tokens, draft_len)
        self.slots, self.prompt_len, self.max_new_tokens, self.gamma_max = slots, prompt_len, max_new_tokens, draft_len
        self.graphdef, self.state_ = nnx.split(target)
        self.params = sampling.per_row(slots)
        self.params1 = sampling.per_row(1)
        self.rng = jax.random.key(0) if rng is None else rng
        self.pad_id = int(pad_id)
        self.static = dict(max_new_tokens=int(max_new_tokens), gamma_max=int(draft_len),
                           stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=self.pad_id,
                           greedy=bool(sampling.all_greedy), verify_chunk=int(verify_chunk))
        self.w = draft_len + 1  # emitted tokens of a row start at seq[w + P]

    def empty(self) -> SpecState:
        """Every slot empty (finished rows)."""
        b, p = self.slots, self.prompt_len
        prompt = jnp.full((b, p), self.pad_id, jnp.int32)
        valid = jnp.zeros((b, p), bool).at[:, -1].set(True)
        return _empty_jit(self.graphdef, self.state_, self.drafter, self.policy, prompt, valid,
                          jax.random.fold_in(self.rng, 0), self.params, **self.static)

    def admit(self, state: SpecState, slot: int, prompt, prompt_valid, limit: int, request_id: int) -> SpecState:
        """Prefill a request (``prompt / prompt_valid [P]``, left-padded) into ``slot``; ``limit`` its
        max_new_tokens (<= N). Its first token is drawn with ``fold_in(rng, 10**6 + request_id)``."""
        p = jnp.where(jnp.asarray(prompt_valid, bool), jnp.asarray(prompt, jnp.int32), self.pad_id)[None, :]
        return _admit_jit(self.graphdef, self.state_, self.drafter, self.policy, state, jnp.int32(slot), p,
                          jnp.asarray(prompt_valid, bool)[None, :], jax.random.fold_in(self.rng, 10 ** 6 + request_id),
                          self.params1, jnp.asarray([limit], jnp.int32), **self.static)

    def run(self, state: SpecState, limit: np.ndarray, rounds: int) -> tuple[SpecState, jax.Array]:
        """Up to ``rounds`` speculative rounds on every slot, stopping early when a generating row finishes.
        ``limit [B]``: each slot's max_new_tokens. Returns ``(state, rounds run)``."""
        return _run_jit(self.graphdef, self.state_, self.drafter, self.policy, state, self.rng, self.params,
                        jnp.asarray(limit, jnp.int32), jnp.int32(rounds), **self.static)

    def tokens(self, state: SpecState, slot: int) -> np.ndarray:
        """The emitted tokens of ``slot`` (its count of them)."""
        n = int(state.count[slot])
        start = self.w + self.prompt_len
        return np.asarray(state.seq[slot, start:start + n])


# ----------------------------------------------------------------------------------------------------------------
# Requests and the host loop
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """A request: ``prompt / valid [P]`` left-padded to the engine's prompt width, ``arrival`` time (clock units),
    ``max_new_tokens`` (<= the engine's N)."""

    prompt: np.ndarray
    valid: np.ndarray
    arrival: float
    max_new_tokens: int


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request: ``slot``, ``admit`` (its prefill started), ``first_token`` (prefill done),
    ``finish`` (the call in which it finished ended), ``tokens`` emitted."""

    arrival: float
    admit: float = float("nan")
    first_token: float = float("nan")
    finish: float = float("nan")
    slot: int = -1
    tokens: Optional[np.ndarray] = None

    @property
    def queueing(self) -> float:
        return self.admit - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def latency(self) -> float:
        return self.finish - self.arrival


@dataclasses.dataclass
class ServeResult:
    """:func:`serve`'s output: one :class:`RequestRecord` per request (input order), the clock at the end
    (``makespan``), ``busy`` (clock spent in jitted calls), the engine's cost counters (``target_forwards``,
    ``verify_positions`` = verified positions per row summed over rounds, ``draft_forwards``, ``rounds``,
    ``admits``) and the acceptance counters summed over requests (``accepted``, ``drafted``)."""

    records: list
    makespan: float
    busy: float
    target_forwards: int
    verify_positions: int
    draft_forwards: int
    rounds: int
    admits: int
    accepted: int
    drafted: int

    def summary(self) -> dict:
        """Host-side metrics (JSON-ready): mean / p50 / p95 of latency, TTFT and queueing, tokens, throughput
        (tokens per clock unit from the first arrival to the last finish)."""
        lat = np.array([r.latency for r in self.records])
        ttft = np.array([r.ttft for r in self.records])
        q = np.array([r.queueing for r in self.records])
        toks = int(sum(len(r.tokens) for r in self.records))
        span = max(r.finish for r in self.records) - min(r.arrival for r in self.records)
        return {
            "requests": len(self.records), "tokens": toks, "throughput": toks / max(span, 1e-12), "span": span,
            "latency_mean": float(lat.mean()), "latency_p50": float(np.percentile(lat, 50)),
            "latency_p95": float(np.percentile(lat, 95)), "ttft_mean": float(ttft.mean()),
            "ttft_p95": float(np.percentile(ttft, 95)), "queueing_mean": float(q.mean()),
            "busy": self.busy, "target_forwards": self.target_forwards, "verify_positions": self.verify_positions,
            "draft_forwards": self.draft_forwards, "rounds": self.rounds, "admits": self.admits,
            "acceptance": self.accepted / max(self.drafted, 1),
            "drafts_per_round": self.drafted / max(self.rounds, 1),
        }


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """``n`` arrival times of a Poisson process of ``rate`` requests per clock unit (exponential gaps, seeded),
    the first at its first gap. ``rate = inf``: all at 0."""
    if rate <= 0:
        raise ValueError(f"rate={rate!r}: allowed > 0")
    if np.isinf(rate):
        return np.zeros(n)
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))


@dataclasses.dataclass(frozen=True)
class CostClock:
    """The deterministic ``"model"`` clock of :func:`serve`, in target AR steps: a target forward on T positions
    per row costs ``1 + verify_slope·(T − 1)``, a drafter forward ``draft``, an admission (batch-1 prefill of both
    models) ``admit``. A run call of F target forwards over P verified positions and D drafter forwards costs
    ``F + verify_slope·(P − F) + draft·D`` (exact for chunked verification too: each chunk is one forward)."""

    verify_slope: float
    draft: float
    admit: float

    def run_cost(self, forwards: int, positions: int, draft_forwards: int) -> float:
        return forwards + self.verify_slope * (positions - forwards) + self.draft * draft_forwards


def serve(engine: SlotEngine, requests: Sequence[Request], *, clock: str = "wall", idle_rounds: int = 1,
          max_rounds: Optional[int] = None, cost: Optional[CostClock] = None) -> ServeResult:
    """Continuous batching (module docstring): FIFO admission into free slots (lowest slot first) whenever the
    clock has reached a request's arrival, then :meth:`SlotEngine.run` — ``idle_rounds`` rounds when a slot is free
    and more requests are still to arrive (so they are admitted at a round boundary), else until a row finishes
    (at most ``max_rounds``, default N). Finished rows free their slot at the end of the call. ``clock``:
    ``"wall"`` (seconds of each jitted call, measured with ``block_until_ready``), ``"steps"`` (1 per round and
    per admission) or ``"model"`` (``cost``, a :class:`CostClock`: target AR steps from the call's forward counts;
    deterministic and free of the machine's load)."""
    if clock not in ("wall", "steps", "model"):
        raise ValueError(f"clock={clock!r}: allowed 'wall', 'steps', 'model'")
    if (clock == "model") != (cost is not None):
        raise ValueError("clock='model' needs cost=CostClock(...), and cost is only used by it")
    for r in requests:
        if not 1 <= r.max_new_tokens <= engine.max_new_tokens or len(r.prompt) != engine.prompt_len:
            raise ValueError(f"request max_new_tokens={r.max_new_tokens} (allowed 1..{engine.max_new_tokens}) or "
                             f"prompt width {len(r.prompt)} != the engine's prompt_len {engine.prompt_len}")
    b = engine.slots
    max_rounds = engine.max_new_tokens if max_rounds is None else max_rounds
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival, i))
    records = [RequestRecord(arrival=float(r.arrival)) for r in requests]
    state = jax.block_until_ready(engine.empty())
    limit = np.ones((b,), np.int32)
    owner = [-1] * b  # request id per slot
    t, busy, head, admits, acc, drafted = 0.0, 0.0, 0, 0, 0, 0
    remaining = len(requests)

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return out, time.perf_counter() - t0

    def harvest(state, t):
        nonlocal remaining, acc, drafted
        fin = np.asarray(state.finished)
        a, d = np.asarray(state.accepted), np.asarray(state.drafted)
        for s in range(b):
            if owner[s] >= 0 and fin[s]:
                rec = records[owner[s]]
                rec.finish, rec.tokens = t, engine.tokens(state, s)
                acc, drafted = acc + int(a[s]), drafted + int(d[s])
                owner[s] = -1
                remaining -= 1

    while remaining:
        # admission: every free slot takes the next request that has arrived
        while head < len(order) and requests[order[head]].arrival <= t and -1 in owner:
            i = order[head]
            s = owner.index(-1)
            r = requests[i]
            records[i].admit, records[i].slot = t, s
            state, dt = timed(engine.admit, state, s, r.prompt, r.valid, r.max_new_tokens, i)
            dt = {"wall": dt, "steps": 1.0, "model": cost.admit if cost else 0.0}[clock]
            t, busy = t + dt, busy + dt
            records[i].first_token = t
            owner[s], limit[s] = i, r.max_new_tokens
            head, admits = head + 1, admits + 1
            harvest(state, t)  # a request may end at its first token
        if all(o < 0 for o in owner):
            if head < len(order):
                t = max(t, requests[order[head]].arrival)  # idle until the next arrival
            continue
        more = head < len(order)
        rounds = idle_rounds if (more and -1 in owner) else max_rounds
        if clock == "steps" and more and -1 in owner:  # run exactly until the next arrival
            rounds = max(1, int(np.ceil(requests[order[head]].arrival - t)))
        before = (int(state.target_forwards), int(state.verify_tokens), int(state.draft_forwards))
        (state, ran), dt = timed(engine.run, state, limit, rounds)
        if clock == "steps":
            dt = float(ran)
        elif clock == "model":
            dt = cost.run_cost(int(state.target_forwards) - before[0], int(state.verify_tokens) - before[1],
                               int(state.draft_forwards) - before[2])
        t, busy = t + dt, busy + dt
        harvest(state, t)
    return ServeResult(records=records, makespan=t, busy=busy, target_forwards=int(state.target_forwards),
                       verify_positions=int(state.verify_tokens), draft_forwards=int(state.draft_forwards),
                       rounds=int(state.round), admits=admits, accepted=acc, drafted=drafted)
