"""Tests that need separate processes: 2 processes x 4 CPU devices joined by ``jax.distributed`` (gloo collectives)
give the same train step as one device; a training run killed at step k and resumed ends with the same
parameters as an uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from _worker import DEVICES_PER_PROCESS, run_steps, tiny_train_config

WORKER = str(Path(__file__).with_name("_worker.py"))
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_two_processes_equal_single_device(tmp_path):
    out = tmp_path / "mp.npz"
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, WORKER, "step", str(out), coordinator, "2", str(pid)],
                              env=_env(DEVICES_PER_PROCESS), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    ref_losses, ref_state = run_steps(None)
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5)
    ref_leaves = [np.asarray(x) for x in jax.tree.leaves(ref_state.params)]
    assert len(got.files) == len(ref_leaves) + 1
    for i, ref in enumerate(ref_leaves):
        np.testing.assert_allclose(got[f"arr_{i}"], ref, rtol=1e-5, atol=1e-6)


def _train_subprocess(run_dir, kill_at=None):
    args = [sys.executable, WORKER, "train", str(run_dir)] + ([str(kill_at)] if kill_at else [])
    return subprocess.run(args, env=_env(8), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    from jaxtok.train.loop import evaluate, load_model, train

    killed = _train_subprocess(tmp_path / "resumed", kill_at=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _train_subprocess(tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["resumed_from"] in (2, 4)  # the step-4 save may still be in flight

    train(tiny_train_config(), tmp_path / "straight", final_eval=False)
    a, meta_a = load_model(tmp_path / "resumed")
    b, meta_b = load_model(tmp_path / "straight")
    assert meta_a["step"] == meta_b["step"] == 6
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a finished run is not trained again (stage caching): the summary reports no new steps
    again = train(tiny_train_config(), tmp_path / "straight", final_eval=False)
    assert again["resumed_from"] == 6
    # evaluate() reloads the run's checkpoint and tokenizer and scores held-out greedy completions
    ev = evaluate(tiny_train_config(), tmp_path / "straight")
    assert ev["eval/num_examples"] == 8 and 0.0 <= ev["eval/exact_match"] <= 1.0
    assert json.loads((tmp_path / "straight" / "eval.json").read_text()) == ev
