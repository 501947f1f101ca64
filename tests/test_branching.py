"""APPO tree rollouts (train/branching.py): branch-point selection, procedure-level advantages, the collector."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtok.config import from_dict
from jaxtok.data import prompt_dataset
from jaxtok.models import Decoder, presets
from jaxtok.tasks import build_tokenizer, make_task
from jaxtok.train import branching


def test_select_branch_points_order_fallback_and_cycle():
    score = np.array([[0.1, 0.9, 0.5, 0.0],   # prompt 0, rollout 0
                      [0.7, 0.2, 0.0, 0.0],   # prompt 0, rollout 1
                      [0.3, 0.0, 0.0, 0.0],   # prompt 1, rollout 0: one token -> nothing to regenerate
                      [0.0, 0.0, 0.0, 0.0]])  # prompt 1, rollout 1: empty
    cand = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    lengths = np.array([4, 2, 1, 0])
    parent, idx = branching.select_branch_points(score, cand, lengths, n=2, num_branches=4)
    # prompt 0: candidates by score (0,1)=.9, (1,0)=.7, (0,2)=.5; then the best other eligible point (0,0)=.1
    assert list(zip(parent[:4], idx[:4])) == [(0, 1), (1, 0), (0, 2), (0, 0)]
    # prompt 1: no eligible point -> branch from the prompt of its first rollout
    assert list(zip(parent[4:], idx[4:])) == [(2, -1)] * 4
    parent, idx = branching.select_branch_points(score[:2], cand[:2], lengths[:2], n=2, num_branches=6)
    assert list(zip(parent, idx))[4:] == [(0, 1), (1, 0)]  # points exhausted: chosen again in turn


def test_appo_advantages_hand_computed():
    mask = np.ones((2, 5), bool)
    adv_init, a_br = branching.appo_advantages(
        np.array([1.0, 0.0]), np.array([1.0, 0.0]), parent=np.array([0, 0]), idx=np.array([1, 3]), n=2,
        num_branches=2, mask_init=mask)
    # group z-scores (population std 0.5): init [1, -1], branch [1, -1]
    np.testing.assert_allclose(adv_init[0], [1, 1, 0, 0, 1], atol=1e-5)  # cols<=1: mean(1,-1)=0; cols 2-3: -1
    np.testing.assert_allclose(adv_init[1], [-1] * 5, atol=1e-5)  # no branches: plain A_init
    np.testing.assert_allclose(a_br, [1, -1], atol=1e-5)


def test_appo_advantages_without_branches_are_grpo():
    r = np.array([0.0, 1.0, 1.0, 0.0])
    adv_init, _ = branching.appo_advantages(r, np.zeros(0), np.zeros(0, int), np.zeros(0, int), n=4,
                                            num_branches=0, mask_init=np.ones((4, 3), bool))
    np.testing.assert_allclose(adv_init[:, 0], (r - r.mean()) / (r.std() + 1e-6), rtol=1e-6)


def test_collect_appo_tree_batch():
    """Tree layout; branch rows copy a parent's prefix, continue it, and carry zero loss weight (loss mask and
    advantages 0: reward contrast only, §9), so the APPO loss and its count are those of the initial rows alone
    (every aggregation ignores rows without loss tokens)."""
    tok = build_tokenizer()
    model = Decoder(presets.get("tiny_draft", vocab_size=tok.get_vocab_size()), rngs=nnx.Rngs(0))
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=4)
    prompts = next(iter(ds))
    settings = from_dict({"rollout": {"num_generations": 2, "branches": 3, "max_new_tokens": 8,
                                      "temperature": 1.0}}).rollout
    ro = branching.collect_appo(model, prompts, task=task, tokenizer=tok, settings=settings, rng=jax.random.key(0))
    b = ro.batch
    P, N = 12, 8
    assert b["tokens"].shape == (2 * 2 + 2 * 3, P + N) and len(ro.completions) == 10
    np.testing.assert_array_equal(b["is_branch"], [0] * 4 + [1] * 6)
    np.testing.assert_array_equal(b["group_ids"], [0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    assert not b["loss_mask"][4:].any() and np.all(b["advantages"][4:] == 0)  # branch rows: no loss weight
    assert b["loss_mask"][:4].any() and np.all(b["advantages"][:4][~b["loss_mask"][:4]] == 0)
    for r in range(4, 10):
        continuation = np.nonzero(b["sampler_logprobs"][r])[0]  # the tokens the branch sampled
        generated = np.nonzero(b["valid"][r, P:])[0] + P
        assert continuation.size == 0 or continuation[-1] == generated[-1]  # the continuation ends the response
        prefix = generated[~np.isin(generated, continuation)]
        parent = 2 * ((r - 4) // 3) + 0  # a parent row of the same prompt (prompts are contiguous)
        same = [p for p in (parent, parent + 1) if np.array_equal(b["tokens"][p, prefix], b["tokens"][r, prefix])]
        assert same, "a branch row's prefix is copied from one of its prompt's initial rollouts"
    assert np.all(b["valid"][:, P:].sum(1) <= N)
    assert ro.info["rollout/branch_point_mean"] >= -1
    np.testing.assert_array_equal(b["max_new_tokens"], [N] * 10)
    assert set(np.unique(b["accuracy"])) <= {0.0, 1.0}


def test_loop_rollout_batch_size_counts_branches():
    from jaxtok.config import validate_names
    from jaxtok.registry import ConfigError

    cfg = from_dict({"data": {"batch_size": 8}, "objective": {"name": "sft"},
                     "rollout": {"num_generations": 2, "branches": 2}})
    assert cfg.rollout.rows_per_prompt == 4
    validate_names(cfg)  # sft does not use rollouts: nothing to check
    with pytest.raises(ConfigError):
        from_dict({"rollout": {"branches": -1}})
