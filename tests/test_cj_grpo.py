"""CJ-GRPO (train/objectives/cj_grpo.py, spec §10): trajectory states and ranks, step-mean aggregation by hand,
S = 1 is one-step GRPO from the fully masked response, and the collector's first inner epoch has ratio 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.config import from_dict
from jaxtok.data import prompt_dataset
from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.tasks import build_tokenizer, make_task
from jaxtok.train.objectives import cj_grpo as CJ

MASK = 3


def test_dense_step_ranks_and_states():
    np.testing.assert_array_equal(CJ.dense_step_ranks([[3, -1, 7], [3, 9, -1]]), [[0, -1, 1], [0, 2, -1]])
    tokens = np.array([[5, 6, 7, 8, 9]])
    gen = np.array([[0, 0, 1, 1, 1]], bool)
    cs = np.array([[-1, -1, 1, 0, 1]])
    np.testing.assert_array_equal(CJ.trajectory_states(tokens, gen, cs, 0, MASK), [[5, 6, 3, 3, 3]])
    np.testing.assert_array_equal(CJ.trajectory_states(tokens, gen, cs, 1, MASK), [[5, 6, 3, 8, 3]])
    np.testing.assert_array_equal(CJ.trajectory_states(tokens, gen, cs, 2, MASK), [[5, 6, 7, 8, 9]])


def test_step_mean_by_hand_and_only_committed_positions():
    """Ratio 1: ℓ = −A. Step 0 holds (row 0: 1 token), step 1 holds (row 0: 1, row 1: 2 tokens):
    L = ½ (−A0 + (−A0 − 2 A1)/3); token-mean = (−2 A0 − 2 A1)/4. Gradient reaches only committed positions."""
    logp = -np.ones((2, 4), np.float32)
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 0]], bool)
    cs = np.array([[-1, 0, 1, -1], [-1, 1, 1, -1]])
    adv = np.array([0.7, -0.3], np.float32)
    args = CJ.CJGRPOArgs(kl_coef=0.0)
    s, c, aux = CJ.cj_grpo_terms(logp, logp, adv, mask, cs, 3, args)
    assert float(c) == 2
    np.testing.assert_allclose(float(s) / float(c), 0.5 * (-0.7 + (-0.7 + 0.6) / 3), rtol=1e-6)
    s, c, _ = CJ.cj_grpo_terms(logp, logp, adv, mask, cs, 3, CJ.CJGRPOArgs(kl_coef=0.0, aggregation="token-mean"))
    np.testing.assert_allclose(float(s) / float(c), (-1.4 + 0.6) / 4, rtol=1e-6)
    g = jax.grad(lambda lp: CJ.cj_grpo_terms(lp, logp, adv, mask, cs, 3, args)[0])(jnp.asarray(logp))
    assert np.all(np.asarray(g)[~mask] == 0) and np.all(np.asarray(g)[mask] != 0)
    s, c, _ = CJ.cj_grpo_terms(logp, logp, adv, np.zeros_like(mask), cs, 3, args)
    assert float(s) == 0 and float(c) == 0


@pytest.fixture(scope="module")
def dlm():
    return Decoder(presets.get("tiny_diffusion", vocab_size=16, num_layers=1), rngs=nnx.Rngs(0))


def _one_step_batch(P=3, N=4):
    """Two groups of two rows; every generated position committed at step 0 (S = 1)."""
    rng = np.random.default_rng(0)
    B = 4
    tokens = np.concatenate([rng.integers(4, 16, (B, P)), rng.integers(4, 16, (B, N))], 1).astype(np.int32)
    gen = np.zeros((B, P + N), bool)
    gen[:, P:] = True
    loss_mask = gen.copy()
    loss_mask[1, P + 2:] = False  # row 1 stopped after 2 tokens: the filled rest is not trained
    return {"tokens": tokens, "valid": np.ones((B, P + N), bool), "loss_mask": loss_mask, "gen_mask": gen,
            "commit_step": np.where(gen, 0, -1).astype(np.int32), "temperature": np.full(B, 0.7, np.float32),
            "rewards": np.array([1, 0, 1, 1], np.float32), "group_ids": np.array([0, 0, 1, 1], np.int32)}


def test_one_step_is_grpo_from_fully_masked_response(dlm):
    batch = _one_step_batch()
    P = 3
    x = batch["tokens"].copy()
    x[:, P:] = MASK
    logits = dlm(jnp.asarray(x), attention="bidirectional").logits.at[..., MASK].set(-jnp.inf) / 0.7
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), batch["tokens"][..., None], -1)[..., 0]
    logp, ref = CJ.trajectory_logprobs(dlm, batch, mask_id=MASK, num_steps=4, reference=dlm)
    np.testing.assert_allclose(np.asarray(logp)[:, P:], expected[:, P:], rtol=1e-5)
    np.testing.assert_allclose(ref, logp)
    batch["old_logprobs"] = np.asarray(logp)
    s, c, aux = jax.jit(lambda b: CJ.cj_grpo_loss(dlm, b, None, CJ.CJGRPOArgs(gen_len=4), reference=dlm))(batch)
    # S = 1, ratio 1, KL 0 (reference = policy): the mean over trained tokens of −A, A = r − mean (no std):
    # rows 0/1 have A = ±0.5 over 4/2 tokens, rows 2/3 A = 0 over 4 + 4 tokens
    assert float(c) == 1
    np.testing.assert_allclose(float(s), -(4 * 0.5 - 2 * 0.5) / 14, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"][0]), 0.0, atol=1e-6)
    with pytest.raises(ConfigError, match="reference"):
        CJ.cj_grpo_loss(dlm, batch, None, CJ.CJGRPOArgs(gen_len=4))


def test_collector_first_epoch_ratio_one():
    """A diffusion rollout (ASS + EOSER commit policy) by the loop's collector: ranks are dense, the generated
    region is marked, and the loss sees ratio 1 on every committed completion token."""
    tok = build_tokenizer()
    model = Decoder(presets.get("tiny_diffusion", vocab_size=tok.get_vocab_size(), num_layers=1),
                    rngs=nnx.Rngs(1))
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=8, batch_size=2, num_examples=8)
    settings = from_dict({"rollout": {"num_generations": 2, "temperature": 1.0}}).rollout
    args = OBJECTIVES.parse_args("cj_grpo", {"gen_len": 8, "policy": "ass", "kl_coef": 0.0}, "objective.args")
    ro = CJ.collect_cj_grpo(model, next(iter(ds)), task=task, tokenizer=tok, settings=settings,
                            rng=jax.random.key(0), args=args)
    b = ro.batch
    assert b["tokens"].shape == (4, 16) and b["gen_mask"][:, 8:].all() and not b["gen_mask"][:, :8].any()
    ranks = b["commit_step"][:, 8:]
    assert ranks.min() == 0 and set(np.unique(ranks[ranks >= 0])) == set(range(ranks.max() + 1))
    assert ranks.max() + 1 <= 3  # ASS: 8 masks in floor(log2 8) = 3 steps
    assert np.all(b["old_logprobs"][~b["loss_mask"]] == 0) and np.all(b["old_logprobs"][b["loss_mask"]] < 0)
    s, c, aux = jax.jit(lambda x: CJ.cj_grpo_loss(model, x, None, args))(b)
    np.testing.assert_allclose(float(aux["ratio_mean"][0]) / float(aux["ratio_mean"][1]), 1.0, atol=1e-5)
    assert float(aux["clip_frac"][0]) == 0 and np.isfinite(float(s))
    entry = OBJECTIVES.entry("cj_grpo")
    assert entry.spec.collect is CJ.collect_cj_grpo and entry.spec.models == ("reference",)


def test_collector_one_step_trajectory_is_the_skip_step_baseline():
    """``trajectory=one_step`` (the paper's skip-step baseline): the same decodes and rewards as CJ-GRPO under the
    same key, every revealed position moved to step 0 (scored from x_0, ratio 1 on the first epoch), and both mean
    log-probs logged; consistent rollouts log neither. An unknown trajectory is a ConfigError naming the value."""
    tok = build_tokenizer()
    model = Decoder(presets.get("tiny_diffusion", vocab_size=tok.get_vocab_size(), num_layers=1),
                    rngs=nnx.Rngs(1))
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=8, batch_size=2, num_examples=8)
    prompts = next(iter(ds))
    settings = from_dict({"rollout": {"num_generations": 2, "temperature": 1.0}}).rollout
    out = {}
    for traj in ("consistent", "one_step"):
        args = OBJECTIVES.parse_args("cj_grpo", {"gen_len": 8, "policy": "ass", "kl_coef": 0.0, "trajectory": traj},
                                     "objective.args")
        out[traj] = (args, CJ.collect_cj_grpo(model, prompts, task=task, tokenizer=tok, settings=settings,
                                              rng=jax.random.key(0), args=args))
    (_, c), (args, o) = out["consistent"], out["one_step"]
    np.testing.assert_array_equal(o.batch["tokens"], c.batch["tokens"])
    np.testing.assert_array_equal(o.batch["rewards"], c.batch["rewards"])
    cs = c.batch["commit_step"]
    np.testing.assert_array_equal(o.batch["commit_step"], np.where(cs >= 0, 0, -1))
    x0 = dict(c.batch, commit_step=o.batch["commit_step"])
    logp, _ = CJ.trajectory_logprobs(model, x0, mask_id=CJ._mask_id(model, args), num_steps=8)
    m = o.batch["loss_mask"]
    np.testing.assert_allclose(o.batch["old_logprobs"][m], np.asarray(logp)[m], rtol=1e-5)
    np.testing.assert_allclose(o.info["rollout/logp_traj_mean"], c.batch["old_logprobs"][m].mean(), rtol=1e-5)
    np.testing.assert_allclose(o.info["rollout/logp_onestep_mean"], o.batch["old_logprobs"][m].mean(), rtol=1e-5)
    assert "rollout/logp_traj_mean" not in c.info
    s, _, aux = jax.jit(lambda x: CJ.cj_grpo_loss(model, x, None, args))(o.batch)
    np.testing.assert_allclose(float(aux["ratio_mean"][0]) / float(aux["ratio_mean"][1]), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="trajectory='x0'"):
        CJ.CJGRPOArgs(trajectory="x0")
