"""Grammar masks on a real BPE vocabulary (decode/constrained.py ``TokenGrammar``, the llguidance engine): the real
Qwen3 vocabulary (151,669 tokens, 151,936 logits; tests/real_tokenizers.py builds it once per module) with a JSON
grammar and a JSON schema. A random tiny decoder decoded greedily and with sampling under the mask stops only on text
that ``json.loads`` parses; every chosen token is allowed by a fresh matcher replaying the row; the mask forbids
tokens that break the grammar at known points (and the forbidden token loses on device even when it is the
argmax)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("llguidance")

from jaxtok.decode import constrained as C  # noqa: E402
from jaxtok.models import Decoder, load_tokenizer, presets  # noqa: E402
from jaxtok.registry import ConfigError  # noqa: E402
from jaxtok.sampling import SamplingParams  # noqa: E402
from jaxtok.tasks.tokenizer import decode  # noqa: E402

import real_tokenizers as rt  # noqa: E402

V = rt.QWEN3_VOCAB_SIZE  # 151,936 logits
B, P, N = 4, 6, 32
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return load_tokenizer(qwen3_dir)


@pytest.fixture(scope="module")
def json_grammar(tok):
    return C.TokenGrammar.json(tok, vocab_size=V)


@pytest.fixture(scope="module")
def schema_grammar(tok):
    """A finite language (no whitespace, booleans and an enum): every row must stop within N tokens."""
    return C.TokenGrammar.from_json_schema(tok, SCHEMA, whitespace_flexible=False, vocab_size=V)


@pytest.fixture(scope="module")
def model():
    return Decoder(presets.get("tiny_draft", vocab_size=V, hidden_size=16, intermediate_size=32, head_dim=8),
                   rngs=nnx.Rngs(0))


def prompts(seed):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 151_000, (B, P)).astype(np.int32)
    valid = np.ones((B, P), bool)
    valid[1, :2] = False  # left padding
    return prompt, valid


def replay(grammar, ids):
    """Every token of ``ids`` is allowed by a fresh matcher at its step; terminators only where the text is a
    sentence. Returns whether the row stopped on a terminator."""
    m = grammar.matcher()
    for k, t in enumerate(int(t) for t in ids):
        allowed = grammar.allowed(m)
        assert allowed[t], (k, t)
        if t in grammar.stop_ids:
            assert m.is_accepting() and k == len(ids) - 1
            return True
        assert m.consume_token(t), (k, t, m.get_error())
    return False


def ids_of(tok, text):
    return tok.encode(text)


def named(tok, mask):
    return {tok.hf.id_to_token(int(i)) for i in np.nonzero(mask)[0]}


# ----------------------------------------------------------------------------------------------------------------
# Decoding under the mask
# ----------------------------------------------------------------------------------------------------------------


def test_json_decoding_greedy_and_sampled_parses_when_it_stops(tok, model, json_grammar):
    stopped = 0
    for seed, temp in ((0, 0.0), (2, 1.0)):
        out = C.grammar_generate(model, *prompts(seed), json_grammar, max_new_tokens=N,
                                 sampling=SamplingParams(temperature=temp), rng=jax.random.key(seed), pad_id=tok.pad_id)
        tokens, lengths, done = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.done)
        assert np.isfinite(np.asarray(out.logprobs)[np.asarray(out.valid)]).all()  # never a masked token
        for r in range(B):
            ids = tokens[r, :lengths[r]]
            assert replay(json_grammar, ids) == bool(done[r])
            if done[r]:
                json.loads(decode(tok, ids))
                stopped += 1
    assert stopped >= 2  # the property is exercised (the rest ran into max_new_tokens mid-sentence)


def test_schema_decoding_always_stops_on_valid_json(tok, model, schema_grammar):
    for seed, temp in ((3, 0.0), (4, 1.0)):
        # constrained_generate dispatches a TokenGrammar to grammar_generate
        out = C.constrained_generate(model, *prompts(seed), schema_grammar, max_new_tokens=N, temperature=temp,
                                     rng=jax.random.key(seed), pad_id=tok.pad_id)
        assert np.asarray(out.done).all()
        for r in range(B):
            ids = np.asarray(out.tokens[r, :int(out.lengths[r])])
            assert replay(schema_grammar, ids)
            obj = json.loads(decode(tok, ids))
            assert set(obj) == {"ok", "color"} and isinstance(obj["ok"], bool) and obj["color"] in ("red", "green",
                                                                                                      "blue")


# ----------------------------------------------------------------------------------------------------------------
# The mask at known points
# ----------------------------------------------------------------------------------------------------------------


def test_mask_forbids_tokens_that_break_the_grammar(tok, json_grammar):
    g, tid = json_grammar, tok.token_to_id
    eos = set(g.stop_ids)
    start = g.ar_token_mask([])
    assert {"{", "[", '"', "true", "1"} <= named(tok, start)
    assert not start[[tid("Ġapples"), tid("app"), tid("}"), *eos]].any()
    mid = g.ar_token_mask(ids_of(tok, '{"a": 1'))  # inside an object, after a number
    assert {"}", ",", "0"} <= named(tok, mid)
    assert not mid[[tid("]"), tid(":"), tid("app"), *eos]].any()
    inside = g.ar_token_mask(ids_of(tok, '{"'))  # inside a key: any text, never a special token
    assert inside[tid("Ġapples")] and inside[tid("app")]
    assert not inside[[tid("<|im_start|>"), *eos]].any()
    done = g.ar_token_mask(ids_of(tok, '{"a": 1}'))
    assert set(np.nonzero(done)[0].tolist()) == eos  # a complete value: only the terminators
    assert not start[tok.hf.get_vocab_size():].any() and not inside[tok.hf.get_vocab_size():].any()  # padding logits
    assert g.accepts(ids_of(tok, '{"a": [1, "x"]}') + [g.stop_ids[0]]) and not g.accepts(ids_of(tok, '{"a": 1'))
    with pytest.raises(ValueError, match="not allowed"):
        g.state_of(ids_of(tok, '{"a": 1]'))


def test_forbidden_argmax_loses_on_device(tok, json_grammar):
    """The bitmask applied to logits where the forbidden ``]`` is the argmax: ``}`` (allowed) wins."""
    g, tid = json_grammar, tok.token_to_id
    bm = np.zeros((1, g.words), np.int32)
    g.fill([g.state_of(ids_of(tok, '{"a": 1'))], bm)
    logits = jnp.zeros((1, V)).at[0, tid("]")].set(100.0).at[0, tid("}")].set(50.0)
    masked = np.asarray(C.apply_token_bitmask(logits, jnp.asarray(bm)))
    assert masked[0, tid("]")] == -np.inf and int(np.argmax(masked[0])) == tid("}")
    np.testing.assert_array_equal(np.isfinite(masked[0]), C.unpack_bitmask(bm[0], V))


def test_bitmask_helpers_agree():
    rng = np.random.default_rng(0)
    bm = rng.integers(-2**31, 2**31, (3, C.bitmask_words(70)), dtype=np.int64).astype(np.int32)  # sign bits set
    host = C.unpack_bitmask(bm, 70)  # [3, 70]
    dev = np.isfinite(np.asarray(C.apply_token_bitmask(jnp.zeros((3, 70)), jnp.asarray(bm))))
    np.testing.assert_array_equal(host, dev)
    row = np.zeros(3, np.int32)
    C.set_token_bits(row, [0, 31, 64], True)
    assert np.nonzero(C.unpack_bitmask(row, 96))[0].tolist() == [0, 31, 64]
    C.set_token_bits(row, [31], False)
    assert np.nonzero(C.unpack_bitmask(row, 96))[0].tolist() == [0, 64]


def test_errors(tok, model, json_grammar):
    with pytest.raises(ValueError, match="vocab_size=model.cfg.vocab_size"):  # e.g. built for the 151,669 ids
        C.GrammarGuide(json_grammar).check(B, tok.hf.get_vocab_size())
    with pytest.raises(ValueError, match="terminators"):
        C.grammar_generate(model, *prompts(0), json_grammar, max_new_tokens=2, stop_tokens=(0,))
    with pytest.raises(ConfigError, match="invalid grammar"):
        C.TokenGrammar.from_lark(tok, "start: undefined_rule", vocab_size=V)
    with pytest.raises(ValueError, match="smaller"):
        C.TokenGrammar.json(tok, vocab_size=100)


def test_char_grammar_reads_byte_level_tokens_as_text(tok, json_grammar):
    """LAVE's character grammar on the same vocabulary: ``vocab_of`` maps ``Ġapples`` to `` apples`` (specials and
    partial UTF-8 tokens None), and the toy JSON grammar agrees with the engine on strings inside its subset."""
    vocab = C.vocab_of(tok)
    assert vocab[tok.token_to_id("Ġapples")] == " apples" and vocab[tok.token_to_id("<|im_start|>")] is None
    assert vocab[tok.token_to_id("<think>")] == "<think>"  # a non-special added token is text as written
    char = C.CharGrammar(C.JSON_GRAMMAR, vocab, tok.eos_ids)
    for text, ok in (('{"a b":[1,"x y"]}', True), ("[true,null,-12]", True), ('{"a":1', False), ("[1,]", False)):
        ids = tok.encode(text)
        assert char.accepts(char.text_of(ids)) == ok == json_grammar.accepts(ids), text
