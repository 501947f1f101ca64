"""Speculative RL rollouts (issue 20 item 6; ``rollout.sampler: speculative``, train/rollout.py
``SpeculativeSampler``).

1. Lossless: on a 6-token vocabulary the first three rollout tokens of the speculative sampler, at the rollout
   temperature with top-k and top-p filters, follow the policy's exact processed joint law (χ², α = 0.001), and a
   two-sample χ² test cannot tell them from plain AR sampling; the returned sampler log-probs are the policy's
   processed log-probabilities of those tokens (computed here from full forwards).
2. The consistency invariant: through ``collect`` (no filters) the sampler log-probs equal the train step's
   recomputed ``old_logprobs`` (``rollout/sampler_abs_logp_diff`` ~ 0), as for AR rollouts.
3. Config errors name the key (exit 2 from the CLI): no drafter, a drafter vocabulary that differs, lossy or
   routed draft policies, an objective that collects its own rollouts, an unknown preset.
4. (slow) GRPO in the training loop with speculative rollouts and a drafter refreshed by OPD every rollout.
"""

import dataclasses
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

from jaxtok import sampling
from jaxtok.config import from_dict, validate_names
from jaxtok.data import prompt_dataset
from jaxtok.decode.generate import generate
from jaxtok.sampling import SamplingParams
from jaxtok.models import Decoder, ModelConfig, presets
from jaxtok.registry import ConfigError
from jaxtok.specs import ObjectiveSpec
from jaxtok.tasks import build_tokenizer, make_task
from jaxtok.train import rollout

V = 6
STOP, PAD = 2, 0
PROMPT = [1, 3, 4]
ROWS, N, G = 4096, 3, 2
TEMP, TOP_K, TOP_P = 0.8, 4, 0.9


def _cfg(d, layers):
    return ModelConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_layers=layers, num_heads=2,
                       num_kv_heads=1, head_dim=d // 2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def pair():
    return Decoder(_cfg(16, 2), rngs=nnx.Rngs(0)), Decoder(_cfg(8, 1), rngs=nnx.Rngs(1))


def _settings(**kw):
    return types.SimpleNamespace(**{"max_new_tokens": N, "temperature": TEMP, "top_k": TOP_K, "top_p": TOP_P, **kw})


SP = types.SimpleNamespace(eos_ids=(STOP,), pad=PAD)


def _processed_logprobs(target, ctx):
    """``log S(p)`` of the target after each context row: ``[len(ctx), V]`` float64 (S = temperature, top-k,
    top-p, as the rollout applies it)."""
    logits = jax.jit(lambda x: target(x).logits[:, -1])(jnp.asarray(ctx, jnp.int32))
    t = jnp.full((len(ctx),), TEMP)
    proc = sampling.process_logits(logits.astype(jnp.float32), t, jnp.full((len(ctx),), TOP_K, jnp.int32),
                                   jnp.full((len(ctx),), TOP_P))
    return np.asarray(jax.nn.log_softmax(proc, axis=-1), np.float64)


@pytest.fixture(scope="module")
def exact(pair):
    """The policy's exact processed law of the first three rollout tokens ``[V+1]^3`` (symbol V = none, after the
    stop token) and the per-context processed log-probs ``{context tuple: [V]}``."""
    target = pair[0]
    ctxs = [PROMPT] + [PROMPT + [a] for a in range(V)] + [PROMPT + [a, b] for a in range(V) for b in range(V)]
    lps = {}
    for group in ([PROMPT], [c for c in ctxs if len(c) == 4], [c for c in ctxs if len(c) == 5]):
        for c, lp in zip(group, _processed_logprobs(target, group)):
            lps[tuple(c)] = lp
    p = {k: np.exp(v) for k, v in lps.items()}
    joint = np.zeros((V + 1,) * 3)
    for a in range(V):
        pa = p[tuple(PROMPT)][a]
        if a == STOP:
            joint[a, V, V] = pa
            continue
        for b in range(V):
            pb = pa * p[tuple(PROMPT + [a])][b]
            if b == STOP:
                joint[a, b, V] = pb
                continue
            joint[a, b, :V] = pb * p[tuple(PROMPT + [a, b])]
    return joint, lps


def _counts(samples, shape):
    c = np.zeros(int(np.prod(shape)))
    np.add.at(c, np.ravel_multi_index(samples.T, shape), 1)
    return c


def _chi2_fit(samples, joint) -> float:
    """χ² goodness of fit of ``samples [n, 3]`` to ``joint``; cells with expected count < 5 pooled."""
    obs, ex = _counts(samples, joint.shape), joint.ravel() * len(samples)
    small = ex < 5
    obs, ex = np.append(obs[~small], obs[small].sum()), np.append(ex[~small], ex[small].sum())
    keep = ex > 0
    return float(sps.chisquare(obs[keep], ex[keep] * obs[keep].sum() / ex[keep].sum()).pvalue)


def _chi2_two_sample(a, b, shape) -> float:
    """χ² test of homogeneity of two samples of token triples (cells with fewer than 10 joint counts pooled)."""
    ca, cb = _counts(a, shape), _counts(b, shape)
    small = ca + cb < 10
    table = np.stack([np.append(ca[~small], ca[small].sum()), np.append(cb[~small], cb[small].sum())])
    table = table[:, table.sum(0) > 0]
    return float(sps.chi2_contingency(table).pvalue)


def _triples(tokens, valid):
    return np.where(valid, tokens, V)[:, :3]


@pytest.mark.slow
def test_speculative_rollouts_have_the_policy_distribution_and_its_logprobs(pair, exact):
    """The speculative sampler (top-k 4, top-p 0.9, T 0.8; drafts accepted and rejected) matches the policy's
    exact processed law (χ²) and plain AR sampling (two-sample χ²); its log-probs are the policy's processed
    log-probs of the emitted tokens."""
    target, draft = pair
    joint, lps = exact
    spec = rollout.SpeculativeSampler(drafter=draft, policy=rollout_policy(), draft_len=G)
    prompt = np.tile(np.array([[PAD] + PROMPT], np.int32), (ROWS, 1))
    valid = np.ones_like(prompt, bool)
    valid[:, 0] = False
    tok, ok, lp = spec.sample(target, prompt, valid, _settings(), jax.random.key(1), SP, None)
    assert 0 < spec.last["rollout/spec_acceptance_rate"] < 1  # both accepted and rejected drafts
    assert spec.last["rollout/spec_tokens_per_target_forward"] > 1
    ar = generate(target, prompt, valid, max_new_tokens=N,
                  sampling=SamplingParams(temperature=TEMP, top_k=TOP_K, top_p=TOP_P),
                  stop_tokens=(STOP,), pad_id=PAD, rng=jax.random.key(2))
    s3, a3 = _triples(tok, ok), _triples(np.asarray(ar.tokens), np.asarray(ar.valid))
    assert _chi2_fit(a3, joint) > 1e-3  # the reference law is right (plain sampling fits it)
    assert _chi2_fit(s3, joint) > 1e-3
    assert _chi2_two_sample(s3, a3, joint.shape) > 1e-3
    # sampler log-probs = log S(p)[token] under the policy's processed distribution (top-k/top-p applied)
    expect = np.zeros(lp.shape)
    for r in range(ROWS):
        for j in range(N):
            if ok[r, j]:
                expect[r, j] = lps[tuple(PROMPT + list(tok[r, :j]))][tok[r, j]]
    np.testing.assert_allclose(lp, expect, atol=2e-5)
    assert np.all(lp[~ok] == 0)


def rollout_policy(name="fixed", args=None):
    from jaxtok.decode.draft_policies import build_policy

    return build_policy(name, args)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.slow
def test_collect_with_speculative_sampler_keeps_the_logprob_invariant(tok):
    """Through ``collect`` at temperature 1.5 without filters, the speculative sampler's log-probs equal the train
    step's recomputed behaviour log-probs (ratio 1 on the first inner epoch), and the info reports acceptance."""
    vocab = tok.get_vocab_size()
    policy = Decoder(presets.get("tiny_student", vocab_size=vocab, num_layers=1), rngs=nnx.Rngs(0))
    draft = Decoder(presets.get("tiny_student", vocab_size=vocab, num_layers=1, hidden_size=32, intermediate_size=64,
                                num_heads=2, num_kv_heads=1, head_dim=16), rngs=nnx.Rngs(5))
    sampler = rollout.SpeculativeSampler(drafter=draft, policy=rollout_policy("heuristic", {"initial": 2}),
                                         draft_len=3)
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=8)
    settings = from_dict({"rollout": {"num_generations": 3, "max_new_tokens": 6, "temperature": 1.5}}).rollout
    ro = rollout.collect(policy, next(iter(ds)), task=task, tokenizer=tok, settings=settings, rng=jax.random.key(7),
                         chunk_size=5, sampler=sampler)
    b = ro.batch
    mask = b["loss_mask"]
    assert mask.sum() > 6
    np.testing.assert_allclose(b["sampler_logprobs"][mask], b["old_logprobs"][mask], atol=2e-5)
    assert ro.info["rollout/sampler_abs_logp_diff"] < 1e-5
    for key in ("rollout/spec_acceptance_rate", "rollout/spec_tokens_per_target_forward",
                "rollout/spec_target_forwards"):
        assert key in ro.info
    assert ro.info["rollout/spec_tokens_per_target_forward"] >= 1


def _spec_cfg(**ro):
    return from_dict({
        "model": {"preset": "tiny_student", "overrides": {"num_layers": 1}},
        "data": {"task": "arith", "task_args": {"digits": 1}, "prompt_len": 12, "batch_size": 8, "num_eval": 8},
        "objective": {"name": "policy_gradient", "args": {"loss_mode": "grpo"}},
        "train": {"steps": 3, "log_every": 1, "eval_batches": 1},
        "rollout": {"num_generations": 4, "max_new_tokens": 6, **ro},
        "run": {"progress": False},
    })


def test_config_errors_name_the_key(tok):
    with pytest.raises(ConfigError, match=r"rollout.draft_init_from=None: rollout.sampler='speculative' needs"):
        _spec_cfg(sampler="speculative")
    with pytest.raises(ConfigError, match="rollout.sampler"):
        _spec_cfg(sampler="medusa")
    with pytest.raises(ConfigError, match=r"rollout.draft_policy='taps'"):
        _spec_cfg(sampler="speculative", draft_init_from="preset:tiny_student", draft_policy="taps")
    with pytest.raises(ConfigError, match=r"rollout.draft_policy_args"):  # parsed once, into the run plan
        validate_names(_spec_cfg(sampler="speculative", draft_init_from="preset:tiny_student",
                                 draft_policy_args={"initial": 2}))
    with pytest.raises(ConfigError, match=r"rollout.draft_policy='nope': not a known draft-length policy"):
        validate_names(_spec_cfg(sampler="speculative", draft_init_from="preset:tiny_student", draft_policy="nope"))
    plan = validate_names(_spec_cfg(sampler="speculative", draft_init_from="preset:tiny_student",
                                    draft_policy="heuristic", draft_policy_args={"initial": 2}))
    assert plan.draft_policy.name == "heuristic" and plan.draft_policy_args.initial == 2
    assert validate_names(_spec_cfg()).draft_policy is None
    with pytest.raises(ConfigError, match=r"rollout.branches=2"):
        _spec_cfg(sampler="speculative", draft_init_from="preset:tiny_student", branches=2)
    policy_cfg = presets.get("tiny_student", vocab_size=tok.get_vocab_size())
    hf = str(Path(__file__).parent / "fixtures" / "hf" / "qwen3")
    plan = validate_names(_spec_cfg(sampler="speculative", draft_init_from=hf))
    with pytest.raises(ConfigError, match=r"rollout.draft_init_from=.*vocab_size .* differs from the policy's"):
        rollout.SpeculativeSampler.from_config(plan, policy_cfg)
    plan = validate_names(_spec_cfg(sampler="speculative", draft_init_from="preset:no_such_model"))
    with pytest.raises(ConfigError, match=r"rollout.draft_init_from='preset:no_such_model': unknown preset"):
        rollout.SpeculativeSampler.from_config(plan, policy_cfg)
    own = dataclasses.replace(plan.objective, spec=ObjectiveSpec(data="rollout", collect=object()))
    with pytest.raises(ConfigError, match=r"rollout.sampler='speculative': objective .* collects its own"):
        rollout.SpeculativeSampler.from_config(dataclasses.replace(plan, objective=own), policy_cfg)
    assert rollout.SpeculativeSampler.from_config(validate_names(_spec_cfg()), policy_cfg) is None


@pytest.mark.slow
def test_grpo_loop_with_speculative_rollouts_and_drafter_refresh(tmp_path):
    """Four GRPO steps with speculative rollouts from a one-layer preset drafter refreshed by OPD before every
    rollout after the first: the metrics carry the acceptance statistics and the refresh losses, the
    sampler/trainer mismatch stays at float error, and a run interrupted after its step-2 checkpoint resumes with
    the refreshed drafter (its weights, AdamW moments and rollout count are checkpointed) to the same parameters
    as the uninterrupted run; the drafter decides which tokens a lossless sampler draws from the same key, so a
    resume from the loaded drafter would end elsewhere."""
    from _worker import interrupted_then_resumed

    from jaxtok.train.loop import load_model, train

    cfg = _spec_cfg(sampler="speculative", draft_init_from="preset:tiny_student", draft_len=3,
                    draft_refresh_every=1, draft_refresh_steps=2, draft_refresh_lr=3e-3)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4, checkpoint_every=2))
    validate_names(cfg)
    train(cfg, tmp_path / "run", final_eval=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["rollout/sampler_abs_logp_diff"] < 1e-4
        assert 0 <= r["rollout/spec_acceptance_rate"] <= 1
    assert "rollout/draft_refresh_loss" not in rows[0]  # the first rollout uses the drafter as loaded
    assert all(np.isfinite(r["rollout/draft_refresh_loss"]) for r in rows[1:])

    assert interrupted_then_resumed(cfg, tmp_path / "resumed", 3)["resumed_from"] == 2
    again = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    again = {r["step"]: r for r in again if "loss" in r}
    assert again[4]["rollout/draft_refresh_loss"] == rows[3]["rollout/draft_refresh_loss"]
    a, _ = load_model(tmp_path / "run")
    b, _ = load_model(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_drafter_refresh_distils_the_drafter_towards_the_policy(tok):
    """DrafterRefresh (OPD, reverse KL on the drafter's own rollouts): eight AdamW steps on one prompt batch bring a
    random drafter's loss against a random policy down, and the refreshed drafter keeps the policy's vocabulary."""
    vocab = tok.get_vocab_size()
    policy = Decoder(presets.get("tiny_student", vocab_size=vocab, num_layers=1), rngs=nnx.Rngs(0))
    draft = Decoder(presets.get("tiny_student", vocab_size=vocab, num_layers=1, hidden_size=32, intermediate_size=64,
                                num_heads=2, num_kv_heads=1, head_dim=16), rngs=nnx.Rngs(5))
    task = make_task("arith", {"digits": 1})
    ds, _ = prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=8)
    settings = from_dict({"rollout": {"num_generations": 4, "max_new_tokens": 6}}).rollout
    refresh = rollout.DrafterRefresh(steps=8, lr=1e-2)
    new, info = refresh(draft, policy, next(iter(ds)), task=task, tokenizer=tok, settings=settings,
                        rng=jax.random.key(0), mesh=None)
    assert info["rollout/draft_refresh_loss"] < 0.8 * info["rollout/draft_refresh_loss_first"]
    assert new.cfg.vocab_size == vocab and new.cfg.hidden_size == 32
