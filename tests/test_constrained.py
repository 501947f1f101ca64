"""Grammar-constrained decoding (decode/constrained.py): the character-level grammars against the tasks' own data
and Lark's Earley parser, the AR token mask on hand-written prefixes, completability of hand-made partial states,
LAVE and the AR constrained loop on random (untrained) tiny models — every output parses, over many seeds — and the
unconstrained host loops against the jitted samplers they mirror."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import lark  # noqa: E402,F401  (the test extra installs it; a missing lark must fail, not skip)

from jaxtok.config import load_config, validate_names  # noqa: E402
from jaxtok.decode import generate  # noqa: E402
from jaxtok.sampling import GREEDY
from jaxtok.decode import constrained as C  # noqa: E402
from jaxtok.decode.diffusion import diffusion_generate  # noqa: E402
from jaxtok.models import Decoder, presets  # noqa: E402
from jaxtok.registry import COMMIT_POLICIES, DECODE_METHODS, ConfigError  # noqa: E402
from jaxtok.tasks import build_tokenizer, make_task  # noqa: E402

TOK = build_tokenizer()
VOCAB = C.vocab_of(TOK)
V = len(VOCAB)
EOS, MASK, PAD = 2, 3, 0
STOPS = (EOS,) + tuple(range(4, 11))
ID = {s: i for i, s in enumerate(VOCAB) if s}

ARITH = make_task("arith", {"digits": 2, "steps": 1, "ops": "+-"})
TASKS = {
    "arith": ARITH,
    "arith3": make_task("arith", {"digits": 3, "steps": 3, "ops": "+-*"}),
    "countdown": make_task("countdown", {"numbers": 3, "max_number": 12}),
    "sort": make_task("sort", {"length": 4, "max_number": 20}),
    "sort_letters": make_task("sort", {"length": 3, "alphabet": "letters"}),
}
GRAMMARS = {k: C.grammar_for("task", t, TOK, STOPS) for k, t in TASKS.items()}

# a toy vocabulary for JSON (the task tokenizer has no braces or quotes)
JV = [None, None, None] + list('{}[]":,-0123456789 abcdefghijklmnopqrstuvwxyz')  # <pad>, <eos>, <mask>
JSON = C.CharGrammar(C.JSON_GRAMMAR, JV, (1,))
JID = {s: i for i, s in enumerate(JV) if s}


def ids(text, table=ID, mask=MASK, eos=EOS):
    """'?' = mask, '$' = eos, other characters = their token."""
    return np.array([mask if c == "?" else eos if c == "$" else table[c] for c in text])


def chars(mask_row, vocab=VOCAB):
    return {vocab[i] if vocab[i] else i for i in np.nonzero(mask_row)[0]}


# ----------------------------------------------------------------------------------------------------------------
# Grammars
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_grammar_accepts_the_tasks_targets(name):
    g, task = GRAMMARS[name], TASKS[name]
    for i in range(60):
        ex = task.example("train" if i % 2 else "eval", i)
        assert g.accepts(ex.target) and g.parses(ex.target), ex.target
        for cut in range(len(ex.target)):
            assert g.is_prefix(ex.target[:cut])
        assert not g.accepts(ex.target.replace(">", ";", 1))


@pytest.mark.parametrize("name", ["arith", "countdown", "sort"])
def test_lr_driver_agrees_with_earley_on_mutated_strings(name):
    """The incremental LALR driver and Lark's Earley parser (dynamic lexer) decide the same strings, and every
    accepted string passes the task's own format check."""
    g, task = GRAMMARS[name], TASKS[name]
    rng = np.random.default_rng(0)
    alphabet = list("0123456789+-*/=(),;>")
    hits = 0
    for i in range(150):
        s = list(task.example("train", i).target)
        for _ in range(int(rng.integers(0, 3))):
            k = int(rng.integers(0, len(s)))
            op = rng.integers(0, 3)
            if op == 0:
                s[k] = rng.choice(alphabet)
            elif op == 1:
                del s[k]
            else:
                s.insert(k, rng.choice(alphabet))
        text = "".join(s)
        ok = g.accepts(text)
        assert ok == g.parses(text), text
        hits += ok
        if ok:
            assert task.format_ok(text), text
    assert 20 < hits < 150  # both outcomes are exercised


def test_json_grammar_on_a_toy():
    good = ['{"a":[1,2,{"b":null}],"c":"x y"}', "true", "[]", '"true"', "-12", '{"k":false}', "[[],{}]"]
    bad = ['{"a":tru}', '{"a" 1}', "-0", "01", "[1,]", '{"a":1,}', '"a', "nul"]
    for s in good:
        assert JSON.accepts(s) and JSON.parses(s) and json.loads(s) is not None, s
    for s in bad:
        assert not JSON.accepts(s) and not JSON.parses(s), s
    assert JSON.is_prefix('{"a":[1,') and JSON.is_prefix("nul") and not JSON.is_prefix("[1,]")
    assert JSON.min_completion(JSON.step_text(JSON.initial, '{"a":[[')) == 3  # ]]}


def test_bad_grammars_raise():
    with pytest.raises(ConfigError, match="single-character"):
        C.CharGrammar('start: "ab"', VOCAB, STOPS)
    with pytest.raises(ConfigError, match="LALR"):
        C.CharGrammar('start: a | b\na: "1"\nb: "1"', VOCAB, STOPS)  # reduce/reduce
    with pytest.raises(ValueError, match="special"):
        C.CharGrammar('start: "1"', VOCAB, (ID["1"],))
    with pytest.raises(ConfigError, match="no completion grammar"):
        C.task_grammar_source(object())


# ----------------------------------------------------------------------------------------------------------------
# AR token mask
# ----------------------------------------------------------------------------------------------------------------

DIGITS = set("0123456789")
NZ = set("123456789")


@pytest.mark.parametrize("prefix,expected", [
    ("", DIGITS | {"-"}),
    ("0", {"+", "-"}),  # canonical integers: no digit after a leading 0
    ("12", DIGITS | {"+", "-"}),  # ops of the task only ("*" is not one)
    ("-", NZ),
    ("12+", DIGITS),
    ("12+7", DIGITS | {"="}),
    ("12+75", {"="}),  # operands have at most 2 digits
    ("12+7=", DIGITS | {"-"}),
    ("12+7=19", DIGITS | {">"}),  # one step: no ";"
    ("12+7=19>", DIGITS | {"-"}),
    ("12+7=19>19", DIGITS | set(STOPS)),
    ("12+7=19>0", set(STOPS)),
])
def test_ar_mask_is_exactly_the_next_characters(prefix, expected):
    assert chars(C.ar_token_mask(GRAMMARS["arith"], ids(prefix))) == expected


def test_ar_mask_respects_the_positions_left():
    g = GRAMMARS["arith"]
    assert chars(C.ar_token_mask(g, ids("12+7=19>"), remaining=1)) == DIGITS  # "-" needs a digit after it
    assert chars(C.ar_token_mask(g, ids("12+7=19>"), remaining=2)) == DIGITS | {"-"}
    assert chars(C.ar_token_mask(g, ids("12+7=19"), remaining=2)) == {">"}  # a longer 19x leaves no answer room
    assert chars(C.ar_token_mask(g, ids(""), remaining=7)) == DIGITS  # 0+0=0>0 is the shortest sentence
    assert not C.ar_token_mask(g, ids(""), remaining=6).any()
    cd = GRAMMARS["countdown"]
    assert chars(C.ar_token_mask(cd, ids("3+5=8;8*7=56>("))) == NZ | {"("}
    assert chars(C.ar_token_mask(JSON, ids('{"a":', JID)), JV) == set('{["-0123456789tfn')
    assert chars(C.ar_token_mask(JSON, ids('{"a":1', JID)), JV) == set("0123456789,}")
    with pytest.raises(ValueError, match="ended"):
        C.ar_token_mask(g, ids("1+1=2>2$"))


# ----------------------------------------------------------------------------------------------------------------
# Completability of partial states
# ----------------------------------------------------------------------------------------------------------------

ARITH_CASES = [
    ("12+7=19>19$???", True),
    ("12+7=19>$?????", False),  # no answer before the terminator
    ("?2+7=19>19????", True),
    ("12+???=1>1", False),  # the operand has at most 2 digits and no mask can end the sentence early
    ("12+??=1>1", True),  # syntax only: 12+34=1>1
    ("12+7=19>19", True),  # complete exactly at N
    ("12+7=19>", False),  # no room for the answer
    ("12+7=19>?", True),
    ("??????", False),  # the shortest sentence has 7 characters
    ("???????", True),
    ("12+7=19>19;?", False),  # one step only
    ("??$???????", False),
    ("-0????????", False),
    ("1+2=3>3???zz", True),  # a mask may end the sentence (becoming <eos>); what follows is ignored
    ("1+2=3>3?z??", True),
    ("1+2=3>3zzz", False),
]
JSON_CASES = [('{"a":?', False), ('{"a":??', True), ("[?,?]", True), ("[?,]", False), ('"?"', True), ("{?}", False),
              ("?????", True), ('{"a":??$', True), ('{"a":?$', False)]


@pytest.mark.parametrize("text,ok", ARITH_CASES)
def test_completable_hand_made_arith_states(text, ok):
    g = GRAMMARS["arith"]
    assert C.completable(g, ids(text), MASK) == ok
    w = C.lookahead_verify(g, ids(text), None, mask_id=MASK)  # the default (beam) check
    assert (w is not None) == ok
    if ok:  # the witness keeps the committed tokens and parses
        keep = ids(text) != MASK
        np.testing.assert_array_equal(w[keep], ids(text)[keep])
        assert g.parses(g.text_of(w))


@pytest.mark.parametrize("text,ok", JSON_CASES)
def test_completable_hand_made_json_states(text, ok):
    row = ids(text, JID, mask=2, eos=1)
    assert C.completable(JSON, row, 2) == ok
    w = C.lookahead_verify(JSON, row, None, mask_id=2, top_k=None)  # beams of configurations, every token tried
    assert (w is not None) == ok
    if ok:
        json.loads(JSON.text_of(w))
    w5 = C.lookahead_verify(JSON, row, None, mask_id=2)  # top-5 per mask: sound, not complete
    assert w5 is None or ok


def test_top_k_lookahead_can_reject_a_completable_state():
    """With flat scores the 5 first allowed tokens after '[' are { [ ] " - and none is followed by ',': LAVE's
    top-k lookahead rejects a completable state (the retries and the recovery cover this)."""
    row = ids("[?,?]", JID, mask=2, eos=1)
    assert C.completable(JSON, row, 2) and C.lookahead_verify(JSON, row, None, mask_id=2) is None


def test_beam_check_follows_the_distributions():
    """The lookahead fills masks with the most likely grammar-allowed tokens of each position."""
    g = GRAMMARS["arith"]
    row = ids("1?+2=?>?$")
    logp = np.full((len(row), V), -5.0)
    logp[1, ID["7"]] = logp[5, ID["9"]] = logp[7, ID["9"]] = 0.0
    logp[1, ID["="]] = 1.0  # more likely but not allowed there
    w = C.lookahead_verify(g, row, logp, mask_id=MASK)
    assert g.text_of(w) == "17+2=9>9"


# ----------------------------------------------------------------------------------------------------------------
# LAVE and the AR loop on random models: outputs always parse
# ----------------------------------------------------------------------------------------------------------------

B, P, N = 6, 8, 16


@pytest.fixture(scope="module")
def dmodel():
    return Decoder(presets.get("tiny_draft", vocab_size=V, mask_token_id=MASK), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def armodel():
    return Decoder(presets.get("tiny_draft", vocab_size=V), rngs=nnx.Rngs(1))


def prompts(seed, vocab=V, lo=11):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(lo, vocab, (B, P)).astype(np.int32)
    valid = np.ones((B, P), bool)
    for r in range(B):
        valid[r, : int(rng.integers(0, P - 1))] = False
    return prompt, valid


@pytest.mark.parametrize("name", ["arith", "countdown", "sort", "sort_letters"])
def test_lave_outputs_always_parse(dmodel, name):
    """Property test over seeds, greedy and sampled: every LAVE row parses (Earley) and passes the task's format
    check; the same random model unconstrained almost never does."""
    g, task = GRAMMARS[name], TASKS[name]
    n = N
    base_ok = rejected = 0
    for seed in range(3):
        prompt, valid = prompts(seed)
        for temp in (0.0, 1.0):
            out = C.lave_generate(dmodel, prompt, valid, g, gen_len=n, args=C.LaveArgs(block_len=8),
                                  temperature=temp, rng=jax.random.key(seed), stop_tokens=STOPS)
            assert out.done.all() and (out.nfe <= n).all()
            rejected += int(out.rejections.sum() + out.recoveries.sum())
            for r in range(B):
                text = g.text_of(out.tokens[r])
                assert g.parses(text) and task.format_ok(text), (seed, temp, text)
                assert not (out.tokens[r] == MASK).any()
        off = C.lave_generate(dmodel, prompt, valid, g, gen_len=n, args=C.LaveArgs(block_len=8, constrained=False),
                              rng=jax.random.key(seed), stop_tokens=STOPS)
        base_ok += sum(g.parses(g.text_of(t)) for t in off.tokens)
    assert base_ok < B and rejected > 0  # the grammar acted


def test_lave_unconstrained_loop_equals_jitted_llada(dmodel):
    """With the grammar off, the host loop is LLaDA (one token per step, low-confidence order, stop early)."""
    prompt, valid = prompts(7)
    for steps in (None, 8):
        off = C.lave_generate(dmodel, prompt, valid, None, gen_len=N, args=C.LaveArgs(block_len=8, steps=steps),
                              stop_tokens=STOPS)
        ref = diffusion_generate(dmodel, prompt, valid, gen_len=N, policy="llada",
                                 policy_args={"block_len": 8, "steps": steps}, stop_tokens=STOPS)
        ref_tokens = np.asarray(ref.tokens)
        np.testing.assert_array_equal(np.where(np.asarray(ref.valid), ref_tokens, PAD), off.tokens)
        np.testing.assert_array_equal(np.asarray(ref.nfe), off.nfe)


@pytest.fixture(scope="module")
def jmodel():
    """A random model over the toy JSON vocabulary (decoded as a diffusion LM and as an AR LM)."""
    return Decoder(presets.get("tiny_draft", vocab_size=len(JV), mask_token_id=2), rngs=nnx.Rngs(3))


def test_lave_json_on_a_toy_model(jmodel):
    m = jmodel
    for seed in range(3):
        prompt, valid = prompts(seed, vocab=len(JV), lo=3)
        out = C.lave_generate(m, prompt, valid, JSON, gen_len=12, args=C.LaveArgs(block_len=4), temperature=1.0,
                              rng=jax.random.key(seed), mask_id=2, pad_id=0)
        for r in range(B):
            text = JSON.text_of(out.tokens[r])
            assert JSON.parses(text), text
            json.loads(text)


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_ar_constrained_outputs_always_parse(armodel, name):
    g, task = GRAMMARS[name], TASKS[name]
    n = N
    for seed in range(3):
        prompt, valid = prompts(seed + 10)
        for temp in (0.0, 1.0):
            out = C.constrained_generate(armodel, prompt, valid, g, max_new_tokens=n, temperature=temp,
                                         rng=jax.random.key(seed))
            for r in range(B):
                text = g.text_of(np.asarray(out.tokens[r]))
                assert g.parses(text) and task.format_ok(text), (seed, temp, text)


def test_ar_constrained_json_and_unconstrained_equals_generate(armodel, jmodel):
    prompt, valid = prompts(5)
    free = C.constrained_generate(armodel, prompt, valid, None, max_new_tokens=N, stop_tokens=(EOS,))
    ref = generate(armodel, prompt, valid, max_new_tokens=N, sampling=GREEDY, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(free.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(free.valid), np.asarray(ref.valid))
    out = C.constrained_generate(jmodel, *prompts(6, vocab=len(JV), lo=3), JSON, max_new_tokens=10, temperature=1.0,
                                 rng=jax.random.key(1))
    for r in range(B):
        json.loads(JSON.text_of(np.asarray(out.tokens[r])))


# ----------------------------------------------------------------------------------------------------------------
# Wiring
# ----------------------------------------------------------------------------------------------------------------


def test_lave_method_registration_and_errors(dmodel):
    assert "lave" in DECODE_METHODS and DECODE_METHODS.entry("lave").config_cls is C.LaveArgs
    assert "lave" not in COMMIT_POLICIES  # a loop of its own (decode.method=lave), not a commit policy
    prompt, valid = prompts(0)
    with pytest.raises(ConfigError, match="decode.method=lave"):  # the old spelling names the new key
        load_config("configs/diffusion/lave.yaml", ["decode.method=diffusion", "decode.policy=lave"])
    with pytest.raises(ConfigError, match="cache"):
        C.lave_generate(dmodel, prompt, valid, GRAMMARS["arith"], gen_len=N, args=C.LaveArgs(cache="dual"))
    with pytest.raises(ValueError, match="no sentence"):
        C.lave_generate(dmodel, prompt, valid, GRAMMARS["arith"], gen_len=5, stop_tokens=STOPS)
    cfg = load_config("configs/diffusion/lave.yaml")
    validate_names(cfg)
    assert cfg.decode.method == "lave" and cfg.decode.policy is None and cfg.decode.policy_args["grammar"] == "task"


def test_lave_step_through_the_one_loop(dmodel):
    """``decode.method=lave``'s step in :func:`jaxtok.decode.evaluate.evaluate` (unpadded batches: a host loop):
    every row parses (``grammar_ok`` 1), the per-row counts and the batch timings come back as metrics."""
    from jaxtok.decode.evaluate import evaluate, lave_step

    step = lave_step(dmodel, TOK, GRAMMARS["arith"], args=C.LaveArgs(block_len=8), gen_len=N)
    m, rows = evaluate(step, ARITH, TOK, prompt_len=48, batch_size=3, num_examples=4, key=jax.random.key(0),
                       warmup=False, pad=False, sample_stats=("nfe",))
    assert m["grammar_ok"] == 1.0 and m["format_ok"] == 1.0 and m["num_examples"] == m["decoded"] == 4
    assert 0 < m["mean_nfe"] <= N and m["verifies_per_row"] >= 1 and m["forward_s"] > 0 and m["host_s"] > 0
    assert len(rows) == 4 and all(1 <= r["nfe"] <= N for r in rows)
