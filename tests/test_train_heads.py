"""Tests for jaxtok.decode.train_heads: SpecDec++/SpecKV records, losses, fitting and head files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtok.decode import draft_policies as dp
from jaxtok.decode import train_heads as th
from jaxtok.models import Decoder, ModelConfig

V = 8


@pytest.fixture(scope="module")
def models():
    cfg = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=8, max_position_embeddings=32)
    return Decoder(cfg, rngs=nnx.Rngs(0)), Decoder(cfg, rngs=nnx.Rngs(1))


PROMPT = np.array([[0, 4, 5, 6], [1, 2, 3, 4], [0, 0, 0, 7]], np.int32)
VALID = np.array([[False, True, True, True], [True] * 4, [False, False, False, True]])


def test_specdecpp_loss_hand_case_and_empty():
    """Uniform logits: every example costs log 2; a rejected example (y=0) weighs w=6, an accepted one 1."""
    head = lambda h: jnp.zeros(h.shape[:-1] + (2,))  # noqa: E731
    hidden = jnp.zeros((2, 3))
    assert float(th.specdecpp_loss(head, hidden, jnp.array([1.0, 0.0]))) == pytest.approx(np.log(2))
    sharp = lambda h: jnp.broadcast_to(jnp.array([0.0, np.log(3.0)]), h.shape[:-1] + (2,))  # P(accept) = 3/4  # noqa
    # y = [1, 0]: (−log .75 + 6·(−log .25)) / 7
    expected = (-np.log(0.75) - 6 * np.log(0.25)) / 7
    assert float(th.specdecpp_loss(sharp, hidden, jnp.array([1.0, 0.0]))) == pytest.approx(expected, rel=1e-5)
    assert float(th.specdecpp_loss(sharp, hidden, jnp.array([1.0, 0.0]), mask=jnp.zeros(2, bool))) == 0.0


def test_records_identical_drafter_accept_everything_and_differ_otherwise(models):
    target, draft = models
    kw = dict(max_new_tokens=5, rng=jax.random.key(0), stop_tokens=())
    same = th.specdecpp_examples(target, target, PROMPT, VALID, temperature=1.0, mix_ratio=0.0, **kw)
    assert same["hidden"].shape == (3 * 5, 16)
    np.testing.assert_allclose(same["label"], 1.0, atol=1e-5)
    other = th.specdecpp_examples(target, draft, PROMPT, VALID, temperature=1.0, mix_ratio=0.5, **kw)
    assert 0 < len(other["label"]) < 15  # mixing drops the positions where Z_t = X_t
    assert np.all((other["label"] >= 0) & (other["label"] <= 1)) and other["label"].min() < 1
    kv = th.speckv_examples(target, target, PROMPT, VALID, candidates=(1, 2), **kw)
    np.testing.assert_allclose(kv["rate"], 1.0)
    assert kv["inputs"].shape[1] == 6 and set(np.unique(kv["inputs"][:, 5])) <= {1.0, 2.0}
    np.testing.assert_allclose(kv["inputs"][:, 4], 0.0)  # comp_enc


def test_fit_save_load_round_trip(tmp_path):
    """The SpecKV predictor fits a linear target; the saved head reloads with identical outputs and serves the
    policy through ``head_path``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = (0.5 + 0.1 * x[:, 0]).astype(np.float32)
    head = dp.speckv_head(16)
    losses = th.fit_head(head, th.speckv_loss, {"inputs": x, "rate": y}, steps=150, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0]
    th.save_head(head, tmp_path / "kv", "speckv", hidden=16)
    again = th.load_head(tmp_path / "kv")
    np.testing.assert_allclose(again(jnp.asarray(x[:4])), head(jnp.asarray(x[:4])), rtol=1e-6)
    policy = dp.build_policy("speckv", {"head_path": str(tmp_path / "kv")})
    np.testing.assert_allclose(policy.predict(jnp.ones((1, 4))),
                               dp.speckv_predict(head, jnp.ones((1, 4)), (2, 4, 6, 8), 0), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="head_path"):
        th.load_head(tmp_path / "missing")
