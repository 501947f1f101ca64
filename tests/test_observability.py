"""Watching a run (issue 19 item 3): the loop's start-up summary and phases, metrics rows with lr / step time /
tokens/s, TensorBoard event files, the W&B and profiler switches and their config checks; the learning rate
logged is the one the optimizer applied; a base config's objective/policy arguments do not leak into another
objective (item 4)."""

import json
import logging
import struct
import sys
import types

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from jaxtok import cli, observe
from jaxtok.config import build_optimizer, build_schedule, from_dict, learning_rate, load_config
from jaxtok.registry import ConfigError


def _tb_scalars(logdir):
    """``{tag: [(step, value)]}`` read back from tensorboardX event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    out: dict = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


# ----------------------------------------------------------------------------------------------------------------
# One short training run: summary, phases, metrics rows, TensorBoard


@pytest.mark.slow
def test_short_run_logs_summary_phases_metrics_and_tensorboard(tmp_path, caplog, monkeypatch):
    from jaxtok import checkpoint
    from jaxtok.metrics import read_jsonl
    from jaxtok.train.loop import train

    # checkpoints are not what this test watches (tests/test_checkpoint.py, the loop tests): the final save's
    # first orbax write costs seconds on a 2-core box
    monkeypatch.setattr(checkpoint.Checkpointer, "save", lambda self, step, **items: False)

    cfg = from_dict({
        "model": {"preset": "tiny_student", "overrides": {"num_layers": 1}},
        "data": {"task": "arith", "task_args": {"digits": 1}, "seq_len": 24, "batch_size": 8, "num_eval": 8},
        "optimizer": {"lr": 1e-3, "schedule": "warmup_cosine", "warmup_steps": 1},
        "train": {"steps": 3, "log_every": 1, "eval_at_start": True, "eval_batches": 1},
        "decode": {"max_new_tokens": 4, "batch_size": 8},
        "run": {"progress": False, "tensorboard": True},
    })
    with caplog.at_level(logging.INFO, logger="jaxtok"):
        train(cfg, tmp_path, final_eval=False)
    messages = [r.getMessage() for r in caplog.records]
    summaries = [m for m in messages if m.startswith("build: done")]
    assert len(summaries) == 1, messages
    for label in ("model", "parameters", "mesh", "device", "data", "task arith", "objective  sft", "steps",
                  "run dir", "tensorboard/", "resumed    no"):
        assert label in summaries[0], (label, summaries[0])
    assert any(m.startswith("compile: first step 1 took") for m in messages), messages
    assert any(m.startswith("train: steps 1..3 done") for m in messages), messages
    assert any(m.startswith("step 3/3:") and "ETA" in m for m in messages), messages  # progress off: log lines

    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0]  # train.eval_at_start: the starting model, before step 1
    assert any(m.startswith("eval: held-out evaluation at step 0") for m in messages), messages
    schedule = build_schedule(cfg.optimizer, cfg.train.steps)
    for r in rows:
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)))
        assert r["step_time_s"] > 0
    assert rows[0]["lr"] == 0.0  # warm-up from 0: the first update uses schedule(0)
    assert rows[0]["compile_s"] == rows[0]["step_time_s"] and rows[0]["tokens_per_s"] is None  # compile only
    assert all(r["tokens_per_s"] > 0 and "compile_s" not in r for r in rows[1:])
    assert rows[1]["step_time_s"] < rows[0]["compile_s"]

    scalars = _tb_scalars(tmp_path / observe.TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in rows])
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3]
    assert [s for s, _ in scalars["train/tokens_per_s"]] == [2, 3]  # the compile-only row has none
    assert [s for s, _ in scalars["eval/exact_match"]] == [0]


# ----------------------------------------------------------------------------------------------------------------
# The logged learning rate is the optimizer's


@pytest.mark.parametrize("name,schedule", [("adamw", "warmup_cosine"), ("sgd", "linear"), ("adam", "cosine")])
def test_logged_lr_is_the_rate_the_optimizer_applied(name, schedule):
    # constant unit gradients on zero parameters: sgd's update is -lr; adam's first moment / root second moment
    # is 1 with bias correction, so its update is -lr too (up to eps) - at every step, warm-up included
    cfg = from_dict({"optimizer": {"name": name, "schedule": schedule, "warmup_steps": 3, "lr": 0.1, "b1": 0.0,
                                   "weight_decay": 0.0, "grad_clip": 0.0, "eps": 1e-12},
                     "train": {"steps": 12}})
    opt = build_optimizer(cfg.optimizer, cfg.train.steps)
    sched = build_schedule(cfg.optimizer, cfg.train.steps)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.ones(3)}
    state = opt.init(params)
    lrs = []
    for step in range(1, cfg.train.steps + 1):  # step k: the update that makes the train state's step k
        updates, state = opt.update(grads, state, params)
        lr = learning_rate(sched, step)
        chex.assert_trees_all_close(updates, {"w": jnp.full(3, -lr)}, rtol=1e-5, atol=1e-7)
        lrs.append(lr)
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.1)  # warm-up from 0 to the peak
    assert learning_rate(optax.constant_schedule(0.5), 7) == 0.5


def test_build_optimizer_uses_build_schedule():
    # the optimizer's numerics are unchanged by the refactor: the same schedule object values, step by step
    cfg = from_dict({"optimizer": {"schedule": "warmup_cosine", "warmup_steps": 2}, "train": {"steps": 6}})
    sched = build_schedule(cfg.optimizer, 6)
    expected = optax.warmup_cosine_decay_schedule(0.0, cfg.optimizer.lr, 2, 6, end_value=cfg.optimizer.lr * 0.1)
    chex.assert_trees_all_close([sched(i) for i in range(7)], [expected(i) for i in range(7)])


# ----------------------------------------------------------------------------------------------------------------
# Sinks and the profiler window


def test_observer_feeds_sinks_scalars_and_drops_a_failing_sink(tmp_path, caplog):
    class Recorder:
        def __init__(self):
            self.got, self.closed = [], False

        def write(self, step, values):
            self.got.append((step, observe.scalars(values)))

        def close(self):
            self.closed = True

    class Broken(Recorder):
        def write(self, step, values):
            raise OSError("disk full")

    rec, broken = Recorder(), Broken()
    with observe.Observer(tmp_path, [broken, rec]) as obs:
        with caplog.at_level(logging.WARNING, logger="jaxtok"):
            obs.write(1, {"loss": 2.0, "lr": 1e-3, "tokens_per_s": None, "rollout/reward_mean": 0.5, "tag": "x"})
        obs.write(1, {"event": "resume", "from_step": 1})
        obs.write(2, {"eval/exact_match": 0.25})
    assert rec.got == [(1, {"train/loss": 2.0, "train/lr": 1e-3, "rollout/reward_mean": 0.5}), (1, {}),
                       (2, {"eval/exact_match": 0.25})]
    assert rec.closed and "Broken failed" in caplog.text
    assert [r["step"] for r in obs.jsonl.read()] == [1, 1, 2]  # metrics.jsonl gets everything
    off = observe.Observer(tmp_path / "other", [Recorder()], enabled=False)
    assert off.write(1, {"loss": 1.0}) is None and off.sinks == [] and not (tmp_path / "other").exists()


def test_wandb_sink_through_a_stand_in_module(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = from_dict({"run": {"wandb": {"project": "p", "tags": ["a"]}}})
    obs = observe.open_observer(cfg, tmp_path)
    obs.write(5, {"loss": 1.5, "event_note": "x"})
    obs.close()
    init = calls[0][1]
    assert init["project"] == "p" and init["tags"] == ["a"] and init["name"] == tmp_path.name
    assert init["resume"] == "allow" and init["id"] == (tmp_path / observe.WANDB_ID_FILE).read_text().strip()
    assert init["config"]["run"]["wandb"] == {"project": "p", "tags": ["a"]}
    assert calls[1:] == [("log", {"train/loss": 1.5}, 5), ("finish",)]
    observe.open_observer(cfg, tmp_path).close()  # a resumed run continues the same W&B run id
    assert calls[3][1]["id"] == init["id"]


def test_profile_window_traces_the_steps_it_names(tmp_path):
    f = jax.jit(lambda x: x * 2)
    win = observe.ProfileWindow([2, 3], tmp_path)
    for step in range(1, 5):
        win.before_step(step)
        assert win.active == (2 <= step <= 3)
        y = f(jnp.ones(2))
        win.after_step(step, y)
    assert not win.active
    assert list((tmp_path / observe.PROFILE_DIR).rglob("*.xplane.pb"))
    late = observe.ProfileWindow([2, 3], tmp_path / "late", start=5)  # resumed past the window: nothing
    for step in range(6, 8):
        late.before_step(step)
        assert not late.active
    assert not (tmp_path / "late").exists()


# ----------------------------------------------------------------------------------------------------------------
# Config keys: validated, exit 2 naming the key


@pytest.mark.parametrize("overrides,match", [
    (["run.wandb.project=demo"], r"run\.wandb: .*needs the wandb package.*pip install wandb"),
    (["run.wandb.entity=me"], r"run\.wandb=.*needs a project name"),
    (["run.wandb.projekt=x"], r"run\.wandb\.projekt: unknown key; allowed keys of run\.wandb"),
    (["run.profile_steps=[3]"], r"run\.profile_steps=\[3\]: \[first, last\]"),
    (["run.profile_steps=[4,2]"], r"run\.profile_steps=\[4, 2\]"),
    (["run.profile_steps=[0,2]"], r"run\.profile_steps=\[0, 2\]"),
    (["run.profile_steps=[20,30]", "train.steps=10"], r"starts after the last step \(train\.steps=10\)"),
    (["run.tensorboard=maybe"], r"run\.tensorboard"),
])
def test_observability_keys_are_checked(tmp_path, overrides, match, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    if "wandb" in overrides[0]:
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 50}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


def test_missing_tensorboardx_is_an_exit_2_naming_the_key(tmp_path, monkeypatch, capsys):
    import jaxtok.config as config

    real = config._find_spec
    monkeypatch.setattr(config, "_find_spec", lambda name: None if name == "tensorboardX" else real(name))
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 5}\n")
    assert cli.main(["validate", str(path), "run.tensorboard=true"]) == 2
    err = capsys.readouterr().err
    assert "run.tensorboard=true" in err and "pip install 'jaxtok[tensorboard]'" in err and "Traceback" not in err
    assert cli.main(["validate", str(path), "run.profile_steps=[1,2]", "run.tensorboard=false"]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Item 4: a changed name drops the base file's arguments


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_changed_objective_name_drops_the_base_files_objective_args(tmp_path):
    _write(tmp_path / "base.yaml", "objective: {name: mdlm, args: {scope: response, shift_logits: true}}\n"
                                   "train: {steps: 7}\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\nobjective: {name: sft}\n")
    cfg = load_config(child)
    assert cfg.objective.name == "sft" and dict(cfg.objective.args) == {} and cfg.train.steps == 7
    # a new name with arguments of its own: only those (not merged with the old objective's)
    other = _write(tmp_path / "other.yaml", "base: base.yaml\nobjective: {name: sft, args: {chunk_size: 64}}\n")
    assert dict(load_config(other).objective.args) == {"chunk_size": 64}
    # the same name: the arguments merge as every other key does
    same = _write(tmp_path / "same.yaml", "base: base.yaml\nobjective: {name: mdlm, args: {tail: eos}}\n")
    assert dict(load_config(same).objective.args) == {"scope": "response", "shift_logits": True, "tail": "eos"}
    # arguments given without a name belong to the default objective (sft)
    _write(tmp_path / "unnamed.yaml", "objective: {args: {chunk_size: 32}}\n")
    renamed = _write(tmp_path / "renamed.yaml", "base: unnamed.yaml\nobjective: {name: mdlm}\n")
    assert dict(load_config(renamed).objective.args) == {}
    kept = _write(tmp_path / "kept.yaml", "base: unnamed.yaml\nobjective: {name: sft}\n")
    assert dict(load_config(kept).objective.args) == {"chunk_size": 32}


def test_changed_decode_policy_and_task_drop_their_base_args(tmp_path):
    _write(tmp_path / "base.yaml", "decode: {method: diffusion, policy: threshold, policy_args: {threshold: 0.5}}\n"
                                   "data: {task: arith, task_args: {digits: 2}}\n")
    child = _write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\ndecode: {policy: llada}\n"
                                                    "data: {task: sort}\n")
    cfg = load_config(child)
    assert (cfg.decode.policy, dict(cfg.decode.policy_args)) == ("llada", {})
    assert (cfg.data.task, dict(cfg.data.task_args)) == ("sort", {})
    assert cfg.decode.method == "diffusion"  # the section's other keys still merge
    # a chain of bases: the rule applies between each layer
    grand = _write(tmp_path / "grand.yaml", "base: sub/child.yaml\ndecode: {policy_args: {steps: 4}}\n")
    assert dict(load_config(grand).decode.policy_args) == {"steps": 4}


def test_summary_formatting():
    assert observe.fmt_count(215_360) == "215k" and observe.fmt_count(1_234_567) == "1.23M"
    assert observe.fmt_duration(75.2) == "1:15" and observe.fmt_duration(3725) == "1:02:05"
    text = observe.startup_summary([("model", "x"), ("run dir", "y")], "title:")
    assert text == "title:\n  model    x\n  run dir  y"


def test_overwrite_removes_the_dashboards_of_the_replaced_run(tmp_path):
    from jaxtok import rundir

    (tmp_path / observe.TENSORBOARD_DIR).mkdir()
    (tmp_path / observe.PROFILE_DIR).mkdir()
    (tmp_path / observe.WANDB_ID_FILE).write_text("abc\n")
    assert set(rundir.holds_run(tmp_path)) == {observe.TENSORBOARD_DIR, observe.PROFILE_DIR, observe.WANDB_ID_FILE}
    cfg = from_dict({"run": {"resume": False, "overwrite": True}})
    rundir.check_fresh_start(cfg, tmp_path)  # a new run: new event files, a new W&B run id
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_of_a_resumed_run_purges_the_redone_steps(tmp_path):
    from tensorboardX.proto import event_pb2

    cfg = from_dict({"run": {"tensorboard": True}})
    with observe.open_observer(cfg, tmp_path) as obs:
        for step in (1, 2, 3):
            obs.write(step, {"loss": float(step)})
    with observe.open_observer(cfg, tmp_path, start=1) as obs:  # resumed from step 1: steps 2, 3 are redone
        obs.write(2, {"loss": 20.0})
    starts = []  # the file-version event that opens each writer's events (one file per writer and second)
    for path in (tmp_path / observe.TENSORBOARD_DIR).glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            if event.file_version:
                starts.append(event.step)
    assert sorted(starts) == [0, 2]  # the resumed writer's: TensorBoard drops older events of steps >= 2
    assert _tb_scalars(tmp_path / observe.TENSORBOARD_DIR)["train/loss"][-1] == (2, 20.0)
