"""The distillation objectives (train/objectives/distill.py, spec train_methods.md §1–4) on tiny decoders and
hand-made rollout batches: OPD limits and KL direction, TIP selection (ρ=1, zero gradient off the selection, the
selected-position logits path against the full path, empty selections), reward weighting, the sampled-token
estimator, TRACE schedule/routing/limits and its annotator, SHRED targets and limits, configs."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok import select as sel
from jaxtok import stats
from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError, Selection
from jaxtok.train.objectives import distill as D
from jaxtok.train.objectives import policy_gradient as PG

V = 16
REPO = Path(__file__).resolve().parents[1]


def _model(preset="tiny_student", seed=0):
    return Decoder(presets.get(preset, vocab_size=V, num_layers=1), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def student():
    return _model("tiny_student", 0)


@pytest.fixture(scope="module")
def teacher():
    return _model("tiny_teacher", 1)


def rollout_batch(rewards=(1.0, 0.0, 1.0, 0.0), *, comp_lens=(5, 3, 4, 5), prompt_len=3, temperature=1.3, seed=0,
                  model=None):
    """A rollout batch by the contract: left-padded prompts (row b has b % 2 pad slots), ragged completions padded
    after their end, groups of 2; ``old_logprobs`` from the rollout scorer when ``model`` is given."""
    rng = np.random.default_rng(seed)
    B, T = len(rewards), prompt_len + max(comp_lens)
    tokens = rng.integers(4, V, (B, T)).astype(np.int32)
    valid = np.zeros((B, T), bool)
    loss_mask = np.zeros((B, T), bool)
    for b in range(B):
        valid[b, b % 2:prompt_len + comp_lens[b]] = True
        loss_mask[b, prompt_len:prompt_len + comp_lens[b]] = True
    batch = {"tokens": np.where(valid, tokens, 0).astype(np.int32),
             "positions": np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32), "valid": valid,
             "loss_mask": loss_mask, "rewards": np.asarray(rewards, np.float32),
             "group_ids": (np.arange(B) // 2).astype(np.int32), "temperature": np.full(B, temperature, np.float32)}
    if model is not None:
        from jaxtok.train.rollout import score_tokens

        batch["old_logprobs"], batch["entropy"] = score_tokens(model, batch, batch["temperature"])
    return batch


_JIT = {}


def run(fn, model, batch, arg_list, rng=jax.random.key(7), grad=True, **frozen):
    """``[(loss_sum, count, aux, grads | None)]`` of objective ``fn`` for each argument dataclass. One jitted
    function per (objective, arguments, model/frozen structures, grad), taking parameters, frozen states and the
    batch as arguments, so tests with equal shapes share compiles (they dominate this file's runtime)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f_graphs = {k: nnx.graphdef(m) for k, m in frozen.items()}
    f_states = {k: nnx.state(m) for k, m in frozen.items()}
    key = (fn, repr(arg_list), graphdef, tuple(sorted(f_graphs.items(), key=lambda kv: kv[0])), grad,
           tuple(sorted(batch)))
    if key not in _JIT:
        def one(p, fs, b, a):
            models = {k: nnx.merge(f_graphs[k], fs[k]) for k in fs}
            ls, c, aux = fn(nnx.merge(graphdef, p, rest), b, rng, a, **models)
            return ls, (c, aux)

        def go(p, fs, b):
            out = []
            for a in arg_list:
                if grad:
                    (ls, (c, aux)), g = jax.value_and_grad(one, has_aux=True)(p, fs, b, a)
                else:
                    (ls, (c, aux)), g = one(p, fs, b, a), None
                out.append((ls, c, aux, g))
            return out

        _JIT[key] = jax.jit(go)
    return _JIT[key](params, f_states, batch)


def close(a, b, atol=1e-6, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def gnorm(g):
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))


@jax.jit
def full_logits(model, batch):
    return model(batch["tokens"], positions=batch["positions"], valid=batch["valid"]).logits


def direct_token_losses(student, teacher, batch, args):
    """Per-token OPD loss ``[B, T-1]`` from full logits (no chunks, no selection), masked by loss_mask."""
    tau = jnp.asarray(batch["temperature"])[:, None, None]
    s = full_logits(student, batch)[:, :-1] / tau
    t = full_logits(teacher, batch)[:, :-1] / tau
    per = D.opd_token_loss(s, t, jnp.asarray(batch["tokens"])[:, 1:], args)
    return jnp.where(batch["loss_mask"][:, 1:], per, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# OPD (§1)

def _sel(mapping):
    """``objective.args.selection`` parsed as the registry parses it."""
    return Selection.parse(mapping, "objective.args.selection")


ES = {"rule": "entropy_sample", "rho": 0.5}
PER_ROW = {"rule": "entropy_topk", "rho": 0.3, "per_row": True, "normalize_by": "all"}
PLAIN_AND_RHO1 = [D.OPDArgs(quadrant_stats=False),
                  D.OPDArgs(selection=_sel({"rule": "entropy_sample", "rho": 1.0}), quadrant_stats=False)]
SEL_VS_FULL = {name: [D.OPDArgs(selection=_sel(sel_), selected_logits=flag, chunk_size=3, quadrant_stats=False)
                      for flag in (True, False)] for name, sel_ in (("flat", ES), ("per_row", PER_ROW))}


def test_identical_distributions_zero_loss_and_gradient():
    """p_S = p_T: every KL kind (full vocabulary, top-k, clipped) is 0 with zero gradient, and so is the selected
    loss of the objective's combination (the teacher/student wiring is checked against full logits below)."""
    s = jax.random.normal(jax.random.key(0), (2, 5, V))
    y = jax.random.randint(jax.random.key(1), (2, 5), 0, V)
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    w = jnp.array([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1]], jnp.float32)
    kinds = [D.OPDArgs(divergence=d) for d in ("reverse_kl", "forward_kl", "jsd")]
    kinds += [D.OPDArgs(top_k=4, top_k_mode="tail_bucket"), D.OPDArgs(divergence="forward_kl", token_clip=0.05)]

    @jax.jit
    def go(x):
        return [jax.value_and_grad(lambda z: sel.selected_loss(D.opd_token_loss(z, x, y, a), w, valid)[0])(x)
                for a in kinds]

    for value, g in go(s):
        assert abs(float(value)) < 1e-6
        np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_kl_direction_hand_computed():
    p_s, p_t = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.5, 0.3])
    rkl = float(np.sum(p_s * np.log(p_s / p_t)))
    fkl = float(np.sum(p_t * np.log(p_t / p_s)))
    assert abs(rkl - fkl) > 0.04
    s, t, y = jnp.log(jnp.asarray(p_s)), jnp.log(jnp.asarray(p_t)), jnp.asarray(0)
    np.testing.assert_allclose(D.opd_token_loss(s, t, y, D.OPDArgs(divergence="reverse_kl")), rkl, rtol=1e-6)
    np.testing.assert_allclose(D.opd_token_loss(s, t, y, D.OPDArgs(divergence="forward_kl")), fkl, rtol=1e-6)
    # β endpoints of JSD are the two KLs; top-k with k = V is the full vocabulary
    np.testing.assert_allclose(D.opd_token_loss(s, t, y, D.OPDArgs(divergence="jsd", beta=0.0)), fkl, rtol=1e-6)
    np.testing.assert_allclose(D.opd_token_loss(s, t, y, D.OPDArgs(divergence="jsd", beta=1.0)), rkl, rtol=1e-6)
    np.testing.assert_allclose(D.opd_token_loss(s, t, y, D.OPDArgs(top_k=3)), rkl, rtol=1e-6)


def test_sampled_token_expected_gradient_is_reverse_kl_gradient():
    """Σ_y p_S(y) ∇(−sg(Δ_y) lp_S(y)) = ∇ KL(p_S‖p_T) exactly (reinforce weights), at one position."""
    s = jnp.array([0.3, -0.4, 1.1, 0.0, -1.2])
    t = jnp.array([-0.5, 0.9, 0.2, 0.4, -0.1])
    args = D.OPDArgs(divergence="sampled_token", sampled_weight="reinforce")
    p = jax.nn.softmax(s)
    expected = sum(p[y] * jax.grad(lambda x: D.opd_token_loss(x, t, jnp.asarray(y), args))(s) for y in range(5))
    exact = jax.grad(lambda x: stats.reverse_kl(x, t))(s)
    np.testing.assert_allclose(expected, exact, atol=1e-6)
    # the gated and weighted weights are the stated functions of Δ
    y = jnp.asarray(2)
    lp_s, lp_t = jax.nn.log_softmax(s)[2], jax.nn.log_softmax(t)[2]
    d = lp_t - lp_s
    for kind, w in (("gated", jax.nn.sigmoid(5.0 * d)), ("weighted", jnp.exp(lp_s) * d)):
        a = D.OPDArgs(divergence="sampled_token", sampled_weight=kind)
        np.testing.assert_allclose(D.opd_token_loss(s, t, y, a), -w * lp_s, rtol=1e-6)


def test_objective_matches_direct_full_logits_and_reward_weighting(student, teacher):
    """The chunked objective equals the token mean of the directly computed per-token loss; reward weighting
    with β_r → ∞ is the per-sample mean, with small β_r the mean over the rewarded rows (§1 test 7)."""
    batch = rollout_batch()
    base = dict(divergence="reverse_kl", chunk_size=5)
    args = [D.OPDArgs(**base), D.OPDArgs(**base, reward_beta=1e9)]
    (ls, c, aux, _), (ls_inf, c_inf, _, _) = run(D.opd_loss, student, batch, args, grad=False, teacher=teacher)
    per = direct_token_losses(student, teacher, batch, args[0])
    mask = batch["loss_mask"][:, 1:]
    np.testing.assert_allclose(ls, jnp.sum(per), rtol=1e-5)
    assert float(c) == mask.sum()
    rows = jnp.sum(per, -1) / mask.sum(-1)
    np.testing.assert_allclose(ls_inf / c_inf, jnp.mean(rows), rtol=1e-5)
    # small β_r: the weights concentrate on the rewarded rows
    r = batch["rewards"] > 0
    np.testing.assert_allclose(D.reward_weights(batch["rewards"], jnp.ones(4, bool), 1e-3), 2.0 * r, atol=1e-6)
    np.testing.assert_allclose(D.reward_weights(batch["rewards"], jnp.array([1, 1, 0, 0], bool), 1e9),
                               [1, 1, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(aux["selected_frac"][0] / aux["selected_frac"][1], 1.0)
    shares = [float(aux[f"q{i}"][0]) for i in (1, 2, 3, 4)]
    assert sum(shares) == mask.sum()


# ----------------------------------------------------------------------------------------------------------------
# TIP (§2)


def test_rho_one_equals_plain_opd(student, teacher):
    batch = rollout_batch()
    (ls, c, _, g), (ls2, c2, aux2, g2) = run(D.opd_loss, student, batch, PLAIN_AND_RHO1, teacher=teacher)
    assert float(c2) == float(c) == batch["loss_mask"].sum()
    np.testing.assert_allclose(ls2, ls, rtol=1e-6)
    close(g2, g, atol=1e-8)
    assert float(aux2["selection_overflow"][0]) == 0


def test_unselected_positions_get_exactly_zero_gradient():
    key = jax.random.key(0)
    s = jax.random.normal(key, (2, 6, V))
    t = jax.random.normal(jax.random.key(1), (2, 6, V))
    y = jax.random.randint(jax.random.key(2), (2, 6), 0, V)
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
    stat = {"entropy_norm": stats.entropy(s, normalized=True)}
    w = SELECT(stat, valid, key)
    assert 0 < float(w.sum()) < float(valid.sum())
    divs = ("reverse_kl", "forward_kl", "jsd", "sampled_token")

    @jax.jit
    def grads(s):
        return [jax.grad(lambda x: sel.selected_loss(D.opd_token_loss(x, t, y, D.OPDArgs(divergence=d)), w,
                                                     valid)[0])(s) for d in divs]

    off = np.asarray(w == 0)
    for g in grads(s):
        assert np.all(np.asarray(g)[off] == 0.0)
        assert np.all(np.abs(np.asarray(g)[~off]).sum(-1) > 0)


def SELECT(stat, valid, key):
    from jaxtok.registry import SELECTIONS

    args = SELECTIONS.parse_args("entropy_sample", {"rho": 0.5})
    return SELECTIONS.get("entropy_sample")(stat, valid, key, args)


@pytest.mark.parametrize("name", ["flat", "per_row"])
def test_selected_logits_path_equals_full_path(student, teacher, name):
    """Loss and gradient of the flat selection; the per-row gather (same gradient code) is checked on the loss."""
    batch = rollout_batch()
    grad = name == "flat"
    (ls, c, aux, g), (ls2, c2, aux2, g2) = run(D.opd_loss, student, batch, SEL_VS_FULL[name], grad=grad,
                                               teacher=teacher)
    n_mask = batch["loss_mask"].sum()
    assert 0 < float(aux["selected_frac"][0]) < n_mask
    assert float(aux["selection_overflow"][0]) == 0
    assert "selection_overflow" not in aux2
    assert float(c) == float(c2)
    np.testing.assert_allclose(ls, ls2, rtol=1e-6)
    if grad:
        close(g, g2, atol=1e-7)


def test_selected_path_has_no_full_token_by_vocab_logits(student, teacher):
    """With a selection the gradient pass projects only the K selected rows: no [B·(T-1), V] f32 array at all
    (``random`` needs no statistics, so there is no selection pass), while the full path has them."""
    batch = rollout_batch()
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    n = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
    k = math.ceil(0.25 * n)

    def jaxpr(selected):
        args = D.OPDArgs(selection=_sel({"rule": "random", "rho": 0.25}), quadrant_stats=False, chunk_size=1024,
                         selected_logits=selected)
        f = jax.grad(lambda p: D.opd_loss(nnx.merge(graphdef, p, rest), batch, jax.random.key(0), args,
                                          teacher=teacher)[0])
        return str(jax.make_jaxpr(f)(params))

    sel_path, full_path = jaxpr(True), jaxpr(False)
    assert f"f32[{k},{V}]" in sel_path and f"f32[{n},{V}]" not in sel_path
    assert f"f32[{n},{V}]" in full_path


def test_empty_selection_gives_zero_not_nan(student, teacher):
    batch = rollout_batch()
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    outs = (run(D.opd_loss, student, batch, PLAIN_AND_RHO1, teacher=teacher)
            + run(D.opd_loss, student, batch, SEL_VS_FULL["flat"], teacher=teacher))
    for ls, c, aux, g in outs:
        assert float(ls) == 0.0 and float(c) == 0.0
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
        assert gnorm(g) == 0.0
    # reward-weighted: no row has tokens
    (ls, c, _, _), = run(D.opd_loss, student, batch, [D.OPDArgs(reward_beta=1.0)], grad=False, teacher=teacher)
    assert float(ls) == 0.0 and float(c) == 0.0


def test_opd_args_errors():
    with pytest.raises(ConfigError, match="divergence='kl'"):
        D.OPDArgs(divergence="kl")
    with pytest.raises(ConfigError, match="selection.rule='entropy'"):
        OBJECTIVES.parse_args("opd", {"selection": {"rule": "entropy"}}, "objective.args")
    with pytest.raises(ConfigError, match="selection.bogus"):
        OBJECTIVES.parse_args("opd", {"selection": {"rule": "q3", "bogus": 1}}, "objective.args")
    with pytest.raises(ConfigError, match="rho"):
        OBJECTIVES.parse_args("opd", {"selection": {"rule": "q3", "rho": 0.0}}, "objective.args")
    args = OBJECTIVES.parse_args("opd", {"selection": {"rule": "entropy_sample", "rho": 0.5, "alpha": 2}})
    assert args.selection.args.rho == 0.5 and args.selection.rule == "entropy_sample"
    assert args.selection == Selection.parse({"rule": "entropy_sample", "rho": 0.5, "alpha": 2}, "selection")
    assert D.OPDArgs().selection.rule == "all"
    with pytest.raises(ConfigError, match="a parsed Selection"):  # a raw mapping is parsed by the registry only
        D.OPDArgs(selection={"rule": "all"})


# ----------------------------------------------------------------------------------------------------------------
# TRACE (§3)


def test_trace_schedule_values():
    lam = jax.jit(lambda k: D.trace_lambda(k))
    for k, want in ((0, 0.5), (9, 0.5), (10, 0.5), (25, 0.25), (39, 0.5 / 30), (40, 0.0), (100, 0.0)):
        np.testing.assert_allclose(lam(k), want, atol=1e-7)
        np.testing.assert_allclose(D.trace_lambda(k), want, atol=1e-7)


def _spans(batch, rows_codes):
    spans = np.zeros(batch["tokens"].shape, np.int8)
    for b, code in rows_codes.items():
        spans[b] = np.where(batch["loss_mask"][b], code, 0)
    return spans


def test_trace_lambda_zero_is_grpo(student, teacher):
    batch = rollout_batch(model=student)
    batch["spans"] = _spans(batch, {0: D.SPAN_KEY, 1: D.SPAN_ERROR})
    noise = 0.1 * np.random.default_rng(5).standard_normal(batch["old_logprobs"].shape)
    batch["old_logprobs"] = np.where(batch["loss_mask"], batch["old_logprobs"] + noise, 0.0).astype(np.float32)
    (ls, c, aux, _), = run(D.trace_loss, student, batch, [D.TraceArgs(step=40)], grad=False, teacher=teacher)
    pg = PG.PolicyGradientArgs(loss_mode="grpo", eps_low=0.2, eps_high=0.28, aggregation="seq-mean-token-mean")
    (ls2, c2, _, _), = run(PG.policy_gradient_loss, student, batch, [pg], grad=False)
    assert float(aux["kl_lambda"][0]) == 0.0 and abs(float(ls)) > 1e-3
    assert float(c) == float(c2)
    np.testing.assert_array_equal(np.asarray(ls), np.asarray(ls2))


def test_trace_all_token_spans_without_grpo_is_self_opd_forward_kl(student, teacher):
    """Span mask = all tokens, GRPO weight 0 (λ = w0), no clip ⇒ λ · per-sample-mean forward-KL OPD."""
    batch = rollout_batch(model=student, temperature=1.0)
    batch["spans"] = _spans(batch, {b: D.SPAN_KEY for b in range(4)})
    targs = D.TraceArgs(step=0, coverage_cap=1.0, token_clip=None)
    (ls, c, aux, _), = run(D.trace_loss, student, batch, [targs], grad=False, teacher=teacher)
    oargs = D.OPDArgs(divergence="forward_kl", reward_beta=1e9, quadrant_stats=False)
    (ls2, c2, _, _), = run(D.opd_loss, student, batch, [oargs], grad=False, teacher=teacher)
    np.testing.assert_allclose(ls / c, 0.5 * ls2 / c2, rtol=1e-5)
    assert float(aux["key_frac"][0]) == batch["loss_mask"].sum()


def test_trace_routing_and_span_aggregation(student, teacher):
    """Key spans of row 0 get forward KL, error spans of row 1 reverse KL (clipped per term at 0.05), the span
    loss is Σ_{t∈S} KL_t / |y|, rows without spans add nothing; GRPO weight on span tokens is 1 − λ/w0."""
    batch = rollout_batch(model=student)
    spans = np.zeros(batch["tokens"].shape, np.int8)
    spans[0, 4] = D.SPAN_KEY  # row 0: completion columns 3..7
    spans[1, 3:5] = D.SPAN_ERROR  # row 1: completion columns 3..5 (3 tokens -> cap floor(0.25·3) = 0 tokens)
    spans[2, 4] = D.SPAN_ERROR  # row 2: 4 tokens -> cap 1
    batch["spans"] = spans
    batch["step"] = np.full(4, 25, np.int32)  # the step comes from the batch field (args.step is 0)
    args = [D.TraceArgs(step=0), D.TraceArgs(step=0, coverage_cap=1.0)]
    (ls, c, aux, _), (ls_full, _, aux_full, _) = run(D.trace_loss, student, batch, args, grad=False,
                                                     teacher=teacher)
    np.testing.assert_allclose(aux["kl_lambda"][0], 0.25, atol=1e-7)
    tau = jnp.asarray(batch["temperature"])[:, None, None]
    s = full_logits(student, batch) / tau
    t = full_logits(teacher, batch) / tau
    fkl = lambda b, col: stats.forward_kl(s[b, col - 1], t[b, col - 1], clip=0.05)  # noqa: E731
    rkl = lambda b, col: stats.reverse_kl(s[b, col - 1], t[b, col - 1], clip=0.05)  # noqa: E731
    lens = batch["loss_mask"].sum(-1)
    span_capped = fkl(0, 4) / lens[0] + rkl(2, 4) / lens[2]
    span_full = span_capped + (rkl(1, 3) + rkl(1, 4)) / lens[1]
    np.testing.assert_allclose(aux["span_kl"][0], fkl(0, 4) + rkl(2, 4), rtol=1e-5)
    np.testing.assert_allclose(aux_full["span_kl"][0], fkl(0, 4) + rkl(2, 4) + rkl(1, 3) + rkl(1, 4), rtol=1e-5)
    lam = 0.25
    np.testing.assert_allclose(ls - aux["pg_loss"][0], lam * span_capped, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ls_full - aux_full["pg_loss"][0], lam * span_full, rtol=1e-4, atol=1e-7)
    assert float(aux["key_frac"][0]) == 1 and float(aux["error_frac"][0]) == 1
    # GRPO weight 1 − λ/w0 = 0.5 on the routed tokens: the pg part differs between the two caps
    assert float(aux["pg_loss"][0]) != float(aux_full["pg_loss"][0])


def test_annotate_completion_hand_made():
    target = "12+7=19;19-3=16>16"
    # correct: the results of both steps and the answer are key spans
    assert D.annotate_completion(target, target, True) == [(5, 7, 1), (13, 15, 1), (16, 18, 1)]
    # the first step departs: error span = that step from where it departs (its result; not the copied operands)
    assert D.annotate_completion("12+7=18;18-3=15>15", target, False) == [(6, 7, 2)]
    # the second step departs in its result digits
    assert D.annotate_completion("12+7=19;19-3=17>17", target, False) == [(14, 15, 2)]
    # a miscopied operand: from that operand on; a truncated result (a prefix of the solution's): its last character
    assert D.annotate_completion("12+7=19;18-3=15>15", target, False) == [(9, 15, 2)]
    assert D.annotate_completion("12+7=19;19-3=1>1", target, False) == [(13, 14, 2)]
    # the helper's failing case: 85-63=19 against 85-63=22 marks "19" only
    assert D.annotate_completion("85-63=19>19", "85-63=22>22", False) == [(6, 8, 2)]
    # every step right, answer wrong: the answer
    assert D.annotate_completion("12+7=19;19-3=16>61", target, False) == [(16, 18, 2)]
    # extra step beyond the solution's steps
    assert D.annotate_completion("12+7=19;19-3=16;1>1", target, False) == [(16, 17, 2)]
    # sorting-style target without '=': the whole step is the key span
    assert D.annotate_completion("1,2,3>1,2,3", "1,2,3>1,2,3", True) == [(0, 5, 1), (6, 11, 1)]


def test_trace_annotate_maps_characters_to_completion_tokens():
    from jaxtok.tasks import build_tokenizer
    from jaxtok.tasks.arith import ArithArgs, ArithTask
    from jaxtok.tasks.base import Example
    from jaxtok.tasks.tokenizer import encode

    tok = build_tokenizer()
    task = ArithTask(ArithArgs(steps=2))
    ex = Example(prompt="12+7-3=", target="12+7=19;19-3=16>16", answer="16")
    texts = ["12+7=19;19-3=16>16", "12+7=18;18-3=15>15"]
    P, T = 8, 8 + 20
    tokens = np.zeros((2, T), np.int32)
    loss_mask = np.zeros((2, T), bool)
    for b, text in enumerate(texts):
        p = encode(tok, ex.prompt)
        tokens[b, P - len(p):P] = p
        ids = encode(tok, text) + [2]  # eos
        tokens[b, P:P + len(ids)] = ids
        loss_mask[b, P:P + len(ids)] = True
    out = D.trace_annotate({"tokens": tokens, "loss_mask": loss_mask}, texts, [ex, ex], task, tok)
    spans = out["spans"]
    assert spans.dtype == np.int8 and spans.shape == (2, T)
    key_chars = "".join(texts[0][c - P] for c in np.nonzero(spans[0] == D.SPAN_KEY)[0])
    assert key_chars == "191616"
    assert list(np.nonzero(spans[1] == D.SPAN_ERROR)[0]) == [P + 6]  # "12+7=18": the result digit that departs
    assert not np.any(spans[:, :P]) and not np.any(spans[1] == D.SPAN_KEY)
    assert OBJECTIVES.entry("trace").spec.prepare is D.trace_annotate


# ----------------------------------------------------------------------------------------------------------------
# SHRED (§4)


def test_shred_targets_variants():
    p = jnp.array([0.5, 0.3, 0.1, 0.06, 0.04])  # θ0's top-5 probabilities (of a larger vocabulary)
    lp = jnp.log(p * 0.9)[None]  # full-vocabulary log-probs: 10 % of the mass lies outside the top-K
    ids = jnp.array([[7, 3, 9, 1, 4]])
    y = jnp.array([3])
    # retain position: renormalised top-K
    log_q, ok = D.shred_targets(lp, ids, y, jnp.array([False]), "A")
    np.testing.assert_allclose(jnp.exp(log_q[0]), p / p.sum(), rtol=1e-6)
    # variant A: zero mass on x_t, ratios of the others kept
    log_q, ok = D.shred_targets(lp, ids, y, jnp.array([True]), "A")
    q = np.asarray(jnp.exp(log_q[0]))
    assert q[1] == 0.0 and bool(ok[0])
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(q[[0, 2, 3, 4]], np.asarray(p)[[0, 2, 3, 4]] / (1 - 0.3), rtol=1e-5)
    # variant B with π = 0.7 (of the full mass): 0.45 < 0.7, 0.45+0.27 crosses it -> the top two go; x_t = id 9
    log_q, ok = D.shred_targets(lp, ids, jnp.array([9]), jnp.array([True]), "B", nucleus=0.7)
    q = np.asarray(jnp.exp(log_q[0]))
    np.testing.assert_array_equal(q[:3], 0.0)
    np.testing.assert_allclose(q[3:], np.asarray(p[3:]) / 0.1, rtol=1e-5)
    # everything demoted: skip (ok False, no NaN) or uniform
    log_q, ok = D.shred_targets(lp, ids, jnp.array([9]), jnp.array([True]), "B", nucleus=1.0)
    assert not bool(ok[0]) and np.all(np.isneginf(np.asarray(log_q)))
    log_q, ok = D.shred_targets(lp, ids, jnp.array([9]), jnp.array([True]), "B", nucleus=1.0,
                                empty_target="uniform")
    assert bool(ok[0])
    np.testing.assert_allclose(jnp.exp(log_q[0]), 0.2, rtol=1e-6)
    # the token KL uses the full student softmax: KL(q‖p) = −log Σ_{I} p when q is p renormalised on I
    s = jnp.log(jnp.concatenate([p * 0.9, jnp.full((5,), 0.02)]))
    lq = jnp.log(p / p.sum())
    np.testing.assert_allclose(D.shred_token_kl(s, lq, jnp.arange(5)), -np.log(0.9), rtol=1e-5)
    np.testing.assert_allclose(D.shred_token_kl(s, lq, jnp.arange(5), renorm_topk=True), 0.0, atol=1e-6)


def sft_batch(lens=(6, 4, 5), prompt_len=2, seed=3):
    rng = np.random.default_rng(seed)
    B, T = len(lens), prompt_len + max(lens)
    valid = np.zeros((B, T), bool)
    loss_mask = np.zeros((B, T), bool)
    for b, n in enumerate(lens):
        valid[b, :prompt_len + n] = True
        loss_mask[b, prompt_len:prompt_len + n] = True
    tokens = np.where(valid, rng.integers(4, V, (B, T)), 0).astype(np.int32)
    return {"tokens": tokens, "positions": np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32),
            "valid": valid, "loss_mask": loss_mask}


def test_shred_limits_counts_and_skip_tokens(student):
    batch = sft_batch()
    theta0 = _model("tiny_student", 0)  # θ' = θ0
    (ls0, c0, _, g0), = run(D.shred_loss, student, batch, [D.ShredArgs(forget_fraction=0.0, top_k=V)],
                            reference=theta0)  # P = 0, K = V: loss 0, zero gradient
    args = [D.ShredArgs(forget_fraction=0.5, top_k=4, skip_tokens=2),
            D.ShredArgs(forget_fraction=0.5, top_k=4, skip_tokens=2, variant="B", nucleus=0.5)]
    (ls, c, aux, _), (lsb, cb, auxb, _) = run(D.shred_loss, student, batch, args, grad=False, reference=theta0)
    n_resp = batch["loss_mask"].sum()
    assert float(c0) == n_resp
    assert abs(float(ls0)) < 1e-5 and gnorm(g0) < 1e-8
    # skip_tokens = 2 removes two leading response tokens per row; P = 0.5 demotes round(0.5·|T_b|) per row
    lens_t = [6 - 2, 4 - 2, 5 - 2]
    assert float(c) == sum(lens_t)  # variant A never empties a top-4 target
    assert float(aux["forget_frac"][0]) == sum(math.floor(0.5 * n + 0.5) for n in lens_t)
    assert float(ls) > 0 and float(lsb) > float(ls)  # B demotes more of θ0's mass than A
    assert float(aux["forget_frac"][0]) == float(auxb["forget_frac"][0])
    with pytest.raises(ConfigError, match="rollout.reference"):
        D.shred_loss(student, batch, None, D.ShredArgs())


# ----------------------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("name", ["opd", "tip_entropy50", "tip_soft_or50", "tip_q3", "trace", "trace_external",
                                  "shred"])
def test_configs_validate(name):
    from jaxtok.config import load_config, validate_names

    cfg = load_config(REPO / "configs" / "distill" / f"{name}.yaml")
    plan = validate_names(cfg)
    own = plan.spec.self_teacher
    if own and own(plan.objective_args):  # TRACE's self-teacher: a synced copy of the student, no teacher run
        assert not cfg.rollout.teacher_init_from
    elif "teacher" in plan.spec.models:
        assert cfg.rollout.teacher_init_from
    if "reference" in plan.spec.models:
        assert cfg.rollout.reference != "none"


# ----------------------------------------------------------------------------------------------------------------
# TAD (§5)

M = 3  # mask id of the tiny diffusion preset
TRAJ = np.array([[M, M, M, M, M],  # step 0: all masked
                 [M, 7, M, M, M],
                 [M, 7, M, 9, M],
                 [5, 7, M, 9, M],
                 [5, 7, 8, 9, 6]])  # S = 4: final response (the last step reveals two tokens)


def test_tad_pairs_near_distant_counts():
    from jaxtok.train.objectives import tad as TAD

    valid = jnp.ones((1, 5), bool)
    for i in range(5):
        x_t, x_tg = TAD.trajectory_pair(TRAJ, i, 0)  # δ = 0: no near token, pure KL
        part = sel.near_distant(jnp.asarray(x_t)[None], jnp.asarray(x_tg)[None], valid, M)
        assert int(part.near.sum()) == 0 and int(part.distant.sum()) == int((x_t == M).sum())
        x_t, x_tg = TAD.trajectory_pair(TRAJ, i, 10)  # δ ≥ S: every masked token is near
        part = sel.near_distant(jnp.asarray(x_t)[None], jnp.asarray(x_tg)[None], valid, M)
        assert int(part.distant.sum()) == 0 and int(part.near.sum()) == int((x_t == M).sum())
        for delta in (1, 2):  # near = tokens revealed between steps i and i+δ
            x_t, x_tg = TAD.trajectory_pair(TRAJ, i, delta)
            part = sel.near_distant(jnp.asarray(x_t)[None], jnp.asarray(x_tg)[None], valid, M)
            assert int(part.near.sum()) == int((x_t == M).sum() - (x_tg == M).sum())
    with pytest.raises(ValueError, match="step=5"):
        TAD.trajectory_pair(TRAJ, 5, 1)


def test_tad_loss_hand_computed():
    from jaxtok.train.objectives import tad as TAD

    x_t, x_tg = (jnp.asarray(a)[None] for a in TAD.trajectory_pair(TRAJ, 2, 1))  # near: pos 0; distant: 2, 4
    s = jax.random.normal(jax.random.key(0), (1, 5, V))
    t = jax.random.normal(jax.random.key(1), (1, 5, V))
    valid = jnp.ones((1, 5), bool)
    args = TAD.TADArgs(ce_weight=1.0, kl_weight=0.5, temperature=2.0)
    loss, aux = TAD.tad_loss_from_logits(s, t, x_t, x_tg, valid, M, args, chunk_size=3)
    ce = -jax.nn.log_softmax(s[0, 0])[5]
    kl = (stats.forward_kl(s[0, 2], t[0, 2], temperature=2.0) + stats.forward_kl(s[0, 4], t[0, 4],
                                                                                  temperature=2.0)) / 2
    np.testing.assert_allclose(loss, ce + 0.5 * 4.0 * kl, rtol=1e-5)
    assert float(aux["near"]) == 1 and float(aux["distant"]) == 2
    # identical teacher and student: no KL; empty near/distant sets add 0 (no NaN)
    loss, aux = TAD.tad_loss_from_logits(s, s, x_t, x_tg, valid, M, args)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    loss, _ = TAD.tad_loss_from_logits(s, t, x_tg, x_tg, jnp.zeros_like(valid), M, args)
    assert float(loss) == 0.0


def test_tad_objective_teacher_equal_student_gives_pure_ce():
    from jaxtok.train.objectives import tad as TAD

    cfg = presets.get("tiny_diffusion", vocab_size=V, num_layers=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    x_t, x_tg = TAD.trajectory_pair(TRAJ, 2, 1)
    prompt = np.array([[0, 12, 13], [14, 12, 13]], np.int32)  # left-padded plain prompts
    valid = np.concatenate([prompt > 0, np.ones((2, 5), bool)], 1)
    tokens = np.concatenate([prompt, np.stack([x_t, x_t])], 1).astype(np.int32)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    batch = {"tokens": tokens, "valid": valid, "positions": positions, "teacher_tokens": tokens,
             "teacher_valid": valid, "teacher_positions": positions, "x_target": np.stack([x_tg, x_tg])}
    (loss, one, aux, _), = run(TAD.tad_loss, model, batch, [TAD.TADArgs()], grad=False,
                               teacher=Decoder(cfg, rngs=nnx.Rngs(0)))
    assert float(one) == 1.0 and float(aux["near"][0]) == 2 and float(aux["distant"][0]) == 4
    np.testing.assert_allclose(aux["kl"][0], 0.0, atol=1e-6)
    np.testing.assert_allclose(loss, aux["ce"][0], rtol=1e-6)


class _TokenLogits:
    """A stand-in bidirectional model for TAD's bookkeeping tests: logits = a fixed random table row per input token,
    at the requested ``logits_at`` columns (no compile, no forward)."""

    def __init__(self, seed: int):
        self.table = jax.random.normal(jax.random.key(seed), (V, V))  # [V, V]

    def __call__(self, tokens, *, positions=None, valid=None, attention=None, logits_at=None):
        from jaxtok.models import DecoderOutput

        x = jnp.take_along_axis(jnp.asarray(tokens), logits_at, axis=1)  # [B, L]
        return DecoderOutput(logits=self.table[x], hidden=None, cache=None)


def test_tad_targets_cover_the_terminator_fill():
    """Near/distant targets cover every masked position of the fixed-length response, the terminator fill included
    (the TAD repository trains all ``gen_length`` positions); ``response_valid`` (the collector's mask up to the
    terminator, all False on a wrong trajectory) only selects rows. A mask cut at the terminator would train only
    position 0 of row 0 here."""
    from jaxtok.train.objectives import tad as TAD

    x_t, x_tg = TAD.trajectory_pair(TRAJ, 2, 1)  # masked in x_t: 0, 2, 4; revealed at the next step: 0
    tokens = np.concatenate([np.full((2, 2), 12), np.stack([x_t, x_t])], 1).astype(np.int32)
    valid = np.ones(tokens.shape, bool)
    positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (2, 1))
    response_valid = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)  # row 0: terminator at 1; row 1: dropped
    batch = {"tokens": tokens, "valid": valid, "positions": positions, "teacher_tokens": tokens,
             "teacher_valid": valid, "teacher_positions": positions, "x_target": np.stack([x_tg, x_tg]),
             "response_valid": response_valid}
    np.testing.assert_array_equal(TAD.response_mask(batch, 5), [[True] * 5, [False] * 5])
    _, _, aux = TAD.tad_loss(_TokenLogits(0), batch, None, TAD.TADArgs(mask_id=M), teacher=_TokenLogits(1))
    assert float(aux["near"][0]) == 1 and float(aux["distant"][0]) == 2  # positions 0 | 2, 4 of row 0
    assert float(aux["kl"][0]) > 0
