"""Rollouts (train/rollout.py), rewards (train/rewards.py) and the loop's rollout path with frozen models."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.config import from_dict, validate_names
from jaxtok.data import prompt_dataset
from jaxtok.decode.generate import generate
from jaxtok.sampling import SamplingParams
from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.tasks import build_tokenizer, make_task

from jaxtok.train import rewards, rollout
from jaxtok.train.step import frozen_states, init_train_state, make_train_step
from _worker import interrupted_then_resumed


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return Decoder(presets.get("tiny_student", vocab_size=tok.get_vocab_size()), rngs=nnx.Rngs(0))


def _settings(**kw):
    return from_dict({"rollout": kw}).rollout


def test_expand_and_assemble_conventions():
    prompts = {"prompt": np.array([[0, 5, 6], [7, 8, 9]]), "prompt_valid": np.array([[0, 1, 1], [1, 1, 1]], bool),
               "index": np.array([3, 4])}
    rows = rollout.expand_groups(prompts, 2)
    np.testing.assert_array_equal(rows["index"], [3, 3, 4, 4])
    comp = np.array([[11, 2, 0]] * 4)
    cvalid = np.array([[1, 1, 0]] * 4, bool)
    b = rollout.assemble(rows["prompt"], rows["prompt_valid"], comp, cvalid)
    np.testing.assert_array_equal(b["tokens"][0], [0, 5, 6, 11, 2, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 0, 1, 2, 3, 3])  # left pad 0; counts valid tokens
    np.testing.assert_array_equal(b["positions"][2], [0, 1, 2, 3, 4, 4])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(b["valid"][0], [0, 1, 1, 1, 1, 0])


def test_collect_old_logprobs_match_the_sampler(tok, policy):
    """At temperature 1.5 without filters, the recomputed behaviour log-probs equal the sampler's own log-probs
    (same distribution, same inputs), so the first inner epoch has ratio 1; groups, rewards and lengths agree."""
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=8)
    prompts = next(iter(ds))
    settings = _settings(num_generations=3, max_new_tokens=6, temperature=1.5, rewards={"exact_match": 1.0,
                                                                                        "format": 0.5},
                         width_buckets=1)  # the full [B, P + N] layout (trimming: the next test)
    key = jax.random.key(7)
    ro = rollout.collect(policy, prompts, task=task, tokenizer=tok, settings=settings, rng=key, chunk_size=5)
    b = ro.batch
    assert b["tokens"].shape == (6, 18) and b["rewards"].shape == (6,)
    np.testing.assert_array_equal(b["group_ids"], [0, 0, 0, 1, 1, 1])
    rows = rollout.expand_groups(prompts, 3)
    out = generate(policy, rows["prompt"], rows["prompt_valid"], max_new_tokens=6,
                   sampling=SamplingParams(temperature=1.5),
                   rng=jax.random.split(key, 3)[0], stop_tokens=(2,), pad_id=0, return_entropy=True)
    np.testing.assert_array_equal(b["tokens"][:, 12:], np.asarray(out.tokens))
    np.testing.assert_allclose(b["old_logprobs"][:, 12:], np.asarray(out.logprobs), atol=2e-5)
    np.testing.assert_allclose(b["entropy"][:, 12:], np.asarray(out.entropy), atol=2e-5)
    assert np.all(b["old_logprobs"][:, :12] == 0)
    expect = [rewards.exact_match(task, c, e) + 0.5 * rewards.format_reward(task, c, e)
              for c, e in zip(ro.completions, ro.examples)]
    np.testing.assert_allclose(b["rewards"], expect)
    assert ro.info["rollout/length_mean"] == pytest.approx(np.asarray(out.valid).sum(1).mean())
    # what the objectives read besides the rewards: the verifier's accuracy (DAPO's filter) and the budget (Dr.GRPO)
    np.testing.assert_array_equal(b["accuracy"], [rewards.exact_match(task, c, e)
                                                  for c, e in zip(ro.completions, ro.examples)])
    np.testing.assert_array_equal(b["max_new_tokens"], [6] * 6)
    # sampler vs trainer on the sampled tokens, logged every step: 0 up to float error without filters
    assert 0.0 <= ro.info["rollout/sampler_abs_logp_diff"] < 2e-5 and 0.0 <= ro.info["rollout/sampler_kl"] < 1e-8
    before = rollout._score_jit._cache_size()
    rollout.collect(policy, prompts, task=task, tokenizer=tok, settings=settings, rng=jax.random.key(8),
                    chunk_size=5)
    assert rollout._score_jit._cache_size() == before  # equal shapes: the scoring forward is not recompiled


def test_bucketed_width_and_trim_padding_hand_computed():
    assert [rollout.bucketed_width(n, 32, 4) for n in (0, 1, 8, 9, 23, 24, 25, 32)] == [8, 8, 8, 16, 24, 24, 32, 32]
    assert rollout.bucketed_width(5, 30, 4) == 8 and rollout.bucketed_width(29, 30, 4) == 30  # steps of 8, capped
    assert rollout.bucketed_width(3, 30, 1) == 30  # one bucket: always the full width
    pv = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], bool)  # P = 5, longest prompt 3
    cv = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)  # N = 4, longest completion 2
    assert rollout.trim_padding(pv, cv, 1) == (slice(0, 5), slice(0, 4))
    assert rollout.trim_padding(pv, cv, 9) == (slice(2, 5), slice(0, 2))  # width 5 = 3 + 2 exactly
    assert rollout.trim_padding(pv, cv, 3) == (slice(1, 5), slice(0, 2))  # width 6: one more prompt pad column
    assert rollout.trim_padding(pv, np.zeros_like(cv), 9) == (slice(2, 5), slice(0, 1))  # keeps one completion col


def test_trimmed_rollout_equals_the_full_width_batch(tok, policy):
    """Trimming (``rollout.width_buckets``) drops only columns that are padding in every row: on the kept columns
    the batch equals the full-width one (same rng), the dropped ones hold no valid token, and a policy-gradient
    loss and its gradient are unchanged (padding is masked everywhere)."""
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=8)
    prompts = next(iter(ds))
    common = dict(num_generations=3, max_new_tokens=6, temperature=1.5)
    full = rollout.collect(policy, prompts, task=task, tokenizer=tok, settings=_settings(**common, width_buckets=1),
                           rng=jax.random.key(7), chunk_size=5).batch
    cut = rollout.collect(policy, prompts, task=task, tokenizer=tok, settings=_settings(**common, width_buckets=6),
                          rng=jax.random.key(7), chunk_size=5).batch
    assert full["tokens"].shape == (6, 18)
    T = cut["tokens"].shape[1]
    p_max = int(prompts["prompt_valid"].sum(1).max())
    n_max = int(full["loss_mask"].sum(1).max())
    assert T == rollout.bucketed_width(p_max + n_max, 18, 6) < 18
    p_keep = min(12, T - n_max)
    cols = np.r_[12 - p_keep:12, 12:12 + T - p_keep]  # the kept columns of the full batch
    assert not full["valid"][:, np.setdiff1d(np.arange(18), cols)].any()
    for k, v in full.items():
        if np.ndim(v) == 2 and k in ("tokens", "positions", "valid", "loss_mask", "sampler_logprobs"):
            np.testing.assert_array_equal(cut[k], v[:, cols], err_msg=k)
        elif np.ndim(v) == 2:
            np.testing.assert_allclose(cut[k], v[:, cols], atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(cut[k], v, err_msg=k)
    from jaxtok.train.objectives import policy_gradient as PG

    loss_fn, args = PG.policy_gradient_loss, PG.PolicyGradientArgs(loss_mode="grpo")
    rewards_ = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], np.float32)  # a learning signal in both groups

    def loss_and_grad(batch):
        def f(m):
            s, c, _ = loss_fn(m, {k: jnp.asarray(v) for k, v in dict(batch, rewards=rewards_).items()},
                              jax.random.key(0), args)
            return s / c
        return nnx.value_and_grad(f)(policy)

    (l_full, g_full), (l_cut, g_cut) = loss_and_grad(full), loss_and_grad(cut)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_full)) > 1e-4  # a real gradient, not zeros
    np.testing.assert_allclose(float(l_cut), float(l_full), atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_cut), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sampler_behaviour_logprobs_skip_the_scoring_forward(tok, policy, monkeypatch):
    """``rollout.behaviour_logprobs: sampler``: old log-probs and entropies are the sampler's own, equal to the
    recomputed ones up to float error, with no scoring forward; filters, which make the sampler's log-probs those
    of S(p) rather than p, are refused naming the key."""
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=8)
    prompts = next(iter(ds))
    common = dict(num_generations=3, max_new_tokens=6, temperature=1.5)
    ref = rollout.collect(policy, prompts, task=task, tokenizer=tok, settings=_settings(**common),
                          rng=jax.random.key(7), chunk_size=5)

    def no_forward(*a, **k):
        raise AssertionError("scoring forward called")

    monkeypatch.setattr(rollout, "score_rollout", no_forward)
    fast = rollout.collect(policy, prompts, task=task, tokenizer=tok,
                           settings=_settings(**common, behaviour_logprobs="sampler"), rng=jax.random.key(7),
                           chunk_size=5)
    np.testing.assert_array_equal(fast.batch["tokens"], ref.batch["tokens"])
    np.testing.assert_allclose(fast.batch["old_logprobs"], ref.batch["old_logprobs"], atol=2e-5)
    np.testing.assert_allclose(fast.batch["entropy"], ref.batch["entropy"], atol=2e-5)
    assert "rollout/sampler_kl" in ref.info and "rollout/sampler_kl" not in fast.info
    for bad in ({"top_k": 5}, {"top_p": 0.9}, {"off_policy_fraction": 0.5}):
        with pytest.raises(ConfigError, match=f"rollout.{next(iter(bad))}"):
            _settings(**common, behaviour_logprobs="sampler", **bad)
    with pytest.raises(ValueError, match="top-K"):
        rollout.collect(policy, prompts, task=task, tokenizer=tok, topk=3, rng=jax.random.key(7),
                        settings=_settings(**common, behaviour_logprobs="sampler"))


def test_rewards_hand_computed():
    task = make_task("arith", {"digits": 1})
    ex = task.example("train", 0)
    good, bad = f"x>{ex.answer}", "x>nope"
    np.testing.assert_allclose(rewards.score(task, [good, bad], [ex, ex], {"exact_match": 2.0}), [2.0, 0.0])
    with pytest.raises(ConfigError, match="rollout.rewards"):
        rewards.score(task, [good], [ex], {"acurracy": 1.0})


def test_math_verify_equivalence():
    task = make_task("arith", {"digits": 1})
    ex = dataclasses.replace(task.example("train", 0), answer="1/2")
    assert rewards.math_verify(task, "so >0.5", ex) == 1.0
    assert rewards.math_verify(task, "so >0.6", ex) == 0.0
    assert rewards.math_verify(task, "no mark", ex) == 0.0


R10 = "reasoning!"  # exactly 10 characters: the shortest substantive think


@pytest.mark.parametrize("text, score", [
    (f"<think>{R10}</think><answer>y</answer>", 1.0),  # 0.2 + 0.5 + 0.5·(0.4 + 0.3) + 0.1 = 1.15, capped at 1
    ("<think>x</think><answer>y</answer>", 0.6),  # 1-char think is not substantive: 0.5 + 0.1
    ("<think>reasoning</think><answer>y</answer>", 0.6),  # 9 characters: still not substantive
    ("<think>          </think><answer>y</answer>", 0.6),  # blank think
    ("<think>x", -0.15),  # −0.5·0.3, no lower clip; score ≤ 0: no balance bonus
    (f"<think>{R10}", 0.05),  # 0.2 − 0.5·0.3; unbalanced tags: no +0.1
    (f"<think>{R10}</think><answer></answer>", 0.5),  # empty answer: no answer credit, no flow bonus; 0.2 + 0.2 + 0.1
    (f"<think>{R10}</think><answer>42", 0.4),  # unclosed answer: no answer credit; 0.2 + 0.5·0.4, unbalanced
    ("<think>hm</think><answer> </answer><answer>42</answer>", 0.6),  # a later pair holds the answer: 0.5 + 0.1
    ("<think>ok<answer>a long answer here</answer>", 0.35),  # think read up to <answer>: "ok"; 0.5 − 0.15
    ("<answer>y</answer>", 0.6),
    ("plain", 0.0),
])
def test_para_format_hand_computed(text, score):
    """PARA-GRPO format reward on edge-case strings, weights of ParaVT ``format.py`` (spec §12, ``answer_suffix``
    on, λ_anchor 0.5): substantive think ≥ 10 characters, credit only for a closed non-empty answer, flow bonus only
    with one, later answer pairs inspected, an unclosed think cut at ``<answer>``, negative scores kept."""
    assert rewards.para_format_score(text) == pytest.approx(score)


def test_step_with_frozen_model_passes_it_by_name(policy):
    """A frozen model reaches the loss as a keyword argument and gets no update; the policy does."""
    teacher = Decoder(policy.cfg, rngs=nnx.Rngs(1))
    seen = {}

    def loss_fn(model, batch, rng, teacher):
        del rng
        t = jax.lax.stop_gradient(teacher(batch["tokens"]).logits)
        s = model(batch["tokens"]).logits
        seen["called"] = True
        return jnp.sum((s - t) ** 2), jnp.asarray(batch["tokens"].size, jnp.float32), {}

    import optax

    opt = optax.sgd(0.1)
    graphdef, state = init_train_state(policy, opt)
    step = make_train_step(policy, opt, loss_fn, frozen={"teacher": teacher}, donate=False)
    batch = {"tokens": jnp.array([[1, 5, 6, 7]], jnp.int32)}
    before = jax.tree.map(np.asarray, nnx.state(teacher))
    new_state, metrics = step(state, batch, frozen_states({"teacher": teacher}))
    assert seen["called"] and float(metrics["loss"]) > 0
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(teacher)))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, new_state.params)
    assert max(jax.tree.leaves(moved)) > 0


# A minimal rollout objective (REINFORCE with a KL to the teacher and the reference) to exercise the loop's
# rollout path end to end, independent of the shipped distillation and RL objectives.
@dataclasses.dataclass(frozen=True)
class _ToyArgs:
    kl: float = 0.1


@OBJECTIVES.register("_toy_rollout", _ToyArgs, data="rollout", models=("teacher", "reference"))
def _toy_rollout(model, batch, rng, args=_ToyArgs(), *, teacher=None, reference=None):
    del rng
    logits = model(batch["tokens"], positions=batch["positions"], valid=batch["valid"]).logits[:, :-1]
    logits = logits / batch["temperature"][:, None, None]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    adv = batch["rewards"] - jnp.mean(batch["rewards"])
    loss = -adv[:, None] * lp
    for frozen in (teacher, reference):
        if frozen is not None:
            f = jax.lax.stop_gradient(frozen(batch["tokens"], positions=batch["positions"], valid=batch["valid"])
                                      .logits[:, :-1])
            loss += args.kl * (lp - jnp.take_along_axis(jax.nn.log_softmax(f), batch["tokens"][:, 1:, None], -1)[..., 0])
    ratio_one = jnp.abs(lp - batch["old_logprobs"][:, 1:]) * mask
    return jnp.sum(loss * mask), jnp.sum(mask).astype(jnp.float32), {"max_logratio": (jnp.max(ratio_one), 1.0)}


def _rollout_cfg(tmp_path, teacher_dir, **rollout_kw):
    return from_dict({
        "model": {"preset": "tiny_student"},
        "data": {"task": "arith", "task_args": {"digits": 1}, "prompt_len": 12, "seq_len": 32, "batch_size": 8,
                 "num_eval": 8},
        "objective": {"name": "_toy_rollout"},
        "optimizer": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": 4, "log_every": 1, "eval_batches": 1},
        "rollout": {"num_generations": 4, "max_new_tokens": 6, "inner_epochs": 2, "reference": "init",
                    "teacher_init_from": str(teacher_dir), **rollout_kw},
        "decode": {"max_new_tokens": 6, "batch_size": 8},
        "run": {"progress": False},
    })


def test_rollout_config_checks(tmp_path):
    cfg = _rollout_cfg(tmp_path, tmp_path)
    validate_names(cfg)
    with pytest.raises(ConfigError, match="num_generations=3 \\+ rollout.branches=0"):
        validate_names(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, num_generations=3)))
    with pytest.raises(ConfigError, match="teacher_init_from"):
        validate_names(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, teacher_init_from=None)))
    with pytest.raises(ConfigError, match="rollout.rewards"):
        validate_names(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, rewards={"nope": 1.0})))


@pytest.mark.slow
def test_loop_rollout_path_end_to_end(tmp_path, tok):
    """`train` with a rollout objective: a teacher run directory and reference=init as frozen models, two inner
    epochs per rollout (the first sees log-ratio 0 up to float error), GKD mixing, rollout metrics logged."""
    from jaxtok.models.hf import save_checkpoint
    from jaxtok.tasks import save_tokenizer
    from jaxtok.train.loop import train

    teacher_dir = tmp_path / "teacher"
    teacher = Decoder(presets.get("tiny_student", vocab_size=tok.get_vocab_size()), rngs=nnx.Rngs(3))
    save_checkpoint(teacher, str(teacher_dir))
    save_tokenizer(tok, teacher_dir / "tokenizer.json")
    cfg = _rollout_cfg(tmp_path, teacher_dir, off_policy_fraction=0.5)
    summary = train(cfg, tmp_path / "run", final_eval=False)
    assert summary["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
    assert steps[0]["max_logratio"] < 1e-4  # first inner epoch: recomputed old log-probs == current policy
    assert steps[1]["max_logratio"] > steps[0]["max_logratio"]  # second epoch: the policy has moved
    assert all("rollout/reward_mean" in r for r in steps)
    assert all(0.0 <= r["rollout/sampler_abs_logp_diff"] < 1e-4 and 0.0 <= r["rollout/sampler_kl"] < 1e-6
               for r in steps)  # sampler/trainer mismatch on the policy's own tokens, every step


@pytest.mark.slow
def test_interrupted_rollout_run_resumes_to_the_same_parameters(tmp_path, tok):
    """A rollout run that dies after its step-2 checkpoint and is started again ends bitwise equal to an
    uninterrupted run: the prompt iterator, RNG and rollout seeds (a function of the step) are restored."""
    from jaxtok.models.hf import save_checkpoint
    from jaxtok.tasks import save_tokenizer
    from jaxtok.train.loop import load_model, train

    teacher_dir = tmp_path / "teacher"
    save_checkpoint(Decoder(presets.get("tiny_student", vocab_size=tok.get_vocab_size()), rngs=nnx.Rngs(3)),
                    str(teacher_dir))
    save_tokenizer(tok, teacher_dir / "tokenizer.json")
    cfg = _rollout_cfg(tmp_path, teacher_dir)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=2))
    train(cfg, tmp_path / "straight", final_eval=False)

    summary = interrupted_then_resumed(cfg, tmp_path / "resumed", 3)
    assert summary["resumed_from"] == 2
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_score_rollout_topk_matches_the_sampler_topk(tok, policy):
    """Without filters the top-K ids and log-probs recomputed by the scoring forward are the sampler's own top-K of
    the distribution each completion token was drawn from (``generate(return_topk=K)``), the sampled token's
    log-prob is among them when it is in the top-K, and prompt columns are 0."""
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=8)
    prompts = next(iter(ds))
    settings = _settings(num_generations=2, max_new_tokens=5, temperature=1.3, width_buckets=1)  # [B, P + N]
    key = jax.random.key(11)
    K = 5
    ro = rollout.collect(policy, prompts, task=task, tokenizer=tok, settings=settings, rng=key, chunk_size=7, topk=K)
    b = ro.batch
    assert b["topk_ids"].shape == (4, 17, K) and b["topk_logprobs"].dtype == np.float32
    rows = rollout.expand_groups(prompts, 2)
    out = generate(policy, rows["prompt"], rows["prompt_valid"], max_new_tokens=5,
                   sampling=SamplingParams(temperature=1.3),
                   rng=jax.random.split(key, 3)[0], stop_tokens=(2,), pad_id=0, return_topk=K)
    v = np.asarray(out.valid)
    np.testing.assert_array_equal(b["topk_ids"][:, 12:][v], np.asarray(out.topk_ids)[v])
    np.testing.assert_allclose(np.exp(b["topk_logprobs"][:, 12:][v]), np.asarray(out.topk_probs)[v], atol=2e-5)
    hit = b["topk_ids"] == b["tokens"][..., None]  # [B, T, K]
    lp_hit = np.where(hit, b["topk_logprobs"], 0.0).sum(-1)
    np.testing.assert_allclose(lp_hit[hit.any(-1)], b["old_logprobs"][hit.any(-1)], atol=1e-6)
    assert np.all(b["topk_ids"][:, :12] == 0) and np.all(b["topk_logprobs"][:, :12] == 0)
    assert "topk_ids" not in rollout.collect(policy, prompts, task=task, tokenizer=tok, settings=settings,
                                             rng=key, chunk_size=7).batch
