"""LUD (lexical unit decoding, decode_methods.md §A8): the decode rule's limiting cases, the exact KV recompute, stop
/ length handling, the training-data construction on a hand-made example, and config errors."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok import cli
from jaxtok.decode.generate import generate
from jaxtok.decode.lud import LUDArgs, accept_count, lud_generate, lud_init, lud_round, repeats
from jaxtok.decode.speculative import poison_stale
from jaxtok.models import Decoder, KVCache, ModelConfig
from jaxtok.sampling import GREEDY
from jaxtok.train.objectives.lud import (LUDArgs as LUDTrainArgs, draw_starts, lexical_units, lud_loss, lud_window,
                                         window_starts)
from jaxtok.train.objectives.sft import sft_loss

ROOT = Path(__file__).resolve().parents[1]
V, P, N, PH, STOP = 12, 5, 9, 3, 2


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, max_position_embeddings=64)
    return Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, P + 1, 16)
    valid = np.arange(P)[None, :] >= (P - lens)[:, None]
    prompt = np.where(valid, rng.integers(4, V, (16, P)), 0).astype(np.int32)
    return prompt, valid


def _lud(model, prompts, stop=(STOP,), n=N, **kw):
    return lud_generate(model, *prompts, max_new_tokens=n, args=LUDArgs(placeholder_id=PH, **kw), sampling=GREEDY,
                        stop_tokens=stop, rng=jax.random.key(0))


@pytest.mark.parametrize("kw", [dict(k=1, threshold=0.0), dict(k=3, threshold=1.5)])
def test_k1_or_alpha_above_1_is_greedy_ar(model, prompts, kw):
    ref = generate(model, *prompts, max_new_tokens=N, sampling=GREEDY, stop_tokens=(STOP,), rng=jax.random.key(0))
    out = _lud(model, prompts, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.valid), np.asarray(ref.valid))
    assert int(out.forwards) == int(ref.num_forwards)
    assert np.asarray(out.accept_hist)[:, 1:].sum() == 0  # one token per forward
    np.testing.assert_array_equal(np.asarray(out.row_forwards), np.asarray(out.lengths))


@pytest.mark.parametrize("k,n", [(3, 9), (4, 7)])
def test_alpha_0_accepts_k_per_forward(model, prompts, k, n):
    out = _lud(model, prompts, stop=(), n=n, k=k, threshold=0.0)
    assert np.all(np.asarray(out.lengths) == n)
    assert int(out.forwards) == -(-n // k)  # ceil(n / k): prefill + steps, each k tokens
    np.testing.assert_array_equal(np.asarray(out.row_forwards), -(-n // k))
    assert np.all(np.asarray(out.accept_hist)[:, :k - 1] == 0)
    # the first token of every forward is the AR token of its (real) context: token 0 = greedy AR's first token
    ref = generate(model, *prompts, max_new_tokens=1, sampling=GREEDY, stop_tokens=(), rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], np.asarray(ref.tokens)[:, 0])


def test_stop_and_max_new_tokens(model, prompts):
    out = _lud(model, prompts, stop=(STOP, 7), n=N, k=4, threshold=0.0)
    toks, valid, lengths = np.asarray(out.tokens), np.asarray(out.valid), np.asarray(out.lengths)
    for r in range(toks.shape[0]):
        row = toks[r, :lengths[r]]
        stops = np.nonzero(np.isin(row, (STOP, 7)))[0]
        if len(stops):  # cut right after the first stop token, the row is done
            assert stops[0] == lengths[r] - 1 and bool(out.done[r])
        else:
            assert lengths[r] == N and not bool(out.done[r])
        assert valid[r].sum() == lengths[r] and np.all(toks[r, lengths[r]:] == 0)
    assert np.any(np.asarray(out.done)) and np.any(~np.asarray(out.done))  # both cases exercised


def test_kv_recompute_is_exact(model, prompts):
    """After a step the cache equals a fresh prefill of the committed tokens except the pending ones; stale
    (placeholder) slots are NaN-poisoned and never read."""
    prompt, valid = jnp.asarray(prompts[0]), jnp.asarray(prompts[1])
    b = prompt.shape[0]
    kw = dict(max_new_tokens=N, k=4, threshold=0.3, repeat_ngram=0, placeholder_id=PH, stop_tokens=(), pad_id=0)
    params = GREEDY.per_row(b)
    st = jax.jit(functools.partial(lud_init, **kw))(model, prompt, valid, jax.random.key(0), params)
    step = jax.jit(functools.partial(lud_round, **kw))
    for i in range(2):
        st = step(model, st.__class__(**{**st.__dict__, "cache": poison_stale(st.cache)}), jax.random.key(i), params)
        n = P + np.asarray(st.count) - np.asarray(st.pend)  # tokens whose KV is in the cache
        np.testing.assert_array_equal(np.asarray(st.cache.lengths), n)
        assert np.all(np.isfinite(np.asarray(st.seq, np.float32)))
        seq, seq_valid = np.asarray(st.seq), np.asarray(st.seq_valid)
        m = int(n.max())
        live = seq_valid[:, :m] & (np.arange(m)[None, :] < n[:, None])  # a row's later tokens: invalid (causal)
        fresh = model(jnp.asarray(seq[:, :m]), valid=jnp.asarray(live), cache=KVCache.init(model.cfg, b, m)).cache
        for name in ("k", "v"):
            got, want = np.asarray(getattr(st.cache, name)[:, :, :m]), np.asarray(getattr(fresh, name))
            np.testing.assert_allclose(got[:, live], want[:, live], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(st.cache.positions[:, :m])[live],
                                      (np.cumsum(live, axis=1) - 1)[live])
    assert np.asarray(st.accept_hist)[:, 1:].sum() > 0  # some steps did accept parallel tokens


def test_accept_rule_and_repetition_guard():
    conf = jnp.array([[0.1, 0.95, 0.92, 0.5], [0.2, 0.3, 0.99, 0.99], [0.9, 0.9, 0.9, 0.9]])
    np.testing.assert_array_equal(np.asarray(accept_count(conf, 0.9)), [3, 1, 4])
    hist = jnp.array([[5, 6, 7, 8], [5, 6, 7, 8]])
    pred = jnp.array([[7, 8, 9, 9], [9, 9, 4, 4]])
    ok = jnp.ones_like(hist, bool)
    # g = 2: row 0: "7 8" repeats the 2-gram "7 8" before it at ŷ_2; row 1: no 2-gram repeat ("9 9" vs "7 8"...)
    np.testing.assert_array_equal(np.asarray(repeats(hist, ok, pred, 2)), [[0, 1, 0, 0], [0, 0, 0, 0]])
    # g = 1: immediate repeats ("9 9", "4 4"); the AR token ŷ_1 is never refused
    np.testing.assert_array_equal(np.asarray(repeats(hist[:, 2:], ok[:, 2:], pred, 1)), [[0, 0, 0, 1], [0, 1, 0, 1]])


def test_repetition_guard_limits_span(model, prompts):
    free = _lud(model, prompts, stop=(), k=4, threshold=0.0)
    guarded = _lud(model, prompts, stop=(), k=4, threshold=0.0, repeat_ngram=1)
    assert int(guarded.forwards) >= int(free.forwards)
    assert np.asarray(guarded.row_forwards).sum() >= np.asarray(free.row_forwards).sum()
    assert np.all(np.asarray(guarded.lengths) == N)


def test_lexical_units_and_windows_hand_made():
    # label index t: token t predicted from output t-1; response = columns 1..8
    confident = jnp.array([[0, 0, 1, 1, 1, 0, 1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(lexical_units(confident)), [[0, 1, 5, 5, 5, 5, 8, 8, 8, 10]])
    # starts s with x_{s+1}, x_{s+2} in one unit: s = 1 (unit [2,5)), 2 (mid-unit), 5 (unit [6,8))
    np.testing.assert_array_equal(np.asarray(window_starts(confident)), [[0, 1, 1, 0, 0, 1, 0, 0, 0, 0]])
    tokens = jnp.arange(10)[None] + 10
    loss_mask = jnp.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], bool)
    inputs, w = lud_window(tokens, loss_mask, lexical_units(confident), jnp.array([1]), jnp.array([True]), k=4,
                           placeholder_id=PH, outside_weight=0.5)
    np.testing.assert_array_equal(np.asarray(inputs), [[10, 11, PH, PH, PH, 15, 16, 17, 18, 19]])
    # outputs at the placeholders 2, 3, 4 score tokens 3, 4 (unit) and 5 (after the unit: outside_weight)
    np.testing.assert_allclose(np.asarray(w), [[0, 0, 0, 1, 1, 0.5, 0, 0, 0, 0]])
    _, w_none = lud_window(tokens, loss_mask, lexical_units(confident), jnp.array([1]), jnp.array([False]), k=4,
                           placeholder_id=PH)
    assert float(w_none.sum()) == 0.0
    start, has = draw_starts(jax.random.key(0), jnp.tile(window_starts(confident), (64, 1)))
    assert bool(has.all()) and set(np.asarray(start).tolist()) == {1, 2, 5}


def _batch():
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, V, (4, 10)).astype(np.int32)
    loss_mask = np.zeros((4, 10), bool)
    loss_mask[:, 4:9] = True
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask), "valid": jnp.ones((4, 10), bool)}


def test_loss_is_sft_without_units_and_adds_windows_with_them(model):
    batch = _batch()
    sft_sum, sft_n, _ = sft_loss(model, batch, jax.random.key(0))
    s, n, aux = lud_loss(model, batch, jax.random.key(0), LUDTrainArgs(threshold=1.0, k=3, placeholder_id=PH),
                         reference=model)
    np.testing.assert_allclose(float(s), float(sft_sum), rtol=1e-5)
    assert float(n) == float(sft_n) and float(aux["window_rows"][0]) == 0
    s0, n0, aux0 = lud_loss(model, batch, jax.random.key(0), LUDTrainArgs(threshold=0.0, k=3, placeholder_id=PH),
                            reference=model)
    assert float(n0) > float(n) and float(s0) > float(s) and np.isfinite(float(s0))
    assert float(aux0["window_rows"][0]) == float(aux0["window_rows"][1])  # every row has a window


def test_config_errors_exit_2_naming_the_key(capsys):
    dec, tr = str(ROOT / "configs/decode/lud.yaml"), str(ROOT / "configs/testbed/lud.yaml")
    assert cli.main(["validate", dec, "decode.policy_args.k=0"]) == 2
    assert "decode.policy_args" in capsys.readouterr().err
    assert cli.main(["validate", dec, "decode.policy_args.alpha=0.5"]) == 2
    assert "decode.policy_args.alpha" in capsys.readouterr().err
    assert cli.main(["validate", tr, "objective.args.threshold=2"]) == 2
    assert "objective.args" in capsys.readouterr().err
    assert cli.main(["validate", dec]) == 0


def test_summarize_lud_stats():
    from jaxtok.decode.evaluate import add_stats, summarize

    sums = add_stats({}, {"target_forwards": np.int32(3), "lud_row_forwards": np.array([2, 3, 9]),
                          "lud_accept_hist": np.array([[1, 0, 1], [2, 1, 0], [0, 0, 0]])}, rows=2)
    out = summarize(sums, n_tok=10, rows=2)
    assert out["tokens_per_forward"] == 2.0 and out["accepted_span_hist"] == [3, 1, 1]
    assert out["mean_accepted_span"] == (3 + 2 + 3) / 5 and out["target_forwards"] == 3
