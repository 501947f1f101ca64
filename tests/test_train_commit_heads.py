"""Learned commit policies' training (train/objectives/commit_heads.py, decode_methods.md §B16 Learn2PD, §B17
TraceLock, run by ``jaxtok train configs/heads/{learn2pd,tracelock}.yaml``) and plan conditioning
(decode/plan_conditioning.py, §B22): labels and block starts on hand-made trajectories, the replay reproducing the
sampler's steps, losses (weights, empty selection), a few steps of the one train step reducing the loss on toys,
saved heads loading through ``policy_args.head_path`` and plugging into ``diffusion_generate`` with loops ending
within their caps, a head trained by ``jaxtok train`` decoding through ``jaxtok decode``, and the
plan-conditioned prompt layout."""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok.decode import commit_policies as cp
from jaxtok.decode.diffusion import diffusion_generate, policy_and_heads
from jaxtok.models import Decoder, presets
from jaxtok.models.heads import HEAD_KINDS, FilterHead, TraceController, build_head, head_kind, save_head
from jaxtok.registry import ConfigError
from jaxtok.train.heads import fit_head
from jaxtok.train.objectives import commit_heads as tch

V, MASK, K, N = 61, 3, 4, 8
ROOT = Path(__file__).resolve().parents[1]
PROMPT = np.array([[0, 1, 11, 12], [1, 13, 14, 15]], np.int32)
PVALID = np.array([[False, True, True, True], [True, True, True, True]])


@pytest.fixture(scope="module")
def decoder():
    cfg = presets.get("tiny_diffusion", vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    return Decoder(cfg, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def traced(decoder):
    out = tch.record_trajectories(decoder, PROMPT, PVALID, gen_len=N, block_len=K, stop_tokens=(2,))
    tokens, cs = np.asarray(out.tokens), np.asarray(out.commit_step)
    rep = tch.replay_trajectory(decoder, PROMPT, PVALID, tokens, cs, int(out.num_steps), return_hidden=True)
    return out, tokens, cs, rep


# ----------------------------------------------------------------------------------------------------------------
# Labels, masks and blocks by hand
# ----------------------------------------------------------------------------------------------------------------


def test_labels_on_a_hand_made_trajectory():
    # one row, 3 positions, 3 steps; final tokens [5, 6, 7]; commits: pos 0 at step 2, pos 1 at 0, pos 2 at 1
    tokens = np.array([[5, 6, 7]])
    cs = np.array([[2, 0, 1]])
    x0 = np.array([[[5, 6, 9]],   # step 0
                   [[8, 6, 7]],   # step 1
                   [[5, 9, 7]]])  # step 2 (pos 1 already committed at 0: its later proposals do not count)
    final = tch.commit_labels(x0, tokens, cs, "final")
    np.testing.assert_array_equal(final[:, 0], [[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    stable = tch.commit_labels(x0, tokens, cs, "stable")
    # pos 0: right at 0, wrong at 1, right at 2 (commit) -> stable only from step 2
    # pos 1: committed at 0 with the right token -> stable at 0 (later steps are after the commit)
    # pos 2: wrong at 0, right at 1 (commit) -> stable from step 1
    np.testing.assert_array_equal(stable[:, 0], [[0, 1, 0], [0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="label kind"):
        tch.commit_labels(x0, tokens, cs, "future")


def test_masked_at_steps_and_block_starts_by_hand():
    cs = np.array([[0, 1, 3, 2, -1]])  # position 4 never committed
    masked = tch.masked_at_steps(cs, 4)
    np.testing.assert_array_equal(masked[:, 0].astype(int), [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1],
                                                             [0, 0, 1, 0, 1]])
    # blocks of 2: [0,2) until both are decoded (step 2), then the block starting at the first mask (2)
    np.testing.assert_array_equal(tch.block_starts(masked, 2)[:, 0], [0, 0, 2, 2])
    # a block whose first positions were decoded early starts at the first masked position, not at a multiple
    cs2 = np.array([[0, 1, 2, 4, 3, 5]])
    m2 = tch.masked_at_steps(cs2, 6)
    m2[2, 0, 2] = False  # position 2 decoded out of order before step 2 -> block 1 starts at 3
    np.testing.assert_array_equal(tch.block_starts(m2, 2)[:3, 0], [0, 0, 3])


# ----------------------------------------------------------------------------------------------------------------
# Replay = the sampler's steps
# ----------------------------------------------------------------------------------------------------------------


def test_replay_reproduces_the_sampler(traced):
    out, tokens, cs, rep = traced
    S = int(out.num_steps)
    assert S == N and np.all(cs >= 0)  # llada, one token per step, stop_early off: every position, N steps
    for b in range(2):
        for i in range(N):
            s = cs[b, i]
            assert rep["x0"][s, b, i] == tokens[b, i]  # committed token = the replayed proposal of its step
            assert rep["masked"][s, b, i] and not rep["masked"][min(s + 1, S - 1), b, i] or s == S - 1
            # LLaDA commits the most confident eligible position: replayed confidences agree
            lo = (s // K) * K
            elig = rep["masked"][s, b, lo:lo + K]
            assert rep["conf"][s, b, i] >= rep["conf"][s, b, lo:lo + K][elig].max() - 1e-6
    lo = tch.block_starts(rep["masked"], K)
    np.testing.assert_array_equal(lo, np.broadcast_to((np.arange(S) // K * K)[:, None], (S, 2)))
    assert rep["hidden"].shape == (S, 2, N, 16)


def test_examples_match_the_decode_features(traced):
    out, tokens, cs, rep = traced
    labels = tch.commit_labels(rep["x0"], tokens, cs)
    lo = tch.block_starts(rep["masked"], K)
    ex = tch.learn2pd_examples(rep, labels, lo, K)
    live = rep["masked"].any(-1).reshape(-1)
    assert ex["feats"].shape == (live.sum(), K)
    # (step 1, row 0): block [0, 4) with the position committed at step 0 shown as confidence 1
    j = 1 * 2 + 0
    first = int(np.flatnonzero(cs[0] == 0)[0])
    assert ex["feats"][j, first] == 1.0 and ex["weight"][j, first] == 0.0
    others = [i for i in range(K) if i != first]
    np.testing.assert_allclose(ex["feats"][j, others], rep["conf"][1, 0, others], rtol=1e-6)
    np.testing.assert_array_equal(ex["label"][j], labels[1, 0, :K])
    tl = tch.tracelock_examples(rep, labels, window=128, stop_tokens=(2,))
    assert tl["feats"].shape == (live.sum(), N, 17) and tl["states"].shape == (live.sum(), N)
    np.testing.assert_array_equal(tl["weight"] > 0, rep["masked"].reshape(-1, N)[live])


# ----------------------------------------------------------------------------------------------------------------
# Losses and training
# ----------------------------------------------------------------------------------------------------------------


def _filter_toy(m=512, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.uniform(0, 1, (m, K)).astype(np.float32)
    return {"feats": feats, "valid": np.ones((m, K), bool), "label": (feats > 0.6).astype(np.float32),
            "weight": (rng.uniform(size=(m, K)) < 0.7).astype(np.float32)}


def test_filter_loss_weights_and_empty_selection():
    head = FilterHead(K, hidden=8, rngs=nnx.Rngs(0))
    d = {k: jnp.asarray(v) for k, v in _filter_toy(16).items()}
    loss_sum, count, _ = tch.filter_loss(head, d, None, tch.Learn2PDHeadArgs())
    logits = head(d["feats"], d["valid"])
    by_hand = jnp.sum(d["weight"] * (jax.nn.softplus(logits) - d["label"] * logits)) / jnp.sum(d["weight"])
    np.testing.assert_allclose(loss_sum / count, by_hand, rtol=1e-5)
    empty = tch.filter_loss(head, dict(d, weight=jnp.zeros_like(d["weight"])), None, tch.Learn2PDHeadArgs())
    assert float(empty[0]) == 0.0 and float(empty[1]) == 0.0  # the step reports 0 with zero gradient


def test_a_few_steps_reduce_the_filter_loss():
    data = _filter_toy()
    head = FilterHead(K, hidden=16, rngs=nnx.Rngs(0))
    loss = functools.partial(tch.filter_loss, args=tch.Learn2PDHeadArgs())
    losses = fit_head(head, loss, data, steps=60, optimizer=optax.adam(1e-2), batch_size=128)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_a_few_steps_reduce_the_controller_loss():
    rng = np.random.default_rng(0)
    m, t, f = 128, 6, 3
    feats = rng.normal(size=(m, t, f)).astype(np.float32)
    data = {"feats": feats, "states": np.full((m, t), 2, np.int32), "valid": np.ones((m, t), bool),
            "label": (feats[..., 0] > 0).astype(np.float32), "weight": np.ones((m, t), np.float32)}
    head = TraceController(f, d_model=16, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))
    args = tch.TraceLockHeadArgs()
    losses = fit_head(head, functools.partial(tch.controller_loss, args=args), data, steps=60,
                      optimizer=optax.adam(1e-2), batch_size=64, augment=lambda b, r: tch.random_crop(b, r, 0.5))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    empty = {k: jnp.asarray(v) for k, v in dict(data, weight=np.zeros((m, t), np.float32)).items()}
    loss_sum, count, _ = tch.controller_loss(head, empty, None, args)
    assert float(loss_sum) == 0.0 and float(count) == 0.0


def test_random_crop_keeps_a_prefix_of_each_window():
    valid = np.array([[False, True, True, True, True, False]] * 50)
    batch = {"valid": valid, "weight": valid.astype(np.float32)}
    out = tch.random_crop(batch, np.random.default_rng(0), 0.25)
    kept = out["valid"].sum(-1)
    assert kept.min() >= 1 and kept.max() <= 4 and len(set(kept.tolist())) > 1
    assert not np.any(out["valid"] & ~valid) and np.all(out["valid"][:, 1])  # a prefix of the window
    np.testing.assert_array_equal(out["weight"] > 0, out["valid"])


# ----------------------------------------------------------------------------------------------------------------
# Saved heads in the sampler
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trained_heads_load_and_decode_within_caps(decoder, traced, tmp_path):
    out, tokens, cs, rep = traced
    labels = tch.commit_labels(rep["x0"], tokens, cs)
    data_l = tch.learn2pd_examples(rep, labels, tch.block_starts(rep["masked"], K), K)
    data_t = tch.tracelock_examples(rep, labels, 128, (2,))
    ctors = {"learn2pd": {"block_size": K, "hidden": 8, "num_features": 1, "depth": 1},
             "tracelock": {"in_features": int(data_t["feats"].shape[-1]), "d_model": 16, "num_heads": 4,
                           "num_layers": 1}}
    losses = {"learn2pd": (tch.filter_loss, tch.Learn2PDHeadArgs()),
              "tracelock": (tch.controller_loss, tch.TraceLockHeadArgs())}
    for kind, data, path in (("learn2pd", data_l, tmp_path / "l2pd"), ("tracelock", data_t, tmp_path / "tl")):
        name = {"learn2pd": "learn2pd_filter", "tracelock": "tracelock_controller"}[kind]
        head = build_head(name, **ctors[kind])
        loss, args = losses[kind]
        fit_head(head, functools.partial(loss, args=args), data, steps=3)
        save_head(head, path, name, **ctors[kind])
        assert HEAD_KINDS[head_kind(path)].policy == kind
        policy, heads = policy_and_heads(kind, {"block_len": K, "threshold": 0.5, "head_path": str(path)})
        probe = tch.head_probs(kind, head, data)
        np.testing.assert_allclose(tch.head_probs(kind, next(iter(heads.values())), data), probe, atol=1e-6)
        res = diffusion_generate(decoder, PROMPT, PVALID, gen_len=N, policy=policy, heads=heads, stop_tokens=(2,))
        nb = math.ceil(N / K) + 1
        assert bool(jnp.all(res.done)) and int(res.num_steps) <= max(N, nb * N) + nb
        cstep = np.asarray(res.commit_step)
        assert np.all((cstep >= 0) & (cstep < int(res.num_steps)))
        assert np.all(np.asarray(res.nfe) <= int(res.num_steps))


def test_policy_args_head_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="head_path"):
        policy_and_heads("learn2pd", {"block_len": K})
    with pytest.raises(FileNotFoundError, match="head.json"):
        policy_and_heads("tracelock", {"head_path": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match="head_path"):
        policy_and_heads("llada", {"head_path": str(tmp_path)})  # not a field of a head-less policy
    head = FilterHead(K, hidden=8, rngs=nnx.Rngs(0))
    save_head(head, tmp_path / "f", "learn2pd_filter", block_size=K, hidden=8)
    with pytest.raises(ConfigError, match="needs"):
        policy_and_heads("tracelock", {"head_path": str(tmp_path / "f")})
    policy, heads = policy_and_heads("llada", {"block_len": K})
    assert heads is None and isinstance(policy.args, cp.LLaDAArgs)


@pytest.mark.slow
def test_jaxtok_train_learn2pd_then_decode_with_head_path(tmp_path):
    """``jaxtok train configs/heads/learn2pd.yaml`` on a tiny random diffusion run writes the filter and the held-out
    label metrics into its run directory; ``jaxtok decode configs/diffusion/learn2pd.yaml head_path=<run dir>``
    decodes with it."""
    from jaxtok import cli
    from jaxtok.models import save_checkpoint

    cfg = presets.get("tiny_diffusion", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    save_checkpoint(Decoder(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "lm"))
    common = [f"model.init_from={tmp_path / 'lm'}", "decode.batch_size=8", "decode.max_new_tokens=8"]
    rc = cli.main(["train", str(ROOT / "configs/heads/learn2pd.yaml"), f"run.out_dir={tmp_path}", *common,
                   "objective.args.prompts=16", "objective.args.block_len=4", "objective.args.hidden=8",
                   "train.steps=3", "data.batch_size=32"])
    assert rc == 0
    run = tmp_path / "learn2pd"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "learn2pd_filter" and summary["examples"] > 0 and summary["heldout_examples"] > 0
    assert set(summary["heldout"]) == {"t=0.5", "t=0.9"}
    assert head_kind(run) == "learn2pd_filter"
    rc = cli.main(["decode", str(ROOT / "configs/diffusion/learn2pd.yaml"), f"run.out_dir={tmp_path}", *common,
                   "run.name=dec", "decode.policy_args.block_len=4", f"decode.policy_args.head_path={run}",
                   "data.num_eval=8"])
    assert rc == 0


# ----------------------------------------------------------------------------------------------------------------
# Plan conditioning (§B22)
# ----------------------------------------------------------------------------------------------------------------


def test_compose_prompt_layouts():
    from jaxtok.decode.plan_conditioning import compose_prompt

    prompt = np.array([[0, 1, 20, 21], [1, 22, 23, 24]])
    pv = prompt != 0
    plan = np.array([[30, 31, 2], [32, 0, 0]])
    plan_valid = np.array([[True, True, False], [True, False, False]])
    toks, valid = compose_prompt(prompt, pv, plan, plan_valid, placement="after", pad_id=0)
    np.testing.assert_array_equal(toks, [[0, 0, 1, 20, 21, 30, 31], [0, 0, 1, 22, 23, 24, 32]])
    np.testing.assert_array_equal(valid, toks != 0)
    toks, valid = compose_prompt(prompt, pv, plan, plan_valid, placement="before", bos_id=1, sep_ids=(9,), pad_id=0)
    # <bos> plan sep prompt, left-padded to P + k + |sep| = 8
    np.testing.assert_array_equal(toks, [[0, 0, 1, 30, 31, 9, 20, 21], [0, 0, 1, 32, 9, 22, 23, 24]])
    assert valid.sum() == 6 + 6
    with pytest.raises(ValueError, match="placement"):
        compose_prompt(prompt, pv, plan, plan_valid, placement="middle")


def test_ar_plan_is_a_terminator_free_prefix():
    from jaxtok.decode.plan_conditioning import ar_plan

    cfg = presets.get("tiny_draft", vocab_size=V)
    planner = Decoder(cfg, rngs=nnx.Rngs(3))
    plan, valid, fwd = ar_plan(planner, PROMPT, PVALID, plan_tokens=5, stop_tokens=(2, 7, 8))
    assert plan.shape == valid.shape == (2, 5) and fwd >= 1
    assert not np.any(np.isin(plan, (2, 7, 8)) & valid)
    assert np.all(valid[:, 1:] <= valid[:, :-1])  # a prefix
    with pytest.raises(ValueError, match="plan_tokens"):
        ar_plan(planner, PROMPT, PVALID, plan_tokens=0, stop_tokens=(2,))
