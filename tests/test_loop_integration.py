"""The training loop drives every registered objective kind end to end (train/loop.py): TRACE's step field, LenVM's
wrapped model through checkpoints, diffusion evaluation, whole-group advantages under micro-batching, CPPO's
top-K rollout statistics, TAD's teacher trajectories. The short training runs are marked ``slow`` (each compiles
a sampler, a scorer and a train step: ~30-80 s on the shared 2-core box)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtok.config import from_dict, validate_names
from jaxtok.models import Decoder, presets
from jaxtok.registry import ConfigError
from jaxtok.tasks import build_tokenizer, save_tokenizer
from _worker import interrupted_then_resumed

TINY = {"num_layers": 1}  # one-layer tiny models: compiles dominate these tests


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok):
    """A run-directory-shaped checkpoint of a random one-layer tiny_student (teacher / data policy)."""
    from jaxtok.models.hf import save_checkpoint

    path = tmp_path_factory.mktemp("teacher")
    model = Decoder(presets.get("tiny_student", vocab_size=tok.get_vocab_size(), **TINY), rngs=nnx.Rngs(3))
    save_checkpoint(model, str(path))
    save_tokenizer(tok, path / "tokenizer.json")
    return path


def _cfg(objective, args=None, *, steps=4, rollout=None, train=None, model=None, decode=None, data=None):
    return from_dict({
        "model": {"preset": "tiny_student", "overrides": TINY, **(model or {})},
        "data": {"task": "arith", "task_args": {"digits": 1}, "prompt_len": 12, "seq_len": 24, "batch_size": 8,
                 "num_eval": 8, **(data or {})},
        "objective": {"name": objective, "args": args or {}},
        "optimizer": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": steps, "log_every": 1, "eval_batches": 1, **(train or {})},
        "rollout": {"num_generations": 4, "max_new_tokens": 6, **(rollout or {})},
        "decode": {"max_new_tokens": 6, "batch_size": 8, **(decode or {})},
        "run": {"progress": False},
    })


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# ----------------------------------------------------------------------------------------------------------------
# 1. TRACE: the λ schedule follows the optimizer step


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["self", "external"])
def test_trace_lambda_decays_over_loop_steps(tmp_path, teacher_dir, teacher):
    """λ_k = 0.5 for k < hold=1, then linear to 0 over decay=2 steps: the logged λ of steps k = 0..3 is
    0.5, 0.5, 0.25, 0 (without the step field every step would log args.step's λ = 0.5), with the paper's
    self-teacher (the student's synced copy) and with the external frozen teacher run."""
    from jaxtok.train.loop import train

    cfg = _cfg("trace", {"kl_weight": 0.5, "hold_steps": 1, "decay_steps": 2, "chunk_size": 64, "teacher": teacher},
               rollout={"teacher_init_from": str(teacher_dir)} if teacher == "external" else None)
    validate_names(cfg)
    train(cfg, tmp_path / "run", final_eval=False)
    lams = [r["kl_lambda"] for r in _records(tmp_path / "run")]
    np.testing.assert_allclose(lams, [0.5, 0.5, 0.25, 0.0], atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# 2. LenVM: the wrapped (value-head) model is trained, checkpointed and rebuilt identically


def _lenvm_cfg(teacher_dir, **train):
    return _cfg("lenvm", {"gamma": 0.9, "eos_id": 2},
                rollout={"teacher_init_from": str(teacher_dir), "off_policy_fraction": 1.0},
                train={"checkpoint_every": 2, **train})


def _assert_same_params(a, b):
    sa, sb = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_lenvm_trains_checkpoints_and_resumes_the_value_head_model(tmp_path, teacher_dir, tok):
    """A LenVM run trains the value head (it moves from its fresh, seed-determined init), saves it with the backbone,
    an interrupted run resumes to bitwise the same parameters, and ``init_from`` that run rebuilds the saved
    value-head model instead of wrapping a fresh head."""
    from jaxtok.train.loop import build_train_model, load_model, train
    from jaxtok.train.objectives.lenvm import LengthValueModel

    cfg = _lenvm_cfg(teacher_dir)
    plan = validate_names(cfg)
    fresh, wrap_meta = build_train_model(plan, tok.get_vocab_size())
    assert isinstance(fresh, LengthValueModel) and wrap_meta["wrap_model"] == "lenvm"
    again, _ = build_train_model(plan, tok.get_vocab_size())
    _assert_same_params(fresh, again)  # the fresh head is a function of train.seed

    train(cfg, tmp_path / "straight", final_eval=False)
    steps = _records(tmp_path / "straight")
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) and "value_mae" in r for r in steps)
    trained, meta = load_model(tmp_path / "straight")
    assert isinstance(trained, LengthValueModel) and meta["wrap_model"] == "lenvm"
    head = lambda m: np.asarray(m.value_head.mlp.out.kernel[...])  # noqa: E731
    assert np.abs(head(trained) - head(fresh)).max() > 0

    assert interrupted_then_resumed(cfg, tmp_path / "resumed", 3)["resumed_from"] == 2
    _assert_same_params(trained, load_model(tmp_path / "resumed")[0])

    cont = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(tmp_path / "straight")))
    rebuilt, wrap_meta = build_train_model(validate_names(cont), tok.get_vocab_size())
    assert wrap_meta["wrap_model"] == "lenvm"
    _assert_same_params(trained, rebuilt)


# ----------------------------------------------------------------------------------------------------------------
# 3. Diffusion objectives are evaluated by diffusion decoding


@pytest.mark.slow
def test_mdlm_run_is_evaluated_by_diffusion_decoding(tmp_path, monkeypatch):
    """A masked-diffusion run's evals decode with ``evaluate_policy`` (policy ``llada`` by default, the objective's
    bidirectional attention although ``model.attention`` is left ``causal``) and report the held-out diffusion loss;
    AR generation is never called."""
    import jaxtok.decode.evaluate as evaluate
    from jaxtok.train import loop

    calls = []
    real = evaluate.evaluate_policy

    def spy(cfg, model, tok, task, **kw):
        calls.append((cfg.model.attention, kw["policy"].name))
        return real(cfg, model, tok, task, **kw)

    def no_ar(*a, **k):
        raise AssertionError("AR generation eval on a diffusion model")

    monkeypatch.setattr(evaluate, "evaluate_policy", spy)
    monkeypatch.setattr(loop, "generation_eval", no_ar)
    cfg = _cfg("mdlm", {"chunk_size": 64}, steps=2, model={"preset": "tiny_diffusion"},
               train={"eval_every": 1})
    summary = loop.train(cfg, tmp_path / "run")
    assert calls == [("bidirectional", "llada")] * 2  # the step-1 eval and the final one
    assert 0 < summary["eval/mean_nfe"] <= 6 and 0.0 <= summary["eval/exact_match"] <= 1.0
    assert np.isfinite(summary["eval/loss"]) and "eval/masked_accuracy" in summary


def test_diffusion_eval_settings_follow_the_objective():
    from jaxtok.decode.diffusion import commit_policy
    from jaxtok.train.loop import diffusion_eval_settings, is_diffusion_run

    bd3 = validate_names(_cfg("bd3lm", {"block_size": 4}))
    assert is_diffusion_run(bd3) and not is_diffusion_run(validate_names(_cfg("sft")))
    dcfg, policy = diffusion_eval_settings(bd3)
    assert (dcfg.model.attention, dcfg.model.block_size) == ("block_causal", 4)
    assert policy == commit_policy("llada", {"block_len": 4})  # parsed once; blocks = the model's position blocks
    shifted = validate_names(_cfg("mdlm", {"shift_logits": True}, model={"attention": "bidirectional"},
                                  decode={"method": "diffusion", "policy": "threshold",
                                          "policy_args": {"threshold": 0.8}}))
    dcfg, policy = diffusion_eval_settings(shifted)
    assert dcfg.model.attention == "bidirectional"
    assert policy == commit_policy("threshold", {"threshold": 0.8, "shift_logits": True})
    with pytest.raises(ConfigError, match="learned heads"):
        diffusion_eval_settings(validate_names(_cfg("mdlm", decode={"method": "diffusion", "policy": "learn2pd"})))


# ----------------------------------------------------------------------------------------------------------------
# 4. Micro-batches never split a group's advantage statistics

from jaxtok.registry import REWARDS  # noqa: E402


@REWARDS.register("_test_length")
def _length_reward(task, completion, example):
    """A reward that varies within groups even for an untrained policy (length of the decoded completion)."""
    return float(len(completion)) / 8.0


def _pg_cfg(micro_batches, **args):
    return _cfg("policy_gradient", {"loss_mode": "grpo", "chunk_size": 64, **args}, steps=1,
                rollout={"rewards": {"_test_length": 1.0}, "temperature": 1.0}, train={"micro_batches": micro_batches},
                data={"batch_size": 16})  # micro-batches of 8 rows over the 8 simulated data shards


@pytest.mark.slow
def test_policy_gradient_micro_batches_use_whole_group_advantages(tmp_path):
    """GRPO with 2 micro-batches (rows interleaved, so each holds half of every group) logs the same loss,
    gradient norm and advantages as one full batch: advantages come from whole groups on the host."""
    from jaxtok.train.loop import train

    logged = {}
    for m in (1, 2):
        cfg = _pg_cfg(m)
        validate_names(cfg)
        train(cfg, tmp_path / f"m{m}", final_eval=False)
        logged[m] = _records(tmp_path / f"m{m}")[0]
    assert logged[1]["adv_abs_mean"] > 0.1  # the rewards vary within groups: the comparison is not vacuous
    for key in ("loss", "grad_norm", "adv_abs_mean", "kept_rows"):
        np.testing.assert_allclose(logged[2][key], logged[1][key], rtol=2e-4, atol=1e-6, err_msg=key)


def test_in_loss_group_advantages_refuse_micro_batches(tmp_path, teacher_dir):
    from jaxtok.train.loop import train

    for name, args in (("trace", {}), ("cj_grpo", {}), ("reasonmaxxer", {})):
        cfg = _cfg(name, args, rollout={"teacher_init_from": str(teacher_dir), "reference": "init"},
                   train={"micro_batches": 2})
        with pytest.raises(ConfigError, match="train.micro_batches=2: objective .* group advantages"):
            validate_names(cfg)
    with pytest.raises(ConfigError, match="micro_batches"):
        train(_cfg("trace", rollout={"teacher_init_from": str(teacher_dir)}, train={"micro_batches": 2},
                   data={"batch_size": 16}), tmp_path / "run")


# ----------------------------------------------------------------------------------------------------------------
# 5. CPPO's top-K divergence reads the rollout's top-K statistics


@pytest.mark.slow
def test_cppo_topk_divergence_runs_on_stored_rollout_topk(tmp_path):
    """CPPO with ``topk_tv`` asks for top-K rollout statistics (K = 20 by default): the loop stores them, the first
    inner epoch sees divergence 0 (same forward as the old log-probs), the second a positive one."""
    from jaxtok.config import rollout_topk
    from jaxtok.train.loop import train

    # dynamic sampling off: it filters on the verifier's accuracy, all 0 for this untrained model's completions
    cfg = _cfg("policy_gradient", {"loss_mode": "cppo", "cppo_divergence": "topk_tv", "chunk_size": 64,
                                   "dynamic_sampling": False},
               rollout={"rewards": {"_test_length": 1.0}, "inner_epochs": 2}, steps=2, train={"eval_every": 0})
    plan = validate_names(cfg)
    assert rollout_topk(cfg, plan.spec, plan.objective_args) == 20
    binary = validate_names(_cfg("policy_gradient", {"loss_mode": "cppo", "cppo_divergence": "binary_tv"}))
    assert rollout_topk(binary.cfg, binary.spec, binary.objective_args) == 0
    train(plan, tmp_path / "run", final_eval=False)
    steps = _records(tmp_path / "run")
    assert steps[0]["divergence_mean"] < 1e-6 < steps[1]["divergence_mean"]
    appo = _cfg("policy_gradient", {"loss_mode": "cppo", "cppo_divergence": "topk_kl"},
                rollout={"branches": 2, "num_generations": 2})
    with pytest.raises(ConfigError, match="default collector only"):
        validate_names(appo)


# ----------------------------------------------------------------------------------------------------------------
# 7. TAD: teacher trajectories on privileged prompts (data="trajectory")


def test_trajectory_pairs_hand_case():
    """Per-row commit ranks; δ = 0 reveals nothing new (no near tokens), δ ≥ S gives the final response, and the
    near count is the number of tokens committed at steps i..i+δ-1."""
    from jaxtok.train.trajectory import row_step_ranks, trajectory_pairs

    M = 3
    final = np.array([[20, 21, 22, 23], [30, 31, 32, 33]])
    commit = np.array([[5, 2, 9, 2], [0, 1, -1, 4]])  # row 0: steps {2, 5, 9}; row 1: {0, 1, 4}, one never
    ranks, lengths = row_step_ranks(commit)
    np.testing.assert_array_equal(ranks, [[1, 0, 2, 0], [0, 1, -1, 2]])
    np.testing.assert_array_equal(lengths, [3, 3])
    steps = np.array([2, 0])
    x_t, same = trajectory_pairs(final, ranks, lengths, steps, 0, M)
    np.testing.assert_array_equal(x_t, same)
    np.testing.assert_array_equal(x_t, [[20, 21, M, 23], [M, M, M, M]])
    _, full = trajectory_pairs(final, ranks, lengths, steps, 99, M)
    np.testing.assert_array_equal(full, [[20, 21, 22, 23], [30, 31, M, 33]])
    x_t, x_tg = trajectory_pairs(final, ranks, lengths, steps, 2, M)
    near = (x_t == M) & (x_tg != M)
    np.testing.assert_array_equal(near.sum(1), [1, 2])  # row 0: rank 2 only (S = 3); row 1: ranks 0 and 1


class _AlwaysRight:
    """The arith task with every completion judged correct, so a random teacher's trajectories are kept."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        return getattr(self._task, name)

    def reward(self, completion, example):
        return 1.0


@pytest.fixture(scope="module")
def diffusion_teacher_dir(tmp_path_factory, tok):
    from jaxtok.models.hf import save_checkpoint

    path = tmp_path_factory.mktemp("dteacher")
    model = Decoder(presets.get("tiny_diffusion", vocab_size=tok.get_vocab_size(), **TINY), rngs=nnx.Rngs(5))
    save_checkpoint(model, str(path))
    save_tokenizer(tok, path / "tokenizer.json")
    return path


@pytest.mark.slow
def test_trajectory_collector_builds_tad_pairs(tok, diffusion_teacher_dir):
    """The collector's batch is the tad objective's layout: plain and privileged prompts followed by the same x_t,
    x_target revealing a superset of x_t, pairs only on kept trajectories; the TAD loss on it is finite with near
    and distant tokens present, and a rejected (incorrect) trajectory contributes no token."""
    from jaxtok.data import prompt_dataset
    from jaxtok.tasks import make_task
    from jaxtok.tasks.tokenizer import decode
    from jaxtok.train.loop import load_model
    from jaxtok.train.objectives.tad import TADArgs, tad_loss
    from jaxtok.train.trajectory import PRIVILEGED_TEMPLATE, collect_trajectories

    teacher, _ = load_model(diffusion_teacher_dir)
    task = make_task("arith", {"digits": 1})
    prompts = next(iter(prompt_dataset(task, "train", tok, prompt_len=12, batch_size=2, num_examples=8)[0]))
    settings = from_dict({"rollout": {"num_generations": 3, "max_new_tokens": 6, "temperature": 0.7}}).rollout
    args = TADArgs(delta=2)
    ro = collect_trajectories(None, prompts, task=_AlwaysRight(task), tokenizer=tok, settings=settings,
                              rng=jax.random.key(0), teacher=teacher, args=args, seq_len=24)
    b = ro.batch
    M = teacher.cfg.mask_token_id
    assert b["tokens"].shape == (6, 18) and b["x_target"].shape == (6, 6) and b["teacher_tokens"].shape[1] == 60
    np.testing.assert_array_equal(b["tokens"][:, -6:], b["teacher_tokens"][:, -6:])
    x_t = b["tokens"][:, -6:]
    assert np.all((x_t == M) | (x_t == b["x_target"]))  # x_target reveals a superset of x_t
    ex = task.example("train", int(prompts["index"][0]))
    priv = decode(tok, b["teacher_tokens"][0][b["teacher_valid"][0]][:-6])
    assert priv.endswith(PRIVILEGED_TEMPLATE.format(target=ex.target, prompt=ex.prompt))
    assert b["response_valid"].any()
    plain = collect_trajectories(None, prompts, task=_AlwaysRight(task), tokenizer=tok, settings=settings,
                                 rng=jax.random.key(0), teacher=teacher, seq_len=24,
                                 args=TADArgs(delta=2, privileged_template="{prompt}"))
    np.testing.assert_array_equal(plain.batch["teacher_tokens"], plain.batch["tokens"])  # no privilege
    loss, _, aux = tad_loss(teacher, b, jax.random.key(0), args, teacher=teacher)
    assert np.isfinite(float(loss)) and float(aux["near"][0]) + float(aux["distant"][0]) > 0
    wrong = collect_trajectories(None, prompts, task=task, tokenizer=tok, settings=settings, rng=jax.random.key(0),
                                 teacher=teacher, args=args, seq_len=24)
    assert not wrong.batch["response_valid"].any() and wrong.info["rollout/exact_match"] == 0.0


@pytest.mark.slow
def test_tad_trains_in_the_loop(tmp_path, diffusion_teacher_dir):
    """``jaxtok train`` with objective tad: trajectories are recorded, the steps run, the eval is diffusion
    decoding."""
    from jaxtok.train.loop import train

    cfg = _cfg("tad", {"delta": 2, "chunk_size": 64}, steps=2, model={"preset": "tiny_diffusion"},
               rollout={"teacher_init_from": str(diffusion_teacher_dir), "num_generations": 2,
                        "temperature": 0.7})
    validate_names(cfg)
    summary = train(cfg, tmp_path / "run", final_eval=True)
    steps = _records(tmp_path / "run")
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) and "rollout/exact_match" in r for r in steps)
    assert "eval/mean_nfe" in summary
