"""Tests for jaxtok.stats (train_methods.md §0–2): hand-computed 3-token values, limiting cases, Monte Carlo
estimators, chunked == unchunked (values and gradients) and the saved-residual check."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok import stats as S
from jaxtok.registry import ConfigError

LN2 = math.log(2.0)
P_S = np.array([0.5, 0.25, 0.25])
P_T = np.array([0.125, 0.375, 0.5])
LOG_S = jnp.asarray(np.log(P_S), jnp.float32)[None]  # [1, 3]; logits = log-probs
LOG_T = jnp.asarray(np.log(P_T), jnp.float32)[None]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed values on a 3-token vocabulary


def test_entropy_hand_computed():
    h = 0.5 * math.log(2) + 2 * 0.25 * math.log(4)  # = 1.5 ln 2
    close(S.entropy(LOG_S), [h])
    close(S.entropy(LOG_S, normalized=True), [h / math.log(3)])
    close(S.entropy(jnp.zeros((1, 3))), [math.log(3)])  # uniform: ln V, normalised 1
    close(S.entropy(jnp.zeros((1, 3)), normalized=True), [1.0])
    # a token with -inf logit has probability 0 and contributes 0 (no NaN), gradient finite
    x = jnp.array([[0.0, 0.0, -jnp.inf]])
    close(S.entropy(x), [LN2])
    assert np.all(np.isfinite(jax.grad(lambda z: S.entropy(z).sum())(x)[:, :2]))


def test_kl_direction_hand_computed():
    rkl = 0.5 * math.log(0.5 / 0.125) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.5)
    fkl = 0.125 * math.log(0.125 / 0.5) + 0.375 * math.log(0.375 / 0.25) + 0.5 * math.log(0.5 / 0.25)
    assert abs(rkl - fkl) > 0.05  # the toy distinguishes the two directions
    close(S.reverse_kl(LOG_S, LOG_T), [rkl])
    close(S.forward_kl(LOG_S, LOG_T), [fkl])
    # the divergences are invariant to a logit shift; temperature divides the logits
    close(S.reverse_kl(LOG_S + 3.0, LOG_T - 1.0), [rkl])
    tau = 2.0
    ps, pt = P_S ** 0.5 / np.sum(P_S ** 0.5), P_T ** 0.5 / np.sum(P_T ** 0.5)
    close(S.reverse_kl(LOG_S, LOG_T, temperature=tau), [np.sum(ps * np.log(ps / pt))])


def test_jsd_hand_computed():
    m = 0.5 * P_T + 0.5 * P_S  # [0.3125, 0.3125, 0.375]
    want = 0.5 * sum(P_T * np.log(P_T / m)) + 0.5 * sum(P_S * np.log(P_S / m))
    close(S.jsd(LOG_S, LOG_T, 0.5), [want])
    b = 0.2
    m = b * P_T + (1 - b) * P_S
    want = b * sum(P_T * np.log(P_T / m)) + (1 - b) * sum(P_S * np.log(P_S / m))
    close(S.jsd(LOG_S, LOG_T, b), [want])


def test_per_term_clip():
    c = 0.05
    rkl_terms = P_S * np.log(P_S / P_T)  # [0.693, -0.101, -0.173]
    fkl_terms = P_T * np.log(P_T / P_S)  # [-0.173, 0.152, 0.347]
    close(S.reverse_kl(LOG_S, LOG_T, clip=c), [np.minimum(rkl_terms, c).sum()])
    close(S.forward_kl(LOG_S, LOG_T, clip=c), [np.minimum(fkl_terms, c).sum()])
    close(S.kl_terms(LOG_S, LOG_T, clip=c), [np.minimum(rkl_terms, c)])
    # clip only changes terms above c: a large c is the unclipped value
    close(S.reverse_kl(LOG_S, LOG_T, clip=10.0), S.reverse_kl(LOG_S, LOG_T))


def test_topk_hand_computed():
    # teacher top-2 = tokens {2, 1}
    ps, pt = np.array([0.25, 0.25]), np.array([0.5, 0.375])
    rs, rt = ps / ps.sum(), pt / pt.sum()
    close(S.reverse_kl(LOG_S, LOG_T, top_k=2), [np.sum(rs * np.log(rs / rt))])
    close(S.forward_kl(LOG_S, LOG_T, top_k=2), [np.sum(rt * np.log(rt / rs))])
    # tail bucket, top-1: categories {token 2, tail}
    qs, qt = np.array([0.25, 0.75]), np.array([0.5, 0.5])
    close(S.reverse_kl(LOG_S, LOG_T, top_k=1, top_k_mode="tail_bucket"), [np.sum(qs * np.log(qs / qt))])
    close(S.forward_kl(LOG_S, LOG_T, top_k=1, top_k_mode="tail_bucket"), [np.sum(qt * np.log(qt / qs))])
    # renorm with k=1 is a point mass on both sides: 0
    close(S.reverse_kl(LOG_S, LOG_T, top_k=1), [0.0])


def test_sampled_estimators_hand_computed():
    y = jnp.array([0])
    lp = S.token_logprobs(LOG_S, y)
    lpt = S.token_logprobs(LOG_T, y)
    close(lp, [math.log(0.5)])
    d = math.log(0.125 / 0.5)
    close(S.sampled_kl(lp, lpt, "k1"), [-d])
    close(S.sampled_kl(lp, lpt, "k2"), [0.5 * d * d])
    close(S.sampled_kl(lp, lpt, "k3"), [math.exp(d) - 1 - d])


def test_token_stats_names_hand_computed():
    y = jnp.array([[0]])
    out = S.token_stats(LOG_S[None], LOG_T[None], y, names=S.STAT_NAMES, chunk_size=4)
    assert set(out) == set(S.STAT_NAMES) and all(v.shape == (1, 1) and v.dtype == jnp.float32 for v in out.values())
    close(out["entropy"], [[1.5 * LN2]])
    close(out["teacher_entropy"], [[S.entropy(LOG_T)[0]]])
    close(out["reverse_kl"], [[S.reverse_kl(LOG_S, LOG_T)[0]]])
    close(out["jsd_norm"], [[S.jsd(LOG_S, LOG_T, 0.5)[0] / LN2]])
    close(out["teacher_logp"], [[math.log(0.125)]])
    close(out["k1"], [[math.log(4.0)]])


# ---------------------------------------------------------------------------------------------------------------
# Limiting cases


def _random_logits(key, shape, scale=2.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_identical_distributions_zero_value_and_gradient():
    x = _random_logits(0, (4, 7))
    variants = [(kind, k, mode) for kind in S.DIVERGENCES for k, mode in [(None, "renorm"), (3, "renorm"),
                                                                        (3, "tail_bucket")]]

    @jax.jit
    def values_and_grads(s):  # every divergence is >= 0 with its minimum at s = x: value 0 and gradient 0
        f = lambda z: jnp.stack([jnp.sum(S.divergence(kind, z, x, top_k=k, top_k_mode=mode))  # noqa: E731
                                 for kind, k, mode in variants])
        return f(s), jax.jacrev(f)(s)

    vals, grads = values_and_grads(x)
    close(vals, np.zeros(len(variants)), 1e-6)
    close(grads, np.zeros((len(variants), 4, 7)), 1e-6)
    lp = S.token_logprobs(x, jnp.zeros(4, jnp.int32))
    for est in S.ESTIMATORS:
        close(S.sampled_kl(lp, lp, est), np.zeros(4), 0)


def test_jsd_endpoints_and_limits():
    s, t = _random_logits(1, (5, 6)), _random_logits(2, (5, 6))
    fkl, rkl = S.forward_kl(s, t), S.reverse_kl(s, t)
    close(S.jsd(s, t, 0.0), fkl)  # special-cased endpoints
    close(S.jsd(s, t, 1.0), rkl)
    eps = 1e-3  # the generalised formula vanishes at the endpoints like β·FKL and (1-β)·RKL
    close(S.jsd(s, t, eps) / eps, fkl, 2e-2)
    close(S.jsd(s, t, 1 - eps) / eps, rkl, 2e-2)
    j = S.jsd(s, t, 0.5)
    close(j, S.jsd(t, s, 0.5))  # symmetric
    assert np.all(np.asarray(j) <= LN2 + 1e-6) and np.all(np.asarray(j) >= 0)
    # disjoint supports reach ln 2
    close(S.jsd(jnp.array([[0.0, -jnp.inf]]), jnp.array([[-jnp.inf, 0.0]]), 0.5), [LN2])


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_shared_zero_probability_token_has_finite_gradient(beta):
    """A vocabulary id with probability 0 under both distributions (``-inf`` in both, e.g. a banned or padded id)
    drops out of JSD_β: the value equals JSD on the other ids and the gradient is finite (and 0 at that id), as
    for FKL/RKL. ``logaddexp(-inf, -inf)`` alone gives a NaN derivative."""
    s, t = jnp.array([[0.3, 1.0, -jnp.inf]]), jnp.array([[0.5, -0.2, -jnp.inf]])
    close(S.jsd(s, t, beta), S.jsd(s[:, :2], t[:, :2], beta))
    for wrt in (0, 1):
        g = jax.grad(lambda a, b: S.jsd(a, b, beta).sum(), argnums=wrt)(s, t)
        g_ref = jax.grad(lambda a, b: S.jsd(a, b, beta).sum(), argnums=wrt)(s[:, :2], t[:, :2])
        assert np.all(np.isfinite(np.asarray(g))), g
        close(g[:, :2], g_ref)
        assert float(g[0, 2]) == 0.0


@pytest.mark.parametrize("mode", S.TOPK_MODES)
def test_topk_with_k_equal_v_is_full(mode):
    s, t = _random_logits(3, (4, 8)), _random_logits(4, (4, 8))
    for kind in S.DIVERGENCES:
        full = S.divergence(kind, s, t)
        for k in (8, 20):
            close(S.divergence(kind, s, t, top_k=k, top_k_mode=mode), full)
    # tail_bucket with k = V - 1: the tail is one token, so nothing is lost
    for kind in S.DIVERGENCES:
        close(S.divergence(kind, s, t, top_k=7, top_k_mode="tail_bucket"), S.divergence(kind, s, t), 1e-5)


def test_tail_bucket_keeps_tiny_tail_exact():
    # a teacher whose top-1 mass is 1 - 1e-12: the tail must still be ~1e-12, not 0 (no inf reverse KL)
    t = jnp.array([[30.0, 2.0, 2.0]])
    s = jnp.array([[0.0, 0.0, 0.0]])
    r = S.reverse_kl(s, t, top_k=1, top_k_mode="tail_bucket")
    tail_t = 2 * math.exp(2.0) / (math.exp(30.0) + 2 * math.exp(2.0))
    want = (1 / 3) * math.log((1 / 3) / (1 - tail_t)) + (2 / 3) * math.log((2 / 3) / tail_t)
    close(r, [want], 1e-4)


def test_bf16_logits_upcast():
    x = _random_logits(5, (3, 9)).astype(jnp.bfloat16)
    h = S.entropy(x)
    assert h.dtype == jnp.float32
    close(h, S.entropy(x.astype(jnp.float32)), 0)


# ---------------------------------------------------------------------------------------------------------------
# Monte Carlo: sampled-token estimators and the score-function gradient (§1 unit test 6)


def test_k_estimators_match_reverse_kl():
    s, t = _random_logits(6, (6,), 1.0), _random_logits(7, (6,), 1.0)
    rkl = float(S.reverse_kl(s, t))
    lp_s, lp_t = S.log_probs(s), S.log_probs(t)
    p = np.exp(np.asarray(lp_s, np.float64))
    # exact expectations under y ~ p_S: k1 and k3 are unbiased
    for est in ("k1", "k3"):
        close(np.sum(p * np.asarray(S.sampled_kl(lp_s, lp_t, est))), rkl, 1e-5)
    # Monte Carlo means converge to the same value; k2 is biased upward but close when p_S ≈ p_T
    y = jax.random.categorical(jax.random.key(8), s, shape=(200_000,))
    for est in ("k1", "k3"):
        mc = float(jnp.mean(S.sampled_kl(lp_s[y], lp_t[y], est)))
        assert abs(mc - rkl) < 0.02, (est, mc, rkl)
    near = t * 0.05 + s * 0.95
    lp_n = S.log_probs(near)
    k2 = np.sum(p * np.asarray(S.sampled_kl(lp_s, lp_n, "k2")))
    close(k2, float(S.reverse_kl(s, near)), 0.1 * float(S.reverse_kl(s, near)))


def test_score_function_gradient_matches_reverse_kl_gradient():
    s, t = _random_logits(9, (5,), 1.0), _random_logits(10, (5,), 1.0)
    g_full = jax.grad(lambda z: S.reverse_kl(z, t))(s)

    def surrogate(z, ys):  # mean over samples of lp_S(y) · sg(lp_S(y) − lp_T(y))
        lp = S.log_probs(z)
        w = jax.lax.stop_gradient(S.sampled_kl(lp[ys], S.log_probs(t)[ys], "k1"))
        return jnp.mean(lp[ys] * w)

    # exact expectation by enumeration (weights p_S(y))
    p = jax.nn.softmax(s)
    grad = jax.jit(jax.grad(surrogate))
    g_exact = sum(p[y] * grad(s, jnp.array([y])) for y in range(5))
    close(g_exact, g_full, 1e-5)
    ys = jax.random.categorical(jax.random.key(11), s, shape=(200_000,))
    close(grad(s, ys), g_full, 0.02)


# ---------------------------------------------------------------------------------------------------------------
# Chunking


CASES = [(5, dict()), (4, dict(top_k=3, top_k_mode="renorm", clip=0.05)),
         (5, dict(top_k=3, top_k_mode="tail_bucket", beta=0.3)), (100, dict(temperature=0.7))]


@pytest.mark.parametrize("chunk_size,kw", CASES)
def test_chunked_equals_unchunked_values_and_gradients(chunk_size, kw):
    B, T, V = 2, 6, 11  # N = 12 tokens: chunk sizes 5 and 100 do not divide it
    s, t = _random_logits(12, (B, T, V)), _random_logits(13, (B, T, V))
    y = jax.random.randint(jax.random.key(14), (B, T), 0, V)
    ref_kw = {k: v for k, v in kw.items() if k != "beta"}
    beta, tau = kw.get("beta", 0.5), kw.get("temperature", 1.0)

    def chunked(z):
        o = S.token_stats(z, t, y, names=S.STAT_NAMES, chunk_size=chunk_size, **kw)
        return jnp.sum(o["reverse_kl"] + 0.3 * o["jsd"] + 0.2 * o["forward_kl"] - 0.1 * o["entropy"]
                       + 0.2 * o["logp"]), o

    def plain(z):
        o = {"reverse_kl": S.reverse_kl(z, t, **ref_kw), "jsd": S.jsd(z, t, beta, **ref_kw),
             "forward_kl": S.forward_kl(z, t, **ref_kw), "entropy": S.entropy(z, tau),
             "logp": S.token_logprobs(z, y, tau)}
        return jnp.sum(o["reverse_kl"] + 0.3 * o["jsd"] + 0.2 * o["forward_kl"] - 0.1 * o["entropy"]
                       + 0.2 * o["logp"]), o

    (v1, o1), g1 = jax.jit(jax.value_and_grad(chunked, has_aux=True))(s)
    (v2, o2), g2 = jax.jit(jax.value_and_grad(plain, has_aux=True))(s)
    for name in o2:
        close(o1[name], o2[name])
    close(v1, v2, 1e-4)
    close(g1, g2, 1e-5)


def _residual_leaves(f, x):
    _, vjp_fn = jax.vjp(f, x)
    return [leaf for leaf in jax.tree.leaves(vjp_fn) if hasattr(leaf, "dtype")]


def test_chunked_saves_no_token_by_vocab_float32_residual():
    N, V = 24, 64
    s = _random_logits(15, (N, V)).astype(jnp.bfloat16)
    t = _random_logits(16, (N, V)).astype(jnp.bfloat16)

    def has_nv_f32(leaves):
        return any(leaf.dtype == jnp.float32 and leaf.size >= N * V for leaf in leaves)

    def chunked(z):
        return jnp.sum(S.token_stats(z, t, names=("reverse_kl", "entropy"), chunk_size=8)["reverse_kl"])

    plain = lambda z: jnp.sum(S.reverse_kl(z, t))  # noqa: E731
    assert has_nv_f32(_residual_leaves(plain, s))  # the check can fail: unchunked keeps f32 log-probs
    leaves = _residual_leaves(chunked, s)
    assert not has_nv_f32(leaves), [(x.shape, x.dtype) for x in leaves]


def test_chunked_map_projects_hidden_states():
    # the memory path: pass hidden states and project per chunk, so no [N, V] logits exist at all
    h = _random_logits(17, (2, 5, 4))
    w = _random_logits(18, (4, 9))
    chunked = lambda w_: S.chunked_map(lambda c: S.entropy(c @ w_), h, chunk_size=3, token_ndim=2)  # noqa: E731
    close(chunked(w), S.entropy(h @ w))
    g1 = jax.jit(jax.grad(lambda w_: chunked(w_).sum()))(w)
    g2 = jax.jit(jax.grad(lambda w_: S.entropy(h @ w_).sum()))(w)
    close(g1, g2, 1e-5)


def test_jit():
    s, t = _random_logits(19, (2, 3, 5)), _random_logits(20, (2, 3, 5))
    f = jax.jit(lambda a, b: S.token_stats(a, b, names=("jsd", "entropy_norm"), chunk_size=4))
    out = f(s, t)
    close(out["jsd"], S.jsd(s, t))
    close(out["entropy_norm"], S.entropy(s, normalized=True))


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_errors_name_argument_and_allowed_values():
    with pytest.raises(ConfigError, match="divergence='kl'.*allowed"):
        S.divergence("kl", LOG_S, LOG_T)
    with pytest.raises(ConfigError, match="beta=1.5"):
        S.jsd(LOG_S, LOG_T, 1.5)
    with pytest.raises(ConfigError, match="top_k=0"):
        S.reverse_kl(LOG_S, LOG_T, top_k=0)
    with pytest.raises(ConfigError, match="top_k_mode='tail'"):
        S.reverse_kl(LOG_S, LOG_T, top_k=1, top_k_mode="tail")
    with pytest.raises(ConfigError, match="estimator='k4'"):
        S.sampled_kl(LOG_S[:, 0], LOG_T[:, 0], "k4")
    with pytest.raises(ConfigError, match="need teacher_logits"):
        S.token_stats(LOG_S, names=("reverse_kl",))
    with pytest.raises(ConfigError, match="need tokens"):
        S.token_stats(LOG_S, LOG_T, names=("k1",))
    with pytest.raises(ConfigError, match="stat='kl'"):
        S.token_stats(LOG_S, LOG_T, names=("kl",))
    with pytest.raises(ConfigError, match="chunk_size=0"):
        S.token_stats(LOG_S, names=("entropy",), chunk_size=0)
