"""TRACE's privileged-context self-distillation (train_methods.md §3; train/self_teacher.py, train/objectives/
distill.py): the teacher is the student's own copy, synced every N steps while λ > 0 and dropped after; it reads the
privileged prompt (prompt + the annotator's diagnostic label) and scores the same completion; the synced copy
survives a resume between syncs; the external frozen teacher stays an option."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok import mesh as M
from jaxtok.models import Decoder, presets
from jaxtok.registry import OBJECTIVES, ConfigError
from jaxtok.train.objectives import distill as D
from jaxtok.train.self_teacher import TEACHER, SelfTeacher

from _worker import tiny_batch, tiny_model_config, tiny_optimizer
from _worker import interrupted_then_resumed


# ----------------------------------------------------------------------------------------------------------------
# schedule


def test_self_teacher_schedule_follows_lambda():
    assert D.trace_teacher_sync(D.TraceArgs()) == (10, 40)  # the paper: sync every 10 steps, λ = 0 from step 40
    assert D.trace_teacher_sync(D.TraceArgs(teacher="external")) is None
    assert D.trace_kl_end(D.TraceArgs(kl_weight=0.0)) == 0  # no KL at all: never a teacher
    for k in range(60):  # the teacher is needed exactly while λ_k > 0
        assert (float(D.trace_lambda(k)) > 0) == SelfTeacher(10, 40).needed(k)
    st = SelfTeacher(every=10, end=40)
    assert [k for k in range(60) if st.sync_due(k)] == [0, 10, 20, 30]
    assert [st.synced_at(k) for k in (0, 9, 10, 25, 39)] == [0, 0, 10, 20, 30]
    assert st.stored(15) and not st.stored(20) and not st.stored(45)
    with pytest.raises(ConfigError, match="teacher_sync_every"):
        D.TraceArgs(teacher_sync_every=0)
    with pytest.raises(ConfigError, match="teacher"):
        D.TraceArgs(teacher="frozen")
    with pytest.raises(ConfigError, match="privileged_template"):
        D.TraceArgs(privileged_template="{label} only")
    with pytest.raises(ConfigError, match="privileged_template"):
        D.TraceArgs(privileged_template="{prompt}{span}")


# ----------------------------------------------------------------------------------------------------------------
# sync / frozen between syncs / skip at λ = 0 / resume, on the sharded train step

N, END, STEPS = 3, 7, 9
FORWARDS = []  # one entry per teacher forward actually executed (a runtime callback, not a trace-time count)


def _loss(model, batch, rng, teacher=None):
    """SFT cross-entropy plus 0.1 · MSE to the teacher's logits (when there is a teacher): a loss that reads the
    teacher, so the step's frozen input and the skipped forward are observable."""
    del rng
    logits = model(batch["tokens"], positions=batch["positions"], valid=batch["valid"]).logits[:, :-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:]
    ce = -jnp.sum(jnp.take_along_axis(lp, batch["tokens"][:, 1:, None], -1)[..., 0] * mask)
    if teacher is None:
        return ce, jnp.sum(mask), {}
    t = jax.lax.stop_gradient(teacher(batch["tokens"], positions=batch["positions"], valid=batch["valid"]).logits)
    jax.debug.callback(lambda: FORWARDS.append(1))
    return ce + 0.1 * jnp.sum(jnp.square(logits - t[:, :-1]) * mask[..., None]), jnp.sum(mask), {}


@pytest.fixture(scope="module")
def setup():
    """Mesh, graphdef, a fresh-state factory and cached step functions (one compile each, shared by the tests)."""
    from jaxtok.train.step import init_train_state, make_train_step

    mesh = M.make_mesh(1, 2, 1, devices=jax.devices()[:2])  # parameters sharded over fsdp: copies must keep it
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    opt = tiny_optimizer()
    cache = {}

    def make_step(frozen=None):
        key = "bare" if frozen is None else "teacher"
        if key not in cache:
            cache[key] = make_train_step(model, opt, _loss, mesh=mesh, frozen=frozen)
        return cache[key]

    def fresh():
        graphdef, state = init_train_state(Decoder(tiny_model_config(), rngs=nnx.Rngs(0)), opt, mesh=mesh)
        st = SelfTeacher(every=N, end=END)
        return graphdef, state, st, st.build_steps(make_step, {}, graphdef, state)

    return mesh, fresh


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def _batch(k, mesh):
    return M.put_batch(tiny_batch(k), mesh)


def _run(state, st, step_fn, mesh, ks):
    """Steps ``ks`` through the self-teacher; ``[(student params before the step, teacher used or None)]``."""
    seen = []
    for k in ks:
        before = _leaves(state.params)
        state, _ = st.step(k, state, _batch(k, mesh), (), step_fn)
        seen.append((before, None if st.state is None else _leaves(st.state)))  # Decoder: no non-Param state
    return state, seen


@pytest.mark.slow
def test_teacher_is_the_student_at_sync_steps_frozen_between_and_dropped_at_lambda_zero(setup):
    mesh, fresh = setup
    graphdef, state, st, step_fn = fresh()
    FORWARDS.clear()
    state, seen = _run(state, st, step_fn, mesh, range(STEPS))
    jax.effects_barrier()
    for k, (student, teacher) in enumerate(seen):
        if k >= END:  # λ = 0: no teacher kept, none passed, no teacher forward
            assert teacher is None
            continue
        synced = seen[st.synced_at(k)][0]  # the student's parameters at the last sync step N·⌊k/N⌋
        assert all(np.array_equal(t, s) for t, s in zip(teacher, synced))
        if k % N:  # frozen in between: the student has moved on, the teacher has not
            assert not all(np.array_equal(t, s) for t, s in zip(teacher, student))
    assert st.syncs == len(range(0, END, N)) and len(FORWARDS) == END
    # the copy has its own buffers on the parameters' shardings: the donated train state never deletes it
    _, state2, st2, step_fn2 = fresh()
    state2, _ = st2.step(0, state2, _batch(0, mesh), (), step_fn2)
    state2, _ = st2.step(1, state2, _batch(1, mesh), (), step_fn2)
    q = st2.state["layers"][0]["attn"]["q_weight_dhn"].get_value()
    assert not q.is_deleted()
    assert q.sharding == state2.params["layers"][0]["attn"]["q_weight_dhn"].get_value().sharding


def test_resume_between_syncs_restores_the_same_teacher(setup, tmp_path):
    """A checkpoint after k=4 updates (between the syncs at 3 and 6) holds the synced copy θ_3; a run resumed from
    it uses the same teachers and reaches bitwise the same parameters as the uninterrupted run. A checkpoint at a
    sync step (k=6) has the same structure (the student's own state), so either restores with one template."""
    from jaxtok import checkpoint as C

    mesh, fresh = setup
    train_part = lambda s, st, k: {"opt_state": s.opt_state, "step": s.step, "rng": s.rng,  # noqa: E731
                                   **st.checkpoint_item(k, s)}
    _, state, st, step_fn = fresh()
    with C.Checkpointer(tmp_path / "ck", async_save=False, max_to_keep=5) as ck:
        state, seen = _run(state, st, step_fn, mesh, range(4))
        ck.save(4, params=state.params, train=train_part(state, st, 4))
        state, seen_rest = _run(state, st, step_fn, mesh, range(4, 6))
        ck.save(6, params=state.params, train=train_part(state, st, 6))
        straight, seen = state, seen + seen_rest

        for at in (4, 6):
            _, resumed, st2, step_fn2 = fresh()
            template = train_part(resumed, st2, 0)
            out = ck.restore(at, params=C.abstract_of(resumed.params), train=C.abstract_of(template))
            resumed = dataclasses.replace(resumed, params=out["params"], **st2.restored(out["train"], at))
            if at == 4:
                assert _same(st2.state, seen[3][1])  # θ_3, not θ_4
                resumed, seen2 = _run(resumed, st2, step_fn2, mesh, range(4, 6))
                assert all(_same(a[1], b[1]) for a, b in zip(seen2, seen[4:6]))
                assert _same(resumed.params, straight.params)
            else:
                assert st2.state is None  # re-derived: step 6 copies the restored student
                resumed, seen2 = _run(resumed, st2, step_fn2, mesh, [6])
                assert _same(seen2[0][1], seen2[0][0])


# ----------------------------------------------------------------------------------------------------------------
# privileged context: prompt + diagnostic label, aligned with the student's completion positions


def test_diagnose_completion_labels():
    target = "12+7=19;19-3=16>16"
    cases = {"12+7=19;19-3=16>16": "correct", "12+7=29;29-3=26>26": "carry error",
             "12+7=-19;-19-3=-22>-22": "sign error", "12+7=18;18-3=15>15": "arithmetic error",
             "12-7=5;5-3=2>2": "wrong operation", "12+7=19;18-3=15>15": "copy error",
             "12+8=20;20-3=17>17": "wrong operand", "12+7=19;19-3=16>61": "answer error",
             "12+7=19>19": "missing step", "12+7=19;19-3=16;1>1": "extra step", "12+7=19;19-3=16": "no answer",
             "1,2>1,2": "step error"}
    for text, want in cases.items():
        assert D.diagnose_completion(text, target, text == target) == want, text
    assert set(cases.values()) <= set(D.TRACE_DIAGNOSES)


@pytest.fixture(scope="module")
def arith():
    """The synthetic tokenizer, two arith examples and their rollout-shaped batch (one correct, one carry error)."""
    from jaxtok.data import encode_prompt
    from jaxtok.tasks import build_tokenizer
    from jaxtok.tasks.arith import ArithArgs, ArithTask
    from jaxtok.tasks.base import Example
    from jaxtok.tasks.tokenizer import encode
    from jaxtok.train.rollout import assemble

    tok = build_tokenizer()
    exs = [Example(prompt="12+7-3=", target="12+7=19;19-3=16>16", answer="16"),
           Example(prompt="5+5=", target="5+5=10>10", answer="10")]
    texts = ["12+7=19;19-3=16>16", "5+5=0>0"]
    P, N = 10, 20
    prompts = [encode_prompt(tok, ex, P, "error") for ex in exs]
    comp = np.zeros((2, N), np.int32)
    comp_valid = np.zeros((2, N), bool)
    for b, text in enumerate(texts):
        ids = encode(tok, text) + [2]  # eos
        comp[b, :len(ids)], comp_valid[b, :len(ids)] = ids, True
    batch = assemble(np.stack([p["prompt"] for p in prompts]), np.stack([p["prompt_valid"] for p in prompts]),
                     comp, comp_valid)
    batch["temperature"] = np.full(2, 1.0, np.float32)
    return tok, ArithTask(ArithArgs(steps=2)), exs, texts, batch, P


@pytest.fixture(scope="module")
def student(arith):
    return Decoder(presets.get("tiny_student", vocab_size=arith[0].get_vocab_size(), num_layers=1),
                   rngs=nnx.Rngs(0))


def test_privileged_prompt_holds_the_label_and_the_same_completion(arith):
    from jaxtok.tasks.tokenizer import decode

    tok, task, exs, texts, batch, P = arith
    out = D.trace_annotate(batch, texts, exs, task, tok, args=D.TraceArgs())
    tt, tv, tp = out["teacher_tokens"], out["teacher_valid"], out["teacher_positions"]
    N = batch["tokens"].shape[1] - P
    P2 = tt.shape[1] - N
    assert P2 == D.privileged_width(P, N, tok) and P2 > P
    np.testing.assert_array_equal(tt[:, P2:], batch["tokens"][:, P:])  # the same completion tokens y
    np.testing.assert_array_equal(tv[:, P2:], batch["valid"][:, P:])
    for b, label in enumerate(("correct", "carry error")):
        assert D.diagnose_completion(texts[b], exs[b].target, b == 0) == label
        assert decode(tok, tt[b, :P2][tv[b, :P2]]) == f"diagnosis:{label}\n{exs[b].prompt}"
        # the completion keeps its relative positions: shifted by the extra privileged tokens
        extra = tv[b, :P2].sum() - batch["valid"][b, :P].sum()
        np.testing.assert_array_equal(tp[b, P2:][tv[b, P2:]], batch["positions"][b, P:][batch["valid"][b, P:]] + extra)
    ref = D.trace_annotate(batch, texts, exs, task, tok, args=D.TraceArgs(privileged_template="ref:{target}\n{prompt}"))
    assert decode(tok, ref["teacher_tokens"][0][ref["teacher_valid"][0]]).startswith(f"ref:{exs[0].target}\n")
    assert set(D.trace_annotate(batch, texts, exs, task, tok, args=D.TraceArgs(privileged_template="{prompt}"))) == \
        {"spans"}  # no privileged addition: the teacher reads the student's own input


def test_empty_privileged_addition_gives_the_students_logits_and_zero_kl(arith, student):
    """Teacher = the student's copy, template ``{prompt}``: with the student's own input the span KL is exactly 0;
    re-encoded and left-padded 5 columns wider, the teacher's logits at the completion positions still equal the
    student's (the alignment of :func:`distill._teacher_hidden`) and the KL is 0 up to float error."""
    tok, task, exs, texts, batch, P = arith
    args = D.TraceArgs(privileged_template="{prompt}", token_clip=None)
    mask = batch["loss_mask"][:, 1:]  # the shifted columns that score completion tokens
    wide = D.trace_privileged_inputs(batch, exs, ["correct"] * 2, tok, D.TraceArgs(privileged_template="{prompt}",
                                                                                  privileged_len=P + 5))
    assert wide["teacher_tokens"].shape[1] == batch["tokens"].shape[1] + 5
    graphdef, params = nnx.split(student)

    @jax.jit
    def go(p, same, padded):
        m = nnx.merge(graphdef, p)
        return (D._span_kl(m, m, same, args), D._span_kl(m, m, padded, args),
                m.logits(D._hidden(m, padded)), m.logits(D._teacher_hidden(m, padded)))  # [B, T-1, V]

    kl_same, kl, s, t = go(params, jax.tree.map(jnp.asarray, batch), jax.tree.map(jnp.asarray, {**batch, **wide}))
    assert float(jnp.max(jnp.abs(kl_same["fkl"]))) == 0.0 and float(jnp.max(jnp.abs(kl_same["rkl"]))) == 0.0
    np.testing.assert_allclose(np.asarray(t)[mask], np.asarray(s)[mask], atol=2e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(jnp.where(batch["loss_mask"], kl["fkl"], 0.0)))) < 1e-6
    assert float(jnp.max(jnp.abs(jnp.where(batch["loss_mask"], kl["rkl"], 0.0)))) < 1e-6


def test_label_changes_the_teacher_and_no_teacher_is_grpo(arith, student):
    """With the label in the teacher's prompt the span KL is positive; λ = 0 (no teacher passed, the self-teacher
    dropped) is the GRPO loss bit for bit, and an external-teacher run without its teacher is refused."""
    from jaxtok.train import objectives  # noqa: F401
    from jaxtok.train.objectives import policy_gradient as PG
    from jaxtok.train.rollout import score_tokens

    tok, task, exs, texts, batch, P = arith
    b = dict(batch, **D.trace_annotate(batch, texts, exs, task, tok, args=D.TraceArgs()))
    b["old_logprobs"], b["entropy"] = score_tokens(student, b, b["temperature"])
    b.update(rewards=np.array([1.0, 0.0], np.float32), group_ids=np.zeros(2, np.int32))
    graphdef, params = nnx.split(student)

    @jax.jit
    def go(p, b):
        m = nnx.merge(graphdef, p)
        kl = D._span_kl(m, m, b, D.TraceArgs(token_clip=None))  # unclipped: KL ≥ 0, > 0 where they differ
        with_teacher = D.trace_loss(m, b, None, D.TraceArgs(), teacher=m)
        dropped = D.trace_loss(m, b, None, D.TraceArgs())
        pg = PG.policy_gradient_loss(m, b, None, PG.PolicyGradientArgs(
            loss_mode="grpo", eps_low=0.2, eps_high=0.28, aggregation="seq-mean-token-mean"))
        return kl, with_teacher, dropped, pg

    kl, (ls_t, _, aux_t), (ls, c, aux), (ls_pg, c_pg, _) = go(params, jax.tree.map(jnp.asarray, b))
    routed = b["spans"] > 0
    assert routed.any() and float(jnp.min(jnp.where(routed, kl["fkl"] + kl["rkl"], 1.0))) > 0
    assert float(aux_t["kl_lambda"][0]) == 0.5 and float(aux_t["span_kl"][0]) != 0
    assert float(aux["kl_lambda"][0]) == 0.0 and float(aux["span_kl"][0]) == 0.0
    np.testing.assert_array_equal(np.asarray(ls), np.asarray(ls_pg))
    assert float(c) == float(c_pg)
    with pytest.raises(ConfigError, match="external"):
        D.trace_loss(student, b, None, D.TraceArgs(teacher="external"))


# ----------------------------------------------------------------------------------------------------------------
# configs: self-teacher by default, the external frozen teacher as the named variant


def test_self_and_external_teacher_configs(tmp_path):
    from pathlib import Path

    from jaxtok.config import load_config, validate_names

    repo = Path(__file__).resolve().parents[1]
    own = load_config(repo / "configs" / "distill" / "trace.yaml")
    ext = load_config(repo / "configs" / "distill" / "trace_external.yaml")
    st = SelfTeacher.of(validate_names(own))
    assert (st.every, st.end) == (10, 40) and own.rollout.teacher_init_from is None
    assert SelfTeacher.of(validate_names(ext)) is None and ext.rollout.teacher_init_from
    assert OBJECTIVES.parse_args("trace", ext.objective.args).privileged_template == "{prompt}"
    with pytest.raises(ConfigError, match="teacher: self"):  # a teacher run next to the self-teacher: refused
        validate_names(dataclasses.replace(own, rollout=dataclasses.replace(own.rollout, teacher_init_from="x")))
    with pytest.raises(ConfigError, match="teacher_init_from=None"):
        validate_names(dataclasses.replace(ext, rollout=dataclasses.replace(ext.rollout, teacher_init_from=None)))
    assert TEACHER in validate_names(own).spec.models


# ----------------------------------------------------------------------------------------------------------------
# the training loop: self-teacher by default, resume between syncs


@pytest.mark.slow
def test_loop_resume_between_syncs_matches_the_uninterrupted_run(tmp_path):
    """The loop with the default self-teacher (sync every 2 steps, λ > 0 for k < 5): a run killed after step 4
    resumes from its checkpoint after 3 updates (teacher θ_2 stored) and logs the same span KL, λ and loss for
    steps 4-6 as the uninterrupted run (the teacher of k = 3 is θ_2, not the restored θ_3), with bitwise equal
    final parameters; after λ reaches 0 the step runs without the teacher (span_kl 0)."""
    import json

    from jaxtok.config import from_dict, validate_names
    from jaxtok.train.loop import load_model, train

    cfg = from_dict({
        "model": {"preset": "tiny_student", "overrides": {"num_layers": 1}},
        "data": {"task": "arith", "task_args": {"digits": 1}, "prompt_len": 12, "seq_len": 24, "batch_size": 8,
                 "num_eval": 8},
        "objective": {"name": "trace", "args": {"hold_steps": 3, "decay_steps": 2, "teacher_sync_every": 2,
                                                "chunk_size": 64}},
        "optimizer": {"lr": 1e-3, "schedule": "constant"},
        "train": {"steps": 6, "log_every": 1, "eval_batches": 1, "checkpoint_every": 1, "keep_checkpoints": 10},
        "rollout": {"num_generations": 4, "max_new_tokens": 6},
        "decode": {"max_new_tokens": 6, "batch_size": 8},
        "run": {"progress": False},
    })
    validate_names(cfg)

    def records(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "loss" in r}  # the last record of each step

    train(cfg, tmp_path / "straight", final_eval=False)

    summary = interrupted_then_resumed(cfg, tmp_path / "resumed", 4)
    assert summary["resumed_from"] == 3
    a, b = records(tmp_path / "straight"), records(tmp_path / "resumed")
    # logged step s took k = s − 1: λ_k = 0.5 for k < 3, then 0.5, 0.25 and 0 from k = 5 (no teacher)
    assert [a[s]["kl_lambda"] for s in range(1, 7)] == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.25, 0.0])
    # the teacher is read while λ > 0 (the clipped per-vocabulary terms may sum below 0), never after
    assert all(a[s]["span_kl"] != 0 for s in range(1, 6)) and a[6]["span_kl"] == 0.0
    for k in (4, 5, 6):
        for key in ("loss", "span_kl", "kl_lambda", "grad_norm"):
            assert b[k][key] == a[k][key], (k, key)
    pa, pb = load_model(tmp_path / "straight")[0], load_model(tmp_path / "resumed")[0]
    assert _same(nnx.state(pa, nnx.Param), nnx.state(pb, nnx.Param))
