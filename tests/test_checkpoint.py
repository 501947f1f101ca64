"""jaxtok.checkpoint: exact round trip (sharded), interrupted saves never replace the last good checkpoint,
corrupt or mismatched checkpoints are refused with a clear message."""

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
