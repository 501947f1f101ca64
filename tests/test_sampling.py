"""Tests for jaxtok.sampling: transforms, Gumbel sampling, static-shape helpers, speculative rejection math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok import sampling as S

# chi-square critical value, 3 degrees of freedom (vocab 4), alpha = 0.001
CHI2_3DF_001 = 16.27


def chi_square(counts, probs):
    counts = np.asarray(counts, np.float64)
    expected = counts.sum() * np.asarray(probs, np.float64)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-probability token was drawn"
    return float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))


def test_count_leading_true_and_first_true_index():
    m = jnp.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(S.count_leading_true(m), [2, 0, 4, 0])
    np.testing.assert_array_equal(S.first_true_index(~m), [2, 0, 4, 0])


def test_rank_desc_and_topk_mask_traced_k():
    scores = jnp.array([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(S.rank_desc(scores), [[3, 0, 1, 2], [0, 1, 2, 3]])
    k = jnp.array([2, 3])
    m = jax.jit(S.topk_mask)(scores, k)
    np.testing.assert_array_equal(m, [[False, True, True, False], [True, True, True, False]])
    valid = jnp.array([[True, False, True, True], [True, True, False, False]])
    m = S.topk_mask(scores, k, valid)
    np.testing.assert_array_equal(m, [[False, False, True, True], [True, True, False, False]])
    # ties are broken by index, exactly k entries
    assert int(S.topk_mask(jnp.zeros((1, 5)), 2).sum()) == 2


def test_temperature_hand_case_and_greedy_no_division():
    logits = jnp.array([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    out = S.apply_temperature(logits, jnp.array([2.0, 0.0]))
    np.testing.assert_allclose(out, [[0.5, 1.0, 2.0], [1.0, 2.0, 4.0]])
    s = S.sample(jax.random.key(0), logits, temperature=jnp.array([0.0, 0.0]))
    np.testing.assert_array_equal(s.tokens, [2, 2])
    assert np.all(np.isfinite(s.logprobs))
    np.testing.assert_allclose(s.logprobs, jax.nn.log_softmax(logits)[:, 2], rtol=1e-6)


def test_top_k_hand_case_and_identity():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
    out = S.mask_top_k(logits, 2)
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, True]])
    np.testing.assert_allclose(out[np.isfinite(out)], [3.0, 2.0])
    for k in (0, 4, 10):
        np.testing.assert_array_equal(S.mask_top_k(logits, k), logits)
    # traced per-row k
    two = jnp.concatenate([logits, logits])
    out = jax.jit(S.mask_top_k)(two, jnp.array([1, 3]))
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, False], [False, True, True, True]])


def test_top_p_hand_case_and_identity():
    probs = jnp.array([[0.1, 0.5, 0.3, 0.1]])
    logits = jnp.log(probs)
    # 0.5 < 0.6 -> need 0.3 too; mass before 0.1's is 0.8 >= 0.6
    np.testing.assert_array_equal(np.isfinite(S.mask_top_p(logits, 0.6)), [[False, True, True, False]])
    np.testing.assert_array_equal(np.isfinite(S.mask_top_p(logits, 0.5)), [[False, True, False, False]])
    np.testing.assert_array_equal(np.isfinite(S.mask_top_p(logits, 1e-6)), [[False, True, False, False]])
    # top_p = 1 is the identity, even for a long tail whose cumulative mass rounds to 1 in float32
    tail = jnp.concatenate([jnp.array([[30.0]]), jnp.zeros((1, 50))], axis=1)
    np.testing.assert_array_equal(S.mask_top_p(tail, 1.0), tail)
    np.testing.assert_array_equal(S.mask_top_p(logits, 1.0), logits)


def test_min_p_hand_case_and_limits():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(probs) + 7.0  # shift invariance
    # keep p >= 0.2 * 0.5 = 0.1
    np.testing.assert_array_equal(np.isfinite(S.mask_min_p(logits, 0.2)), [[True, True, True, False]])
    np.testing.assert_array_equal(S.mask_min_p(logits, 0.0), logits)
    np.testing.assert_array_equal(np.isfinite(S.mask_min_p(logits, 1.0)), [[True, False, False, False]])


def test_process_logits_log_probs_are_renormalised():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    s = S.sample(jax.random.key(1), logits, temperature=1.0, top_k=2)
    np.testing.assert_allclose(np.exp(s.log_probs), [[4 / 7, 3 / 7, 0.0, 0.0]], rtol=1e-6)
    assert int(s.tokens[0]) in (0, 1)
    np.testing.assert_allclose(S.entropy_from_log_probs(s.log_probs), -(4 / 7 * np.log(4 / 7) + 3 / 7 * np.log(3 / 7)),
                               rtol=1e-6)


def test_large_logits_do_not_overflow():
    logits = jnp.array([[1000.0, 999.0, -1000.0]])
    s = S.sample(jax.random.key(2), logits, temperature=0.5)
    assert np.all(np.isfinite(s.log_probs[:, :2])) and int(s.tokens[0]) in (0, 1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_frequencies_match_softmax(temperature):
    logits = jnp.array([1.0, 0.2, -0.5, 0.7])
    n = 20000
    tokens = S.sample(jax.random.key(3), jnp.broadcast_to(logits, (n, 4)), temperature=temperature).tokens
    counts = np.bincount(np.asarray(tokens), minlength=4)
    assert chi_square(counts, jax.nn.softmax(logits / temperature)) < CHI2_3DF_001


def test_filtered_sampling_frequencies():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
    n = 20000
    tokens = S.sample(jax.random.key(4), jnp.broadcast_to(logits, (n, 4)), top_p=0.65).tokens
    counts = np.bincount(np.asarray(tokens), minlength=4)
    assert chi_square(counts, [4 / 7, 3 / 7, 0.0, 0.0]) < CHI2_3DF_001


# ----------------------------------------------------------------------------------------------------------------
# Speculative verification
# ----------------------------------------------------------------------------------------------------------------


def test_residual_distribution_hand_case_and_degenerate():
    p = jnp.array([0.5, 0.3, 0.2, 0.0])
    q = jnp.array([0.2, 0.5, 0.2, 0.1])
    np.testing.assert_allclose(S.residual_distribution(p, q), [1.0, 0.0, 0.0, 0.0])
    p2 = jnp.array([0.4, 0.1, 0.5, 0.0])
    np.testing.assert_allclose(S.residual_distribution(p2, q), [0.4, 0.0, 0.6, 0.0], rtol=1e-6)
    # p == q: no residual mass -> fall back to p (never token 0 by default)
    np.testing.assert_allclose(S.residual_distribution(q, q), q)


def test_greedy_variant_accepts_exact_matching_prefix():
    v = 5
    a = jnp.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])  # target argmax at γ+1 = 4 slots
    target = jax.nn.one_hot(a, v) * 3.0
    drafts = jnp.array([[1, 2, 0], [0, 2, 3], [1, 2, 3]])
    out = S.speculative_accept_greedy(drafts, target, pad_id=9)
    np.testing.assert_array_equal(out.num_accepted, [2, 0, 3])
    np.testing.assert_array_equal(out.next_token, [3, 1, 4])
    np.testing.assert_array_equal(out.tokens, [[1, 2, 3, 9], [1, 9, 9, 9], [1, 2, 3, 4]])
    # a row whose own γ is 1: the second draft is invalid even though it matches
    valid = jnp.array([[True, False, False]] * 3)
    out = S.speculative_accept_greedy(drafts, target, valid, pad_id=9)
    np.testing.assert_array_equal(out.num_accepted, [1, 0, 1])
    np.testing.assert_array_equal(out.tokens[0], [1, 2, 9, 9])


def _spec_round(key, q, p, gamma):
    """One speculative round for one row with position-indexed tables q [γ, V], p [γ+1, V]."""
    k_draft, k_verify = jax.random.split(key)
    drafts = jax.random.categorical(k_draft, jnp.log(q))  # [γ]
    out = S.speculative_accept(k_verify, drafts[None], q[None], p[None])
    return out.tokens[0], out.num_accepted[0]


def test_speculative_sampling_is_exact_in_distribution():
    gamma, n = 2, 40000
    q = jnp.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    p = jnp.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1], [0.05, 0.15, 0.3, 0.5]])
    keys = jax.random.split(jax.random.key(5), n)
    tokens, nacc = jax.jit(jax.vmap(lambda k: _spec_round(k, q, p, gamma)))(keys)
    tokens, nacc = np.asarray(tokens), np.asarray(nacc)
    # first emitted token ~ p_1
    assert chi_square(np.bincount(tokens[:, 0], minlength=4), p[0]) < CHI2_3DF_001
    # second token (emitted in this round when d_1 was accepted) ~ p_2; third (bonus after γ accepts) ~ p_3
    assert chi_square(np.bincount(tokens[nacc >= 1, 1], minlength=4), p[1]) < CHI2_3DF_001
    assert chi_square(np.bincount(tokens[nacc == 2, 2], minlength=4), p[2]) < CHI2_3DF_001
    # P(accept d_1) = sum_x min(p, q) = 1 - TV(p, q) = 0.4 here
    assert abs(np.mean(nacc >= 1) - float(jnp.minimum(p[0], q[0]).sum())) < 0.01


def test_speculative_sampling_q_equals_p_accepts_everything():
    gamma, n = 3, 20000
    p = jnp.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1], [0.5, 0.0, 0.5, 0.0], [0.05, 0.15, 0.3, 0.5]])
    keys = jax.random.split(jax.random.key(6), n)
    tokens, nacc = jax.jit(jax.vmap(lambda k: _spec_round(k, p[:gamma], p, gamma)))(keys)
    tokens = np.asarray(tokens)
    assert np.all(np.asarray(nacc) == gamma)
    for i in range(gamma + 1):
        assert chi_square(np.bincount(tokens[:, i], minlength=4), p[i]) < CHI2_3DF_001


def test_invalid_drafts_give_the_bonus_distribution():
    n = 20000
    q = jnp.array([[0.7, 0.1, 0.1, 0.1]])
    p = jnp.array([[0.1, 0.4, 0.2, 0.3], [0.9, 0.05, 0.05, 0.0]])
    keys = jax.random.split(jax.random.key(7), n)

    def one(k):
        out = S.speculative_accept(k, jnp.array([[0]]), q[None], p[None], draft_valid=jnp.array([[False]]))
        return out.tokens[0], out.num_accepted[0]

    tokens, nacc = jax.jit(jax.vmap(one))(keys)
    assert np.all(np.asarray(nacc) == 0)
    assert chi_square(np.bincount(np.asarray(tokens[:, 0]), minlength=4), p[0]) < CHI2_3DF_001


def test_zero_target_probability_draft_is_always_rejected():
    q = jnp.array([[[0.5, 0.5, 0.0, 0.0]]])
    p = jnp.array([[[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    keys = jax.random.split(jax.random.key(8), 2000)
    out = jax.jit(jax.vmap(lambda k: S.speculative_accept(k, jnp.array([[0]]), q, p)))(keys)
    assert np.all(np.asarray(out.num_accepted) == 0)
    # residual max(0, p - q) = [0, 0, 0.5, 0] -> always token 2
    assert np.all(np.asarray(out.next_token) == 2)


def test_speculative_accept_shape_error():
    with pytest.raises(ValueError, match="target_probs"):
        S.speculative_accept(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2, 4)) / 4,
                             jnp.ones((1, 2, 4)) / 4)


def test_sampling_params_validate_freeze_and_per_row():
    """SamplingParams: out-of-range values name the field; host arrays become hashable tuples; per_row drops the
    filters at their neutral values (skipped at trace time) and keeps the per-row values."""
    for bad, name in ((dict(temperature=-1.0), "temperature"), (dict(top_k=1.5), "top_k"), (dict(top_p=0.0), "top_p"),
                      (dict(min_p=2.0), "min_p"), (dict(temperature=np.zeros((2, 2))), "temperature")):
        with pytest.raises(ValueError, match=name):
            S.SamplingParams(**bad)
    p = S.SamplingParams(temperature=np.array([0.7, 0.0], np.float32), top_k=5)
    assert hash(p) == hash(S.SamplingParams(temperature=(np.float32(0.7).item(), 0.0), top_k=5))
    assert not p.all_greedy and S.GREEDY.all_greedy and S.SamplingParams(temperature=(0.0, 0.0)).all_greedy
    rows = p.per_row(2)
    assert rows.top_p is None and rows.min_p is None and rows.filtered
    np.testing.assert_array_equal(rows.top_k, [5, 5])
    np.testing.assert_array_equal(rows.temperature, np.array([0.7, 0.0], np.float32))
    assert not S.SamplingParams().per_row(3).filtered
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    got = rows.sample(jax.random.key(1), logits)
    want = S.sample(jax.random.key(1), logits, rows.temperature[:, None], rows.top_k[:, None])
    np.testing.assert_array_equal(got.tokens, want.tokens)
