"""REFINE-style NSP RL (train/objectives/refine.py): positions, rewards, collector, loss, loop wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.config import from_dict
from jaxtok.data import sft_dataset
from jaxtok.models import Decoder, presets
from jaxtok.tasks import build_tokenizer, make_task
from jaxtok.train.objectives import refine


def test_smooth_is_a_zero_padded_moving_average():
    x = jnp.array([[3.0, 0.0, 3.0, 6.0]])
    np.testing.assert_allclose(refine.smooth(x, jnp.ones((1, 4), bool), 3), [[1.0, 2.0, 3.0, 3.0]], rtol=1e-6)
    # an even width uses width + 1; padding is zero and counted
    np.testing.assert_allclose(refine.smooth(x, jnp.array([[1, 1, 1, 0]], bool), 2), [[1.0, 2.0, 1.0, 1.0]],
                               rtol=1e-6)


def test_positions_one_per_chunk_clamped_and_argmax():
    T, C, k = 40, 4, 1
    valid = jnp.array([[True] * 32 + [False] * 8])
    ent = jnp.zeros((1, T)).at[0, 5].set(10.0).at[0, 17].set(10.0)
    s = refine.refine_positions(jax.random.key(0), ent, valid, n_chunks=C, k=k, mode="argmax", margin=0)
    np.testing.assert_array_equal(np.asarray(s)[0, [0, 2]], [6, 18])  # chunks of 8: peaks at 5 and 17 -> s = j + 1
    assert all(8 * c < int(v) <= 8 * (c + 1) for c, v in enumerate(np.asarray(s)[0]))
    s = refine.refine_positions(jax.random.key(0), ent, valid, n_chunks=C, k=5, mode="sample", margin=6)
    assert np.all((np.asarray(s) >= 6) & (np.asarray(s) <= 32 - 6))


def test_uniform_mode_gives_uniform_positions():
    T, n = 16, 4000
    valid = jnp.ones((n, T), bool)
    ent = jnp.tile(jnp.arange(T, dtype=jnp.float32), (n, 1))  # entropy must not matter
    s = np.asarray(refine.refine_positions(jax.random.key(1), ent, valid, n_chunks=2, k=1, mode="uniform",
                                           margin=0))
    counts = np.bincount(s[:, 0], minlength=T)[1:9]  # chunk 0 covers j in 0..7 -> s in 1..8
    expected = n / 8
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def test_rewards_hand_computed_and_bounded():
    h = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    hg = jnp.array([[[1.0, 0.0], [0.0, -1.0]]])
    y, yg = jnp.array([[4, 5]]), jnp.array([[4, 6]])
    np.testing.assert_allclose(refine.refine_rewards(h, hg, y, yg, "cosine"), [0.0], atol=1e-6)  # (1 + -1)/2
    np.testing.assert_allclose(refine.refine_rewards(h, hg, y, yg, "binary"), [0.5])
    np.testing.assert_allclose(refine.refine_rewards(h, hg, y, yg, "hybrid"), [0.5], atol=1e-6)
    r = refine.refine_rewards(jax.random.normal(jax.random.key(0), (50, 3, 8)),
                              jax.random.normal(jax.random.key(1), (50, 3, 8)), y[:, :1], yg[:, :1], "cosine")
    assert np.all(np.abs(np.asarray(r)) <= 1.0)
    with pytest.raises(ValueError, match="reward='nope'"):
        refine.refine_rewards(h, hg, y, yg, "nope")


@pytest.mark.slow
def test_collect_and_loss_on_a_tiny_model():
    tok = build_tokenizer()
    model = Decoder(presets.get("tiny_draft", vocab_size=tok.get_vocab_size()), rngs=nnx.Rngs(0))
    ds, _ = sft_dataset(make_task("arith", {"digits": 1}), "train", tok, seq_len=24, batch_size=2, num_examples=8)
    docs = next(iter(ds))
    settings = from_dict({}).rollout
    args = refine.RefineArgs(n_chunks=3, rollout_len=2, margin=2)
    ro = refine.collect_refine(model, docs, task=None, tokenizer=tok, settings=settings, rng=jax.random.key(0),
                               args=args)
    b = ro.batch
    T = docs["tokens"].shape[1]
    assert b["ro_tokens"].shape == (6, T + 2) and b["ro_advantages"].shape == (6,)
    np.testing.assert_allclose(b["ro_advantages"].reshape(2, 3).sum(1), 0.0, atol=1e-4)  # GRPO per document
    assert np.all(b["ro_old_logprobs"][:, :T] == 0) and np.all(b["ro_old_logprobs"][:, T:] < 0)
    assert 0.0 <= ro.info["rollout/sampler_abs_logp_diff"] < 1e-4  # sampler and trainer agree (no filters)

    @nnx.jit
    def loss_and_grads(m, batch):  # one compiled call (eager op-by-op dispatch took ~40 s)
        def f(m):
            loss, count, aux = refine.refine_loss(m, batch, jax.random.key(0), args)
            return loss, (count, aux)

        return nnx.value_and_grad(f, has_aux=True)(m)

    (loss, (count, aux)), grads = loss_and_grads(model, jax.tree.map(jnp.asarray, b))
    assert np.isfinite(float(loss)) and float(count) == 1.0
    # first pass: ratio 1, so the PG term is -mean(advantage) over rollout tokens = 0 for z-scored groups
    np.testing.assert_allclose(float(aux["pg_loss"][0]), 0.0, atol=1e-4)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow
def test_refine_through_the_training_loop(tmp_path):
    from jaxtok.train.loop import train

    cfg = from_dict({
        "model": {"preset": "tiny_draft"},
        "data": {"task": "arith", "task_args": {"digits": 1}, "seq_len": 24, "prompt_len": 10, "batch_size": 8,
                 "num_eval": 4},
        "objective": {"name": "refine", "args": {"n_chunks": 2, "rollout_len": 2, "margin": 2}},
        "optimizer": {"schedule": "constant"},
        "train": {"steps": 2, "log_every": 1, "eval_batches": 1},
        "decode": {"max_new_tokens": 8, "batch_size": 8},
        "run": {"progress": False},
    })
    summary = train(cfg, tmp_path / "run", final_eval=False)
    assert summary["step"] == 2 and np.isfinite(summary["train/loss"])
