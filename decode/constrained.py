"""Grammar-constrained decoding: LAVE for masked-diffusion LMs and a grammar token mask for AR generation
(decode_methods.md §B21).

**Grammar.** :class:`CharGrammar` is a context-free grammar written in Lark whose terminals each match single
characters (a scannerless, character-level grammar, so it lines up with the character tokenizer of the synthetic
tasks). Lark builds the LALR(1) table; a small incremental driver runs it over token strings. A parser
*configuration* is the set of LR stacks consistent with the text so far (a set, because a character may match
several terminals, e.g. ``t`` in ``true`` and inside a JSON string); an empty set means the text is not a viable
prefix. LALR never shifts an erroneous terminal, so "feeding succeeds" is exactly "is a prefix of some sentence".
Operations (memoised per configuration): ``step(config, token)``, ``is_accepting(config)``, ``allowed(config)``
(the next tokens: grammar characters, plus the terminators when the text is a complete sentence) and
``min_completion(config)`` (fewest tokens that finish a sentence — a lower bound when the search is capped), which
keeps every state completable *within the positions left*.

**LAVE** (lookahead-then-verify, B21) for a diffusion LM. A generated row ``x [N]`` holds committed tokens and
masks; it is *completable* iff the masks can be filled (each with a grammar token or a terminator) so that the text
up to the first terminator (or all N tokens) is a sentence. Each step runs one jitted forward giving the parallel
per-position distributions ``log p_i [N, V]``; on the host, for each commit of the step:

    j = most confident masked position of the row's semi-AR block; v = proposal at j (argmax, or Gumbel at T > 0)
    if v == witness[j]: accept                              # the cached verified completion (LAVE's cache_seq)
    else: witness' = lookahead_verify(x with x_j = v, log p)   # beams over parser configurations, left to right:
              # committed position: advance every beam (drop dead ones); masked position: expand each beam with the
              # top_k grammar-allowed tokens of log p_i (length-feasible), keep top_n beams by Σ log p + random_n
              # random ones; accept iff a beam ends in an accepting configuration (it is the new witness)
          on reject: log p_j[v] = -inf and propose again; after max_retries rejections commit witness[j] (recovery)

The witness is always a verified completion of the current state, so every intermediate state stays completable
and the final output parses (the recovery never fails). Beams are distinct parser configurations (best score per
configuration, a Viterbi beam), which makes the 10-beam check far less likely to reject a completable proposal than
beams of raw strings. Deviation from the reference: the recovery commits the witness token at the proposed position
instead of rewriting the rest of the block autoregressively.

**Host loop.** The parser is host-side and data-dependent, so :func:`lave_generate` is a Python loop around a jitted
forward (one NFE per step for the whole batch): the documented exception to the no-host-in-loop rule
(decode_methods.md §c.6). Same for :func:`constrained_generate` (AR with the grammar mask: a jitted prefill and a
jitted one-token step over the KV cache, the mask applied on the host).

Grammars: :func:`task_grammar_source` (the synthetic tasks' completion formats: ``arith``, ``countdown``, ``sort``,
sized by the task's arguments) and :data:`JSON_GRAMMAR` (a small JSON for toy vocabularies; the task tokenizer has
no braces or quotes). ``jaxtok decode configs/diffusion/lave.yaml`` runs LAVE through ``decode.method=lave``
(:func:`jaxtok.decode.evaluate.lave_step`).

**Real vocabularies (AR).** :class:`CharGrammar` walks the text of every token per parser configuration in Python
(:func:`vocab_of` maps byte-level BPE strings such as ``Ġapples`` back to `` apples``; tokens that are not whole
UTF-8 characters are left out): exact, but sized for character tokenizers, not 150k-token vocabularies. For real
tokenizers (Qwen3, Llama-3, any ``tokenizer.json``) :class:`TokenGrammar`
compiles the grammar (JSON, a JSON schema, or llguidance's Lark dialect) with the **llguidance** engine (the
``grammar`` extra), chosen by measurement over xgrammar and outlines-core on the Qwen3 vocabulary
(docs/results/grammar_engines.md, ``scripts/grammar_engines.py``). :func:`grammar_generate` (and
:func:`constrained_generate` given a TokenGrammar) applies its token bitmask inside :func:`jaxtok.decode.generate`:
a :class:`GrammarGuide` whose ordered ``io_callback`` advances each row's matcher with the accepted token and returns
the next bitmask ``[B, V/32]``; forbidden tokens get ``-inf`` on device; terminators are allowed only when the text
is a complete sentence.

**LAVE keeps its own lookahead.** LAVE's verification fills *masked positions anywhere in the row* with beams of
parser configurations (deduplicated by configuration, scored, back-pointed) and prunes with ``min_completion`` (the
fewest tokens that finish a sentence); the engines expose left-to-right matchers (consume / rollback / mask), with
no hashable configuration and no shortest-completion bound, so they cannot serve that search. LAVE therefore runs
its own lookahead over the same grammar through :class:`CharGrammar` (character-level vocabularies; on a BPE
vocabulary it is correct but slow).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from jaxtok.models import KVCache
from jaxtok.registry import LOGIT_GUIDES, ConfigError

from .commit_policies import SamplerArgs

_END = "$END"
_MAX_BFS = 50_000  # parser configurations visited by one min_completion search before it settles for a lower bound


class _EndState:
    """The configuration after a terminator: the sentence is over, every later token is ignored."""

    def __repr__(self):
        return "END"


END = _EndState()


# ----------------------------------------------------------------------------------------------------------------
# Grammar and incremental prefix checker
# ----------------------------------------------------------------------------------------------------------------


class CharGrammar:
    """A Lark CFG over single-character terminals, run incrementally over the strings of a token vocabulary.

    Args:
      source: Lark grammar text; every terminal must match single characters only.
      vocab: ``vocab[i]`` = the text of token i, or None for special tokens (never part of the grammar's text).
      stop_ids: terminators (end of the sentence; EOS and Rainbow pads).
      start: the start rule.
    """

    def __init__(self, source: str, vocab: Sequence[Optional[str]], stop_ids: Sequence[int], start: str = "start"):
        import lark
        from lark.parsers.lalr_analysis import Shift

        try:
            self.lark = lark.Lark(source, parser="lalr", lexer="basic", start=start)
        except lark.exceptions.GrammarError as e:
            raise ConfigError(f"grammar is not LALR(1) at the character level: {e}") from e
        self.source, self.start = source, start
        self._shift = Shift
        table = self.lark.parser.parser.parser.parse_table
        self._states = table.states
        self._end_state = table.end_states[start]
        self.initial = frozenset({(table.start_states[start],)})
        self.vocab = tuple(vocab)
        self.stop_ids = tuple(int(t) for t in stop_ids)
        if not self.stop_ids:
            raise ValueError("stop_ids: the grammar needs at least one terminator token")
        for t in self.stop_ids:
            if not 0 <= t < len(self.vocab) or self.vocab[t] is not None:
                raise ValueError(f"stop_ids: {t} must be a special token of the vocabulary (text None)")
        # character -> the terminals matching it
        chars = sorted({c for s in self.vocab if s for c in s})
        self._char_terms: dict[str, tuple[str, ...]] = {c: () for c in chars}
        for td in self.lark.terminals:
            pat = td.pattern
            if pat.type == "str":
                if len(pat.value) != 1:
                    raise ConfigError(f"terminal {td.name} = {pat.value!r}: a character-level grammar needs "
                                      f"single-character terminals (write \"t\" \"r\" \"u\" \"e\", not \"true\")")
                matched = [c for c in chars if c == pat.value]
            else:
                rx = re.compile(pat.to_regexp())
                matched = [c for c in chars if rx.fullmatch(c)]
                if rx.fullmatch("") or any(rx.fullmatch(c + c) for c in chars):
                    raise ConfigError(f"terminal {td.name} = /{pat.value}/ must match exactly one character")
            for c in matched:
                self._char_terms[c] = self._char_terms[c] + (td.name,)
        self.text_ids = np.array([i for i, s in enumerate(self.vocab) if s], np.int64)
        self._step: dict = {}
        self._allowed: dict = {}
        self._min: dict = {}
        self._within: dict = {}
        self._earley = None

    # -- LR driver over stacks (tuples of state ids) --------------------------------------------------------------

    def _feed(self, stack: tuple, term: str) -> Optional[tuple]:
        """Shift terminal ``term`` (after the reductions it triggers); None if it is not a viable continuation."""
        states, st = self._states, list(stack)
        while True:
            act = states[st[-1]].get(term)
            if act is None:
                return None
            action, arg = act
            if action is self._shift:
                st.append(arg)
                return tuple(st)
            size = len(arg.expansion)
            if size:
                del st[-size:]
            st.append(states[st[-1]][arg.origin.name][1])

    def _accepts(self, stack: tuple) -> bool:
        """Whether ``$END`` reduces the stack to the accepting state."""
        states, st = self._states, list(stack)
        while True:
            act = states[st[-1]].get(_END)
            if act is None or act[0] is self._shift:
                return False
            size = len(act[1].expansion)
            if size:
                del st[-size:]
            st.append(states[st[-1]][act[1].origin.name][1])
            if st[-1] == self._end_state:
                return True

    # -- configurations -------------------------------------------------------------------------------------------

    def step_text(self, config, text: str):
        """The configuration after ``text`` (an empty frozenset: not a viable prefix)."""
        for c in text:
            config = frozenset(s for st in config for t in self._char_terms.get(c, ())
                               if (s := self._feed(st, t)) is not None)
            if not config:
                break
        return config

    def step(self, config, token: int):
        """The configuration after token id ``token`` (terminators and specials give the empty set; see
        :meth:`is_accepting` for terminators)."""
        key = (config, token)
        out = self._step.get(key)
        if out is None:
            s = self.vocab[token]
            out = self.step_text(config, s) if s else frozenset()
            self._step[key] = out
        return out

    def is_accepting(self, config) -> bool:
        """The text so far is a complete sentence."""
        return config is END or any(self._accepts(st) for st in config)

    def allowed(self, config) -> np.ndarray:
        """``[V]`` bool: tokens that keep the text a viable prefix (terminators when it is a complete sentence)."""
        out = self._allowed.get(config)
        if out is None:
            out = np.zeros(len(self.vocab), bool)
            for t in self.text_ids:
                out[t] = bool(self.step(config, int(t)))
            if self.is_accepting(config):
                out[list(self.stop_ids)] = True
            self._allowed[config] = out
        return out

    def allowed_within(self, config, remaining: int) -> np.ndarray:
        """``[V]`` bool: :meth:`allowed` tokens after which the sentence can still end within ``remaining`` positions
        (this token included; a terminator needs none after it)."""
        key = (config, int(remaining))
        out = self._within.get(key)
        if out is None:
            out = self.allowed(config).copy() if remaining >= 1 else np.zeros(len(self.vocab), bool)
            for v in np.nonzero(out)[0]:
                if int(v) not in self.stop_ids and self.min_completion(self.step(config, int(v))) > remaining - 1:
                    out[v] = False
            self._within[key] = out
        return out

    def min_completion(self, config) -> float:
        """Fewest tokens appended to reach a complete sentence (0 if complete, inf if dead). Breadth-first over
        configurations; past ``_MAX_BFS`` visited it returns the depth reached (a lower bound, so pruning with it
        never drops a completable state)."""
        if config is END:
            return 0
        if not config:
            return float("inf")
        out = self._min.get(config)
        if out is not None:
            return out
        seen, frontier, depth, out = {config}, [config], 0, float("inf")
        while frontier:
            if any(self.is_accepting(c) for c in frontier):
                out = depth
                break
            if len(seen) > _MAX_BFS:
                out = depth
                break
            nxt = []
            for c in frontier:
                for t in self.text_ids:
                    n = self.step(c, int(t))
                    if n and n not in seen:
                        seen.add(n)
                        nxt.append(n)
            frontier, depth = nxt, depth + 1
        self._min[config] = out
        return out

    # -- whole strings --------------------------------------------------------------------------------------------

    def state_of(self, ids: Sequence[int]):
        """The configuration after the token ids ``ids`` (END after a terminator)."""
        config = self.initial
        for t in ids:
            t = int(t)
            if t in self.stop_ids:
                return END if self.is_accepting(config) else frozenset()
            config = self.step(config, t)
            if not config:
                break
        return config

    def is_prefix(self, text: str) -> bool:
        """``text`` is a prefix of some sentence."""
        return bool(self.step_text(self.initial, text))

    def accepts(self, text: str) -> bool:
        """``text`` is a sentence (the incremental driver)."""
        return self.is_accepting(self.step_text(self.initial, text))

    def parses(self, text: str) -> bool:
        """``text`` is a sentence, by Lark's Earley parser with its dynamic lexer (independent of the LR driver)."""
        import lark

        if self._earley is None:
            self._earley = lark.Lark(self.source, parser="earley", lexer="dynamic", start=self.start)
        try:
            self._earley.parse(text)
            return True
        except lark.exceptions.LarkError:
            return False

    def text_of(self, ids: Sequence[int]) -> str:
        """The grammar text of ``ids``: token strings up to the first terminator (specials skipped)."""
        out = []
        for t in ids:
            t = int(t)
            if t in self.stop_ids:
                break
            out.append(self.vocab[t] or "")
        return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Grammars of the synthetic tasks and JSON
# ----------------------------------------------------------------------------------------------------------------

_NUMBERS = r"""
int: nat | "-" pos
nat: "0" | pos
pos: NZ | pos "0" | pos NZ
dig: "0" | NZ
NZ: /[1-9]/
"""


def _bounded(name: str, digits: int, zero: bool) -> str:
    """Rule ``name``: a canonical non-negative integer of at most ``digits`` digits (``zero``: 0 allowed)."""
    alts = (['"0"'] if zero else []) + ["NZ" + " dig" * k for k in range(digits)]
    return f"{name}: " + " | ".join(alts) + "\n"


def _repeat(item: str, sep: str, count: int) -> str:
    return " ".join([item] + [f'"{sep}" {item}'] * (count - 1))


def task_grammar_source(task) -> str:
    """The Lark grammar of a synthetic task's completions (scratchpad, ``>``, answer), sized by its arguments.

    - ``arith``: ``steps`` steps ``int op operand = int`` joined by ``;`` (operand: at most ``digits`` digits; the
      task's operators), then ``>int``;
    - ``countdown``: ``numbers - 1`` steps ``pos op num = pos`` (positive values), then ``>`` an expression over
      ``+ - * /`` and parentheses whose literals are positive numbers of at most the digits of ``max_number``;
    - ``sort``: a list of exactly ``length`` items, ``>``, the same-length list (items: canonical integers of at
      most the digits of ``max_number``, or single letters).
    Integers are canonical (no leading zeros), so countdown answers are Python expressions (the task's
    ``format_ok``); a division by a zero-valued parenthesis still parses but fails ``format_ok``.
    """
    name, a = getattr(task, "name", None), getattr(task, "args", None)
    if name == "arith":
        ops = " | ".join(f'"{o}"' for o in a.ops)
        return (f'start: {_repeat("step", ";", a.steps)} ">" int\n'
                f'step: int op operand "=" int\nop: {ops}\n' + _bounded("operand", a.digits, True) + _NUMBERS)
    if name == "countdown":
        return (f'start: {_repeat("step", ";", a.numbers - 1)} ">" expr\n'
                'step: pos op num "=" pos\nop: "+" | "-" | "*" | "/"\n'
                'expr: expr "+" term | expr "-" term | term\n'
                'term: term "*" factor | term "/" factor | factor\n'
                'factor: num | "(" expr ")"\n' + _bounded("num", len(str(a.max_number)), False) + _NUMBERS)
    if name == "sort":
        item = ("item: LETTER\nLETTER: /[a-z]/\n" if a.alphabet == "letters"
                else _bounded("item", len(str(a.max_number)), True) + _NUMBERS)
        return f'start: lst ">" lst\nlst: {_repeat("item", ",", a.length)}\n' + item
    raise ConfigError(f"no completion grammar for task {name!r} (known: arith, countdown, sort)")


JSON_GRAMMAR = r"""
start: value
value: object | array | string | number | true | false | null
object: "{" "}" | "{" pair ("," pair)* "}"
pair: string ":" value
array: "[" "]" | "[" value ("," value)* "]"
string: "\"" "\"" | "\"" chars "\""
chars: CH | chars CH
number: int
true: "t" "r" "u" "e"
false: "f" "a" "l" "s" "e"
null: "n" "u" "l" "l"
CH: /[a-z0-9 ]/
""" + _NUMBERS


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def vocab_of(tok) -> list[Optional[str]]:
    """``vocab[i]``: the text of token i of a tokenizer (``tokenizers.Tokenizer`` or one wrapping it as ``.hf``),
    None for its special tokens. Byte-level BPE vocabularies (Qwen, Llama-3: ``Ġapples``) are mapped back to text
    (`` apples``); a token whose bytes are not whole UTF-8 characters is None too (the character grammar never emits
    it: sound, not complete — real vocabularies are :class:`TokenGrammar`'s job)."""
    hf = getattr(tok, "hf", tok)
    added = hf.get_added_tokens_decoder()  # {id: AddedToken}: their content is text as written
    special = {i for i, t in added.items() if t.special}
    byte_level = type(getattr(hf, "decoder", None)).__name__ == "ByteLevel"
    table = _byte_level_table() if byte_level else None
    out: list[Optional[str]] = []
    for i in range(hf.get_vocab_size()):
        s = None if i in special else hf.id_to_token(i)
        if s is not None and table is not None and i not in added:
            try:
                s = bytes(table[c] for c in s).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                s = None
        out.append(s)
    return out


def grammar_for(name: str, task, tok, stop_ids: Sequence[int]) -> CharGrammar:
    """``name``: ``task`` (the task's completion grammar) or ``json``, over the tokenizer's vocabulary."""
    if name == "task":
        return CharGrammar(task_grammar_source(task), vocab_of(tok), stop_ids)
    if name == "json":
        return CharGrammar(JSON_GRAMMAR, vocab_of(tok), stop_ids)
    raise ConfigError(f"grammar={name!r}: allowed 'task', 'json'")


# ----------------------------------------------------------------------------------------------------------------
# Lookahead-then-verify
# ----------------------------------------------------------------------------------------------------------------


def lookahead_verify(grammar: CharGrammar, gen: np.ndarray, logp: Optional[np.ndarray], *, mask_id: int,
                     top_k: Optional[int] = 5, top_n: Optional[int] = 5, random_n: int = 5,
                     rng: Optional[np.random.Generator] = None, order: Optional[np.ndarray] = None,
                     fill_id: Optional[int] = None) -> Optional[np.ndarray]:
    """LAVE's check (B21): a completion of the partially masked row ``gen [N]`` that parses, or None.

    Left to right over all N positions, beams are parser configurations (best Σ log p per configuration, with a
    back-pointer). A committed token advances every beam (dead ones dropped; a terminator ends a beam whose text is
    complete). A mask expands each beam with the ``top_k`` most likely (under ``logp[i]``) grammar-allowed tokens
    whose configuration can still be finished in the positions left (``None``: all of them); a terminator is among
    them when the text is complete. Then ``top_n`` best beams are kept plus ``random_n`` random others (``top_n``
    None: all). A beam survives if it ended or its text is complete at N. ``logp`` None scores every token 0 (a pure
    grammar search; with ``top_k = top_n = None`` the search is exact). ``order [N, V]``: ``argsort(-logp)`` if
    already computed. Masks after the end take ``fill_id`` (default the first terminator).

    Returns the completion ``[N]`` (committed tokens kept) or None when no beam survives.
    """
    n = len(gen)
    stops = set(grammar.stop_ids)
    fill = grammar.stop_ids[0] if fill_id is None else fill_id
    if logp is None:
        logp = np.zeros((n, len(grammar.vocab)), np.float32)
    if order is None:
        order = np.argsort(-logp, axis=-1, kind="stable")
    rng = rng or np.random.default_rng(0)
    beams = {grammar.initial: 0.0}
    history = []  # per position: {config: (score, previous config, token)}
    for i in range(n):
        t, rem = int(gen[i]), n - 1 - i
        new: dict = {}

        def add(cfg, score, prev, tok):
            if cfg not in new or score > new[cfg][0]:
                new[cfg] = (score, prev, tok)

        for c, score in beams.items():
            if c is END:
                add(END, score, c, t if t != mask_id else fill)
                continue
            if t != mask_id:
                if t in stops:
                    if grammar.is_accepting(c):
                        add(END, score, c, t)
                    continue
                nc = grammar.step(c, t)
                if nc and grammar.min_completion(nc) <= rem:
                    add(nc, score, c, t)
                continue
            allowed, taken = grammar.allowed(c), 0
            for v in order[i]:
                v = int(v)
                if not allowed[v]:
                    continue
                nc = END if v in stops else grammar.step(c, v)
                if nc is not END and grammar.min_completion(nc) > rem:
                    continue
                add(nc, score + float(logp[i, v]), c, v)
                taken += 1
                if top_k is not None and taken >= top_k:
                    break
        if not new:
            return None
        history.append(new)
        if top_n is None or len(new) <= top_n + random_n:
            beams = {c: v[0] for c, v in new.items()}
        else:
            ranked = sorted(new, key=lambda c: -new[c][0])
            keep = ranked[:top_n]
            rest = ranked[top_n:]
            if random_n:
                keep += [rest[k] for k in rng.choice(len(rest), size=min(random_n, len(rest)), replace=False)]
            beams = {c: new[c][0] for c in keep}
    final = [c for c in beams if grammar.is_accepting(c)]
    if not final:
        return None
    c = max(final, key=lambda c: beams[c])
    out = np.empty(n, np.int64)
    for i in range(n - 1, -1, -1):
        _, prev, tok = history[i][c]
        out[i] = tok
        c = prev
    return out


def completable(grammar: CharGrammar, gen: np.ndarray, mask_id: int) -> bool:
    """Exact check: can the masks of ``gen [N]`` be filled so the row parses (an exhaustive configuration search)."""
    return lookahead_verify(grammar, np.asarray(gen), None, mask_id=mask_id, top_k=None, top_n=None) is not None


def ar_token_mask(grammar: CharGrammar, prefix_ids: Sequence[int], remaining: Optional[int] = None) -> np.ndarray:
    """``[V]`` bool: the tokens AR generation may emit after ``prefix_ids`` (grammar characters that keep a viable
    prefix; terminators once the text is a sentence). ``remaining``: positions left including this one — then a
    token is allowed only if the sentence can still be finished within them (a terminator needs none after it)."""
    config = grammar.state_of(prefix_ids)
    if config is END:
        raise ValueError("prefix_ids: the sentence already ended (a terminator is in the prefix)")
    if remaining is None:
        return grammar.allowed(config).copy()
    return grammar.allowed_within(config, remaining).copy()


# ----------------------------------------------------------------------------------------------------------------
# Jitted forwards
# ----------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "attention", "block_size", "shift", "mask_id"))
def _diffusion_logp(graphdef, model_state, x, full_valid, *, prompt_len, attention, block_size, shift, mask_id):
    """``[B, N, V]`` float32 log-probabilities of every generated position from one bidirectional forward (the mask
    token excluded)."""
    b, length = x.shape
    n = length - prompt_len
    cols = jnp.broadcast_to(prompt_len + jnp.arange(n, dtype=jnp.int32) - shift, (b, n))
    logits = nnx.merge(graphdef, model_state)(x, valid=full_valid, attention=attention, block_size=block_size,
                                              logits_at=cols).logits.astype(jnp.float32)
    return jax.nn.log_softmax(logits.at[..., mask_id].set(-jnp.inf), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def _ar_prefill(graphdef, model_state, prompt, prompt_valid, *, capacity):
    model = nnx.merge(graphdef, model_state)
    b, p = prompt.shape
    out = model(prompt, valid=prompt_valid, cache=KVCache.init(model.cfg, b, capacity),
                logits_at=jnp.full((b, 1), p - 1, jnp.int32))
    return jax.nn.log_softmax(out.logits[:, 0].astype(jnp.float32), axis=-1), out.cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ar_step(graphdef, model_state, cache, last, live):
    out = nnx.merge(graphdef, model_state)(last[:, None], valid=live[:, None], cache=cache)
    return jax.nn.log_softmax(out.logits[:, 0].astype(jnp.float32), axis=-1), out.cache


def _propose(logp_row: np.ndarray, gumbel: Optional[np.ndarray], temperature: float) -> int:
    """Argmax of ``logp`` (T = 0) or of ``logp / T + g`` (Gumbel-max sampling, §0.1)."""
    if temperature == 0 or gumbel is None:
        return int(np.argmax(logp_row))
    return int(np.argmax(logp_row / temperature + gumbel))


# ----------------------------------------------------------------------------------------------------------------
# AR generation with the grammar mask
# ----------------------------------------------------------------------------------------------------------------


def constrained_generate(model, prompt, prompt_valid, grammar, *, max_new_tokens: int,
                         temperature: float = 0.0, rng: Optional[jax.Array] = None, pad_id: int = 0,
                         stop_tokens: Optional[Sequence[int]] = None):
    """Autoregressive generation where each step's logits are masked by :func:`ar_token_mask` (grammar next tokens,
    finishable within the tokens left), so every row ends in a sentence (a terminator, or a complete sentence at
    ``max_new_tokens``). A host loop around a jitted prefill and a jitted one-token step over the KV cache (1 NFE
    per step). ``grammar`` None: plain generation (same loop); a :class:`TokenGrammar` (real BPE vocabularies):
    :func:`grammar_generate` (the engine's bitmask inside jitted generate). Returns
    :class:`jaxtok.decode.generate.GenerateResult` (``logprobs`` under the masked, tempered distribution)."""
    from .generate import GenerateResult

    if isinstance(grammar, TokenGrammar):  # real vocabularies: the llguidance engine inside jitted generate
        from jaxtok.sampling import SamplingParams

        return grammar_generate(model, prompt, prompt_valid, grammar, max_new_tokens=max_new_tokens,
                                sampling=SamplingParams(temperature=temperature), rng=rng, pad_id=pad_id,
                                stop_tokens=stop_tokens)
    prompt = np.asarray(prompt, np.int32)
    prompt_valid = np.asarray(prompt_valid, bool)
    b, n = prompt.shape[0], int(max_new_tokens)
    if n < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: allowed a positive integer")
    stops = tuple(grammar.stop_ids if stop_tokens is None and grammar is not None else (stop_tokens or (2,)))
    seed = int(jax.random.randint(rng if rng is not None else jax.random.key(0), (), 0, 2**31 - 1))
    graphdef, state = nnx.split(model)
    logp, cache = _ar_prefill(graphdef, state, jnp.asarray(np.where(prompt_valid, prompt, pad_id)),
                              jnp.asarray(prompt_valid), capacity=prompt.shape[1] + n)
    tokens = np.full((b, n), pad_id, np.int64)
    lps = np.zeros((b, n), np.float32)
    valid = np.zeros((b, n), bool)
    done = np.zeros(b, bool)
    configs = [grammar.initial if grammar is not None else None for _ in range(b)]
    forwards = 1
    for t in range(n):
        lp = np.asarray(logp)
        last = np.full(b, pad_id, np.int64)
        for r in range(b):
            if done[r]:
                continue
            row = lp[r].astype(np.float64)
            if grammar is not None:
                allowed = grammar.allowed_within(configs[r], n - t)
                if not allowed.any():
                    raise RuntimeError(f"row {r}: no grammar token fits at step {t} (min_completion was a lower "
                                       f"bound); raise max_new_tokens")
                row = np.where(allowed, row, -np.inf)
            scaled = row / temperature if temperature > 0 else row
            scaled = scaled - np.logaddexp.reduce(scaled[np.isfinite(scaled)])
            g = np.random.default_rng([seed, t, r]).gumbel(size=row.shape) if temperature > 0 else None
            v = int(np.argmax(scaled + g)) if g is not None else int(np.argmax(row))
            tokens[r, t], lps[r, t], valid[r, t], last[r] = v, scaled[v], True, v
            if v in stops:
                done[r] = True
            elif grammar is not None:
                configs[r] = grammar.step(configs[r], v)
        if t == n - 1 or done.all():
            break
        logp, cache = _ar_step(graphdef, state, cache, jnp.asarray(last, jnp.int32), jnp.asarray(valid[:, t]))
        forwards += 1
    return GenerateResult(tokens=jnp.asarray(tokens, jnp.int32), logprobs=jnp.asarray(lps), valid=jnp.asarray(valid),
                          done=jnp.asarray(done), lengths=jnp.asarray(valid.sum(1), jnp.int32),
                          num_forwards=jnp.asarray(forwards, jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# Token-level grammar engine (llguidance) for AR generation on real vocabularies
# ----------------------------------------------------------------------------------------------------------------

_LLTOKENIZERS: dict = {}  # (id(tokenizers.Tokenizer), vocab_size, stop_ids) -> (the tokenizer, its LLTokenizer)


def _llguidance():
    """The ``llguidance`` module, or an ImportError naming the extra that installs it."""
    try:
        import llguidance
    except ImportError as e:
        raise ImportError("token-level grammar masks need llguidance: pip install 'jaxtok[grammar]'") from e
    return llguidance


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words of a token bitmask over ``vocab_size`` logits (bit j of word w = token 32 w + j)."""
    return (int(vocab_size) + 31) // 32


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token bitmask ``[..., W]`` int32 -> ``[..., V]`` bool (host side)."""
    bitmask = np.ascontiguousarray(bitmask, np.int32)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little")  # [..., 32 W]
    return bits[..., :vocab_size].astype(bool)


def set_token_bits(bitmask_row: np.ndarray, ids: Sequence[int], value: bool) -> None:
    """Set (``value`` True) or clear the bits of token ``ids`` in one ``[W]`` int32 bitmask row, in place."""
    words = bitmask_row.view(np.uint32)
    for t in ids:
        w, b = divmod(int(t), 32)
        if value:
            words[w] |= np.uint32(1 << b)
        else:
            words[w] &= ~np.uint32(1 << b)


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Logits ``[B, V]`` with every token whose bit is 0 in ``bitmask [B, W]`` (int32) set to ``-inf`` (on device;
    the arithmetic shift keeps bit k of a negative word at position k)."""
    b, v = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    allowed = bits.reshape(b, -1)[:, :v].astype(bool)  # [B, V]
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))


def _engine_tokenizer(hf, vocab_size: int, stop_ids: tuple):
    """llguidance's view of a ``tokenizers.Tokenizer`` (its ``tokenizer.json``; ~2 s for a 150k vocabulary, so
    cached per tokenizer object, logit count and terminators)."""
    llg = _llguidance()
    key = (id(hf), vocab_size, stop_ids)
    hit = _LLTOKENIZERS.get(key)
    if hit is None or hit[0] is not hf:
        hit = (hf, llg.LLTokenizer(hf.to_str(), n_vocab=vocab_size, eos_token=list(stop_ids)))
        _LLTOKENIZERS[key] = hit
    return hit[1]


class TokenGrammar:
    """A grammar over a real tokenizer vocabulary (byte-level BPE such as Qwen3 / Llama-3, or any ``tokenizer.json``),
    compiled by the llguidance engine: its matcher walks token *bytes* (``Ġapples`` is `` apples``), keeps special
    tokens out of the text, and fills a ``[W]`` int32 bitmask of the next allowed tokens in tens of microseconds on a
    150k vocabulary (docs/results/grammar_engines.md: measured against xgrammar and outlines-core).

    The terminators ``stop_ids`` (default the tokenizer's ``eos_ids``) are allowed exactly when the text so far is a
    complete sentence (:meth:`fill` enforces it on top of the engine). Ids at or past the tokenizer's size (the
    model's padding logits) are never allowed.

    Args:
      grammar: an llguidance grammar (use :meth:`json`, :meth:`from_json_schema` or :meth:`from_lark`).
      tok: a :class:`jaxtok.tasks.tokenizer.TextTokenizer` (``.hf``, ``.eos_ids``) or a ``tokenizers.Tokenizer``.
      vocab_size: the model's logit count V (default the tokenizer's size); must be >= the tokenizer's size.
      stop_ids: terminators (default ``tok.eos_ids``).
    """

    def __init__(self, grammar: str, tok, *, vocab_size: Optional[int] = None,
                 stop_ids: Optional[Sequence[int]] = None, name: str = "grammar"):
        llg = _llguidance()
        hf = getattr(tok, "hf", tok)
        n_tok = hf.get_vocab_size()
        self.vocab_size = int(vocab_size if vocab_size is not None else n_tok)
        if self.vocab_size < n_tok:
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the tokenizer's {n_tok} tokens")
        stops = stop_ids if stop_ids is not None else getattr(tok, "eos_ids", None)
        if not stops:
            raise ValueError("stop_ids: the grammar needs at least one terminator (the tokenizer names no eos_ids)")
        self.stop_ids = tuple(int(t) for t in stops)
        for t in self.stop_ids:
            if not 0 <= t < n_tok:
                raise ValueError(f"stop_ids: {t} is outside the tokenizer's vocabulary [0, {n_tok})")
        self.words = bitmask_words(self.vocab_size)
        self.lltok = _engine_tokenizer(hf, self.vocab_size, self.stop_ids)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise ConfigError(f"{name}: invalid grammar: {messages[0] if messages else 'unknown error'}")
        self.grammar, self.name = grammar, name
        self._llg = llg

    @classmethod
    def from_json_schema(cls, tok, schema, *, whitespace_flexible: bool = True, **kw) -> "TokenGrammar":
        """JSON text valid under ``schema`` (a dict or its JSON string). ``whitespace_flexible`` False: no
        whitespace between JSON tokens (separators ``,`` and ``:``)."""
        llg = _llguidance()
        try:
            g = llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": whitespace_flexible})
        except ValueError as e:
            raise ConfigError(f"json schema: {e}") from e
        return cls(g, tok, name="json_schema", **kw)

    @classmethod
    def json(cls, tok, *, whitespace_flexible: bool = True, **kw) -> "TokenGrammar":
        """Any JSON value (the schema ``{}``)."""
        return cls.from_json_schema(tok, {}, whitespace_flexible=whitespace_flexible, **kw)

    @classmethod
    def from_lark(cls, tok, source: str, **kw) -> "TokenGrammar":
        """A grammar in llguidance's Lark dialect (multi-character terminals and regexes allowed; ``%json {...}``
        embeds a JSON schema)."""
        return cls(_llguidance().LLMatcher.grammar_from_lark(source), tok, name="lark", **kw)

    def __repr__(self):
        return f"TokenGrammar({self.name}, vocab_size={self.vocab_size}, stop_ids={self.stop_ids})"

    # -- matchers -------------------------------------------------------------------------------------------------

    def matcher(self):
        """A fresh llguidance matcher at the start of the grammar."""
        m = self._llg.LLMatcher(self.lltok, self.grammar, log_level=0)
        if m.is_error():
            raise ConfigError(f"{self.name}: {m.get_error()}")
        return m

    def fill(self, matchers: Sequence, bitmask: np.ndarray, rows: Optional[Sequence[int]] = None,
             executor=None) -> None:
        """Write the next-token bitmask of ``matchers[k]`` into ``bitmask[rows[k]]`` (``bitmask [B, W]`` int32,
        C-contiguous), in parallel over rows; the terminators' bits are then set iff that matcher accepts."""
        from llguidance.numpy import fill_next_token_bitmask_par

        rows = list(range(len(matchers))) if rows is None else list(rows)
        if not rows:
            return
        executor = executor or self._executor()
        fill_next_token_bitmask_par(executor, list(zip(matchers, rows)), bitmask)
        for m, r in zip(matchers, rows):
            set_token_bits(bitmask[r], self.stop_ids, False)
            if m.is_accepting():
                set_token_bits(bitmask[r], self.stop_ids, True)

    def _executor(self):
        if getattr(self, "_exec", None) is None:
            self._exec = self._llg.LLExecutor()
        return self._exec

    def allowed(self, matcher) -> np.ndarray:
        """``[V]`` bool: the tokens the grammar allows after ``matcher``'s text (terminators iff it is complete)."""
        bm = np.zeros((1, self.words), np.int32)
        self.fill([matcher], bm)
        return unpack_bitmask(bm[0], self.vocab_size)

    def state_of(self, ids: Sequence[int]):
        """A matcher advanced over ``ids`` (no terminator among them); ValueError naming the first rejected token."""
        m = self.matcher()
        for k, t in enumerate(ids):
            t = int(t)
            if t in self.stop_ids:
                raise ValueError(f"ids[{k}]={t}: a terminator inside the prefix (the sentence already ended)")
            if not m.consume_token(t):
                raise ValueError(f"ids[{k}]={t}: not allowed by the grammar after the tokens before it")
        return m

    def ar_token_mask(self, prefix_ids: Sequence[int]) -> np.ndarray:
        """``[V]`` bool: the tokens AR generation may emit after ``prefix_ids`` (the engine's next tokens; the
        terminators once the text is a sentence)."""
        return self.allowed(self.state_of(prefix_ids))

    def accepts(self, ids: Sequence[int]) -> bool:
        """The tokens up to the first terminator (all of them if none) form a complete sentence."""
        m = self.matcher()
        for t in ids:
            t = int(t)
            if t in self.stop_ids:
                break
            if not m.consume_token(t):
                return False
        return bool(m.is_accepting())


class _MaskSession:
    """Host state of one :func:`grammar_generate` call: one matcher per row, advanced with each accepted token.
    ``error`` records the first row the engine could not continue (the row is then ended with a terminator and the
    call raises)."""

    def __init__(self, grammar: TokenGrammar, batch: int):
        self.grammar = grammar
        self.matchers = [grammar.matcher() for _ in range(batch)]
        self.bitmask = np.zeros((batch, grammar.words), np.int32)
        self.executor = grammar._llg.LLExecutor()
        self.error: Optional[str] = None
        self.calls = 0

    def _fail(self, r: int, step: int, why: str) -> None:
        if self.error is None:
            self.error = f"row {r}, step {step}: {why}"

    def __call__(self, step: int, last: np.ndarray, done: np.ndarray) -> np.ndarray:
        """``last [B]`` (the tokens chosen at ``step - 1``), ``done [B]`` -> the bitmask ``[B, W]`` of ``step``."""
        self.calls += 1
        g, bm = self.grammar, self.bitmask
        bm[:] = -1  # finished rows: everything (their token is discarded), never an all -inf row
        live = [r for r in range(len(self.matchers)) if not done[r]]
        if step > 0:
            for r in live:
                m = self.matchers[r]
                if not m.is_error() and not m.consume_token(int(last[r])):
                    self._fail(r, step, f"token {int(last[r])} rejected by the engine ({m.get_error()[:200]})")
        ok = [r for r in live if not self.matchers[r].is_error()]
        g.fill([self.matchers[r] for r in ok], bm, ok, self.executor)
        for r in live:
            if self.matchers[r].is_error() or not bm[r].any():  # no word with a bit set: no allowed token
                if not self.matchers[r].is_error():
                    self._fail(r, step, "the grammar allows no next token")
                bm[r] = 0
                set_token_bits(bm[r], g.stop_ids[:1], True)  # end the row; the call raises afterwards
        return bm.copy()


_SESSIONS: dict = {}
_SESSION_IDS = itertools.count(1)


def _mask_callback(session, step, last, done):
    """io_callback target: the registered session's bitmask for ``step``."""
    return _SESSIONS[int(session)](int(step), np.asarray(last), np.asarray(done))


@dataclasses.dataclass(frozen=True)
class _GrammarSpec:
    """Static half of a :class:`GrammarGuide` (hashable: equal for every grammar of one vocabulary size, so a new
    grammar or session reuses the compiled :func:`jaxtok.decode.generate`)."""

    vocab_size: int
    words: int

    def init(self, arrays: dict, prompt, prompt_valid, max_new_tokens: int) -> dict:
        """Carry: ``last [B]``, the tokens chosen at the previous step (unused at step 0)."""
        return {"last": jnp.zeros((prompt.shape[0],), jnp.int32)}

    def adjust(self, arrays: dict, carry: dict, logits, step, done):
        """Masked logits ``[B, V]`` for token ``step``: one ordered host callback advances the rows' matchers with
        ``carry['last']`` and returns their bitmasks ``[B, W]``."""
        bitmask = io_callback(
            _mask_callback, jax.ShapeDtypeStruct((logits.shape[0], self.words), jnp.int32),
            arrays["session"], step, carry["last"], done, ordered=True)
        return apply_token_bitmask(logits, bitmask), carry

    def advance(self, carry: dict, token) -> dict:
        return {"last": token.astype(jnp.int32)}


class GrammarGuide:
    """A logit guide for :func:`jaxtok.decode.generate` (``guide=``) applying a :class:`TokenGrammar`'s bitmask at
    every step. :meth:`for_batch` opens a host session (one matcher per row); :meth:`close` ends it and raises if the
    engine failed. :func:`grammar_generate` does both around one call."""

    host_session = True  # advances host-side matchers through an ordered callback: one device, no mesh

    def __init__(self, grammar: TokenGrammar):
        self.grammar = grammar
        self.spec = _GrammarSpec(grammar.vocab_size, grammar.words)
        self.session_id: Optional[int] = None

    def check(self, batch: int, vocab_size: int) -> None:
        if vocab_size != self.grammar.vocab_size:
            raise ValueError(f"grammar guide: the grammar masks {self.grammar.vocab_size} logits, the model has "
                             f"{vocab_size}; build it with vocab_size=model.cfg.vocab_size")

    def for_batch(self, batch: int) -> dict:
        self.close(check=False)
        self.session_id = next(_SESSION_IDS)
        _SESSIONS[self.session_id] = _MaskSession(self.grammar, batch)
        return {"session": jnp.asarray(self.session_id, jnp.int32)}

    @property
    def session(self) -> Optional[_MaskSession]:
        return _SESSIONS.get(self.session_id)

    def close(self, check: bool = True) -> None:
        """Drop the session (after the generation's arrays are ready); ``check``: raise its engine error."""
        session = _SESSIONS.pop(self.session_id, None) if self.session_id is not None else None
        self.session_id = None
        if check and session is not None and session.error:
            raise RuntimeError(f"grammar {self.grammar.name}: {session.error}")


@dataclasses.dataclass(frozen=True)
class GrammarGuideArgs:
    """``decode.policy: grammar`` (AR, ``decode.method`` greedy or sample): constrain completions with llguidance.

    ``kind``: ``json`` (any JSON value), ``json_schema`` (``schema``: a mapping, or a path to a .json file) or
    ``lark`` (``lark``: llguidance's Lark dialect, inline or a path to a file). ``whitespace_flexible``: JSON may
    hold whitespace between tokens."""

    kind: Literal["json", "json_schema", "lark"] = "json"
    schema: Optional[Any] = None
    lark: Optional[str] = None
    whitespace_flexible: bool = True

    def __post_init__(self):
        if self.kind == "json_schema" and self.schema is None:
            raise ValueError("kind='json_schema' needs schema (a mapping or a .json file)")
        if self.kind == "lark" and not self.lark:
            raise ValueError("kind='lark' needs lark (the grammar text or a file)")


def _text_or_file(value: str) -> str:
    """``value`` itself, or the contents of the file it names."""
    path = Path(value)
    return path.read_text(encoding="utf-8") if len(value) < 4096 and path.is_file() else value


@LOGIT_GUIDES.register("grammar", GrammarGuideArgs)
def grammar_guide(args: GrammarGuideArgs, *, tokenizer, vocab_size: int, mesh=None, **_) -> "GrammarGuide":
    """The guide of ``decode.policy: grammar``: a :class:`TokenGrammar` over the run's tokenizer and the model's
    ``vocab_size`` logits (terminators: the tokenizer's ``eos_ids``)."""
    del mesh  # the grammar session is a host callback: `jaxtok decode` runs it on one device
    kw = dict(vocab_size=vocab_size, whitespace_flexible=args.whitespace_flexible)
    if args.kind == "json":
        grammar = TokenGrammar.json(tokenizer, **kw)
    elif args.kind == "json_schema":
        schema = args.schema
        schema = json.loads(_text_or_file(schema)) if isinstance(schema, str) else dict(schema)
        grammar = TokenGrammar.from_json_schema(tokenizer, schema, **kw)
    else:
        grammar = TokenGrammar.from_lark(tokenizer, _text_or_file(args.lark), vocab_size=vocab_size)
    return GrammarGuide(grammar)


def grammar_generate(model, prompt, prompt_valid, grammar: TokenGrammar, *, max_new_tokens: int,
                     sampling=None, rng: Optional[jax.Array] = None, pad_id: int = 0,
                     stop_tokens: Optional[Sequence[int]] = None, **kwargs):
    """AR generation under a :class:`TokenGrammar` (llguidance) with :func:`jaxtok.decode.generate`: the jitted
    prefill + ``while_loop`` unchanged, the grammar as a logit guide. At every step one ordered
    ``jax.experimental.io_callback`` sends the previous step's tokens ``[B]`` to the host, which advances each row's
    matcher with its accepted token and fills the next bitmask ``[B, W]`` (int32, V/32 words); on device the
    forbidden tokens get ``-inf`` before temperature / top-k / top-p / min-p and sampling. The terminators are
    allowed only when the row's text is a complete sentence, so a row that stops (``done``) parses; a row that
    reaches ``max_new_tokens`` first is unfinished (``done`` False: the engine has no shortest-completion bound,
    unlike :class:`CharGrammar`'s ``allowed_within``).

    Why a callback and not a host loop: sampling and filters stay on device in the one compiled loop and only ``B``
    ids and ``B x V/32`` words cross per step (a host loop moves ``B x V`` float logits and samples on the host);
    ``io_callback`` (ordered), not ``pure_callback``, because advancing the matchers is a side effect that must run
    exactly once per step, in order. ``sampling``: a :class:`~jaxtok.sampling.SamplingParams` (default greedy);
    ``kwargs``: :func:`generate`'s other options (``return_entropy``, ``return_topk``). Returns :class:`GenerateResult`; raises RuntimeError if the
    engine rejected a row's token or had no next token (that row was ended early)."""
    from .generate import generate
    from jaxtok.sampling import GREEDY

    if not isinstance(grammar, TokenGrammar):
        raise TypeError(f"grammar: expected a TokenGrammar, got {type(grammar).__name__}")
    if kwargs.get("mesh") is not None:
        raise ValueError("grammar_generate: mesh is not supported (the grammar session is a single-host callback)")
    stops = grammar.stop_ids if stop_tokens is None else tuple(int(t) for t in stop_tokens)
    if set(stops) != set(grammar.stop_ids):
        raise ValueError(f"stop_tokens {tuple(stops)} differ from the grammar's terminators {grammar.stop_ids}")
    guide = GrammarGuide(grammar)
    try:
        out = generate(model, prompt, prompt_valid, max_new_tokens=max_new_tokens,
                       sampling=GREEDY if sampling is None else sampling, stop_tokens=stops, rng=rng if rng is not None else jax.random.key(0), pad_id=pad_id,
                       guide=guide, **kwargs)
        jax.block_until_ready(out)
    except BaseException:
        guide.close(check=False)
        raise
    guide.close()
    return out


# ----------------------------------------------------------------------------------------------------------------
# LAVE for masked diffusion
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaveArgs(SamplerArgs):
    """LAVE (B21) settings on top of the sampler's (``block_len``, ``steps``; ``cache`` must be ``none``).

    ``grammar``: ``task`` (the decoded task's completion grammar) or ``json``. ``top_k_per_mask`` / ``top_n_beams`` /
    ``random_n_beams``: the lookahead's expansion and beam widths (reference 5 / 5 / 5). ``max_retries`` τ:
    rejected proposals per commit before the cache-enhanced recovery (reference 5). ``constrained``: False runs the
    same host loop without the grammar (the baseline of a with/without comparison)."""

    grammar: Literal["task", "json"] = "task"
    top_k_per_mask: int = 5
    top_n_beams: int = 5
    random_n_beams: int = 5
    max_retries: int = 5
    constrained: bool = True

    def __post_init__(self):
        super().__post_init__()
        for f in ("top_k_per_mask", "top_n_beams"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)}: must be >= 1")
        if self.random_n_beams < 0 or self.max_retries < 0:
            raise ValueError("random_n_beams and max_retries must be >= 0")


@dataclasses.dataclass(frozen=True)
class LaveResult:
    """Output of :func:`lave_generate` (host numpy arrays).

    ``tokens [B, N]`` (after the first terminator: ``pad_id``); ``valid [B, N]`` up to and including the first
    terminator; ``lengths [B]``; ``done [B]``; ``nfe [B]`` forwards each row took part in; ``commit_step [B, N]``;
    ``verifies / rejections / recoveries [B]``: lookahead checks run, proposals rejected, witness fallbacks;
    ``forward_s`` / ``host_s``: seconds in the jitted forwards (compilation included) / in the host loop."""

    tokens: np.ndarray
    valid: np.ndarray
    lengths: np.ndarray
    done: np.ndarray
    nfe: np.ndarray
    commit_step: np.ndarray
    verifies: np.ndarray
    rejections: np.ndarray
    recoveries: np.ndarray
    forward_s: float = 0.0
    host_s: float = 0.0


def lave_generate(model, prompt, prompt_valid, grammar: Optional[CharGrammar], *, gen_len: int,
                  args: Optional[LaveArgs] = None, temperature: float = 0.0, rng: Optional[jax.Array] = None,
                  mask_id: Optional[int] = None, stop_tokens: Optional[Sequence[int]] = None, pad_id: int = 0,
                  attention: str = "bidirectional", block_size: Optional[int] = None) -> LaveResult:
    """LAVE (B21): masked-diffusion decoding where every commit keeps the row completable under ``grammar``.

    LLaDA's semi-AR schedule (blocks of ``args.block_len``; ``args.steps`` total, default ``gen_len``: one commit
    per step), low-confidence order; each commit is verified as in the module docstring. One jitted forward per
    step for the whole batch; the parser runs on the host. ``grammar`` None (or ``args.constrained`` False): the
    same loop unconstrained. Rows are independent (a row's draws use ``(seed, step, row)``).
    """
    args = args or LaveArgs()
    if args.cache != "none" or args.cfg_scale > 0:
        raise ConfigError("policy 'lave' supports cache='none' and cfg_scale=0 only")
    if isinstance(gen_len, bool) or not isinstance(gen_len, (int, np.integer)) or gen_len < 1:
        raise ValueError(f"gen_len={gen_len!r}: allowed a positive integer")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r}: allowed a float >= 0")
    constrained = grammar is not None and args.constrained
    cfg = model.cfg
    mask_id = (cfg.mask_token_id if cfg.mask_token_id is not None else 3) if mask_id is None else int(mask_id)
    stops = tuple(stop_tokens) if stop_tokens is not None else (grammar.stop_ids if grammar is not None else (2,))
    if constrained and set(stops) != set(grammar.stop_ids):
        raise ValueError(f"stop_tokens {stops} differ from the grammar's terminators {grammar.stop_ids}")
    if mask_id in stops or mask_id == pad_id:
        raise ValueError(f"mask_id={mask_id} must differ from pad_id and the terminators")
    prompt = np.asarray(prompt, np.int32)
    prompt_valid = np.asarray(prompt_valid, bool)
    if prompt.ndim != 2 or prompt_valid.shape != prompt.shape:
        raise ValueError(f"prompt/prompt_valid: expected equal [B, P] shapes, got {prompt.shape}, {prompt_valid.shape}")
    b, p = prompt.shape
    n, kb = int(gen_len), int(args.block_len)
    n_blocks = -(-n // kb)
    spb = max(1, (args.steps or n) // n_blocks)
    seed = int(jax.random.randint(rng if rng is not None else jax.random.key(0), (), 0, 2**31 - 1))
    stop_set = set(stops)
    shift = 1 if (args.shift_logits or cfg.shift_logits) else 0

    x = np.concatenate([np.where(prompt_valid, prompt, pad_id), np.full((b, n), mask_id, np.int32)], 1)
    full_valid = jnp.asarray(np.concatenate([prompt_valid, np.ones((b, n), bool)], 1))
    gen = x[:, p:]  # a view: writes go into x
    commit_step = np.full((b, n), -1, np.int64)
    nfe = np.zeros(b, np.int64)
    verifies, rejections, recoveries = (np.zeros(b, np.int64) for _ in range(3))
    done = np.zeros(b, bool)
    witness: list = [None] * b
    block = np.full(b, -1)
    block_step = np.zeros(b, np.int64)
    block_masks = np.zeros(b, np.int64)
    graphdef, state = nnx.split(model)
    kw = dict(prompt_len=p, attention=attention, block_size=block_size, shift=shift, mask_id=mask_id)
    vkw = dict(mask_id=mask_id, top_k=args.top_k_per_mask, top_n=args.top_n_beams, random_n=args.random_n_beams)
    forward_s, t_start = 0.0, time.perf_counter()

    for step in range(n * 2 + n_blocks):  # every step commits >= 1 token per live row: ends within n steps
        if done.all():
            break
        t0 = time.perf_counter()
        logp = np.asarray(_diffusion_logp(graphdef, state, jnp.asarray(x), full_valid, **kw))  # [B, N, V]
        forward_s += time.perf_counter() - t0
        for r in range(b):
            if done[r]:
                continue
            nfe[r] += 1
            masked = gen[r] == mask_id
            first = int(np.argmax(masked))
            if first // kb != block[r]:  # a new semi-AR block starts at the first masked position
                block[r], block_step[r] = first // kb, 0
                block_masks[r] = int(masked[block[r] * kb:(block[r] + 1) * kb].sum())
            lo, hi = block[r] * kb, min((block[r] + 1) * kb, n)
            eligible = masked.copy()
            eligible[:lo] = eligible[hi:] = False
            k = block_masks[r] // spb + int(block_step[r] < block_masks[r] % spb)
            if block_step[r] >= spb - 1:
                k = int(eligible.sum())
            k = max(1, min(int(k), int(eligible.sum())))
            row_lp = logp[r].astype(np.float64)
            g = (np.random.default_rng([seed, step, r]).gumbel(size=row_lp.shape) if temperature > 0 else None)
            x0 = np.array([_propose(row_lp[i], None if g is None else g[i], temperature) for i in range(n)])
            conf = np.exp(row_lp[np.arange(n), x0])
            vrng = np.random.default_rng([seed, step, r, 1])
            if constrained and witness[r] is None:
                verifies[r] += 1
                witness[r] = lookahead_verify(grammar, gen[r], row_lp, rng=vrng, **vkw)
                if witness[r] is None:  # the model's top-k found nothing: a pure grammar search
                    witness[r] = lookahead_verify(grammar, gen[r], None, mask_id=mask_id, top_k=None, top_n=64)
                if witness[r] is None:
                    raise ValueError(f"gen_len={n}: no sentence of the grammar fits (row {r})")
            order = None
            for _ in range(k):
                j = int(np.argmax(np.where(eligible, conf, -np.inf)))
                v = int(x0[j])
                if constrained:
                    lp_j = row_lp[j].copy()
                    for attempt in range(args.max_retries + 1):
                        if v == witness[r][j]:
                            break
                        trial = gen[r].copy()
                        trial[j] = v
                        verifies[r] += 1
                        if order is None:
                            order = np.argsort(-row_lp, axis=-1, kind="stable")
                        w = lookahead_verify(grammar, trial, row_lp, rng=vrng, order=order, **vkw)
                        if w is not None:
                            witness[r] = w
                            break
                        rejections[r] += 1
                        lp_j[v] = -np.inf
                        v = _propose(lp_j, None if g is None else g[j], temperature)
                    else:
                        recoveries[r] += 1
                        v = int(witness[r][j])
                gen[r, j] = v
                commit_step[r, j] = step
                eligible[j] = False
            block_step[r] += 1
            still = gen[r] == mask_id
            stop_at = np.nonzero(np.isin(gen[r], list(stop_set)))[0]
            if not still.any():
                done[r] = True
            elif args.stop_early and len(stop_at) and not still[:stop_at[0]].any():
                done[r] = True
    tokens = gen.astype(np.int64).copy()
    valid = np.zeros((b, n), bool)
    lengths = np.zeros(b, np.int64)
    for r in range(b):
        stop_at = np.nonzero(np.isin(tokens[r], list(stop_set)))[0]
        end = int(stop_at[0]) + 1 if len(stop_at) else n
        tokens[r, end:] = pad_id
        valid[r, :end] = True
        lengths[r] = end
    return LaveResult(tokens=tokens, valid=valid, lengths=lengths, done=done, nfe=nfe, commit_step=commit_step,
                      verifies=verifies, rejections=rejections, recoveries=recoveries, forward_s=forward_s,
                      host_s=time.perf_counter() - t_start - forward_s)


__all__ = ["END", "JSON_GRAMMAR", "CharGrammar", "GrammarGuide", "LaveArgs", "LaveResult", "TokenGrammar",
           "apply_token_bitmask", "ar_token_mask", "bitmask_words", "completable", "constrained_generate",
           "grammar_for", "grammar_generate", "lave_generate", "lookahead_verify", "set_token_bits",
           "task_grammar_source", "unpack_bitmask", "vocab_of"]
