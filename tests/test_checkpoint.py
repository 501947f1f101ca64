"""jaxtok.checkpoint: exact round trip (sharded), interrupted saves never replace the last good checkpoint,
corrupt or mismatched checkpoints are refused with a clear message."""

import errno
import glob
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok import checkpoint as C
from jaxtok import mesh as M
from jaxtok.models import Decoder, presets
from jaxtok.train.step import init_train_state

OPT = optax.adam(1e-3)


def _state(preset="tiny_draft", mesh=None, **overrides):
    model = Decoder(presets.get(preset, vocab_size=64, **overrides), rngs=nnx.Rngs(0))
    _, state = init_train_state(model, OPT, seed=3, mesh=mesh)
    return state


def _train_part(state):
    return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def _save(directory, step, state, data=None):
    with C.Checkpointer(directory) as ck:
        ck.save(step, params=state.params, train=_train_part(state), data=data or {"next_index": step},
                meta={"note": "x"})
    return directory


def _restore(directory, state):
    with C.Checkpointer(directory) as ck:
        return ck.restore(params=C.abstract_of(state.params), train=C.abstract_of(_train_part(state)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    state = _state()
    d = _save(tmp_path_factory.mktemp("ck") / "checkpoints", 2, state)
    return d, state


def _copy(saved, tmp_path):
    d, state = saved
    dst = tmp_path / "copy"
    shutil.copytree(d, dst)
    return dst, state


def test_round_trip_is_exact_and_keeps_shardings(tmp_path):
    mesh = M.make_mesh(2, 2, 2)
    state = _state(mesh=mesh)
    d = _save(tmp_path / "ck", 5, state, data={"next_index": 40})
    out = _restore(d, state)
    assert out["step"] == 5 and out["data"] == {"next_index": 40} and out["meta"]["note"] == "x"
    for a, b in zip(jax.tree.leaves((state.params, _train_part(state))), jax.tree.leaves((out["params"], out["train"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    with C.Checkpointer(d) as ck:
        assert ck.restore(params=C.abstract_of(state.params))["train"] is None


def test_keeps_max_to_keep_newest(tmp_path):
    state = _state()
    with C.Checkpointer(tmp_path / "ck", max_to_keep=2) as ck:
        for step in (1, 2, 3):
            ck.save(step, params=state.params)
    with C.Checkpointer(tmp_path / "ck") as ck:
        assert ck.steps() == [2, 3]


def test_leftover_temporary_directory_is_ignored(saved, tmp_path):
    d, state = _copy(saved, tmp_path)
    # what a process killed mid-save leaves behind: a half-written, never-renamed step directory
    tmp = d / "4.orbax-checkpoint-tmp-1234567"
    shutil.copytree(d / "2", tmp)
    for f in glob.glob(str(tmp / "params" / "**" / "manifest.ocdbt"), recursive=True):
        os.remove(f)
    with C.Checkpointer(d) as ck:
        assert ck.latest_step() == 2 and ck.steps() == [2]
        assert not tmp.exists()  # cleaned up on start
    assert _restore(d, state)["step"] == 2


def test_failed_save_does_not_replace_last_good(saved, tmp_path):
    d, state = _copy(saved, tmp_path)
    with pytest.raises(Exception):
        with C.Checkpointer(d) as ck:
            # the data item cannot be serialised: the save fails after the arrays were written
            ck.save(4, params=state.params, train=_train_part(state), data={"bad": object()})
            ck.wait()
    with C.Checkpointer(d) as ck:
        assert ck.steps() == [2]
    assert _restore(d, state)["step"] == 2


def _data_files(d, item):
    return [f for f in glob.glob(str(d / "2" / item / "**" / "d" / "*"), recursive=True) if os.path.isfile(f)]


def _truncate(d):
    for f in _data_files(d, "params"):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _flip_bytes(d):
    for f in _data_files(d, "params"):
        b = bytearray(open(f, "rb").read())
        b[len(b) // 2] ^= 0xFF
        open(f, "wb").write(bytes(b))


def _delete_data(d):
    for f in _data_files(d, "train"):
        os.remove(f)


def _delete_metadata(d):
    os.remove(d / "2" / "params" / "_METADATA")


@pytest.mark.parametrize("damage, match", [
    (_truncate, "corrupt|unreadable"),
    (_flip_bytes, "corrupt|unreadable"),
    (_delete_data, "corrupt|unreadable"),
    (_delete_metadata, "no readable 'params' item"),
])
def test_corrupt_checkpoint_is_refused(saved, tmp_path, damage, match):
    d, state = _copy(saved, tmp_path)
    damage(d)
    with pytest.raises(C.CheckpointError, match=match) as err:
        _restore(d, state)
    assert str(d / "2") in str(err.value)


def test_silently_changed_values_are_refused(saved, tmp_path):
    # storage that returns wrong values without an error: simulated by changing one save-time fingerprint
    d, state = _copy(saved, tmp_path)
    meta_file = d / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["fingerprints"]["params"]["embed_vd.value"] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(C.CheckpointError, match=r"\[params\] is corrupt: stored data of \['embed_vd.value'\]"):
        _restore(d, state)


def test_shape_mismatch_is_refused(saved):
    d, _ = saved
    bigger = _state("tiny_student")
    with pytest.raises(C.CheckpointError, match=r"embed_vd.value: shape \(64, 48\) in checkpoint, \(64, 96\) expected"):
        _restore(d, bigger)


def test_dtype_mismatch_is_refused(saved):
    d, _ = saved
    bf16 = _state(param_dtype="bfloat16")
    with C.Checkpointer(d) as ck, pytest.raises(C.CheckpointError, match="dtype float32 in checkpoint, bfloat16 expected"):
        ck.restore(params=C.abstract_of(bf16.params))


def test_missing_checkpoint_is_refused(tmp_path):
    with C.Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(C.CheckpointError, match="no committed checkpoint"):
            ck.restore(params={})
        with pytest.raises(C.CheckpointError, match="step 7 not found"):
            ck.read_meta(7)


# ------------------------------------------------------------------------------------------------------------
# Faults of a training run, through the CLI and the real loop (train/loop.py): Ctrl-C, resume marker, finished run,
# a damaged newest checkpoint, a full disk at a save.

TINY_RUN = """
model: {preset: tiny_draft}
data: {task: arith, task_args: {digits: 1}, seq_len: 16, prompt_len: 8, batch_size: 8, num_train: 64, num_eval: 8}
optimizer: {lr: 1.0e-2, schedule: constant}
train: {steps: 4, checkpoint_every: 2, log_every: 1, eval_batches: 1}
decode: {max_new_tokens: 4, batch_size: 8}
run: {progress: false, name: r}
"""


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_faults_through_the_cli(tmp_path, monkeypatch, capsys):
    from jaxtok import cli
    from jaxtok.train import loop

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    run = tmp_path / "r"

    def train(*overrides, log_level="INFO"):
        rc = cli.main(["--log-level", log_level, "train", str(config), f"run.out_dir={tmp_path}", *overrides])
        return rc, capsys.readouterr().err

    # Ctrl-C in step 4 (step 3 logged, not checkpointed): one line (above the INFO progress log, shown here at
    # WARNING), exit 130, the step-2 checkpoint committed, the lock released
    def interrupt(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setitem(cli.HANDLERS, "train", lambda cfg, d: loop.train(cfg, d, on_step=interrupt))
    rc, err = train(log_level="WARNING")
    assert rc == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "interrupted" in err and "step 2" in err
    assert C.Checkpointer(run / "checkpoints").steps() == [2] and not (run / "train.lock").exists()
    monkeypatch.delitem(cli.HANDLERS, "train")

    # resumed: metrics.jsonl marks where the redone steps start
    rc, err = train()
    assert rc == 0, err
    recs = _records(run)
    marks = [r for r in recs if r.get("event") == "resume"]
    assert marks == [{"step": 2, "time": marks[0]["time"], "event": "resume", "from_step": 2}]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == [1, 2, 3, 3, 4] and recs.index(marks[0]) == 3  # step 3 redone after the marker
    summary = (run / "summary.json").read_text()
    assert json.loads(summary)["resumed_from"] == 2 and "eval/exact_match" in json.loads(summary)
    evals = sum("eval/exact_match" in r for r in recs)

    # finished: nothing trained, evaluated or rewritten
    metrics = (run / "metrics.jsonl").read_text()
    rc, err = train()
    assert rc == 0 and "already finished at step 4" in err
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "summary.json").read_text() == summary
    assert sum("eval/exact_match" in r for r in _records(run)) == evals == 1

    # the newest checkpoint damaged: resume falls back to step 2, says so, and moves step 4 aside
    for f in glob.glob(str(run / "checkpoints" / "4" / "params" / "**" / "d" / "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    rc, err = train("train.steps=6")
    assert rc == 0, err
    assert "checkpoint step 4 is damaged" in err and "resumed" in err and "from step 2" in err
    assert _records(run)[-1]["step"] == 6
    assert [r for r in _records(run) if r.get("event") == "resume"][-1]["damaged_from_step"] == 4
    assert (run / "checkpoints-damaged" / "4").is_dir()
    assert C.Checkpointer(run / "checkpoints").steps() == [4, 6]

    # a full disk at a save: one line, exit 1, the last good checkpoint intact
    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.ocp.CheckpointManager, "save", no_space)
    rc, err = train("train.steps=10")
    last = err.strip().splitlines()[-1]  # after the "resumed ... from step 6" log line
    assert rc == 1 and last.startswith("jaxtok: error:") and "Traceback" not in err, err
    assert "No space left on device [ENOSPC]" in last and "step 8" in last and "step 6, is intact" in last
    monkeypatch.undo()
    assert C.Checkpointer(run / "checkpoints").steps() == [4, 6] and not (run / "train.lock").exists()


def test_fresh_start_over_a_run_needs_overwrite(tmp_path):
    from jaxtok.config import from_dict
    from jaxtok.registry import ConfigError
    from jaxtok.train.loop import train

    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    cfg = from_dict({"run": {"resume": False}, "train": {"steps": 3}, "optimizer": {"warmup_steps": 1}})
    with pytest.raises(ConfigError, match="run.overwrite=true"):
        train(cfg, tmp_path)
    assert (tmp_path / "checkpoints" / "3").is_dir() and not (tmp_path / "train.lock").exists()
