"""Subprocess entry point for the multi-process and kill-and-resume tests (not a test module).

    python tests/_worker.py step <out.npz> <coordinator> <num_processes> <process_id>
        one of N processes (4 CPU devices each) joined with jax.distributed; runs two sharded train steps on the
        global (2, 2, 2) mesh and writes the losses and gathered parameters (process 0).
    python tests/_worker.py train <run_dir> [kill_at]
        trains the tiny config of :func:`tiny_train_config`; with ``kill_at`` the process SIGKILLs itself right
        after that step.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

DEVICES_PER_PROCESS = 4


def tiny_model_config():
    from jaxtok.models import ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                       head_dim=8, qk_norm=True)


def tiny_batch(seed: int = 0, batch: int = 8, length: int = 12) -> dict:
    """Random tokens with an uneven response mask (one row has no response token at all)."""
    rng = np.random.default_rng(seed)
    loss_mask = rng.random((batch, length)) < 0.5
    loss_mask[3] = False
    return {"tokens": rng.integers(0, 64, (batch, length)).astype(np.int32),
            "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
            "valid": np.ones((batch, length), bool), "loss_mask": loss_mask}


def tiny_optimizer():
    import optax

    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))


def run_steps(mesh, num_steps: int = 2, micro_batches: int = 1):
    """Losses and final params of ``num_steps`` SFT steps of the tiny model on ``tiny_batch`` (seeded)."""
    from flax import nnx

    from jaxtok.mesh import put_batch
    from jaxtok.models import Decoder
    from jaxtok.train.objectives.sft import sft_loss
    from jaxtok.train.step import init_train_state, make_train_step

    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    opt = tiny_optimizer()
    _, state = init_train_state(model, opt, mesh=mesh)
    step = make_train_step(model, opt, sft_loss, mesh=mesh, micro_batches=micro_batches)
    losses = []
    for i in range(num_steps):
        state, metrics = step(state, put_batch(tiny_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, state


def tiny_train_config(**train):
    from jaxtok.config import from_dict

    return from_dict({
        "model": {"preset": "tiny_draft"},
        "data": {"task": "arith", "task_args": {"digits": 1}, "seq_len": 16, "prompt_len": 8, "batch_size": 8,
                 "num_train": 64, "num_eval": 8},
        "optimizer": {"lr": 1e-2, "warmup_steps": 1},
        "train": dict({"steps": 6, "checkpoint_every": 2, "log_every": 1, "eval_batches": 1}, **train),
        "decode": {"max_new_tokens": 4, "batch_size": 8},
        "run": {"progress": False},
    })


def main(argv):
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    mode = argv[1]
    if mode == "step":
        out, coordinator, n, pid = argv[2], argv[3], int(argv[4]), int(argv[5])
        from jax.experimental import multihost_utils

        from jaxtok.mesh import initialize_distributed, make_mesh

        os.environ.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(pid))
        assert initialize_distributed(None)
        assert jax.process_count() == n and jax.local_device_count() == DEVICES_PER_PROCESS
        losses, state = run_steps(make_mesh(2, 2, 2))
        leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(state.params)]
        if pid == 0:
            np.savez(out, losses=np.asarray(losses), *leaves)
        jax.distributed.shutdown()
    elif mode == "train":
        from jaxtok.train.loop import train

        kill_at = int(argv[3]) if len(argv) > 3 else None

        def on_step(step, metrics):
            if step == kill_at:
                jax.block_until_ready(metrics)
                os.kill(os.getpid(), signal.SIGKILL)

        train(tiny_train_config(), argv[2], on_step=on_step, final_eval=False)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def interrupted_then_resumed(cfg, run_dir, at_step: int) -> dict:
    """Train ``cfg`` into ``run_dir``, interrupted (KeyboardInterrupt) right after step ``at_step``, then train again
    in the same directory; returns the resumed run's summary (``resumed_from`` = the last checkpoint kept)."""
    import pytest

    from jaxtok.train.loop import train

    def die(step, metrics):
        if step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir, on_step=die, final_eval=False)
    return train(cfg, run_dir, final_eval=False)


if __name__ == "__main__":
    main(sys.argv)
