"""Tests for jaxtok.select (train_methods.md §2–5): exact counts with traced ρ, validity, ρ=1 == plain OPD,
empty selections, Soft-OR / Q3 / quadrant on hand-built grids, Gumbel-top-k vs sampling without replacement,
TRACE span cap, SHRED lowest-probability set, TAD near/distant partition, registry entries."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok import select as sel
from jaxtok import stats
from jaxtok.registry import SELECTIONS, ConfigError

VALID = jnp.array([[True, True, True, True, True, False, False],
                   [True, True, False, True, True, True, False]])  # [2, 7], 10 valid tokens
N_VALID = 10
H = jax.random.uniform(jax.random.key(0), VALID.shape)  # ĥ-like scores in [0, 1)
D = jax.random.uniform(jax.random.key(1), VALID.shape)
STATS = {"entropy_norm": H, "reverse_kl": D, "forward_kl": D, "jsd_norm": D, "logp": -D,
         "spans": jnp.ones(VALID.shape, bool)}
RHO_RULES = ["random", "entropy_sample", "entropy_topk", "soft_or", "q3"]


def run_rule(name, rho, valid=VALID, key=jax.random.key(2), stats_=STATS, **kw):
    args = SELECTIONS.parse_args(name, dict(kw, **({"rho": rho} if rho is not None else {})))
    return SELECTIONS.get(name)(stats_, valid, key, args)


def test_keep_count():
    assert [int(sel.keep_count(r, 10)) for r in (0.05, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0)] == [1, 1, 3, 5, 7, 9, 10]
    assert int(sel.keep_count(0.5, 0)) == 0
    assert int(sel.keep_count(0.01, 10, at_least_one=False)) == 0
    assert int(jax.jit(sel.keep_count)(0.25, 12)) == 3


def test_masked_quantile_matches_numpy():
    x = jax.random.normal(jax.random.key(3), (3, 9))
    v = jax.random.bernoulli(jax.random.key(4), 0.6, (3, 9))
    xs = np.asarray(x)[np.asarray(v)]
    for q in (0.0, 0.25, 0.5, 0.98, 1.0):
        np.testing.assert_allclose(sel.masked_quantile(x, v, q), np.quantile(xs, q), rtol=1e-6)
    rows = sel.masked_quantile(x, v, 0.5, axis=1)
    for b in range(3):
        np.testing.assert_allclose(rows[b], np.quantile(np.asarray(x)[b][np.asarray(v)[b]], 0.5), rtol=1e-6)
    assert float(sel.masked_quantile(x, jnp.zeros_like(v), 0.5)) == 0.0


@pytest.mark.parametrize("name", RHO_RULES)
def test_exact_count_only_valid_traced_rho(name):
    traces = []

    @jax.jit
    def f(rho, key):
        traces.append(1)
        return _rule_with_rho(name, STATS, VALID, key, rho)

    for rho in (0.1, 0.25, 0.5, 0.8, 1.0):
        w = np.asarray(f(jnp.float32(rho), jax.random.key(5)))
        assert set(np.unique(w)) <= {0.0, 1.0}
        assert w.sum() == max(1, math.floor(rho * N_VALID))
        assert np.all(w[~np.asarray(VALID)] == 0)
    assert len(traces) == 1  # ρ is traced: one compilation for every ρ
    # ρ = 1 selects every valid token
    np.testing.assert_array_equal(f(jnp.float32(1.0), jax.random.key(6)), VALID.astype(np.float32))


def _rule_with_rho(name, stats_, valid, key, rho):
    """The rule's core function with a traced ρ (the registered adapters take ρ from the frozen args)."""
    if name == "random":
        return sel.select_random(key, valid, rho)
    if name == "entropy_sample":
        return sel.entropy_sample(key, stats_["entropy_norm"], valid, rho)
    if name == "entropy_topk":
        return sel.entropy_topk(stats_["entropy_norm"], valid, rho)
    if name == "soft_or":
        return sel.soft_or(stats_["entropy_norm"], stats_["reverse_kl"], valid, rho)
    return sel.q3(stats_["entropy_norm"], stats_["forward_kl"], valid, rho)


@pytest.mark.parametrize("name", [n for n in SELECTIONS.names() if n != "near_distant"])  # masks pair: below
def test_registered_rules_empty_valid_and_only_valid(name):
    w = run_rule(name, None)
    assert w.shape == VALID.shape and w.dtype == jnp.float32
    assert np.all(np.asarray(w)[~np.asarray(VALID)] == 0)
    empty = jnp.zeros_like(VALID)
    w0 = run_rule(name, None, valid=empty)
    np.testing.assert_array_equal(w0, np.zeros(VALID.shape))
    loss = jnp.ones(VALID.shape)
    for norm in ("selected", "all"):
        total, count = sel.selected_loss(loss, w0, empty, norm)
        assert float(total) == 0.0 and float(count) == 0.0


def test_registry_defaults_and_needs():
    assert set(SELECTIONS.names()) == {"all", "random", "entropy_sample", "entropy_topk", "soft_or", "q3",
                                       "quadrant", "spans", "lowest_prob", "near_distant"}
    a = SELECTIONS.parse_args("entropy_sample", {})
    assert (a.rho, a.alpha, a.gamma, a.granularity, a.normalize_by) == (0.5, 2.0, 0.0, "micro_batch", "selected")
    assert a.needs() == ("entropy_norm",)
    assert SELECTIONS.parse_args("entropy_sample", {"gamma": 1.0}).needs() == ("entropy_norm", "jsd_norm")
    assert SELECTIONS.parse_args("q3", {}).rho == 0.1
    assert SELECTIONS.parse_args("q3", {}).needs() == ("entropy_norm", "forward_kl")
    assert SELECTIONS.parse_args("soft_or", {}).needs() == ("entropy_norm", "reverse_kl")
    assert SELECTIONS.parse_args("spans", {}).coverage_cap == 0.25
    assert SELECTIONS.parse_args("lowest_prob", {}).per_row is True
    assert SELECTIONS.parse_args("quadrant", {"which": [1, 3]}).which == (1, 3)
    with pytest.raises(ConfigError, match="rho"):
        SELECTIONS.parse_args("random", {"rho": 1.5})
    with pytest.raises(ConfigError, match="normalize_by"):
        SELECTIONS.parse_args("all", {"normalize_by": "tokens"})
    with pytest.raises(ConfigError, match="unknown key"):
        SELECTIONS.parse_args("q3", {"rh0": 0.1})
    with pytest.raises(ConfigError, match="which"):
        SELECTIONS.parse_args("quadrant", {"which": [5]})
    with pytest.raises(ConfigError, match=r"needs stats\['forward_kl'\]"):
        SELECTIONS.get("q3")({"entropy_norm": H}, VALID, None, SELECTIONS.parse_args("q3", {}))


# ---------------------------------------------------------------------------------------------------------------
# ρ = 1 is plain OPD; unselected tokens get exactly zero gradient; normalisation


def test_rho_one_is_plain_opd_and_unselected_tokens_get_zero_gradient():
    B, T, V = 2, 7, 6
    s = jax.random.normal(jax.random.key(7), (B, T, V))
    t = jax.random.normal(jax.random.key(8), (B, T, V))
    h = stats.entropy(s, normalized=True)

    def loss(z, w, norm):
        total, count = sel.selected_loss(stats.reverse_kl(z, t), w, VALID, norm)
        return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)

    f = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    opd = f(s, sel.select_all(VALID), "selected")
    for w in (sel.entropy_sample(jax.random.key(9), h, VALID, 1.0), sel.entropy_topk(h, VALID, 1.0),
              sel.select_random(jax.random.key(9), VALID, 1.0)):
        tip = f(s, w, "selected")
        np.testing.assert_allclose(tip[0], opd[0], rtol=1e-6)
        np.testing.assert_allclose(tip[1], opd[1], rtol=1e-6)
    # ρ = 0.5: unselected (and invalid) positions get exactly zero gradient
    w = sel.entropy_sample(jax.random.key(10), h, VALID, 0.5)
    value, g = f(s, w, "selected")
    off = np.asarray(w) == 0
    assert np.all(np.asarray(g)[off] == 0.0) and np.any(np.asarray(g)[~off] != 0.0)
    # normalize_by="all" divides by every valid token instead of the K selected
    value_all, _ = f(s, w, "all")
    np.testing.assert_allclose(value_all * N_VALID, value * float(w.sum()), rtol=1e-5)
    # empty valid: a zero loss and a zero (not NaN) gradient
    total, count = sel.selected_loss(stats.reverse_kl(s, t), w, jnp.zeros_like(VALID))
    assert float(total) == 0.0 and float(count) == 0.0
    g0 = jax.grad(lambda z: loss(z, jnp.zeros(VALID.shape), "selected"))(s)
    assert np.all(np.asarray(g0) == 0.0)


# ---------------------------------------------------------------------------------------------------------------
# entropy_sample: Gumbel-top-k is sampling without replacement


def test_gumbel_top_k_matches_sampling_without_replacement_chi2():
    w = np.array([0.1, 0.2, 0.3, 0.15, 0.25])  # ĥ ∝ w, α = 1: draw K = 2 of 5 without replacement
    h = jnp.asarray(w, jnp.float32)[None]
    valid = jnp.ones((1, 5), bool)
    M = 4000
    keys = jax.random.split(jax.random.key(11), M)
    draws = jax.jit(jax.vmap(lambda k: sel.entropy_sample(k, h, valid, 0.4, alpha=1.0)))(keys)[:, 0]  # [M, 5]
    draws = np.asarray(draws)
    assert np.all(draws.sum(-1) == 2)
    pairs = list(itertools.combinations(range(5), 2))
    # P({i, j}) = w_i w_j / (1 - w_i) + w_j w_i / (1 - w_j) (sequential draws, §2 rule 1)
    expected = np.array([w[i] * w[j] / (1 - w[i]) + w[j] * w[i] / (1 - w[j]) for i, j in pairs]) * M
    observed = np.array([np.sum(draws[:, i] * draws[:, j]) for i, j in pairs])
    chi2 = np.sum((observed - expected) ** 2 / expected)
    assert chi2 < 27.88, chi2  # χ²(9 dof) at p = 0.001
    # higher entropy tokens are chosen more often
    freq = draws.mean(0)
    assert list(np.argsort(freq)) == list(np.argsort(w))


def test_entropy_sample_uniform_when_alpha_gamma_zero():
    h = jnp.asarray([[0.9, 0.01, 0.5, 0.2, 0.7, 0.05, 0.3, 0.6]])
    valid = jnp.ones((1, 8), bool)
    keys = jax.random.split(jax.random.key(12), 4000)
    draws = jax.jit(jax.vmap(lambda k: sel.entropy_sample(k, h, valid, 0.5, alpha=0.0)))(keys)[:, 0]
    freq = np.asarray(draws).mean(0)
    np.testing.assert_allclose(freq, 0.5, atol=0.03)
    # with α = 2 the ordering follows ĥ, and γ > 0 adds the divergence factor
    draws = jax.jit(jax.vmap(lambda k: sel.entropy_sample(k, h, valid, 0.25, alpha=2.0)))(keys)[:, 0]
    freq = np.asarray(draws).mean(0)
    assert freq[0] > freq[4] > freq[2] > freq[3] > freq[1]
    d = jnp.asarray([[0.01, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]])
    draws = jax.jit(jax.vmap(lambda k: sel.entropy_sample(k, h, valid, 0.25, 1.0, 2.0, d)))(keys)[:, 0]
    assert np.asarray(draws).mean(0)[1] > 0.9


def test_per_row_selection_counts():
    w = sel.entropy_sample(jax.random.key(13), H, VALID, 0.5, per_row=True)
    np.testing.assert_array_equal(np.asarray(w).sum(-1), [2, 2])  # floor(0.5·5) per row
    w = sel.entropy_topk(H, VALID, 0.5, per_row=True)
    np.testing.assert_array_equal(np.asarray(w).sum(-1), [2, 2])


# ---------------------------------------------------------------------------------------------------------------
# Deterministic rules on hand-built grids


def test_entropy_topk_picks_highest():
    h = jnp.array([[0.3, 0.9, 0.1, 0.95, 0.5, 0.99]])
    valid = jnp.array([[True, True, True, True, True, False]])  # the highest is invalid
    np.testing.assert_array_equal(sel.entropy_topk(h, valid, 0.4), [[0, 1, 0, 1, 0, 0]])


def test_soft_or_score_properties_and_values():
    # entropy and divergence already spanning [0, 1]: min-max is the identity (clip_quantile=1: no clipping)
    h = jnp.array([[0.0, 1.0, 0.0, 0.5, 0.5, 0.25]])
    d = jnp.array([[0.0, 0.0, 1.0, 0.5, 1.0, 0.0]])
    valid = jnp.ones_like(h, bool)
    s = sel.soft_or_score(h, d, valid, clip_quantile=1.0)
    np.testing.assert_allclose(s, [[0.0, 1.0, 1.0, 0.75, 1.0, 0.25]], atol=1e-6)
    # s = 0 only where both are 0; monotone in each argument
    grid = jnp.linspace(0.0, 1.0, 6)
    hh, dd = jnp.meshgrid(grid, grid, indexing="ij")
    s = np.asarray(sel.soft_or_score(hh, dd, jnp.ones(hh.shape, bool), clip_quantile=1.0))
    assert s[0, 0] == 0.0 and np.all(s.ravel()[1:] > 0)
    assert np.all(s[-1, :] == 1.0) and np.all(s[:, -1] == 1.0)
    assert np.all(np.diff(s, axis=0) >= 0) and np.all(np.diff(s, axis=1) >= 0)
    # entropy is clipped at its 98th percentile before min-max: an outlier does not squash the others
    h = jnp.concatenate([jnp.linspace(0.0, 1.0, 50), jnp.array([100.0])])[None]  # q_0.98 of 51 values = 1.0
    d = jnp.zeros_like(h)
    want = np.minimum(np.asarray(h), 1.0)
    np.testing.assert_allclose(sel.soft_or_score(h, d, jnp.ones_like(h, bool)), want, atol=1e-6)
    # soft_or keeps the top-ρ by that score; invalid tokens do not take part in min-max
    h = jnp.array([[0.1, 0.9, 0.2, 0.3, 5.0]])
    d = jnp.array([[0.9, 0.1, 0.1, 0.2, 5.0]])
    valid = jnp.array([[True, True, True, True, False]])
    s = sel.soft_or_score(h, d, valid, clip_quantile=1.0)
    np.testing.assert_allclose(s, [[1.0, 1.0, 0.125, 0.34375, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(sel.soft_or(h, d, valid, 0.5, clip_quantile=1.0), [[1, 1, 0, 0, 0]])


def test_planted_overconfident_token_picked_by_q3_not_entropy_topk():
    h = jnp.array([[0.8, 0.7, 0.02, 0.6, 0.75, 0.1, 0.65, 0.9, 0.05, 0.85]])  # token 2: near-deterministic
    fkl = jnp.array([[0.3, 0.2, 2.5, 0.1, 0.4, 0.05, 0.2, 0.3, 0.01, 0.35]])  # ... and far from the teacher
    valid = jnp.ones_like(h, bool)
    q = np.asarray(sel.q3(h, fkl, valid, 0.1))
    np.testing.assert_array_equal(q, np.eye(10)[2][None])
    np.testing.assert_allclose(sel.q3_score(h, fkl), fkl * (1 - h))
    assert np.asarray(sel.entropy_topk(h, valid, 0.5))[0, 2] == 0


def test_quadrants_hand_grid():
    h = jnp.array([[0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.0, 0.0]])
    d = jnp.array([[0.9, 0.1, 0.8, 0.2, 0.6, 0.3, 5.0, 5.0]])
    valid = jnp.array([[True] * 6 + [False, False]])
    # medians over the 6 valid: h 0.5, d 0.45
    q = sel.quadrants(h, d, valid)
    np.testing.assert_array_equal(q, [[1, 2, 3, 4, 1, 4, 0, 0]])
    np.testing.assert_array_equal(sel.quadrant_shares(q), [2, 1, 1, 2])
    np.testing.assert_array_equal(sel.select_quadrants(h, d, valid, (3,)), [[0, 0, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(sel.select_quadrants(h, d, valid, (1, 2)), [[1, 1, 0, 0, 1, 0, 0, 0]])
    # other quantiles move the thresholds: at q=0 every valid token except the minimum is "high"
    np.testing.assert_array_equal(sel.quadrants(h, d, valid, 0.0, 0.0), [[1, 2, 3, 1, 1, 1, 0, 0]])


# ---------------------------------------------------------------------------------------------------------------
# TRACE spans, SHRED lowest-prob, TAD near/distant


def test_spans_coverage_cap():
    spans = jnp.array([[0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]], bool)
    valid = jnp.array([[True] * 12, [True] * 8 + [False] * 4])
    w = np.asarray(sel.cap_spans(spans, valid, 0.25))  # caps: floor(3) and floor(2)
    np.testing.assert_array_equal(w[0], [0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(w[1], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # token 8 is padding
    assert np.all(w.sum(-1) <= 0.25 * np.asarray(valid).sum(-1))
    np.testing.assert_array_equal(sel.cap_spans(spans, valid, 1.0), np.asarray(spans & valid, np.float32))


def test_lowest_prob_shred():
    logp = jnp.log(jnp.array([[0.9, 0.05, 0.5, 0.01, 0.3, 0.001], [0.2, 0.1, 0.6, 0.7, 0.01, 0.02]]))
    valid = jnp.array([[False, True, True, True, True, True], [False, False, True, True, True, True]])  # skip
    w = np.asarray(sel.lowest_prob(logp, valid, 0.5))
    # row 0: |T| = 5 -> round(2.5) = 3 lowest among valid: 0.001, 0.01, 0.05 (the 0-th token is context)
    np.testing.assert_array_equal(w[0], [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(w[1], [0, 0, 0, 0, 1, 1])  # |T| = 4 -> 2
    assert np.asarray(sel.lowest_prob(logp, valid, 0.0)).sum() == 0
    np.testing.assert_array_equal(sel.lowest_prob(logp, valid, 1.0), np.asarray(valid, np.float32))


def test_near_distant_tad():
    M = 99
    x_t = jnp.array([[5, M, M, M, M, 7, M]])
    x_tgt = jnp.array([[5, 3, M, 4, M, 7, M]])
    valid = jnp.array([[True] * 6 + [False]])
    nd = sel.near_distant(x_t, x_tgt, valid, M)
    np.testing.assert_array_equal(nd.near, [[0, 1, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(nd.distant, [[0, 0, 1, 0, 1, 0, 0]])
    # near count = tokens revealed between the two states
    assert int(nd.near.sum()) == int(jnp.sum(valid & (x_t == M) & (x_tgt != M)))
    # δ = 0 (same state): no near tokens, pure KL; δ ≥ S (final state): every masked token is near
    nd0 = sel.near_distant(x_t, x_t, valid, M)
    assert int(nd0.near.sum()) == 0 and int(nd0.distant.sum()) == 4
    final = jnp.array([[5, 1, 2, 3, 4, 7, 8]])
    nd1 = sel.near_distant(x_t, final, valid, M)
    assert int(nd1.near.sum()) == 4 and int(nd1.distant.sum()) == 0
    out = SELECTIONS.get("near_distant")({"x_t": x_t, "x_target": x_tgt}, valid, None,
                                         SELECTIONS.parse_args("near_distant", {"mask_id": M}))
    np.testing.assert_array_equal(out.near, nd.near)
