"""Draft-length heads trained by ``jaxtok train`` (train/objectives/draft_heads.py, train/heads.py): SpecDec++/SpecKV
records, losses, fitting through the one train step, head files, and a head trained by ``jaxtok train`` loading in
``jaxtok decode`` through ``head_path``."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtok.decode import draft_policies as dp
from jaxtok.models import Decoder, ModelConfig
from jaxtok.models.heads import load_head, save_head, speckv_head
from jaxtok.train.heads import fit_head
from jaxtok.train.objectives import draft_heads as dh

V = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    cfg = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=8, max_position_embeddings=32)
    return Decoder(cfg, rngs=nnx.Rngs(0)), Decoder(cfg, rngs=nnx.Rngs(1))


PROMPT = np.array([[0, 4, 5, 6], [1, 2, 3, 4], [0, 0, 0, 7]], np.int32)
VALID = np.array([[False, True, True, True], [True] * 4, [False, False, False, True]])


def _ratio(out):
    loss_sum, count, _ = out
    return float(loss_sum) / float(count) if float(count) > 0 else 0.0


def test_specdecpp_loss_hand_case_and_empty():
    """Uniform logits: every example costs log 2; a rejected example (y=0) weighs w=6, an accepted one 1."""
    args = dh.SpecDecPPHeadArgs()
    head = lambda h: jnp.zeros(h.shape[:-1] + (2,))  # noqa: E731
    hidden = jnp.zeros((2, 3))
    batch = {"hidden": hidden, "label": jnp.array([1.0, 0.0])}
    assert _ratio(dh.specdecpp_loss(head, batch, None, args)) == pytest.approx(np.log(2))
    sharp = lambda h: jnp.broadcast_to(jnp.array([0.0, np.log(3.0)]), h.shape[:-1] + (2,))  # P(accept) = 3/4  # noqa
    # y = [1, 0]: (−log .75 + 6·(−log .25)) / 7
    expected = (-np.log(0.75) - 6 * np.log(0.25)) / 7
    assert _ratio(dh.specdecpp_loss(sharp, batch, None, args)) == pytest.approx(expected, rel=1e-5)
    loss_sum, count, _ = dh.specdecpp_loss(sharp, dict(batch, mask=jnp.zeros(2, bool)), None, args)
    assert float(loss_sum) == 0.0 and float(count) == 0.0  # the step reports 0 with zero gradient


def test_records_identical_drafter_accept_everything_and_differ_otherwise(models):
    target, draft = models
    kw = dict(max_new_tokens=5, rng=jax.random.key(0), stop_tokens=())
    same = dh.specdecpp_examples(target, target, PROMPT, VALID, temperature=1.0, mix_ratio=0.0, **kw)
    assert same["hidden"].shape == (3 * 5, 16)
    np.testing.assert_allclose(same["label"], 1.0, atol=1e-5)
    other = dh.specdecpp_examples(target, draft, PROMPT, VALID, temperature=1.0, mix_ratio=0.5, **kw)
    assert 0 < len(other["label"]) < 15  # mixing drops the positions where Z_t = X_t
    assert np.all((other["label"] >= 0) & (other["label"] <= 1)) and other["label"].min() < 1
    kv = dh.speckv_examples(target, target, PROMPT, VALID, candidates=(1, 2), **kw)
    np.testing.assert_allclose(kv["rate"], 1.0)
    assert kv["inputs"].shape[1] == 6 and set(np.unique(kv["inputs"][:, 5])) <= {1.0, 2.0}
    np.testing.assert_allclose(kv["inputs"][:, 4], 0.0)  # comp_enc


def test_fit_save_load_round_trip(tmp_path):
    """The SpecKV predictor fits a linear target through the one train step; the saved head reloads with identical
    outputs and serves the policy through ``head_path``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = (0.5 + 0.1 * x[:, 0]).astype(np.float32)
    head = speckv_head(16)
    loss = functools.partial(dh.speckv_loss, args=dh.SpecKVHeadArgs())
    losses = fit_head(head, loss, {"inputs": x, "rate": y}, steps=150, optimizer=optax.adam(1e-2))
    assert losses[-1] < 0.1 * losses[0]
    save_head(head, tmp_path / "kv", "speckv", hidden=16)
    again = load_head(tmp_path / "kv")
    np.testing.assert_allclose(again(jnp.asarray(x[:4])), head(jnp.asarray(x[:4])), rtol=1e-6)
    policy = dp.build_policy("speckv", {"head_path": str(tmp_path / "kv")})
    np.testing.assert_allclose(policy.predict(jnp.ones((1, 4))),
                               dp.speckv_predict(head, jnp.ones((1, 4)), (2, 4, 6, 8), 0), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="head_path"):
        load_head(tmp_path / "missing")
    with pytest.raises(ValueError, match="kind='speckv'"):  # a SpecKV head is not a SpecDec++ head
        dp.build_policy("specdecpp", {"head_path": str(tmp_path / "kv")})


@pytest.mark.slow
def test_jaxtok_train_head_then_decode_with_head_path(tmp_path):
    """``jaxtok train configs/heads/speckv.yaml`` on tiny random target/drafter runs writes a head into its run
    directory, which ``jaxtok decode ... head_path=<run dir>`` loads."""
    from jaxtok import cli
    from jaxtok.models import presets, save_checkpoint

    cfg = presets.get("tiny_draft", vocab_size=64)  # the task tokenizer's vocabulary fits in 64
    save_checkpoint(Decoder(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "target"))
    save_checkpoint(Decoder(cfg, rngs=nnx.Rngs(1)), str(tmp_path / "draft"))
    pair = [f"model.init_from={tmp_path / 'target'}", f"decode.draft_init_from={tmp_path / 'draft'}",
            "model.preset=tiny_draft", "decode.batch_size=8", "decode.max_new_tokens=8"]
    rc = cli.main(["train", str(ROOT / "configs/heads/speckv.yaml"), f"run.out_dir={tmp_path}", *pair,
                   "objective.args.prompts=16", "train.steps=4", "train.log_every=2", "data.batch_size=16"])
    assert rc == 0
    run = tmp_path / "speckv"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "speckv" and summary["examples"] > 0 and summary["step"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    head = load_head(run, kinds=("speckv",))
    assert head(jnp.ones((1, 6))).shape == (1, 1)
    rc = cli.main(["decode", str(ROOT / "configs/decode/spec_speckv.yaml"), f"run.out_dir={tmp_path}", *pair,
                   "run.name=dec", f"decode.policy_args.head_path={run}", "data.num_eval=8"])
    assert rc == 0
