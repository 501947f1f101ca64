"""train/step.py and the SFT objective: sharded == single device, token-weighted accumulation, no recompilation,
chunked float32 cross-entropy against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok import mesh as M
from jaxtok.models import Decoder, DecoderOutput
from jaxtok.train.objectives.sft import SFTArgs, chunked_token_stats, sft_loss, sft_metrics
from jaxtok.train.step import finalize_metrics, init_train_state, make_eval_step, make_train_step, split_model

from _worker import run_steps, tiny_batch, tiny_model_config, tiny_optimizer

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return run_steps(None)


def _assert_params_close(a, b, rtol=RTOL, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(reference, shape):
    ref_losses, ref_state = reference
    losses, state = run_steps(M.make_mesh(*shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    # the reported loss is the global token mean: Σ loss / Σ loss_mask of the unsharded objective
    loss_sum, count, _ = sft_loss(Decoder(tiny_model_config(), rngs=nnx.Rngs(0)), tiny_batch(0), None)
    assert float(count) == tiny_batch(0)["loss_mask"][:, 1:].sum()
    np.testing.assert_allclose(losses[0], float(loss_sum) / float(count), rtol=RTOL)
    _assert_params_close(state, ref_state)
    assert int(state.step) == 2
    # the state stays on its declared shardings after the donated update
    q = state.params["layers"][0]["attn"]["q_weight_dhn"].get_value()
    assert q.sharding.spec == M.logical_to_spec(("embed", "heads", "head_dim"), mesh=q.sharding.mesh, shape=q.shape)


def test_micro_batches_weigh_tokens_not_batches(reference):
    # tiny_batch has uneven response counts per row and a row with none, so a mean of per-micro-batch means would
    # differ from the full-batch token mean
    ref_losses, ref_state = reference
    losses, state = run_steps(None, micro_batches=4)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    _assert_params_close(state, ref_state)


def test_micro_batches_on_a_mesh(reference):
    ref_losses, ref_state = reference
    losses, state = run_steps(M.make_mesh(2, 2, 2), micro_batches=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    _assert_params_close(state, ref_state)


def test_second_call_does_not_recompile():
    traces = []

    def counting_loss(model, batch, rng):
        traces.append(1)
        return sft_loss(model, batch, rng)

    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    opt = tiny_optimizer()
    _, state = init_train_state(model, opt)
    step = make_train_step(model, opt, counting_loss)
    for i in range(3):
        state, _ = step(state, tiny_batch(i))
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_empty_selection_gives_zero_loss_and_no_update():
    model = Decoder(tiny_model_config(), rngs=nnx.Rngs(0))
    opt = optax.adam(1e-2)
    _, state = init_train_state(model, opt)
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    batch = dict(tiny_batch(), loss_mask=np.zeros((8, 12), bool))
    state, metrics = make_train_step(model, opt, sft_loss, donate=False)(state, batch)
    assert float(metrics["loss"]) == 0.0 and float(metrics["count"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0 and np.isfinite(float(metrics["token_accuracy"]))
    for a, b in zip(before, jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("count", [0.2, 1.0, 5.0])
def test_gradient_uses_the_reported_normaliser_for_any_positive_count(count):
    """The step reports ``Σ sum / Σ count`` and must apply the gradient of that same quantity, also for counts
    below 1 (fractional weights): with ``loss_sum = count · 3·scale`` the loss is ``3·scale`` whatever the count,
    so one SGD step (lr 1) moves ``scale`` by exactly −3 (a ``1/max(count, 1)`` gradient scale moved it by −0.6 at
    count 0.2)."""
    model = _NextTokenOracle(4)

    def loss_fn(m, batch, rng):
        del batch, rng
        return count * 3.0 * m.scale[...], jnp.asarray(count, jnp.float32), {}

    opt = optax.sgd(1.0)
    _, state = init_train_state(model, opt)
    state, metrics = make_train_step(model, opt, loss_fn, donate=False)(state, {"x": jnp.zeros((1,))})
    np.testing.assert_allclose(float(metrics["loss"]), 30.0, rtol=1e-6)
    np.testing.assert_allclose(float(state.params["scale"].get_value()), 10.0 - 3.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ SFT objective


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_cross_entropy_matches_full_log_softmax(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(10, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, 10), jnp.int32)
    mask = jnp.asarray(rng.random(10) < 0.6)
    logp = jax.nn.log_softmax(hidden @ w, axis=-1)
    expected = np.where(mask, -np.take_along_axis(np.asarray(logp), np.asarray(targets)[:, None], 1)[:, 0], 0.0)
    nll, correct = chunked_token_stats(lambda h: h @ w, hidden, targets, mask, chunk_size=chunk)
    np.testing.assert_allclose(nll, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(correct, np.asarray(mask) & (np.argmax(logp, -1) == np.asarray(targets)))
    # gradients through the rematerialised scan equal the unchunked ones
    g1 = jax.grad(lambda w: jnp.sum(chunked_token_stats(lambda h: h @ w, hidden, targets, mask, chunk_size=chunk)[0]))(w)
    g2 = jax.grad(lambda w: jnp.sum(jnp.where(mask, -jnp.take_along_axis(
        jax.nn.log_softmax(hidden @ w, -1), targets[:, None], 1)[:, 0], 0.0)))(w)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_label_smoothing_hand_case():
    # p = (1/4, 3/4), target 1: CE = -log 3/4; eps = 0.5 adds half of the mean of -log p
    logits = jnp.asarray([[0.0, np.log(3.0)]], jnp.float32)
    nll, _ = chunked_token_stats(lambda h: h, logits, jnp.asarray([1]), jnp.asarray([True]), chunk_size=4,
                                 label_smoothing=0.5)
    expected = 0.5 * -np.log(0.75) + 0.5 * 0.5 * (-np.log(0.25) - np.log(0.75))
    np.testing.assert_allclose(float(nll[0]), expected, rtol=1e-6)


class _NextTokenOracle(nnx.Module):
    """Predicts token+1 (mod V) at every position: hidden = one-hot(token+1), logits = 10·hidden."""

    def __init__(self, vocab: int):
        self.scale = nnx.Param(jnp.asarray(10.0))
        self.vocab = vocab

    def __call__(self, tokens, *, positions=None, valid=None, return_logits=True, return_hidden=False):
        hidden = jax.nn.one_hot((tokens + 1) % self.vocab, self.vocab)
        return DecoderOutput(logits=None, hidden=hidden, cache=None)

    def logits(self, hidden):
        return hidden * self.scale[...]


def test_sft_metrics_exact_match_hand_case():
    tokens = np.array([[1, 2, 3, 4, 5],    # every response token = previous + 1 -> exact
                       [1, 2, 3, 9, 5],    # response token 9 is not 3 + 1 -> not exact
                       [1, 2, 3, 4, 5]])   # no response tokens: not counted
    loss_mask = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    out = sft_metrics(_NextTokenOracle(16), {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask)},
                      SFTArgs(chunk_size=4))
    assert [float(v) for v in out["exact_match"]] == [1.0, 2.0]
    assert [float(v) for v in out["token_accuracy"]] == [4.0, 6.0]  # row 1: tokens 9 and 5 are mispredicted
    eval_step = make_eval_step(_NextTokenOracle(16), lambda m, b: sft_metrics(m, b, SFTArgs(chunk_size=4)))
    model = _NextTokenOracle(16)
    _, params, rest = split_model(model)
    pairs = [eval_step(params, rest, {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask)})] * 2
    final = finalize_metrics(pairs)
    assert final["exact_match"] == pytest.approx(0.5) and final["token_accuracy"] == pytest.approx(4 / 6)


def test_sft_args_validation():
    with pytest.raises(ValueError, match="chunk_size=0"):
        SFTArgs(chunk_size=0)
    with pytest.raises(ValueError, match="label_smoothing=1.0"):
        SFTArgs(label_smoothing=1.0)
